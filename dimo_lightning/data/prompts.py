"""PromptDataModule: the data-free condition source of text-to-image teachers (prompts are the only data).

Prompts come from a ``.txt`` file (one prompt per line), a ``.jsonl`` file (one ``{"prompt": ...}`` object per line)
or a built-in generator named ``package.module:function`` (a callable without arguments returning the prompts, e.g.
``dimo_lightning.data.captions:train_prompts``). Files are indexed by line offsets and read lazily, so a caption list
of millions of lines costs 8 bytes per prompt in memory, not the strings.

The training stream: pass e over the M prompts is a permutation seeded by (seed, e); global sample s is
``perm_{s // M}[s % M]``; rank r's batch j holds the global samples ``((j * world + r) * B + i)``. So ranks get
disjoint, deterministic streams that together visit every prompt once per pass, and the position (j) is saved in
Lightning checkpoints (as :class:`~dimo_lightning.data.labels.ClassLabelDataModule` does), so resume is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from dimo_lightning.core.seeding import derive_seed
from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.data.labels import PredictConditions, ResumableLoader, _rank_and_world, check_counts
from dimo_lightning.data.prompt_files import PromptFile, load_prompts


def _take(prompts: Sequence[str], indices: Sequence[int]) -> list[str]:
    return prompts.take(indices) if isinstance(prompts, PromptFile) else [prompts[int(i)] for i in indices]


def pass_permutation(num_prompts: int, seed: int, pass_index: int, shuffle: bool = True) -> torch.Tensor:
    """Order (M,) of the prompts in pass ``pass_index`` of the training stream (identity without shuffling)."""
    if not shuffle:
        return torch.arange(num_prompts)
    generator = torch.Generator().manual_seed(derive_seed(seed, step=pass_index, salt=11))
    return torch.randperm(num_prompts, generator=generator)


class PromptStream(IterableDataset):
    """Yields ``batches_per_epoch`` prompt batches (lists of B strings) per pass, continuing from ``position``.

    Args:
        prompts: the training prompts.
        batch_size: prompts per batch (per rank).
        batches_per_epoch: batches per Lightning epoch.
        seed: seed of the per-pass shuffling (the same on every rank: ranks interleave one global order).
        shuffle: shuffle each pass; False keeps file order.
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, batches_per_epoch: int, seed: int,
                 shuffle: bool = True) -> None:
        super().__init__()
        self.prompts = prompts
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # index j of the next batch of this rank
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _permutation(self, pass_index: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != pass_index:
            self._cached = (pass_index, pass_permutation(len(self.prompts), self.seed, pass_index, self.shuffle))
        return self._cached[1]

    def batch_indices(self, index: int, rank: int, world_size: int) -> list[int]:
        """Prompt indices of batch ``index`` of ``rank`` among ``world_size`` ranks."""
        m = len(self.prompts)
        start = (index * world_size + rank) * self.batch_size
        return [int(self._permutation(s // m)[s % m]) for s in range(start, start + self.batch_size)]

    def __iter__(self):
        rank, world = _rank_and_world()
        for _ in range(self.batches_per_epoch):
            batch = _take(self.prompts, self.batch_indices(self.position, rank, world))
            self.position += 1
            yield batch


class PromptDataModule(pl.LightningDataModule):
    """Conditions only: training batches ``ConditionBatch([B prompt strings])``; the teacher encodes them.

    The negative prompt is not data: it is set in one place, the teacher's ``negative_prompt``
    (``--model.init_args.teacher.init_args.negative_prompt``), which owns CFG wherever the teacher is sampled or
    gives targets (training, the report, ``dimo predict``).

    Args:
        train_prompts: training prompts: a ``.txt`` / ``.jsonl`` file or a ``package.module:function`` generator.
        eval_prompts: held-out prompts for evaluation (a separate file or split); None reuses ``train_prompts``.
        predict_prompts: prompts ``dimo predict`` samples, in order; None uses ``eval_prompts``.
        batch_size: prompts per batch per rank (the Di[M]O batch size B).
        batches_per_epoch: batches in one Lightning epoch (epochs only pace logging and checkpoints).
        seed: seed of the per-pass shuffling.
        shuffle: shuffle every pass over the training prompts.
        predict_samples: number of prompts ``dimo predict`` samples (cycling through ``predict_prompts``); None
            samples each prompt once.
    """

    def __init__(
        self,
        train_prompts: str = "dimo_lightning.data.captions:train_prompts",
        eval_prompts: str | None = "dimo_lightning.data.captions:eval_prompts",
        predict_prompts: str | None = None,
        batch_size: int = 64,
        batches_per_epoch: int = 100,
        seed: int = 0,
        shuffle: bool = True,
        predict_samples: int | None = None,
    ) -> None:
        super().__init__()
        check_counts(batch_size=batch_size, batches_per_epoch=batches_per_epoch, predict_samples=predict_samples)
        self.train_prompts = train_prompts
        self.eval_prompts = eval_prompts
        self.predict_prompts = predict_prompts
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.predict_samples = predict_samples
        self._loaded: dict[str, Sequence[str]] = {}
        self._stream: PromptStream | None = None

    def prompts(self, which: str) -> Sequence[str]:
        """The ``train``, ``eval`` or ``predict`` prompts (loaded and validated once)."""
        if which not in self._loaded:
            source = {
                "train": self.train_prompts,
                "eval": self.eval_prompts or self.train_prompts,
                "predict": self.predict_prompts or self.eval_prompts or self.train_prompts,
            }[which]
            self._loaded[which] = load_prompts(source, f"{which}_prompts")
        return self._loaded[which]

    def evaluation_conditions(self, num_samples: int) -> list[str]:
        """The first ``num_samples`` held-out prompts, cycling when there are fewer (the same on every rank;
        callers shard them)."""
        prompts = self.prompts("eval")
        return _take(prompts, [i % len(prompts) for i in range(num_samples)])

    def grid_conditions(self, rows: int) -> list[str]:
        """The first ``rows`` held-out prompts: one row each of
        :class:`~dimo_lightning.evaluation.callbacks.sample_grid.SampleGrid` (for the captioned-MNIST prompts, one per
        digit, in class order)."""
        prompts = self.prompts("eval")
        return _take(prompts, range(min(rows, len(prompts))))

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self._stream = PromptStream(self.prompts("train"), self.batch_size, self.batches_per_epoch, self.seed,
                                        self.shuffle)
        return ResumableLoader(self._stream, batch_size=None, collate_fn=ConditionBatch)

    def val_dataloader(self) -> DataLoader:
        """One batch of held-out prompts: validation work happens in callbacks."""
        return DataLoader([self.evaluation_conditions(self.batch_size)], batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        """``predict_samples`` prompts of ``predict_prompts`` in order (global sample i is prompt i, cycling), as
        batches ``{"conditions": [B prompts], "index": (B,) global indices}``, each rank a contiguous share
        (:class:`PromptPredictConditions`), so ``SampleWriter`` stores every prompt with its sample, in order."""
        prompts = self.prompts("predict")
        count = len(prompts) if self.predict_samples is None else self.predict_samples
        return DataLoader(PromptPredictConditions(prompts, count, self.batch_size), batch_size=None)


class PromptPredictConditions(PredictConditions):
    """``dimo predict``'s prompts: global sample ``i`` gets prompt ``i % len(prompts)``; sharding, batching and
    padding as in :class:`~dimo_lightning.data.labels.PredictConditions`.

    Args:
        prompts: the prompts, in order.
        num_samples: samples over all ranks.
        batch_size: prompts per batch.
    """

    def __init__(self, prompts: Sequence[str], num_samples: int, batch_size: int) -> None:
        super().__init__(num_samples, num_classes=1, batch_size=batch_size)
        self.prompts = prompts

    def conditions(self, index: torch.Tensor) -> list[str]:
        return _take(self.prompts, [int(i) % len(self.prompts) for i in index])
