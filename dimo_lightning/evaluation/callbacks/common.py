"""Helpers shared by the evaluation callbacks: conditions, shards, the student's pipeline, extractor and reference
caches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from dimo_lightning.core.sharding import balanced_labels, condition_count
from dimo_lightning.evaluation.metrics.classifier import load_classifier
from dimo_lightning.evaluation.metrics.features import (
    FeatureExtractor,
    check_reference_stats,
    compute_reference_stats,
    is_stats_file,
    load_reference_stats,
)
from dimo_lightning.evaluation.metrics.image_sources import open_image_source
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.training.ema import evaluation_student

# ---------------------------------------------------------------- conditions (labels today, prompts later)


def evaluation_conditions(trainer: pl.Trainer, pl_module: pl.LightningModule, num_samples: int) -> Any:
    """The ``num_samples`` raw conditions every evaluation samples for, identical on every rank.

    Asks the DataModule (``trainer.datamodule.evaluation_conditions(num_samples)``) when it has that method, else
    falls back to balanced class labels over ``pl_module.teacher.num_classes``. The result is whatever the teacher's
    ``encode_condition`` takes: a (N,) label tensor for class-conditional teachers, a list of prompts for others.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "evaluation_conditions", None)):
        conditions = datamodule.evaluation_conditions(num_samples)
    else:
        num_classes = getattr(pl_module.teacher, "num_classes", None)
        if num_classes is None:
            raise ValueError(f"{type(pl_module.teacher).__name__} has no num_classes and the DataModule no "
                             "evaluation_conditions(num_samples): the evaluation has no conditions to sample")
        conditions = balanced_labels(num_samples, num_classes)
    if condition_count(conditions) != num_samples:
        raise ValueError(f"evaluation_conditions({num_samples}) returned {condition_count(conditions)} conditions")
    return conditions


# ---------------------------------------------------------------- shards


def gather_rows(pl_module: pl.LightningModule, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All ranks' rows in rank order: pad this rank's (n, ...) block to max(counts) rows, ``all_gather`` the
    fixed-size blocks (world, max, ...), trim each to its count. A collective: call it on every rank."""
    width = max(counts)
    padded = torch.cat([rows, rows.new_zeros(width - len(rows), *rows.shape[1:])]) if len(rows) < width else rows
    gathered = pl_module.all_gather(padded)
    if len(counts) == 1:
        return gathered[: counts[0]]
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


# ---------------------------------------------------------------- sampling and networks


def student_pipeline(pl_module: pl.LightningModule, network: nn.Module | None = None) -> OneStepPipeline:
    """The one-step pipeline of the module's (EMA) student (``network``: another one), with the module's sampling
    defaults; ``pipeline.sample_codes(conditions, generator)`` samples raw conditions (labels or prompts)."""
    network = evaluation_student(pl_module) if network is None else network
    return OneStepPipeline.from_teacher(pl_module.teacher, network, pl_module.sampling_defaults(), pl_module.device)


def require_image_teacher(teacher: Any, flag: str) -> None:
    """Raise a clear error when ``teacher`` is not an image teacher (``teacher.modality``); ``flag`` names the
    callback."""
    modality = getattr(teacher, "modality", "image")
    if modality != "image":
        raise ValueError(f"{flag} evaluates image teachers (modality 'image'); {type(teacher).__name__} has modality "
                         f"{modality!r}: use TextEvaluationReport / TextMonitor instead")


def load_accuracy_network(name: str | None, device: torch.device | str = "cpu") -> nn.Module | None:
    """The class-accuracy network for ``name`` (``mnist-cnn`` or None): images (B, 1, H, W) -> logits (B, C)."""
    if name is None:
        return None
    if name != "mnist-cnn":
        raise ValueError(f"accuracy_network must be 'mnist-cnn' or null, got {name!r}")

    return load_classifier(device=device)


def check_accuracy_network(name: str | None) -> None:
    """Validate the ``accuracy_network`` flag at construction."""
    if name not in (None, "mnist-cnn"):
        raise ValueError(f"accuracy_network must be 'mnist-cnn' or null, got {name!r}")


_EXTRACTORS: dict[tuple, Any] = {}
_REFERENCES: dict[tuple, Any] = {}


def shared_extractor(name: str, weights_path: str | None, device: torch.device, flag: str = "extractor"):
    """One :class:`~dimo_lightning.evaluation.metrics.features.FeatureExtractor` per (name, weights, device) and
    process."""

    key = (name, weights_path, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(name, weights_path, device, flag=flag)
    return _EXTRACTORS[key]


def shared_reference(spec: str, extractor, flag: str = "reference", need_features: int = 0, batch_size: int = 250):
    """Reference statistics for ``spec``, validated against ``extractor`` (errors name the file and ``flag``).

    ``spec`` is a ``dimo stats`` file (loaded), or an image set (see
    :mod:`dimo_lightning.evaluation.metrics.image_sources`) whose statistics are computed once per process and cached
    (ImageNet-size sets: precompute them with ``dimo stats``).
    """

    key = (spec, extractor.name, extractor.feature_layer, id(extractor.network))
    if key not in _REFERENCES:
        if spec.endswith(".npz") and is_stats_file(spec):
            stats = load_reference_stats(spec, flag)
        else:
            source = open_image_source(spec, flag)
            stats = compute_reference_stats(source.batches(batch_size), source.count, extractor, source=spec)
        _REFERENCES[key] = stats
    stats = _REFERENCES[key]
    check_reference_stats(stats, extractor, flag, need_features)
    return stats
