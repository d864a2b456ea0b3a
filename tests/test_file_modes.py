"""Files written for the user (an exported student, predictions, weight files) get the mode ``open()`` gives under
the user's umask (0644 under umask 022), not safetensors' owner-only 0600."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import save_tiny_mnist_teacher
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.commands.cli import main
from dimo_lightning.core.weight_files import default_file_mode, save_safetensors
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.inference.prediction_writer import SampleWriter
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.module import DiMOModule


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def trainer(root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny teacher and a 2-generator-step checkpoint distilled from it."""
    root = tmp_path_factory.mktemp("modes")
    weights, codebook = save_tiny_mnist_teacher(root / "teacher")
    module = DiMOModule(MNISTTeacher(str(weights), str(codebook)))
    trainer(root, [ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]).fit(module, ClassLabelDataModule(10, 4, 2))
    return {"root": root, "teacher": (weights, codebook), "ckpt": root / "ckpt" / "last.ckpt"}


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_safetensors_files_follow_the_umask(mask, expected, tmp_path):
    with umask(mask):
        assert default_file_mode() == expected
        path = save_safetensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors", metadata={"format": "pt"})
    assert stat.S_IMODE(path.stat().st_mode) == expected


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_dimo_export_writes_files_with_the_umask_mode(run, mask, expected, tmp_path):
    out = tmp_path / "student"
    with umask(mask):
        main(["export", "--ckpt_path", str(run["ckpt"]), "--output", str(out)])
    written = modes(out)
    assert {"model.safetensors", "config.json", "tokenizer.safetensors"} <= set(written)
    assert written == dict.fromkeys(written, expected)


def test_predictions_are_written_with_the_umask_mode(run, tmp_path):
    writer = SampleWriter(str(tmp_path / "predictions"), shard_size=4, max_png=2)
    module = DiMOModule(MNISTTeacher(*map(str, run["teacher"])))
    with umask(0o022):
        trainer(tmp_path, [writer]).predict(module, ClassLabelDataModule(10, 4, 2, predict_samples=6))
    written = modes(writer.path)
    assert any(name.endswith(".npz") for name in written) and any(name.endswith(".png") for name in written)
    assert written == dict.fromkeys(written, 0o644)


def test_released_layouts_are_written_with_the_umask_mode(tmp_path):
    """``save_pretrained`` of the Meissonic and aMUSEd students (``dimo export --format diffusers``)."""
    from fixtures.released_layouts import TINY_AMUSED_TRANSFORMER, TINY_MEISSONIC_TRANSFORMER

    from dimo_lightning.nn.amused import AmusedTransformer
    from dimo_lightning.nn.meissonic import MeissonicTransformer

    with umask(0o022):
        MeissonicTransformer(**TINY_MEISSONIC_TRANSFORMER).save_pretrained(tmp_path / "meissonic")
        AmusedTransformer(**TINY_AMUSED_TRANSFORMER).save_pretrained(tmp_path / "amused")
    written = modes(tmp_path)
    assert {"meissonic/diffusion_pytorch_model.safetensors", "amused/diffusion_pytorch_model.safetensors"} <= set(
        written)
    assert written == dict.fromkeys(written, 0o644)
