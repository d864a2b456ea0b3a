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
            "llada": LLaDATeacher(str(folders["llada"]), seq_len=16, block_length=8)}


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
    assert all(isinstance(t, str) for t in teacher.decode_text(x))
    pairs = teacher.split_text(x, cond)
    assert [p for p, _ in pairs][2] == ""
    sampled = teacher.sample(cond, steps=2, generator=gen(2))  # the teacher's own decoding keeps the prompt too
    assert torch.equal(sampled[cond.fixed], cond.tokens[cond.fixed]) and int(sampled.max()) < teacher.mask_id


def test_remask_of_an_image_sample_is_the_plain_remask(tiny_teacher):
    from dimo_lightning.core.masking import remask

    codes = torch.randint(0, tiny_teacher.codebook_size, (4, tiny_teacher.seq_len), generator=gen())
    labels = torch.tensor([0, 1, 2, 3])
    ours = remask_sample(tiny_teacher, codes, labels, "cosine", gen(5), [0.1, 0.9])
    plain = remask(codes, "cosine", tiny_teacher.mask_id, gen(5), [0.1, 0.9])
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


# ---- DataModules ----------------------------------------------------------------------------------------------------
def test_unconditional_text_data_is_resumable_and_encodes_to_unprompted_rows(teachers):
    from dimo_lightning.data.text import UnconditionalTextDataModule

    data = UnconditionalTextDataModule(batch_size=3, batches_per_epoch=4, predict_samples=5)
    loader = data.train_dataloader()
    batches = [b.conditions for b in loader]
    assert [b.tolist() for b in batches[:2]] == [[0, 1, 2], [3, 4, 5]]
    state = loader.state_dict()
    resumed = UnconditionalTextDataModule(batch_size=3, batches_per_epoch=4).train_dataloader()
    resumed.load_state_dict(state)
    assert next(iter(resumed)).conditions.tolist() == [12, 13, 14]  # the batch after the last one trained on
    cond = teachers["mdlm"].encode_condition(batches[0])
    assert isinstance(cond, PrefixCondition) and cond.batch_size == 3 and not cond.fixed.any()
    assert data.evaluation_conditions(4).tolist() == [0, 1, 2, 3]
    predict = list(data.predict_dataloader())
    assert [b["index"].tolist() for b in predict] == [[0, 1, 2], [3, 4]]


@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_prompt_data_encodes_with_a_sequence_teacher(teachers, name, tmp_path):
    from dimo_lightning.data.prompts import PromptDataModule

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(p for p in PROMPTS if p) + "\n")
    data = PromptDataModule(train_prompts=str(path), eval_prompts=str(path), batch_size=2, batches_per_epoch=1)
    batch = next(iter(data.train_dataloader()))
    cond = teachers[name].encode_condition(batch.conditions)
    assert cond.batch_size == 2 and cond.fixed.any(dim=1).all()
    assert teachers[name].encode_condition(data.evaluation_conditions(3)).batch_size == 3


# ---- `dimo fit` / predict / export through the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge(folders, tmp_path_factory):
    """A random 1-layer GPT-2 over the tiny GPT-2-style tokenizer (the judge of the text metrics)."""
    from fixtures.text_layouts import save_gpt2_style_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("judge")
    tokenizer = save_gpt2_style_tokenizer(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return str(folder)


def teacher_entry(name: str, folders) -> dict:
    if name == "mdlm":
        mdlm, gpt2 = folders["mdlm"]
        return {"class_path": "dimo_lightning.teachers.mdlm.MDLMTeacher",
                "init_args": {"checkpoint": str(mdlm), "tokenizer": str(gpt2)}}
    return {"class_path": "dimo_lightning.teachers.llada.LLaDATeacher",
            "init_args": {"checkpoint": str(folders["llada"]), "seq_len": 16, "block_length": 8, "dtype": "float32"}}


def fit_config(name: str, prompted: bool, folders, judge: str, root, steps: int = 2) -> dict:
    """A tiny `dimo fit` config: the teacher, a few generator steps, TextMonitor + TextEvaluationReport."""
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(p for p in PROMPTS if p) + "\n")
    data = ({"class_path": "dimo_lightning.data.prompts.PromptDataModule",
             "init_args": {"train_prompts": str(prompts), "eval_prompts": str(prompts), "batch_size": 2,
                           "batches_per_epoch": 3, "predict_samples": 3}} if prompted else
            {"class_path": "dimo_lightning.data.text.UnconditionalTextDataModule",
             "init_args": {"batch_size": 2, "batches_per_epoch": 3, "predict_samples": 3}})
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": -1, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "text"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"filename": "last", "save_top_k": 1, "enable_version_counter": False}},
                {"class_path": "dimo_lightning.evaluation.callbacks.text_monitor.TextMonitor",
                 "init_args": {"every_n_generator_steps": 1, "num_samples": 4, "batch_size": 2, "judge": judge,
                               "num_text_samples": 2, "subset_size": 4}},
                {"class_path": "dimo_lightning.evaluation.callbacks.text_evaluation_report.TextEvaluationReport",
                 "init_args": {"num_samples": 4, "teacher_steps": [2], "batch_size": 2, "judge": judge,
                               "num_text_samples": 2, "subset_size": 4}},
                {"class_path": "dimo_lightning.inference.text_writer.TextSampleWriter",
                 "init_args": {"output_dir": str(root / "predictions")}},
            ],
        },
        "model": {
            "class_path": "dimo_lightning.training.module.DiMOModule",
            "init_args": {
                "teacher": teacher_entry(name, folders),
                "student": {"r_init": 0.6, "emb_noise_sigma": 0.1, "emb_noise_relative": True},
                "targets": {"cfg_scale": 1.0 if not prompted else 2.0, "mask_schedule": "cosine"},
                "aux": {"sample": "reuse"},
                "optim": {"max_generator_steps": steps, "train_dropout": False},
                "sampling": {"teacher": {"steps": 2}},
            },
        },
        "data": data,
    }


