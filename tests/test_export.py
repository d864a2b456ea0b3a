"""Export, Lightning-free sampling, checkpoints that rebuild the module, teacher-change errors, the progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import merge_settings, save_tiny_mnist_teacher
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from dimo_lightning.commands.cli import main
from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.inference.export import export_student, load_student
from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.teachers.maskgit import MaskGITTeacher
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule
from dimo_lightning.training.progress import GeneratorStepProgressBar

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=-1, logger=False, num_sanity_val_steps=0,
        limit_val_batches=0, enable_model_summary=False, callbacks=callbacks, **kwargs,
    )


def _module(weights: Path, codebook: Path, **kwargs) -> DiMOModule:
    teacher = MNISTTeacher(str(weights), str(codebook))
    defaults = dict(student={"r_init": [0.4, 0.8], "top_k": 12},
                    optim={"max_generator_steps": STEPS, "train_dropout": False}, sampling={"temperature": 0.8},
                    run={"seed": 0})
    return DiMOModule(teacher, **merge_settings(defaults, kwargs))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny distillation run (3 generator steps) with the EMA and a last.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    weights, codebook = save_tiny_mnist_teacher(root / "teacher")
    module = _module(weights, codebook)
    ema = StudentEMA(decay=0.5)
    bar = GeneratorStepProgressBar()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    _trainer(root, [ema, checkpoint, bar]).fit(module, ClassLabelDataModule(10, 4, 2))
    return {"root": root, "module": module, "ema": ema, "bar": bar, "ckpt": root / "ckpt" / "last.ckpt",
            "weights": weights, "codebook": codebook}


def test_progress_bar_counts_generator_steps(trained):
    bar = trained["bar"].train_progress_bar
    assert bar.total == STEPS and bar.n == STEPS == trained["module"].generator_step
    assert "generator step" in bar.desc


def test_export_round_trip_identical_logits_and_samples(trained, tmp_path):
    module, ema = trained["module"], trained["ema"].module
    out = export_student(trained["ckpt"], tmp_path / "exp")
    config = json.loads((out / "config.json").read_text())
    assert config["weights_source"] == "ema" and config["key_layout"] == "maskgit-v1.0"
    assert config["sampling"]["r_init"] == pytest.approx(0.6)  # midpoint of [0.4, 0.8], as generate() uses
    assert config["sampling"]["temperature"] == 0.8 and config["sampling"]["top_k"] == 12
    assert config["teacher"]["class_path"] == "dimo_lightning.teachers.mnist.MNISTTeacher"
    assert (out / "tokenizer.safetensors").is_file()  # the PatchVQ codebook travels with the student
    pipeline = load_student(out)
    labels = torch.tensor([0, 3, 9, 9, 1])
    for seed in (0, 1):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = module.student_logits(ema, labels, 0.6, module.settings.student.emb_noise_sigma, g1)
        torch.testing.assert_close(pipeline.logits(labels, g2), expected, rtol=0, atol=0)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        codes = module.generate(labels, network=ema, generator=g1)
        assert torch.equal(pipeline.sample_codes(labels, g2), codes)
        assert torch.equal(pipeline(labels, seed=seed), module.teacher.decode(
            module.generate(labels, network=ema, generator=torch.Generator().manual_seed(seed))))
    # --ema false exports the raw student
    raw = load_file(str(export_student(trained["ckpt"], tmp_path / "raw", ema=False) / "model.safetensors"))
    for key, value in module.student.state_dict().items():
        assert torch.equal(raw[key], value), key


def test_exported_keys_load_as_a_maskgit_checkpoint(trained, tmp_path):
    """The exported file is a MaskGIT v1.0 transformer checkpoint: it goes through MaskGITTeacher's own reader and
    strict loader, as a .safetensors file and wrapped in the released .pth layout."""
    out = export_student(trained["ckpt"], tmp_path / "exp")
    arch = json.loads((out / "config.json").read_text())["network"]["init_args"]
    state = load_file(str(out / "model.safetensors"))
    pth = tmp_path / "MaskGIT_student.pth"
    torch.save({"iter": 0, "global_epoch": 0, "model_state_dict": state, "optimizer_state_dict": {}}, pth)
    for path in (out / "model.safetensors", pth):
        net = MaskTransformer(**arch)
        load_state_dict_checked(net, MaskGITTeacher._read_weights(path), str(path))
        for key, value in trained["ema"].module.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key


def test_load_student_imports_no_lightning(trained, tmp_path):
    out = export_student(trained["ckpt"], tmp_path / "exp")
    code = (
        "import sys, torch\n"
        "from dimo_lightning.inference.export import load_student\n"
        f"pipeline = load_student({str(out)!r})\n"
        "images = pipeline(torch.tensor([0, 1, 2]), seed=0)\n"
        "assert images.shape == (3, 1, 28, 28), images.shape\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print('LIGHTNING', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LIGHTNING []" in result.stdout


def test_dimo_sample_writes_pngs_grid_and_npz(trained, tmp_path, capsys):
    out = export_student(trained["ckpt"], tmp_path / "exp")
    main(["sample", "--student", str(out), "--labels", "0,1,2", "--num", "8", "--output", str(tmp_path / "s"),
          "--batch_size", "5"])
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (24, 28, 28) and data["images"].dtype == np.float32
    assert data["labels"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert len(list((tmp_path / "s" / "png").glob("*.png"))) == 24
    from PIL import Image

    assert Image.open(tmp_path / "s" / "grid.png").size == (8 * 30 + 2, 3 * 30 + 2)  # a row per label
    # seeded: batch i uses seed + i, so the first batch equals a direct call
    pipeline = load_student(out)
    first = pipeline(torch.tensor([0, 0, 0, 0, 0]), seed=0)[:, 0].numpy()
    np.testing.assert_array_equal(data["images"][:5], first)


def test_load_from_checkpoint_rebuilds_the_teacher(trained):
    module = trained["module"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = DiMOModule.load_from_checkpoint(trained["ckpt"])
    assert not [w for w in caught if "Found keys" in str(w.message)]  # no warning about the teacher's keys
    assert isinstance(rebuilt.teacher, MNISTTeacher)
    assert rebuilt.generator_step == STEPS
    assert rebuilt.hparams.teacher == module.hparams.teacher
    for key, value in module.student.state_dict().items():
        assert torch.equal(rebuilt.student.state_dict()[key], value), key
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(rebuilt.teacher.state_dict()[key], value), key
    # the EMA average comes back too, and is what evaluation samples from
    from dimo_lightning.training.ema import evaluation_student

    assert evaluation_student(rebuilt) is rebuilt.student_ema
    for key, value in trained["ema"].module.state_dict().items():
        assert torch.equal(rebuilt.student_ema.state_dict()[key], value), key
    labels = torch.tensor([1, 2])
    assert torch.equal(rebuilt.generate(labels, generator=torch.Generator().manual_seed(3)),
                       module.generate(labels, generator=torch.Generator().manual_seed(3)))


def test_resume_with_another_teacher_is_an_error_naming_both(trained, tmp_path):
    weights, codebook = save_tiny_mnist_teacher(tmp_path / "other", seed=5)
    module = _module(weights, codebook)
    module.hparams.max_generator_steps = STEPS + 1
    with pytest.raises(ValueError) as excinfo:
        _trainer(tmp_path, [], enable_progress_bar=False).fit(module, ClassLabelDataModule(10, 4, 2),
                                                               ckpt_path=trained["ckpt"])
    message = str(excinfo.value)
    assert str(trained["weights"]) in message and str(weights) in message
    assert "allow_teacher_change=true" in message
    module = _module(weights, codebook, run={"allow_teacher_change": True})
    module.hparams.max_generator_steps = STEPS + 1
    _trainer(tmp_path, [], enable_progress_bar=False).fit(module, ClassLabelDataModule(10, 4, 2),
                                                           ckpt_path=trained["ckpt"])
    assert module.generator_step == STEPS + 1


def test_data_must_match_teacher_and_accumulation(trained, tmp_path):
    module = _module(trained["weights"], trained["codebook"])
    with pytest.raises(ValueError, match=r"--data.init_args.num_classes=7 .* teacher's 10 classes"):
        _trainer(tmp_path, [], enable_progress_bar=False).fit(module, ClassLabelDataModule(7, 4, 2))
    module = _module(trained["weights"], trained["codebook"], optim={"accumulate_micro_batches": 3})
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by .*accumulate_micro_batches=3"):
        _trainer(tmp_path, [], enable_progress_bar=False).fit(module, ClassLabelDataModule(10, 4, 2))


def test_teacher_record_names_files_by_absolute_path(trained, monkeypatch):
    monkeypatch.chdir(trained["weights"].parent)
    record = MNISTTeacher("teacher.safetensors", "codebook.safetensors").init_record()
    assert record == {"class_path": "dimo_lightning.teachers.mnist.MNISTTeacher",
                      "init_args": {"checkpoint": str(trained["weights"]), "codebook": str(trained["codebook"])}}
    assert MNISTTeacher.from_record(record).init_record() == record
