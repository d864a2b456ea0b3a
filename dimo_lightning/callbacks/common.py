"""Helpers shared by the evaluation callbacks: run directory, conditions, shards, extractor and reference caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn


def run_directory(trainer: pl.Trainer) -> Path:
    """The run's log directory (the logger's version folder), created if needed.

    ``trainer.log_dir`` is a collective (it broadcasts rank zero's path): call this on every rank, never inside a
    rank-zero-only branch, or the other ranks wait forever.
    """
    directory = Path(trainer.log_dir or trainer.default_root_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# ---------------------------------------------------------------- conditions (labels today, prompts later)


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """(num_samples,) labels cycling through the classes (equal counts when num_samples % C == 0)."""
    return torch.arange(num_samples) % num_classes


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


def condition_count(conditions: Any) -> int:
    """Number of conditions in a tensor or a sequence."""
    return len(conditions)


def slice_conditions(conditions: Any, start: int, stop: int) -> Any:
    """Conditions ``[start, stop)``, of the same kind (a tensor view or a list)."""
    return conditions[start:stop] if isinstance(conditions, torch.Tensor) else list(conditions[start:stop])


def are_labels(conditions: Any) -> bool:
    """Whether the conditions are class labels (an integer tensor (N,)), the case where accuracy makes sense."""
    return isinstance(conditions, torch.Tensor) and conditions.ndim == 1 and not conditions.is_floating_point()


# ---------------------------------------------------------------- shards


def batch_spans(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The global batches ``[(start, stop), ...]`` of ``num_samples`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, tuple[int, int]]]:
    """``[(global batch index, (start, stop)), ...]`` of ``rank``: a contiguous block of the global batches.

    Batches (not samples) are dealt out, so a sample's batch and its seed do not depend on the world size: the same
    samples come out on 1 or 64 ranks. Ranks differ by at most one batch.
    """
    spans = batch_spans(num_samples, batch_size)
    first, last = rank * len(spans) // world_size, (rank + 1) * len(spans) // world_size
    return [(i, spans[i]) for i in range(first, last)]


def rank_counts(num_samples: int, batch_size: int, world_size: int) -> list[int]:
    """Samples per rank under :func:`rank_batches`."""
    return [sum(stop - start for _, (start, stop) in rank_batches(num_samples, batch_size, r, world_size))
            for r in range(world_size)]


def index_range(num_samples: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(num_samples)`` (sizes differ by at most one)."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


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


def student_sampler(pl_module: pl.LightningModule, temperature: float | None = None):
    """``(network, conditions, generator) -> codes`` sampling the module's student (or its EMA) in one step."""

    def sample(network: nn.Module, conditions: Any, generator: torch.Generator) -> torch.Tensor:
        cond = pl_module.teacher.encode_condition(conditions)
        cond = cond.to(pl_module.device) if isinstance(cond, torch.Tensor) else cond
        return pl_module.generate(cond, network=network, temperature=temperature, generator=generator)

    return sample


def load_accuracy_network(name: str | None, device: torch.device | str = "cpu") -> nn.Module | None:
    """The class-accuracy network for ``name`` (``mnist-cnn`` or None): images (B, 1, H, W) -> logits (B, C)."""
    if name is None:
        return None
    if name != "mnist-cnn":
        raise ValueError(f"accuracy_network must be 'mnist-cnn' or null, got {name!r}")
    from dimo_lightning.metrics.classifier import load_classifier

    return load_classifier(device=device)


def check_accuracy_network(name: str | None) -> None:
    """Validate the ``accuracy_network`` flag at construction."""
    if name not in (None, "mnist-cnn"):
        raise ValueError(f"accuracy_network must be 'mnist-cnn' or null, got {name!r}")


_EXTRACTORS: dict[tuple, Any] = {}
_REFERENCES: dict[tuple, Any] = {}


def shared_extractor(name: str, weights_path: str | None, device: torch.device, flag: str = "extractor"):
    """One :class:`~dimo_lightning.metrics.features.FeatureExtractor` per (name, weights, device) and process."""
    from dimo_lightning.metrics.features import FeatureExtractor

    key = (name, weights_path, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(name, weights_path, device, flag=flag)
    return _EXTRACTORS[key]


def shared_reference(spec: str, extractor, flag: str = "reference", need_features: int = 0, batch_size: int = 250):
    """Reference statistics for ``spec``, validated against ``extractor`` (errors name the file and ``flag``).

    ``spec`` is a ``dimo stats`` file (loaded), or an image set (see :mod:`dimo_lightning.metrics.sources`) whose
    statistics are computed once per process and cached (ImageNet-size sets: precompute them with ``dimo stats``).
    """
    from dimo_lightning.metrics.features import (
        check_reference_stats,
        compute_reference_stats,
        is_stats_file,
        load_reference_stats,
    )
    from dimo_lightning.metrics.sources import open_image_source

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