def run_fit(config: dict, root) -> str:
    import yaml

    from dimo_lightning.commands.cli import main

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return str(path)


@pytest.mark.parametrize("name,prompted", [("mdlm", False), ("mdlm", True), ("llada", False), ("llada", True)])
def test_dimo_fit_predict_and_export_a_text_student(name, prompted, folders, judge, tmp_path, monkeypatch):
    import json

    from dimo_lightning.commands.cli import main
    from dimo_lightning.inference.export import load_student

    monkeypatch.chdir(tmp_path)
    config = run_fit(fit_config(name, prompted, folders, judge, tmp_path), tmp_path)
    version = tmp_path / "runs/text/version_0"
    ckpt = version / "checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=False)["dimo"]["generator_step"] == 2
    report = json.loads((version / "eval.json").read_text())  # TextEvaluationReport at the end of fit
    assert [r["model"] for r in report["rows"]] == ["teacher", "student"]
    assert all(r["gen_ppl"] > 0 and r["entropy"] > 0 for r in report["rows"])
    assert (version / "samples_student_1.txt").read_text().strip()

    main(["predict", "--config", config, "--ckpt_path", str(ckpt)])
    lines = [json.loads(line) for f in sorted((tmp_path / "predictions").glob("texts_*.jsonl"))
             for line in f.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2] and all(isinstance(r["text"], str) for r in lines)
    if prompted:
        assert [r["prompt"] for r in lines] == [p for p in PROMPTS if p] + [PROMPTS[0]]

    main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "exported")])
    pipeline = load_student(str(tmp_path / "exported"))
    texts = pipeline(["Hello world!"] if prompted else 2, seed=0)
    assert all(isinstance(t, str) for t in texts)
    if prompted:
        assert texts[0].startswith("Hello world!")
        cond = pipeline.prepare(PROMPTS[:2])
        codes = pipeline.sample_codes(cond=cond, generator=gen())
        assert torch.equal(codes[cond.fixed], cond.tokens[cond.fixed])  # the student never changes the prompt
    # the exported student computes what the trained one computes: same prompt ids, noise and logits
    from dimo_lightning.inference.pipeline import OneStepPipeline
    from dimo_lightning.training.module import DiMOModule

    module = DiMOModule.load_from_checkpoint(str(ckpt))
    network = getattr(module, "student_ema", module.student)
    live = OneStepPipeline.from_teacher(module.teacher, network, module.sampling_defaults(), module.device)
    conditions = PROMPTS[:2] if prompted else torch.arange(2)
    for overrides in ({}, {"emb_noise_sigma": 0.3}):
        torch.testing.assert_close(pipeline.logits(conditions, gen(3), **overrides),
                                   live.logits(conditions, gen(3), **overrides), rtol=0, atol=1e-5)


def test_fsdp_shards_each_text_block_as_a_unit(teachers):
    from dimo_lightning.training.distributed import shard_units

    for teacher in teachers.values():
        network = teacher.network
        blocks = network.blocks if hasattr(network, "blocks") else network.backbone.blocks
        assert shard_units(network) == list(blocks) and len(blocks) == 2


# ---- configs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["mdlm_owt.yaml", "llada.yaml"])
def test_text_configs_print(config, capsys):
    """The released-teacher configs parse (their weight folders need not exist: --print_config builds nothing)."""
    from pathlib import Path

    import yaml

    from dimo_lightning.commands.cli import main

    path = Path(__file__).resolve().parents[1] / "configs" / config
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(path), "--print_config"])
    assert excinfo.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    teacher = printed["model"]["init_args"]["teacher"]
    assert teacher["class_path"].rsplit(".", 1)[1] in ("MDLMTeacher", "LLaDATeacher")
    assert printed["model"]["init_args"]["targets"]["cfg_scale"] == 1
