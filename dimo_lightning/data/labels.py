"""ClassLabelDataModule: the data-free condition source for class-conditional teachers.

Di[M]O needs no images: each batch is a vector of class labels drawn uniformly and independently
(docs/method.md#the-iteration). Batch j on rank r is a pure function of (seed, r, j), and the loader is resumable
(its position is saved in Lightning checkpoints), so a resumed run sees exactly the labels an uninterrupted run would
have seen, and ranks draw different labels without a distributed sampler.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from dimo_lightning.core.seeding import derive_seed
from dimo_lightning.core.sharding import rank_batches
from dimo_lightning.data.batch import ConditionBatch


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_counts(minimum: int = 1, **counts: int | None) -> None:
    """Raise ``ValueError`` for the first of ``counts`` (name -> value; None is skipped) below ``minimum``.

    The message starts with the argument's name (``batch_size must be >= 1, got 0``): the ``dimo`` command puts the
    flag of the DataModule that raised it in front (``--data.init_args.batch_size``).
    """
    for name, value in counts.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def label_batch(seed: int, rank: int, index: int, batch_size: int, num_classes: int) -> torch.Tensor:
    """The ``index``-th label batch (batch_size,) of ``rank``: uniform i.i.d. classes, deterministic."""
    generator = torch.Generator().manual_seed(derive_seed(seed, rank, index))
    return torch.randint(0, num_classes, (batch_size,), generator=generator)


class ClassLabelStream(IterableDataset):
    """Yields ``batches_per_epoch`` label batches per pass, continuing from a global position.

    Args:
        num_classes: labels are drawn from [0, num_classes).
        batch_size: labels per batch (per rank).
        batches_per_epoch: batches per pass (what Lightning calls an epoch).
        seed: base seed.
    """

    def __init__(self, num_classes: int, batch_size: int, batches_per_epoch: int, seed: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.position = 0  # global index of the next batch to yield

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rank, _ = _rank_and_world()
        for _ in range(self.batches_per_epoch):
            batch = label_batch(self.seed, rank, self.position, self.batch_size, self.num_classes)
            self.position += 1
            yield batch


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ClassLabelStream` whose position Lightning saves and restores.

    Lightning prefetches one batch ahead of the training step; the saved position subtracts what was fetched
    but not yet trained on, so a checkpoint taken after batch j resumes at batch j + 1.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.dataset.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.position = int(state["position"])


class PredictConditions(IterableDataset):
    """``dimo predict``'s conditions: this rank's contiguous, non-overlapping share of the global indices
    ``range(num_samples)``, in order, as batches ``{"conditions": labels (B,), "index": global indices (B,)}``.

    The global indices are cut into batches of ``batch_size`` first and ranks take contiguous blocks of whole
    batches (:func:`~dimo_lightning.core.sharding.rank_batches`): a batch, and so its samples (seeded by its first
    index), is the same on any number of ranks. The label of global index i is ``i % num_classes`` (balanced, class
    order). The rank is read when iterated (after the process group exists); being an IterableDataset, Lightning
    never re-shards it with a distributed sampler, so no sample is padded in twice (``use_distributed_sampler`` may
    stay at its default). Ranks may get unequal counts (by up to one batch); a rank with fewer batches ends with
    padding batches whose ``index`` is empty.

    Args:
        num_samples: samples over all ranks.
        num_classes: classes of the teacher.
        batch_size: conditions per batch.
    """

    def __init__(self, num_samples: int, num_classes: int, batch_size: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.batch_size = batch_size

    def batches(self) -> list[tuple[int, int] | None]:
        """This rank's batches ``[(start, stop), ...]`` of global indices, then ``None`` (a padding batch) for each
        batch the busiest rank has more: every rank runs the same number of predict steps, which sharded (FSDP)
        networks need (each forward gathers parameters on all ranks)."""

        rank, world = _rank_and_world()
        spans = [span for _, span in rank_batches(self.num_samples, self.batch_size, rank, world)]
        most = max(len(rank_batches(self.num_samples, self.batch_size, r, world)) for r in range(world))
        return spans + [None] * (most - len(spans))

    def __len__(self) -> int:
        return len(self.batches())

    def conditions(self, index: torch.Tensor) -> Any:
        """The conditions of the global indices ``index`` (B,): labels ``index % num_classes`` here; subclasses
        return other kinds (a list of prompts: :class:`~dimo_lightning.data.prompts.PromptPredictConditions`)."""
        return index % self.num_classes

    def __iter__(self):
        for span in self.batches():
            if span is None:  # padding: batch 0's conditions, no global index (SampleWriter writes nothing)
                conditions = self.conditions(torch.arange(min(self.batch_size, self.num_samples)))
                yield {"conditions": conditions, "index": torch.zeros(0, dtype=torch.long)}
                continue
            index = torch.arange(*span)
            yield {"conditions": self.conditions(index), "index": index}


class ClassLabelDataModule(pl.LightningDataModule):
    """Conditions only: training batches ``ConditionBatch(labels (B,) long)``.

    Args:
        num_classes: number of classes of the teacher.
        batch_size: labels per batch per rank (the Di[M]O batch size B).
        batches_per_epoch: batches in one Lightning epoch (epochs only pace logging and checkpoints).
        seed: base seed of the label stream (each rank adds its rank).
        predict_samples: number of labels ``dimo predict`` samples over all ranks, balanced over classes in class
            order.
    """

    def __init__(
        self,
        num_classes: int = 10,
        batch_size: int = 64,
        batches_per_epoch: int = 100,
        seed: int = 0,
        predict_samples: int = 1000,
    ) -> None:
        super().__init__()
        check_counts(num_classes=num_classes, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                     predict_samples=predict_samples)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.predict_samples = predict_samples
        self._stream: ClassLabelStream | None = None

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self._stream = ClassLabelStream(self.num_classes, self.batch_size, self.batches_per_epoch, self.seed)
        return ResumableLoader(self._stream, batch_size=None, collate_fn=ConditionBatch)

    def val_dataloader(self) -> DataLoader:
        """One batch of labels: validation work happens in callbacks (EvaluationReport, FIDMonitor)."""
        return DataLoader(torch.arange(self.batch_size) % self.num_classes, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        """``predict_samples`` labels cycling through the classes in order (balanced), each rank a contiguous share
        of the global indices (:class:`PredictConditions`)."""
        return DataLoader(PredictConditions(self.predict_samples, self.num_classes, self.batch_size), batch_size=None)

    def evaluation_conditions(self, num_samples: int) -> torch.Tensor:
        """The conditions of the evaluation callbacks: (num_samples,) labels cycling through the classes."""
        return torch.arange(num_samples) % self.num_classes
