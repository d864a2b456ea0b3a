"""`dimo export` / `load_student` / `dimo sample` for prompt (text-to-image) students: the text encoder and tokenizer
travel with the student, the reloaded student (without Lightning) gives the module's EMA logits, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import save_tiny_mnist_teacher
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_prompt_teacher import FakePromptTeacher, save_tiny_prompt_teacher, write_prompts

from dimo_lightning.commands.cli import main
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.data.prompts import PromptDataModule
from dimo_lightning.inference.export import export_student, load_student
from dimo_lightning.inference.prompt_export import PromptConditioner, text_encoder_source
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.teachers.prompt import PromptTeacher
from dimo_lightning.training.ema import StudentEMA, evaluation_student
from dimo_lightning.training.module import DiMOModule

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a bold seven leaning right", "thin three", "an unknown word", "a bold seven leaning right"]
MICRO_CONDS = [28.0, 28.0, 0.0, 0.0, 6.0]


def _trainer(root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=-1, logger=False,
                      num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                      enable_progress_bar=False, callbacks=callbacks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text-to-image distillation (2 generator steps through a real CLIP encoder) with the EMA, a last.ckpt and
    its export."""
    root = tmp_path_factory.mktemp("t2i")
    folder = save_tiny_prompt_teacher(root / "teacher")
    teacher = PromptTeacher(str(folder), negative_prompt="blurry ugly", micro_conds=MICRO_CONDS)
    module = DiMOModule(teacher, student={"r_init": [0.4, 0.8], "top_k": 8}, targets={"cfg_scale": 2.0},
                        optim={"max_generator_steps": 2, "train_dropout": False},
                        sampling={"temperature": 0.8}, run={"seed": 0})
    ema = StudentEMA(decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    _trainer(root, [ema, checkpoint]).fit(module, PromptDataModule(train_prompts=write_prompts(root), eval_prompts=None,
                                                                   batch_size=2, batches_per_epoch=2))
    ckpt = root / "ckpt" / "last.ckpt"
    return {"root": root, "folder": folder, "module": module, "ckpt": ckpt,
            "export": export_student(ckpt, root / "exp")}


def test_reloaded_without_lightning_gives_the_ema_students_logits(trained, tmp_path):
    module, out = trained["module"], trained["export"]
    ema = evaluation_student(module)
    assert ema is not module.student  # the average, which differs from the raw student after 2 steps
    result = tmp_path / "logits.safetensors"
    code = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from dimo_lightning.inference.export import load_student\n"
        f"pipeline = load_student({str(out)!r})\n"
        f"prompts = {PROMPTS!r}\n"
        "tensors = {}\n"
        "for seed in (0, 1):\n"
        "    tensors[f'logits{seed}'] = pipeline.logits(prompts, torch.Generator().manual_seed(seed))\n"
        "    tensors[f'codes{seed}'] = pipeline.sample_codes(prompts, torch.Generator().manual_seed(seed))\n"
        "tensors['images'] = pipeline(prompts, seed=0)\n"
        f"save_file(tensors, {str(result)!r})\n"
        "print('LIGHTNING', sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "LIGHTNING []" in run.stdout
    reloaded = load_file(str(result))
    cond = module.teacher.encode_condition(PROMPTS)
    assert cond.micro_conds is not None  # the teacher's micro-conditions reach the student, and must be exported
    sigma = module.settings.student.emb_noise_sigma
    for seed in (0, 1):
        expected = module.student_logits(ema, cond, 0.6, sigma, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(reloaded[f"logits{seed}"], expected, rtol=0, atol=1e-6)
        codes = module.generate(cond, network=ema, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(reloaded[f"codes{seed}"], codes)
    raw = module.student_logits(module.student, cond, 0.6, sigma, torch.Generator().manual_seed(0))
    assert not torch.allclose(reloaded["logits0"], raw, atol=1e-6)  # it is the EMA that was exported
    images = module.teacher.decode(module.generate(cond, network=ema, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(reloaded["images"], images)
    assert not torch.equal(reloaded["logits0"][0], reloaded["logits0"][3])  # fresh noise per row, same prompt


def test_export_folder_holds_the_text_encoder_and_its_record(trained):
    out, teacher = trained["export"], trained["module"].teacher
    config = json.loads((out / "config.json").read_text())
    cond = config["conditioning"]
    assert cond["type"] == "prompt" and cond["max_length"] == 8 and cond["grid_size"] == 7
    assert cond["micro_conds"] == MICRO_CONDS and cond["timestep"] == 0.0
    assert cond["hidden_states"] == "penultimate" and cond["pooled"] == "text_embeds"
    assert cond["guidance"].startswith("none") and cond["teacher_cfg_scale"] == 2.0
    assert cond["teacher_negative_prompt"] == "blurry ugly"
    assert cond["source"]["text_encoder"] == str((trained["folder"] / "text_encoder").resolve())
    assert "null_pooled" not in cond  # the checkpoint's reference tensor stays out of the JSON
    assert config["weights_source"] == "ema" and config["key_layout"] == "native"
    assert config["network"]["class_path"] == "dimo_lightning.nn.meissonic.MeissonicTransformer"
    assert config["teacher"]["class_path"] == "dimo_lightning.teachers.prompt.PromptTeacher"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.safetensors", "text_encoder/config.json",
            "text_encoder/model.safetensors", "text_tokenizer/tokenizer.json",
            "text_tokenizer/tokenizer_config.json"} <= files
    # the encoder's weights are the teacher's, bit for bit, and the tokenizer splits prompts the same way
    exported = load_file(str(out / "text_encoder" / "model.safetensors"))
    for key, value in teacher.text_encoder.state_dict().items():
        assert torch.equal(exported[key], value), key
    pipeline = load_student(out)
    assert isinstance(pipeline.conditioner, PromptConditioner) and pipeline.conditioning_type == "prompt"
    ids = pipeline.conditioner.text_tokenizer(PROMPTS, padding="max_length", max_length=8, truncation=True)
    assert ids["input_ids"] == teacher.text_tokenizer(PROMPTS, padding="max_length", max_length=8,
                                                      truncation=True)["input_ids"]
    with pytest.raises(ValueError, match="text-to-image student"):
        pipeline.logits(torch.tensor([0, 1]))


def test_dimo_sample_with_prompts_writes_pngs_grid_and_npz(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import dimo_lightning.commands.sample

    # a long prompt file: the grid shows the first
    monkeypatch.setattr(dimo_lightning.commands.sample, "GRID_MAX_ROWS", 2)
    out = trained["export"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(f"{p}\n" for p in PROMPTS[:3]))
    main(["sample", "--student", str(out), "--prompts", str(prompt_file), "--num", "2", "--batch_size", "4",
          "--output", str(tmp_path / "s")])
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (6, 28, 28) and data["images"].dtype == np.float32
    assert data["prompts"].tolist() == [p for p in PROMPTS[:3] for _ in range(2)]
    pngs = sorted((tmp_path / "s" / "png").glob("*.png"))
    assert [Image.open(p).text["prompt"] for p in pngs] == data["prompts"].tolist()
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 * 30 + 2, 2 * 30 + 2)  # a row per prompt, 2 at most
    assert (tmp_path / "s" / "grid.txt").read_text().splitlines() == PROMPTS[:2]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "grid.txt", "png", "samples.npz"]
    # seeded: batch i uses seed + i, so the first batch equals a direct call
    first = load_student(out)(data["prompts"][:4].tolist(), seed=0)[:, 0].numpy()
    np.testing.assert_array_equal(data["images"][:4], first)
    main(["sample", "--student", str(out), "--prompt", "thin three", "--num", "3", "--output", str(tmp_path / "one")])
    assert np.load(tmp_path / "one" / "samples.npz")["prompts"].tolist() == ["thin three"] * 3
    # conditions of the wrong kind, or both prompt flags: one line naming the flag
    for args, message in ((["--labels", "0,1"], "--labels: .* text-to-image student"),
                          ([], "give --prompts FILE or --prompt TEXT"),
                          (["--prompt", "a", "--prompts", str(prompt_file)], "not both")):
        with pytest.raises(SystemExit):
            main(["sample", "--student", str(out), "--output", str(tmp_path / "bad"), *args])
        assert re.search(message, capsys.readouterr().err), message


def test_class_student_rejects_prompts(tmp_path, capsys):
    weights, codebook = save_tiny_mnist_teacher(tmp_path / "teacher")
    module = DiMOModule(MNISTTeacher(str(weights), str(codebook)),
                        optim={"max_generator_steps": 1, "train_dropout": False},
                        run={"seed": 0})
    _trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(
        module, ClassLabelDataModule(10, 2, 1))
    out = export_student(tmp_path / "ckpt" / "last.ckpt", tmp_path / "exp")
    for flag in ("--prompts", "--prompt"):
        with pytest.raises(SystemExit):
            main(["sample", "--student", str(out), flag, "thin three", "--output", str(tmp_path / "s")])
        assert f"{flag}: {out} is a class-conditional student (10 classes); give --labels" in capsys.readouterr().err


def _with_record(ckpt: Path, path: Path, **changes) -> Path:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["dimo"]["export"]["conditioning"].update(changes)
    torch.save(checkpoint, path)
    return path


def test_export_errors_for_text_encoders_it_cannot_write(trained, tmp_path):
    # a prompt teacher with its own encode_prompts (no transformers encoder from a folder) records no source
    assert text_encoder_source(FakePromptTeacher()) is None
    assert text_encoder_source(trained["module"].teacher) is not None
    record = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["dimo"]["export"]["conditioning"]
    assert record["null_pooled"].shape == (16,)
    no_source = _with_record(trained["ckpt"], tmp_path / "fake.ckpt", source=None, teacher_class="FakePromptTeacher")
    with pytest.raises(ValueError, match=r"prompt teacher \(FakePromptTeacher\) has no transformers .* cannot be "
                                         "exported"):
        export_student(no_source, tmp_path / "e1")
    # the teacher folder now holds another encoder: refused, not silently exported
    other = save_tiny_prompt_teacher(tmp_path / "other", seed=1)
    swapped = _with_record(trained["ckpt"], tmp_path / "swapped.ckpt",
                           source={**record["source"], "text_encoder": str(other / "text_encoder")})
    with pytest.raises(ValueError, match="is not the one the student .* was trained with"):
        export_student(swapped, tmp_path / "e2")
    gone = _with_record(trained["ckpt"], tmp_path / "gone.ckpt",
                        source={**record["source"], "text_tokenizer": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere .* is gone"):
        export_student(gone, tmp_path / "e3")
    # an export folder missing its text encoder
    broken = tmp_path / "broken"
    export_student(trained["ckpt"], broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder is missing"):
        load_student(broken)
