"""The aux model's loss of one micro-batch (docs/method.md#the-aux-update): the aux model learns the student's
distribution as a masked model does its data, from re-masked student samples.

    student sample x (fresh, or the generator update's) -> re-mask x_t -> aux logits -> cross-entropy on the masked
    positions (label smoothing; optionally mixed with a KL to the student's tempered probabilities)
"""

from __future__ import annotations

import torch

from dimo_lightning.core.losses import aux_loss, finite_rows
from dimo_lightning.objectives.context import IterationContext, Objective


class AuxUpdate(Objective):
    """The aux cross-entropy on a re-masked student sample.

    Args:
        sample: ``fresh`` (a new student sample) or ``reuse`` (the generator update's draw, when it stepped).
        mask_schedule: mask-ratio schedule of the re-masking.
        mask_ratio_clamp: optional [low, high] clamp of the ratios.
        label_smoothing: label smoothing of the cross-entropy.
        soft_weight: weight of the soft loss (KL to the student's probabilities at ``soft_temperature``); 0: hard CE.
        soft_temperature: temperature of the soft loss.
        cfg_drop_ratio: share of rows whose condition is replaced by the null condition (the aux model learns the
            unconditional distribution too).

    Logs (per micro-batch): ``kept_rows``, the share of rows with finite aux and student logits.
    """

    def __init__(self, *, sample: str, mask_schedule: str, mask_ratio_clamp: list[float] | None,
                 label_smoothing: float, soft_weight: float, soft_temperature: float, cfg_drop_ratio: float) -> None:
        self.sample = sample
        self.mask_schedule = mask_schedule
        self.mask_ratio_clamp = mask_ratio_clamp
        self.label_smoothing = label_smoothing
        self.soft_weight = soft_weight
        self.soft_temperature = soft_temperature
        self.cfg_drop_ratio = cfg_drop_ratio

    def loss(self, ctx: IterationContext, part: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            x, z = ctx.sample_for(part, reuse=self.sample == "reuse")  # (B, N), (B, N, V)
            drop = None
            if self.cfg_drop_ratio > 0:
                drop = torch.rand(x.shape[0], generator=ctx.generator, device=ctx.device) < self.cfg_drop_ratio
            x_t, mask, _ = ctx.remask(x, part, self.mask_schedule, self.mask_ratio_clamp)
            soft = (z.float() / self.soft_temperature).softmax(-1) if self.soft_weight > 0 else None
        logits = ctx.teacher.apply_network(ctx.aux, x_t, ctx.conditions[part], drop)
        valid = finite_rows(logits.detach(), z)
        loss = aux_loss(logits, x, mask, self.label_smoothing, soft, self.soft_weight, self.soft_temperature,
                        row_weight=valid)
        return loss, {"kept_rows": valid.float().mean()}
