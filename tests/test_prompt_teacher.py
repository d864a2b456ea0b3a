"""Prompt teachers: text conditions through DiMOModule (micro-batches, batched negative-prompt CFG, aux drop) and
the CLIP-encoder teacher loaded from a diffusers-layout folder."""

from __future__ import annotations

import zlib

import lightning.pytorch as pl
import pytest
import torch

from dimo_lightning.core.conditions import TextCondition
from dimo_lightning.data.prompts import PromptDataModule
from dimo_lightning.nn.meissonic import MeissonicTransformer
from dimo_lightning.teachers.prompt import PromptTeacher, TextConditionalTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer
from dimo_lightning.training.module import DiMOModule

TINY_NET = dict(attention_head_dim=8, num_attention_heads=2, num_layers=1, num_single_layers=1, joint_attention_dim=12,
                pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], vocab_size=17, codebook_size=16, downsample=False,
                upsample=False)
WORDS = ["a", "bold", "thin", "seven", "three", "leaning", "left", "right", "upright", "blurry", "ugly"]


class FakePromptTeacher(TextConditionalTeacher):
    """Tiny MeissonicTransformer; each prompt maps to fixed random embeddings (no text encoder)."""

    def __init__(self, negative_prompt: str | None = "blurry", **kwargs) -> None:
        super().__init__(grid_size=7, negative_prompt=negative_prompt, **kwargs)
        torch.manual_seed(0)
        self.network = MeissonicTransformer(**TINY_NET)
        self.tokenizer = PatchVQTokenizer(torch.rand(16, 16))
        self.encoded: list[list[str]] = []
        self.eval().requires_grad_(False)

    def encode_prompts(self, prompts):
        self.encoded.append(list(prompts))
        states, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            states.append(torch.randn(5, 12, generator=g))
            pooled.append(torch.randn(16, generator=g))
        return TextCondition(torch.stack(states), torch.stack(pooled))


def write_prompts(tmp_path, n=12):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a bold seven leaning right {i}\n" for i in range(n)))
    return str(path)


def test_uncond_branch_uses_negative_for_the_teacher_and_null_elsewhere():
    teacher = FakePromptTeacher()
    cond = teacher.encode_condition(["a bold seven", "thin three"])
    codes = torch.randint(0, 17, (2, 49))
    negative = teacher.encode_prompts(["blurry"])
    null = teacher.encode_prompts([""])
    net = teacher.network

    def run(c: TextCondition, network=net):
        return network(codes, c.hidden_states, c.pooled, c.micro_conds, 0.0)

    cond_logits = run(cond)
    neg_logits = run(TextCondition(negative.hidden_states.expand(2, -1, -1), negative.pooled.expand(2, -1)))
    guided = teacher.guided_logits(net, codes, cond, 3.0)
    torch.testing.assert_close(guided, neg_logits + 3.0 * (cond_logits - neg_logits), atol=1e-5, rtol=1e-5)
    # one batched pass of 2B
    calls = []
    hook = net.register_forward_pre_hook(lambda m, args: calls.append(args[1].clone()))
    teacher.guided_logits(net, codes, cond, 3.0)
    hook.remove()
    assert len(calls) == 1 and calls[0].shape[0] == 4
    torch.testing.assert_close(calls[0][2:], negative.hidden_states.expand(2, -1, -1))
    # any other network (the aux) drops to the empty prompt
    other = MeissonicTransformer(**TINY_NET).eval()
    dropped = teacher.apply_network(other, codes, cond, torch.tensor([True, False]))
    expected = run(TextCondition(torch.cat([null.hidden_states, cond.hidden_states[1:]]),
                                 torch.cat([null.pooled, cond.pooled[1:]])), other)
    torch.testing.assert_close(dropped, expected, atol=1e-5, rtol=1e-5)
    # without a negative prompt the teacher's CFG uses the empty prompt too
    plain = FakePromptTeacher(negative_prompt=None)
    null_logits = run(TextCondition(null.hidden_states.expand(2, -1, -1), null.pooled.expand(2, -1)))
    torch.testing.assert_close(plain.guided_logits(plain.network, codes, cond, 2.0),
                               null_logits + 2.0 * (cond_logits - null_logits), atol=1e-5, rtol=1e-5)
    # null and negative embeddings are encoded once, then cached
    before = len(teacher.encoded)
    for _ in range(3):
        teacher.guided_logits(net, codes, cond, 3.0)
        teacher.apply_network(other, codes, cond, torch.tensor([True, True]))
    assert len(teacher.encoded) == before


