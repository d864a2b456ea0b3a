"""Helpers shared by the evaluation callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


def run_directory(trainer: pl.Trainer) -> Path:
    """The run's log directory (the logger's version folder), created if needed.

    ``trainer.log_dir`` is a collective (it broadcasts rank zero's path): call this on every rank, never inside a
    rank-zero-only branch, or the other ranks wait forever.
    """
    directory = Path(trainer.log_dir or trainer.default_root_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def student_sampler(pl_module: pl.LightningModule, temperature: float | None = None):
    """``(network, labels, generator) -> codes`` sampling the module's student (or its EMA) in one step."""

    def sample(network: torch.nn.Module, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cond = pl_module.teacher.encode_condition(labels).to(pl_module.device)
        return pl_module.generate(cond, network=network, temperature=temperature, generator=generator)

    return sample


def accuracy_function(name: str | None):
    """The class-accuracy function for ``name`` (``mnist-cnn`` or None)."""
    if name is None:
        return None
    if name != "mnist-cnn":
        raise ValueError(f"accuracy_network must be 'mnist-cnn' or null, got {name!r}")
    from dimo_lightning.metrics.fidelity import class_accuracy

    return class_accuracy
