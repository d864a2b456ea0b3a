"""Which rows each rank handles: batches dealt out so that a sample's batch (and its seed) do not depend on the
world size, and the plain condition operations the evaluations need."""

from __future__ import annotations

from typing import Any

import torch


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """(num_samples,) labels cycling through the classes (equal counts when num_samples % C == 0)."""
    return torch.arange(num_samples) % num_classes


def condition_count(conditions: Any) -> int:
    """Number of conditions in a tensor or a sequence."""
    return len(conditions)


def slice_conditions(conditions: Any, start: int, stop: int) -> Any:
    """Conditions ``[start, stop)``, of the same kind (a tensor view or a list)."""
    return conditions[start:stop] if isinstance(conditions, torch.Tensor) else list(conditions[start:stop])


def are_labels(conditions: Any) -> bool:
    """Whether the conditions are class labels (an integer tensor (N,)), the case where accuracy makes sense."""
    return isinstance(conditions, torch.Tensor) and conditions.ndim == 1 and not conditions.is_floating_point()


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