def test_micro_conditions_timestep_and_frozen_names():
    teacher = FakePromptTeacher(micro_conds=[28, 28, 0, 0, 6], timestep=0.5)
    cond = teacher.encode_condition(["a thin three"])
    assert cond.micro_conds.tolist() == [[28.0, 28.0, 0.0, 0.0, 6.0]]
    codes = torch.randint(0, 16, (1, 49))
    out = teacher(codes, cond)
    net = teacher.network
    torch.testing.assert_close(out, net(codes, cond.hidden_states, cond.pooled, cond.micro_conds, 0.5))
    assert not torch.allclose(out, net(codes, cond.hidden_states, cond.pooled, cond.micro_conds, 0.0))
    names = teacher.frozen_parameter_names()
    assert "embed.embeddings.weight" in names and "mlm_layer.conv2.weight" in names and len(names) == 6
    assert teacher.decode(torch.randint(0, 16, (2, 49))).shape == (2, 1, 28, 28)
    with pytest.raises(TypeError, match="list of strings"):
        teacher.encode_condition(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timestep"):
        FakePromptTeacher(timestep=3.0)


def test_training_step_with_text_conditions_micro_batches_and_cfg(tmp_path):
    teacher = FakePromptTeacher()
    module = DiMOModule(teacher, student={"r_init": 0.5, "emb_noise_sigma": 0.3}, targets={"cfg_scale": 3.0},
                        aux={"cfg_drop_ratio": 0.5},
                        optim={"max_generator_steps": 2, "accumulate_micro_batches": 2, "fix_emb_layer": True},
                        run={"seed": 3})
    negative = teacher.encode_prompts(["blurry"]).hidden_states[0]
    null = teacher.encode_prompts([""]).hidden_states[0]
    teacher_calls, aux_calls = [], []
    teacher.network.register_forward_pre_hook(lambda m, args: teacher_calls.append(args[1].clone()))
    module.aux.register_forward_pre_hook(lambda m, args: aux_calls.append(args[1].clone()))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(train_prompts=write_prompts(tmp_path), eval_prompts=None, batch_size=4,
                                         batches_per_epoch=5))
    assert module.generator_step == 2 and module.iteration == 2
    # 2 iterations x 2 micro-batches of 2 prompts: the teacher runs one pass of 2B = 4 rows, negative in the 2nd half
    assert len(teacher_calls) == 4 and all(c.shape[0] == 4 for c in teacher_calls)
    for call in teacher_calls:
        assert all(torch.equal(row, negative) for row in call[2:])
        assert not any(torch.equal(row, negative) or torch.equal(row, null) for row in call[:2])
    # the aux sees micro-batches of 2; its dropped rows get the empty prompt, never the negative
    assert all(c.shape[0] == 2 for c in aux_calls)
    rows = [row for c in aux_calls for row in c]
    assert any(torch.equal(r, null) for r in rows) and not any(torch.equal(r, negative) for r in rows)
    # the student learned, except its frozen embedding and head; the teacher did not change
    after = module.student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and not {k for k in changed if k.startswith(("embed.", "mlm_layer."))}
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    codes = module.generate(teacher.encode_condition(["a thin three"] * 3))
    assert codes.shape == (3, 49) and int(codes.max()) < 16


