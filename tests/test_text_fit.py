"""Text teachers through `dimo fit`: the prompt prefix in training, the text DataModules, predict / export, configs."""

from __future__ import annotations

import pytest
import torch
from fixtures.text_layouts import save_tiny_llada, save_tiny_mdlm

from dimo_lightning.core.conditions import PrefixCondition
from dimo_lightning.inference.one_step import StudentInput, TokenSampling, remask_sample, student_sample
from dimo_lightning.teachers.llada import LLaDATeacher
from dimo_lightning.teachers.mdlm import MDLMTeacher

PROMPTS = ["Hello world!", "The quick brown fox", ""]  # "" is an unconditional row


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    mdlm, gpt2 = save_tiny_mdlm(root)
    return {"mdlm": (mdlm, gpt2), "llada": save_tiny_llada(root / "LLaDA-8B-Instruct")}


@pytest.fixture(scope="module")
def teachers(folders):
    mdlm, gpt2 = folders["mdlm"]
    return {"mdlm": MDLMTeacher(str(mdlm), tokenizer=str(gpt2)),
            "llada": LLaDATeacher(str(folders["llada"]), seq_len=16, block_length=4)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the prefix in the one step ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_student_draws_and_remasks_keep_the_prompt(teachers, name):
    teacher = teachers[name]
    cond = teacher.encode_condition(PROMPTS)
    assert cond.fixed[0].any() and not cond.fixed[2].any()
    student = teacher.network  # the teacher's own network stands in for the student (same call)
    x, z = student_sample(teacher, student, cond, StudentInput(0.6, 0.1), TokenSampling(), gen(), "cpu")
    assert z.shape == (3, 16, teacher.logit_width)
    assert torch.equal(x[cond.fixed], cond.tokens[cond.fixed])
    x_t, mask, ratio = remask_sample(teacher, x, cond, "cosine", gen(1))
    assert torch.equal(x_t[cond.fixed], cond.tokens[cond.fixed])  # never masked ...
    assert not (mask & cond.fixed).any()  # ... and never in the loss
    assert torch.equal(x_t[mask], torch.full_like(x_t[mask], teacher.mask_id))
    assert torch.equal(x_t[~mask], x[~mask]) and ratio.shape == (3,)


def test_remask_of_an_image_sample_is_the_plain_remask(tiny_teacher):
    from dimo_lightning.core.masking import remask

    codes = torch.randint(0, tiny_teacher.codebook_size, (4, tiny_teacher.seq_len), generator=gen())
    labels = torch.tensor([0, 1, 2, 3])
    ours = remask_sample(tiny_teacher, codes, labels, "cosine", gen(5), [0.1, 0.9])
    plain = remask(codes, "cosine", tiny_teacher.mask_id, gen(5), [0.1, 0.9])
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)
