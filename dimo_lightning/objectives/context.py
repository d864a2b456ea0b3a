"""What the objectives of one Di[M]O iteration share: :class:`IterationContext`, and the :class:`Objective` interface.

An iteration (docs/method.md#the-iteration) runs up to three updates (generator, aux, discriminator) over the same
micro-batches with one random generator; each update's loss is an :class:`Objective` that reads the context instead
of a list of positional arguments. The training module builds the context, runs each objective over the
micro-batches (backward, clipping, the optimizer step) and logs what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dimo_lightning.inference.one_step import (
    StudentInput,
    TokenSampling,
    remask_sample,
    student_logits,
    student_sample,
    student_tokens,
)
from dimo_lightning.teachers.base import MaskedTeacher


@dataclass
class IterationContext:
    """One iteration's conditions, data, randomness and networks.

    Attributes:
        teacher: the frozen teacher (targets, trunk, tokenizer).
        student: the student network (trained by the generator update).
        aux: the aux network (trained by the aux update).
        conditions: the encoded conditions on the device, one entry per micro-batch.
        real: (B_i, N) real codes per micro-batch (Soft-Di[M]O's real data), else None.
        student_input: r_init, sigma and noise scale of the student's input this iteration.
        sampling: how the student's tokens are drawn in training.
        generator: the iteration's random generator: every draw of every update comes from it, in order.
        device: where the iteration runs.
        gan_weight: w_gan of this iteration (0 without the GAN).
        samples: the generator update's detached draws ``(x (B_i, N), z (B_i, N, V))`` per micro-batch, for the aux
            (``aux.sample: reuse``) and discriminator updates; None when the generator did not step.
    """

    teacher: MaskedTeacher
    student: nn.Module
    aux: nn.Module
    conditions: list[Any]
    real: list[torch.Tensor] | None
    student_input: StudentInput
    sampling: TokenSampling
    generator: torch.Generator
    device: torch.device
    gan_weight: float = 0.0
    samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def parts(self) -> int:
        """Number of micro-batches."""
        return len(self.conditions)

    def student_logits(self, part: int) -> torch.Tensor:
        """The student's logits (B_i, N, V) on a fresh hybrid input of micro-batch ``part``, with grad."""
        return student_logits(self.teacher, self.student, self.conditions[part], self.student_input, self.generator,
                              self.device)

    def draw(self, logits: torch.Tensor, part: int) -> torch.Tensor:
        """Tokens (B_i, N) drawn from (detached) student logits of micro-batch ``part`` (its prompt kept)."""
        with torch.no_grad():
            return student_tokens(self.teacher, logits.detach(), self.conditions[part], self.sampling, self.generator)

    def student_sample(self, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A detached student sample of micro-batch ``part``: (x (B_i, N), z (B_i, N, V))."""
        return student_sample(self.teacher, self.student, self.conditions[part], self.student_input, self.sampling,
                              self.generator, self.device)

    def sample_for(self, part: int, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator update's draw of ``part`` when ``reuse`` and there is one, else a fresh student sample."""
        if reuse and self.samples is not None:
            return self.samples[part]
        return self.student_sample(part)

    def remask(self, codes: torch.Tensor, part: int, schedule: str, clamp: list[float] | None = None,
               band: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward masking of a sample (B_i, N) of micro-batch ``part``: (x_t, mask (B_i, N) bool, ratio (B_i,)) with
        ``schedule``; its fixed positions (a prompt) kept and out of the mask
        (:func:`~dimo_lightning.inference.one_step.remask_sample`)."""
        return remask_sample(self.teacher, codes, self.conditions[part], schedule, self.generator, clamp, band=band)


def split_real(real: torch.Tensor, conditions: list[Any], teacher: MaskedTeacher,
               device: torch.device) -> list[torch.Tensor]:
    """Real codes (B, N) on ``device``, split like ``conditions`` into micro-batches (a ValueError if they differ)."""
    parts = list(real.to(device).chunk(len(conditions)))
    if [len(r) for r in parts] != [teacher.condition_batch_size(c) for c in conditions]:
        raise ValueError(f"real codes batch of {len(real)} rows does not match its {len(conditions)} micro-batches")
    return parts


class Objective:
    """One loss of a Di[M]O iteration, computed per micro-batch.

    ``loss(ctx, part)`` returns the micro-batch's loss (with grad, before the 1 / parts of accumulation) and a dict
    of detached scalar logs; the caller averages the logs over the micro-batches. Every random draw comes from
    ``ctx.generator`` so that the iteration's draws happen in one fixed order.
    """

    def loss(self, ctx: IterationContext, part: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class DrawTerm:
    """A term of the generator loss that scores the generator update's student draw of one micro-batch (the GAN's
    generator term, the coverage term): ``loss(ctx, part, draw) -> (unweighted loss with grad, detached logs)``."""

    def loss(self, ctx: IterationContext, part: int,
             draw: StudentDraw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class StudentDraw:
    """The generator update's student draw of one micro-batch, which the Soft-Di[M]O terms score.

    Attributes:
        z: (B, N, V) student logits, with grad.
        x: (B, N) the tokens sampled from them (constants).
        valid: (B,) bool rows whose logits (student, teacher, aux) are all finite; the terms leave the others out.
    """

    z: torch.Tensor
    x: torch.Tensor
    valid: torch.Tensor