# ---- the CLIP-encoder teacher in the diffusers layout ----------------------------------------------------------------
def save_tiny_prompt_teacher(folder, seed: int = 0):
    """A random tiny MeissonicTransformer + CLIPTextModelWithProjection + word-level tokenizer + codebook."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    MeissonicTransformer(**TINY_NET).save_pretrained(folder / "transformer")
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(str(folder / "tokenizer"))
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                            pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[BOS]"], eos_token_id=vocab["[EOS]"])
    CLIPTextModelWithProjection(config).save_pretrained(str(folder / "text_encoder"))
    PatchVQTokenizer(torch.rand(16, 16)).save(folder / "codebook.safetensors")
    return folder


def test_prompt_teacher_encodes_with_the_frozen_clip_penultimate_layer(tmp_path):
    folder = save_tiny_prompt_teacher(tmp_path / "t2i")
    teacher = PromptTeacher(str(folder), negative_prompt="blurry ugly")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.text_encoder.training
    cond = teacher.encode_condition(["a bold seven leaning right", "thin three", "an unknown word"])
    assert cond.hidden_states.shape == (3, 8, 12) and cond.pooled.shape == (3, 16)
    ids = teacher.text_tokenizer(["thin three"], padding="max_length", max_length=8, return_tensors="pt")
    assert ids["input_ids"][0].tolist()[:4] == [2, 6, 8, 3]  # [BOS] thin three [EOS], then padding
    out = teacher.text_encoder(input_ids=ids["input_ids"], output_hidden_states=True)
    torch.testing.assert_close(cond.hidden_states[1], out.hidden_states[-2][0])
    torch.testing.assert_close(cond.pooled[1], out.text_embeds[0])
    assert not torch.allclose(cond.hidden_states[1], out.last_hidden_state[0])  # not the final (normed) layer
    torch.testing.assert_close(teacher.encode_condition(["thin three"]).pooled[0], cond.pooled[1])
    codes = teacher.sample(cond, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 49) and teacher.decode(codes).shape == (3, 1, 28, 28)
    # a short distillation through the real encoder
    module = DiMOModule(teacher, targets={"cfg_scale": 2.0}, optim={"max_generator_steps": 1}, run={"seed": 0})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(train_prompts=write_prompts(tmp_path), eval_prompts=None, batch_size=2,
                                         batches_per_epoch=2))
    assert module.generator_step == 1


def test_prompt_teacher_folder_errors(tmp_path):
    folder = save_tiny_prompt_teacher(tmp_path / "t2i")
    (folder / "codebook.safetensors").rename(tmp_path / "codebook.safetensors")
    with pytest.raises(FileNotFoundError, match="codebook not found"):
        PromptTeacher(str(folder))
    PromptTeacher(str(folder), codebook=str(tmp_path / "codebook.safetensors"))
    (folder / "tokenizer").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/"):
        PromptTeacher(str(folder))


# ---- the shipped captioned-MNIST teacher (assets/mnist_t2i_teacher, `make assets`) -----------------------------------
def test_shipped_t2i_teacher_loads_by_default_and_follows_prompts():
    from dimo_lightning.assets import asset_path
    from dimo_lightning.data.captions import eval_prompts
    from dimo_lightning.evaluation.metrics.classifier import prompt_faithfulness

    folder = asset_path("mnist_t2i_teacher")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"the shipped T2I teacher grew to {size / 2**20:.1f} MB"
    teacher = PromptTeacher()  # default: the shipped asset
    assert teacher.network.config["downsample"] is False and teacher.grid_shape == (7, 7)
    prompts = eval_prompts()[:20]  # held-out captions, two per class
    codes = teacher.sample(teacher.encode_condition(prompts), steps=16, cfg_scale=2.0, choice_temperature=16.0,
                           generator=torch.Generator().manual_seed(0))
    images = teacher.decode(codes)
    assert images.shape == (20, 1, 28, 28) and 0 <= float(images.min()) and float(images.max()) <= 1
    scores = prompt_faithfulness(images[:, 0], prompts)
    # A trained teacher draws the asked digit (an untrained one: ~0.1); thickness and slant are checked by the table.
    assert scores["class_accuracy"] >= 0.8, scores


def test_package_data_globs_cover_every_shipped_asset_file():
    # setuptools' package-data patterns are globs relative to the package ("assets/*" does not recurse): every file
    # under assets/ must match one, or a wheel install silently lacks it.
    import tomllib

    from dimo_lightning.assets import ASSET_DIR

    package = ASSET_DIR.parent
    config = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["dimo_lightning"]
    covered = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    shipped = {p for p in ASSET_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped - covered == set()
    assert any("mnist_t2i_teacher" in p.parts for p in shipped)


def test_install_t2i_teacher_replaces_the_asset_folder(tmp_path, monkeypatch):
    import shutil

    from helpers import load_script

    from dimo_lightning.assets import asset_path

    build = load_script("build_assets")

    run = tmp_path / "version_0"
    shutil.copytree(asset_path("mnist_t2i_teacher"), run / "t2i_teacher")
    target = tmp_path / "assets"
    (target / "mnist_t2i_teacher" / "stale").mkdir(parents=True)  # left over from an older layout
    monkeypatch.setattr(build, "asset_path", lambda name: target / name)
    installed = build.install_t2i_teacher(str(run))
    files = sorted(p.relative_to(installed) for p in installed.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(run / "t2i_teacher") for p in (run / "t2i_teacher").rglob("*") if p.is_file())
    assert not (installed / "stale").exists()
    shutil.rmtree(run / "t2i_teacher" / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lacks text_encoder"):
        build.install_t2i_teacher(str(run))
