"""Sampling: categorical sampling with temperature / top-k / top-p, the one-step student sampler and the MaskGIT
iterative decoder used for teachers (docs/method.md#one-step-sampling; the teacher's decoding settings:
docs/cli.md#one-set-of-teacher-decoding-settings).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DECODE_SCHEDULES = ("root", "linear", "square", "cosine", "arccos")


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    exclude_ids: tuple[int, ...] | list[int] = (),
) -> torch.Tensor:
    """Logits (..., V) divided by ``temperature``, with excluded ids, entries below the k-th largest (top_k > 0) and
    entries past cumulative probability ``top_p`` (0 < top_p < 1; the most likely one is always kept) set to -inf.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature  # a new tensor: the edits below never touch the caller's logits
    if exclude_ids:
        logits[..., list(exclude_ids)] = float("-inf")
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def gumbel_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Standard Gumbel samples -log(-log u), u ~ U(0, 1), float32."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    # In place on the one buffer: the same operations in the same order as -log(-log(u)) with its clamps, so the
    # same values bit for bit, without five temporaries of the logits' size (samplers call this on (B, N, V)).
    return u.clamp_min_(1e-20).log_().neg_().clamp_min_(1e-20).log_().neg_()


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per position from softmax(logits (..., V)) -> (...) long, via the Gumbel-max trick."""
    # noise + logits in the noise buffer: float addition commutes, so this is logits + noise bit for bit.
    noise = gumbel_noise(logits.shape, generator, logits.device)
    return noise.add_(logits.detach().float()).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    exclude_ids: tuple[int, ...] | list[int] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample codes (B, N) from logits (B, N, V) with temperature / top-k / top-p, never drawing ``exclude_ids``."""
    return sample_categorical(filter_logits(logits, temperature, top_k, top_p, exclude_ids), generator)


def decode_schedule(steps: int, num_tokens: int, mode: str = "arccos") -> list[int]:
    """Number of tokens revealed at each of ``steps`` MaskGIT steps; each >= 1 and they sum to N.

    r_i = linspace(1, 0, S); v_i by mode (root 1 - sqrt(r), linear 1 - r, square 1 - r^2, cosine cos(pi r / 2),
    arccos arccos(r) / (pi / 2)); t_i = round(N v_i / sum v); zeros become 1 and the last entry absorbs the rest.
    Examples (N = 256, arccos): S=8 -> [1, 18, 26, 32, 38, 43, 48, 50].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(f"steps ({steps}) cannot exceed the number of tokens ({num_tokens})")
    if steps == 1:
        return [num_tokens]
    r = torch.linspace(1, 0, steps, dtype=torch.float64)
    if mode == "root":
        v = 1 - r.sqrt()
    elif mode == "linear":
        v = 1 - r
    elif mode == "square":
        v = 1 - r**2
    elif mode == "cosine":
        v = torch.cos(r * math.pi / 2)
    elif mode == "arccos":
        v = torch.arccos(r) / (math.pi / 2)
    else:
        raise ValueError(f"unknown decode schedule {mode!r}; choose one of {', '.join(DECODE_SCHEDULES)}")
    counts = [max(1, int(x)) for x in torch.round(num_tokens * v / v.sum()).tolist()]
    counts[-1] = num_tokens - sum(counts[:-1])
    # Rounding can overshoot; take the excess back from the largest earlier steps, keeping every step >= 1.
    while counts[-1] < 1:
        i = max(range(steps - 1), key=lambda j: counts[j])
        counts[i] -= 1
        counts[-1] += 1
    return counts


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` in one new buffer.

    The expression written out allocates three tensors of the logits' size; this one (``cond`` and ``uncond`` are
    left untouched: a model's output is not ours to overwrite). Products and sums commute, so the values equal the
    written-out expression bit for bit, and autograd goes through it alike.

    Args:
        cond: (B, N, V) conditional logits.
        uncond: (B, N, V) unconditional logits.
        scale: a number, or a tensor broadcastable to the logits (e.g. (B, 1, 1) per-sample scales).
    """
    return torch.sub(cond, uncond).mul_(scale).add_(uncond)


LogitsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def maskgit_decode(
    logits_fn: LogitsFn,
    batch_size: int,
    num_tokens: int,
    codebook_size: int,
    mask_id: int,
    steps: int = 8,
    schedule: str = "arccos",
    cfg_scale: float = 1.0,
    cfg_ramp: bool = True,
    softmax_temperature: float = 1.0,
    choice_temperature: float = 4.5,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    cfg_batched: bool = True,
    initial: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """MaskGIT iterative decoding from an all-mask sequence (or from ``initial``, whose unmasked entries stay).

    At step i the model scores every position; a token is drawn at each still-masked position; the scheduled
    number of drawn tokens with the highest confidence ``log p + tau_i * Gumbel`` (tau_i annealed linearly from
    ``choice_temperature`` to 0) are written and stay fixed. The mask slot is never drawn.

    Args:
        logits_fn: ``(codes (B', N), drop_condition (B',) bool or None) -> logits (B', N, V)``; with CFG it is
            called once per step on a batch of 2B (conditional half first), or, with ``cfg_batched=False``, twice
            on B: conditional (``None``), then unconditional (all-True flags).
        batch_size: B.
        num_tokens: N.
        codebook_size: K; logits beyond K (the mask slot) are ignored.
        mask_id: id of the mask token.
        steps: S.
        schedule: how many tokens each step reveals (:func:`decode_schedule`).
        cfg_scale: guidance w in ``l_u + w (l_c - l_u)``; 1 is a purely conditional pass.
        cfg_ramp: ramp the scale linearly from 1 at the first step to ``cfg_scale`` at the last.
        softmax_temperature: the logits are divided by it before sampling.
        choice_temperature: initial Gumbel temperature of the confidence (0: pure confidence).
        device: device of the codes.
        generator: random source.
        return_history: also return the codes after each step.
        cfg_batched: one network pass of 2B per guided step (True), or two passes of B. The logits agree up to
            float rounding (the matrix products are blocked differently); which is faster depends on the device
            and the batch (``dimo bench`` times both).
        initial: optional (B, N) starting codes: the mask id where tokens are to be drawn, anything else (a text
            prompt, ids of any range) where they are kept. Each row gets its own schedule over its own number of
            masked positions (a row with fewer masked positions than ``steps`` reveals one per step, then waits;
            steps in which no row reveals anything are skipped). None: all-mask codes (the image path, whose draws it
            leaves as they were).

    Returns:
        Codes (B, N): drawn entries in [0, K) (no mask left), kept entries of ``initial`` unchanged; and the list of
        per-step codes if ``return_history``.
    """
    row_counts = None  # (B, S) per-row reveal counts, when rows of ``initial`` have different numbers of masks
    if initial is None:
        counts = decode_schedule(steps, num_tokens, schedule)
    else:
        if tuple(initial.shape) != (batch_size, num_tokens):
            raise ValueError(f"initial codes must be (B={batch_size}, N={num_tokens}), got {list(initial.shape)}")
        masked = (initial == mask_id).sum(dim=1).tolist()
        # A row with fewer masked positions than steps reveals one per step and then waits.
        schedules = {m: decode_schedule(min(steps, m), m, schedule) + [0] * (steps - m) if 0 < m < steps
                     else decode_schedule(steps, m, schedule) if m else [0] * steps for m in set(masked)}
        if len(schedules) == 1:
            counts = schedules[masked[0]]
        else:
            row_counts = torch.tensor([schedules[m] for m in masked], dtype=torch.long, device=initial.device)
            counts = row_counts.max(dim=0).values.tolist()
    # Per-step constants on the host, once: the guidance scale and the confidence's Gumbel temperature.
    progress = [i / (steps - 1) if steps > 1 else 1.0 for i in range(steps)]
    scales = [1.0 + (cfg_scale - 1.0) * p if cfg_ramp else cfg_scale for p in progress]
    taus = [choice_temperature * (1.0 - p) if steps > 1 else 0.0 for p in progress]
    if initial is None:
        codes = torch.full((batch_size, num_tokens), mask_id, dtype=torch.long, device=device)
    else:
        codes = initial.to(device=device, dtype=torch.long)
    drop = None  # the CFG drop flags (2B, conditional half first; or B, all True, for the split form), made once
    history = []
    for i, count in enumerate(counts):
        if count == 0:  # only from ``initial``: every row has revealed all its positions already
            continue
        still_masked = codes == mask_id  # (B, N)
        if scales[i] == 1.0:
            logits = logits_fn(codes, None)[..., :codebook_size]
        elif cfg_batched:
            if drop is None:
                drop = torch.arange(2 * batch_size, device=codes.device) >= batch_size
            both = logits_fn(codes.repeat(2, 1), drop)
            cond, uncond = both[:batch_size, :, :codebook_size], both[batch_size:, :, :codebook_size]
            logits = cfg_combine(cond, uncond, scales[i])
        else:
            if drop is None:
                drop = torch.ones(batch_size, dtype=torch.bool, device=codes.device)
            cond = logits_fn(codes, None)[..., :codebook_size]
            logits = cfg_combine(cond, logits_fn(codes, drop)[..., :codebook_size], scales[i])
        logits = logits.float()
        if softmax_temperature != 1.0:  # x / 1 == x exactly: no copy of the logits for the default
            logits = logits / softmax_temperature
        drawn = sample_categorical(logits, generator)  # (B, N)
        if i == len(counts) - 1:
            # The last step reveals every position still masked (the counts sum to N and each step reveals
            # exactly its count), and its Gumbel temperature is 0 (no draw): skipping the confidence changes
            # neither the codes nor the random stream.
            reveal = still_masked
        else:
            log_prob = logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
            if taus[i] > 0:
                log_prob = log_prob + taus[i] * gumbel_noise(log_prob.shape, generator, log_prob.device)
            confidence = log_prob.masked_fill_(~still_masked, float("-inf"))
            chosen = confidence.topk(count, dim=-1).indices  # (B, count): exactly `count` new tokens per row
            if row_counts is None:
                reveal = torch.zeros_like(still_masked).scatter_(1, chosen, True).logical_and_(still_masked)
            else:  # row b takes the first row_counts[b, i] of the `count` (its row maximum) most confident
                take = torch.arange(count, device=codes.device)[None] < row_counts[:, i : i + 1]
                reveal = torch.zeros_like(still_masked).scatter_(1, chosen, take).logical_and_(still_masked)
        codes = torch.where(reveal, drawn, codes)
        if return_history:
            history.append(codes)  # torch.where made a new tensor: no clone needed
    return (codes, history) if return_history else codes
