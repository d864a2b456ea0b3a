"""UnconditionalTextDataModule: the data-free condition source of unconditional text teachers (MDLM).

An unconditional text student has nothing to condition on: a training batch is B per-sample indices, of which the
sequence teacher's ``encode_condition`` reads only the number (B rows without a prompt). The indices are still the
global sample numbers, so a batch is a pure function of (rank, position) and the loader is resumable as
:class:`~dimo_lightning.data.labels.ClassLabelDataModule`'s (the position is saved in Lightning checkpoints).

Prompted text (LLaDA) uses :class:`~dimo_lightning.data.prompts.PromptDataModule`: its prompt strings go through the
sequence teacher's ``encode_condition`` like a text-to-image teacher's.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.data.labels import PredictConditions, ResumableLoader, _rank_and_world, check_counts


class SampleIndexStream(IterableDataset):
    """Yields ``batches_per_epoch`` batches of global sample indices (B,) long per pass, continuing from
    ``position``: rank r's batch j holds ``((j * world + r) * B + i)`` for i < B (disjoint across ranks, the same
    on a resume).

    Args:
        batch_size: indices per batch (per rank).
        batches_per_epoch: batches per Lightning epoch.
    """

    def __init__(self, batch_size: int, batches_per_epoch: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.position = 0  # index j of this rank's next batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rank, world = _rank_and_world()
        for _ in range(self.batches_per_epoch):
            start = (self.position * world + rank) * self.batch_size
            self.position += 1
            yield torch.arange(start, start + self.batch_size)


class UnconditionalPredictConditions(PredictConditions):
    """``dimo predict``'s unconditional rows: the global indices themselves (sharding, batching and padding as in
    :class:`~dimo_lightning.data.labels.PredictConditions`)."""

    def __init__(self, num_samples: int, batch_size: int) -> None:
        super().__init__(num_samples, num_classes=1, batch_size=batch_size)

    def conditions(self, index: torch.Tensor) -> torch.Tensor:
        return index.clone()


class UnconditionalTextDataModule(pl.LightningDataModule):
    """Conditions only, for unconditional text: training batches ``ConditionBatch(indices (B,) long)``.

    Args:
        batch_size: sequences per batch per rank (the Di[M]O batch size B).
        batches_per_epoch: batches in one Lightning epoch (epochs only pace logging and checkpoints).
        predict_samples: sequences ``dimo predict`` samples over all ranks.
    """

    def __init__(self, batch_size: int = 32, batches_per_epoch: int = 100, predict_samples: int = 1000) -> None:
        super().__init__()
        check_counts(batch_size=batch_size, batches_per_epoch=batches_per_epoch, predict_samples=predict_samples)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.predict_samples = predict_samples
        self._stream: SampleIndexStream | None = None

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self._stream = SampleIndexStream(self.batch_size, self.batches_per_epoch)
        return ResumableLoader(self._stream, batch_size=None, collate_fn=ConditionBatch)

    def val_dataloader(self) -> DataLoader:
        """One batch of indices: validation work happens in callbacks (TextMonitor, TextEvaluationReport)."""
        return DataLoader(torch.arange(self.batch_size), batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        """``predict_samples`` unconditional rows, each rank a contiguous share of the global indices."""
        return DataLoader(UnconditionalPredictConditions(self.predict_samples, self.batch_size), batch_size=None)

    def evaluation_conditions(self, num_samples: int) -> torch.Tensor:
        """The conditions of the evaluation callbacks: the indices (num_samples,) (only their number matters)."""
        return torch.arange(num_samples)
