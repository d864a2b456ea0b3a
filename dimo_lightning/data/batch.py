"""The one shape of a Di[M]O training batch: :class:`ConditionBatch` (conditions, and real codes when the data has
them).

Every DataModule that feeds ``DiMOModule.training_step`` yields it: :class:`~dimo_lightning.data.labels.
ClassLabelDataModule` (class labels), :class:`~dimo_lightning.data.prompts.PromptDataModule` (prompt strings) and
:class:`~dimo_lightning.data.real_codes.RealCodesDataModule` (labels with the real codes the GAN and coverage terms
compare with). The module never guesses what a batch holds from its contents.

Other batches keep their own shapes: validation yields the bare conditions (validation is a no-op batch; the
evaluation callbacks do the work), and ``dimo predict`` yields ``{"conditions": ..., "index": (B,) global sample
indices}`` (``index`` seeds the samples and names the files, so it travels with the conditions; an empty index marks
a padding batch, see :class:`~dimo_lightning.data.labels.PredictConditions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dimo_lightning.core.conditions import move_condition


@dataclass
class ConditionBatch:
    """One training batch.

    Attributes:
        conditions: what the student generates for, raw (the teacher encodes it): class labels (B,) long, or a list
            of B prompt strings.
        real: optional (B, N) long real token codes of the same conditions, row for row (Soft-Di[M]O's real data).
    """

    conditions: Any
    real: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.real is not None and (self.real.ndim != 2 or self.real.is_floating_point()):
            raise ValueError(f"ConditionBatch.real must be (B, N) integer codes, got {self.real.dtype} "
                             f"{list(self.real.shape)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ConditionBatch:
        """The batch on ``device`` (Lightning's batch transfer calls this): tensors move, prompt strings stay."""
        conditions = self.conditions.to(device, non_blocking=non_blocking) if torch.is_tensor(
            self.conditions) else move_condition(self.conditions, device)
        real = None if self.real is None else self.real.to(device, non_blocking=non_blocking)
        return ConditionBatch(conditions, real)
