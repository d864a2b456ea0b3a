"""The student's one step, written once: a fresh hybrid input -> student logits -> sampled tokens.

Training (the generator, aux and discriminator updates), evaluation, the benchmark and the exported pipeline all
draw student samples through these functions, so a change to the student's input (a new noise, a timestep) is made
in one place.

Fixed positions (a text prompt, ``PrefixCondition.fixed``) are enforced here too: the hybrid input gets the prompt
written in before the forward (:func:`student_logits`), drawn tokens get it after drawing (:func:`student_tokens`),
and a re-masked sample keeps it and leaves it out of the loss mask (:func:`remask_sample`). Image teachers'
``fix_positions`` return the codes unchanged and their conditions have no ``fixed``, so image runs draw and compute
exactly what they did before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dimo_lightning.core.masking import hybrid_initial_sequence, remask
from dimo_lightning.core.sampling import sample_tokens


@dataclass(frozen=True)
class StudentInput:
    """How the student's input is drawn for one call.

    Attributes:
        r_init: share of masked positions in the hybrid input (the rest are uniform random codes).
        sigma: embedding-noise level of the input embeddings.
        noise_scale: multiplier of ``sigma`` (the RMS of the code embeddings when the noise is relative).
    """

    r_init: float
    sigma: float
    noise_scale: float = 1.0


@dataclass(frozen=True)
class TokenSampling:
    """How tokens are drawn from the student's logits: temperature, top-k / top-p (0: off), ids never drawn."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    exclude: tuple[int, ...] = ()


def one_step_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    seq_len: int,
    codebook_size: int,
    mask_id: int,
    r_init: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``forward`` applied to a fresh hybrid input x_init (B, N) -> logits (B, N, V).

    The input's random codes and mask positions are drawn from ``generator`` before ``forward`` runs (which may draw
    the embedding noise from the same generator), so every caller consumes the stream in the same order.
    """
    x_init = hybrid_initial_sequence(batch_size, seq_len, codebook_size, r_init, mask_id, generator, device)
    return forward(x_init)


def student_logits(teacher, network: torch.nn.Module, cond, student_input: StudentInput,
                   generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
    """One forward of ``network`` (student, its EMA, or the aux) through ``teacher``'s contract -> logits (B, N, V)."""
    return one_step_logits(
        lambda x_init: teacher.apply_network(network, teacher.fix_positions(x_init, cond), cond, None,
                                             student_input.sigma, student_input.noise_scale, generator),
        teacher.condition_batch_size(cond), teacher.seq_len, teacher.codebook_size, teacher.mask_id,
        student_input.r_init, generator, device,
    )


def draw_tokens(logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None) -> torch.Tensor:
    """Tokens (B, N) drawn from ``logits`` (B, N, V) under ``sampling``."""
    return sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.exclude, generator)


def student_tokens(teacher, logits: torch.Tensor, cond, sampling: TokenSampling,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Tokens (B, N) drawn from student ``logits`` (B, N, V), with ``cond``'s fixed positions (a prompt) written back:
    the student never changes a prompt token."""
    return teacher.fix_positions(draw_tokens(logits, sampling, generator), cond)


def remask_sample(teacher, codes: torch.Tensor, cond, schedule: str, generator: torch.Generator | None,
                  clamp: tuple[float, float] | list[float] | None = None,
                  band: tuple[float, float] | list[float] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The re-mask of a student sample (every Di[M]O update, the consistency diagnostic, the benchmark): codes (B, N)
    -> (x_t (B, N), mask (B, N) bool, ratio (B,)).

    The ratios and masked positions are drawn by :func:`~dimo_lightning.core.masking.remask` over all N positions
    (the same draws with or without a prompt); then ``cond``'s fixed positions get their tokens back and leave the
    mask (``mask & ~cond.fixed``), so no loss or target is ever computed on a prompt token. ``ratio`` is the drawn
    one (adaptive CFG reads it), not the share of generated positions masked.
    """
    x_t, mask, ratio = remask(codes, schedule, teacher.mask_id, generator, clamp, band=band)
    fixed = getattr(cond, "fixed", None)
    if fixed is not None:
        x_t = teacher.fix_positions(x_t, cond)
        mask = mask & ~fixed.to(mask.device)
    return x_t, mask, ratio


@torch.no_grad()
def student_sample(teacher, network: torch.nn.Module, cond, student_input: StudentInput, sampling: TokenSampling,
                   generator: torch.Generator | None,
                   device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A detached student sample: (tokens x (B, N), prompt kept; logits z (B, N, V))."""
    z = student_logits(teacher, network, cond, student_input, generator, device)
    return student_tokens(teacher, z, cond, sampling, generator), z
