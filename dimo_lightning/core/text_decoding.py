"""Multi-step decoders of text masked-diffusion models, written from their references (pure functions of a logits
function; the teachers wire them to their networks).

- :func:`ancestral_decode`: MDLM's ancestral sampler over the log-linear schedule (``Diffusion._sample`` with the
  ``ddpm_cache`` predictor and ``_ddpm_caching_update`` in kuleshov-group/mdlm ``diffusion.py``).
- :func:`block_decode`: LLaDA's low-confidence / random remasking with semi-autoregressive blocks (``generate`` and
  ``get_num_transfer_tokens`` in ML-GSAI/LLaDA ``generate.py``).

MaskGIT-style confidence decoding, the third decoder, is :func:`dimo_lightning.core.sampling.maskgit_decode` with
``initial`` codes.

Conventions: codes (B, L) long; the mask id is K (the logit width), so logits (B, L, K) never score the mask. Entries
of the starting codes that are not the mask (a prompt) are kept as they are, whatever their id; every masked entry
is filled with an id in [0, K).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# MDLM's sampler constants (diffusion.py / noise_schedule.py of kuleshov-group/mdlm).
ANCESTRAL_EPS = 1e-5  # the last time of the sampling grid, linspace(1, eps, steps + 1)
LOGLINEAR_EPS = 1e-3  # LogLinearNoise: sigma(t) = -log(1 - (1 - eps) t)
SAMPLING_PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
REMASKING = ("low_confidence", "random")


def loglinear_sigma(t: torch.Tensor, eps: float = LOGLINEAR_EPS) -> torch.Tensor:
    """MDLM's log-linear total noise ``sigma(t) = -log1p(-(1 - eps) t)`` (the network's time input)."""
    return -torch.log1p(-(1 - eps) * t)


def exponential_race(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from unnormalised non-negative ``weights`` (..., V) -> (...) long, as MDLM's
    ``_sample_categorical``: ``argmax(w / E)`` with ``E = 1e-10 - log(u + 1e-10)``, u ~ U(0, 1) in the weights'
    dtype (float64 keeps the tail that float32 noise truncates)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=weights.dtype)
    return (weights / (1e-10 - (u + 1e-10).log())).argmax(dim=-1)


@torch.no_grad()
def ancestral_decode(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    mask_id: int,
    steps: int,
    *,
    precision: str = "float64",
    softmax_temperature: float = 1.0,
    cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MDLM's ancestral sampler (SUBS parameterisation, log-linear schedule, continuous time) -> codes (B, L).

    Times ``t_i = linspace(1, 1e-5, steps + 1)``, ``dt = (1 - 1e-5) / steps``; at each step, with the move chances
    ``t`` and ``s = t - dt`` (the log-linear schedule's ``1 - exp(-sigma(t))`` up to its eps), a masked position
    becomes token v with weight ``p_theta(v) (t - s)`` and stays masked with weight ``s``; unmasked positions are
    copied (SUBS carry-over). The final "noise removal" step writes the argmax of ``p_theta`` into every position
    still masked, so no mask is left. With ``cache`` the network's distribution is reused while the codes have not
    changed (the reference's ``ddpm_cache``; valid only for a network that ignores its time input).

    The step is drawn in two stages with the same law as the reference's one race over K + 1 weights: since
    ``p_theta`` sums to 1, a masked position moves with probability ``dt / t`` (a uniform in ``precision``), and
    only the positions that move race over the K tokens. Each position thus races once in the whole decode rather
    than once per step, which makes many-step sampling of a large vocabulary affordable on a CPU.

    Args:
        logits_fn: ``(codes (B, L), sigma (B,)) -> logits (B, L, K)`` over the K non-mask ids.
        initial: (B, L) starting codes: ``mask_id`` where tokens are drawn; other entries (a prompt) are kept.
        mask_id: K.
        steps: number of denoising steps (>= 1).
        precision: "float64" (draws the move and the exponential race in float64, the precision that keeps the
            sampler's token entropy: Zheng et al. 2024, arXiv:2409.02908) or "float32" (the original MDLM code).
        softmax_temperature: the logits are divided by it (1: the reference).
        cache: reuse the distribution while the codes are unchanged.
        generator: random source.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"sampling_precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}")
    if softmax_temperature <= 0:
        raise ValueError(f"softmax_temperature must be > 0, got {softmax_temperature}")
    dtype = SAMPLING_PRECISIONS[precision]
    x = initial.clone()
    b = x.shape[0]
    times = torch.linspace(1, ANCESTRAL_EPS, steps + 1, dtype=torch.float64).tolist()
    dt = (1 - ANCESTRAL_EPS) / steps

    def probabilities(codes: torch.Tensor, t: float) -> torch.Tensor:
        sigma = loglinear_sigma(torch.full((b,), t, dtype=torch.float32, device=codes.device))
        logits = logits_fn(codes, sigma).float()
        if softmax_temperature != 1.0:
            logits = logits / softmax_temperature
        return logits.softmax(dim=-1)  # (B, L, K) float32; cast to ``dtype`` where drawn

    p_x0 = None
    for i in range(steps):
        t = times[i]
        if p_x0 is None:
            p_x0 = probabilities(x, t)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
        moves = (x == mask_id) & (u < dt / t)  # the race's chance of a token over staying masked: dt / t
        if bool(moves.any()):  # x is this function's copy of ``initial``: written in place
            x[moves] = exponential_race(p_x0[moves].to(dtype), generator)
            p_x0 = None  # the codes changed: the distribution is stale
        elif not cache:
            p_x0 = None
    still_masked = x == mask_id
    if bool(still_masked.any()):  # noise removal at t = 1e-5: the most likely token (SUBS never predicts the mask)
        if p_x0 is None:
            p_x0 = probabilities(x, times[-1])
        x = torch.where(still_masked, p_x0.argmax(dim=-1), x)
    return x


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: (B,) masked counts -> (B, steps) tokens revealed per step, the linear
    schedule's equal shares ``m // steps`` with the remainder given to the first steps."""
    base = masked[:, None] // steps
    remainder = masked[:, None] % steps
    return base + (torch.arange(steps, device=masked.device)[None] < remainder).long()


