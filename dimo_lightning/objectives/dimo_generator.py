"""The generator's loss of one micro-batch: the Di[M]O term on a re-masked student sample, plus the Soft-Di[M]O terms
on the same draw (docs/method.md#the-iteration, #targets-and-the-divergence, #soft-dimo).

    x_init -> student logits z (with grad) -> sample x -> re-mask x_t -> teacher (CFG) and aux logits on x_t
    -> per-token gradient g -> surrogate loss whose gradient in z is g on the masked positions
    [+ w_gan * L_gan(z) + w_cov * coverage(z)]
"""

from __future__ import annotations

import torch

from dimo_lightning.core.losses import distribution_matching_grad, finite_rows, generator_loss
from dimo_lightning.objectives.context import DrawTerm, IterationContext, Objective, StudentDraw


class DiMOGenerator(Objective):
    """The student's loss: ``L_DiMO`` (or, with ``gan_only``, none of it) ``+ ctx.gan_weight * L_gan + coverage_weight
    * coverage``.

    Args:
        cfg_scale: guidance scale of the teacher's targets (1: no CFG).
        adaptive_cfg: per-sample scale ``1 + (cfg_scale - 1) * mask ratio``.
        divergence_beta: 0 forward KL, 1 reverse KL, between: the mix.
        teacher_temperature: temperature of the teacher's softmax in the divergence.
        aux_temperature: temperature of the aux softmax in the divergence.
        mask_schedule: mask-ratio schedule of the re-masking.
        mask_ratio_band: optional [low, high]: the ratios drawn from the schedule conditioned on this band.
        mask_ratio_clamp: optional [low, high] clamp of the ratios.
        exclude_mask_from_grad: zero the token gradient on the mask logit.
        aux_from_student: the aux-free ablation (``aux.mode: none``): the student's own detached logits on the
            re-masked sample stand in for the aux model's.
        gan: the GAN's generator term (:class:`~dimo_lightning.objectives.gan.GANGeneratorTerm`), or None.
        coverage: the coverage term (:class:`~dimo_lightning.objectives.coverage.CoverageTerm`), or None.
        coverage_weight: its weight.
        gan_only: ablation: ``L_gan`` alone (no teacher or aux forward).

    Logs (per micro-batch): ``kept_rows`` (share of finite rows), ``gan`` (the weighted GAN term) and ``coverage``
    (the detached energy distance) when those terms are on.
    """

    def __init__(self, *, cfg_scale: float, adaptive_cfg: bool, divergence_beta: float, teacher_temperature: float,
                 aux_temperature: float, mask_schedule: str, mask_ratio_band: list[float] | None,
                 mask_ratio_clamp: list[float] | None, exclude_mask_from_grad: bool, aux_from_student: bool = False,
                 gan: DrawTerm | None = None, coverage: DrawTerm | None = None, coverage_weight: float = 0.0,
                 gan_only: bool = False) -> None:
        if gan_only and gan is None:
            raise ValueError("gan_only needs the GAN's generator term")
        self.cfg_scale = cfg_scale
        self.adaptive_cfg = adaptive_cfg
        self.divergence_beta = divergence_beta
        self.teacher_temperature = teacher_temperature
        self.aux_temperature = aux_temperature
        self.mask_schedule = mask_schedule
        self.mask_ratio_band = mask_ratio_band
        self.mask_ratio_clamp = mask_ratio_clamp
        self.exclude_mask_from_grad = exclude_mask_from_grad
        self.aux_from_student = aux_from_student
        self.gan = gan
        self.coverage = coverage
        self.coverage_weight = coverage_weight
        self.gan_only = gan_only

    def token_gradient(self, ctx: IterationContext, part: int, x: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-mask the sample x (B, N) and compare teacher and aux on it (no grad) -> (g (B, N, V), mask (B, N),
        teacher logits, aux logits)."""
        t, cond = ctx.teacher, ctx.conditions[part]
        with torch.no_grad():
            x_t, mask, ratio = ctx.remask(x, part, self.mask_schedule, self.mask_ratio_clamp, self.mask_ratio_band)
            # A Python float when the scale is fixed: the teacher decides "no CFG" without a device read.
            adaptive = self.adaptive_cfg and self.cfg_scale != 1
            scale = 1 + (self.cfg_scale - 1) * ratio if adaptive else float(self.cfg_scale)
            teacher_logits = t.guided_logits(t.network, x_t, cond, scale)
            aux_logits = t.apply_network(ctx.student if self.aux_from_student else ctx.aux, x_t, cond)
            grad = distribution_matching_grad(teacher_logits, aux_logits, self.divergence_beta,
                                              teacher_temperature=self.teacher_temperature,
                                              aux_temperature=self.aux_temperature)
            if self.exclude_mask_from_grad and grad.shape[-1] > t.mask_id:
                grad[..., t.mask_id] = 0
        return grad, mask, teacher_logits, aux_logits

    def loss(self, ctx: IterationContext, part: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = ctx.student_logits(part)  # (B, N, V), with grad
        x = ctx.draw(z, part)  # (B, N)
        logs: dict[str, torch.Tensor] = {}
        if self.gan_only:  # ablation: L_gan alone, no teacher or aux forward
            draw = StudentDraw(z, x, finite_rows(z.detach()))
            loss = ctx.gan_weight * self.gan.loss(ctx, part, draw)[0]
            logs["gan"] = loss.detach()
        else:
            grad, mask, teacher_logits, aux_logits = self.token_gradient(ctx, part, x)
            draw = StudentDraw(z, x, finite_rows(z.detach(), teacher_logits, aux_logits))
            loss = generator_loss(z, grad, mask, row_weight=draw.valid)
            if self.gan is not None and ctx.gan_weight > 0:  # Soft-Di[M]O: + w_gan * L_gan (soft embedding path)
                gan_term = ctx.gan_weight * self.gan.loss(ctx, part, draw)[0]
                logs["gan"] = gan_term.detach()
                loss = loss + gan_term
            if self.coverage is not None:  # the energy distance to the real codes, per class
                coverage_loss, coverage_logs = self.coverage.loss(ctx, part, draw)
                logs.update(coverage_logs)
                loss = loss + self.coverage_weight * coverage_loss
        ctx.samples = (ctx.samples or []) + [(x, z.detach())]
        logs["kept_rows"] = draw.valid.float().mean()
        return loss, logs