@torch.no_grad()
def block_decode(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    mask_id: int,
    steps: int,
    block_length: int,
    *,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    softmax_temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LLaDA's semi-autoregressive remasking sampler -> codes (B, L).

    The masked positions of each row, in order, are cut into blocks of ``block_length`` (the last may be shorter)
    decoded one after the other. Block j gets ``steps_j`` steps (``steps / num_blocks`` each when that divides, as
    the reference requires; otherwise the remainder goes to the first blocks), and each step reveals the
    :func:`transfer_counts` share of the block's masked positions: a candidate token per masked position is the
    argmax of ``exp(logits) / (-log u)^temperature`` in float64 (Gumbel-max sampling at ``temperature``; greedy at
    0), and the positions revealed are those of the current and earlier blocks with the highest confidence: the
    candidate's float64 softmax probability (``low_confidence``) or a uniform draw (``random``).

    Args:
        logits_fn: ``codes (B, L) -> logits (B, L, K)`` over the K non-mask ids (guidance, if any, applied inside).
        initial: (B, L) starting codes: ``mask_id`` where tokens are drawn; other entries (a prompt) are kept.
        mask_id: K.
        steps: total number of network passes (>= the number of blocks).
        block_length: tokens per block (the generated length: one block, no semi-autoregression).
        remasking: "low_confidence" or "random".
        temperature: the Gumbel temperature (0: argmax).
        softmax_temperature: the logits are divided by it first (1: the reference).
        generator: random source.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if temperature < 0 or softmax_temperature <= 0:
        raise ValueError(f"temperature must be >= 0 and softmax_temperature > 0, got {temperature}, "
                         f"{softmax_temperature}")
    x = initial.clone()
    generated = x == mask_id  # (B, L)
    block_of = (generated.long().cumsum(dim=1) - 1) // block_length  # block index of every generated position
    num_blocks = -(-int(generated.sum(dim=1).max()) // block_length)
    if num_blocks == 0:
        return x
    if steps < num_blocks:
        raise ValueError(f"steps ({steps}) must be at least the number of blocks ({num_blocks} blocks of "
                         f"block_length {block_length}): each block takes at least one step")
    per_block = [steps // num_blocks + (j < steps % num_blocks) for j in range(num_blocks)]
    for j, block_steps in enumerate(per_block):
        in_block = generated & (block_of == j)
        counts = transfer_counts((in_block & (x == mask_id)).sum(dim=1), block_steps)  # (B, block_steps)
        open_positions = generated & (block_of <= j)
        for i in range(block_steps):
            count = counts[:, i]
            k = int(count.max())
            if k == 0:  # more steps than masked positions in this block: nothing to reveal, no pass needed
                continue
            masked = x == mask_id
            logits = logits_fn(x).to(torch.float64)
            if softmax_temperature != 1.0:
                logits = logits / softmax_temperature
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
                candidate = (logits.exp() / (-u.log()) ** temperature).argmax(dim=-1)
            else:
                candidate = logits.argmax(dim=-1)
            if remasking == "low_confidence":
                confidence = logits.softmax(dim=-1).gather(-1, candidate[..., None])[..., 0]
            else:
                confidence = torch.rand(candidate.shape, generator=generator, device=candidate.device)
                confidence = confidence.to(torch.float64)
            confidence = confidence.masked_fill(~(masked & open_positions), float("-inf"))
            chosen = confidence.topk(k, dim=-1).indices  # (B, k), most confident first
            take = torch.arange(k, device=x.device)[None] < count[:, None]
            reveal = torch.zeros_like(masked).scatter_(1, chosen, take) & masked
            x = torch.where(reveal, candidate, x)
    return x
