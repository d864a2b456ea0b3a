"""Pure masking functions: mask-ratio schedules, exact-count masking, the student's hybrid initial sequence and the
embedding-noise (sigma) schedule. Every random draw takes an optional ``torch.Generator`` and runs on the device of
its inputs (no host round trips).
"""

from __future__ import annotations

import math

import torch

MASK_SCHEDULES = ("linear", "square", "cosine", "arccos", "mage")


def mask_ratio(u: torch.Tensor, schedule: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ratio rho(u) for u in [0, 1] (docs/method.md#forward-re-masking).

    linear: u; square: u^2; cosine: cos(pi u / 2); arccos: arccos(u) / (pi / 2); mage: a normal with mean 0.55 and
    std 0.25 truncated to [0.5, 1.0] (``u`` only gives the shape; the draw uses ``generator``).
    """
    if schedule == "linear":
        return u
    if schedule == "square":
        return u * u
    if schedule == "cosine":
        return torch.cos(math.pi * u / 2)
    if schedule == "arccos":
        return torch.arccos(u.clamp(-1, 1)) / (math.pi / 2)
    if schedule == "mage":
        return truncated_normal(u.shape, 0.55, 0.25, 0.5, 1.0, generator=generator, device=u.device)
    raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {', '.join(MASK_SCHEDULES)}")


def truncated_normal(
    shape: torch.Size | tuple[int, ...],
    mean: float,
    std: float,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Samples of N(mean, std^2) truncated to [low, high] by inverse-CDF sampling."""

    def std_normal_cdf(x: float) -> float:  # host-side constants: no device tensors to validate or read back
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    cdf_low = std_normal_cdf((low - mean) / std)
    cdf_high = std_normal_cdf((high - mean) / std)
    u = torch.rand(shape, generator=generator, device=device)
    p = (cdf_low + u * (cdf_high - cdf_low)).clamp(1e-7, 1 - 1e-7)
    return (mean + std * torch.special.ndtri(p)).clamp(low, high)


def schedule_u_interval(schedule: str, low: float, high: float) -> tuple[float, float]:
    """The interval of u in [0, 1] whose mask ratios rho(u) lie in [low, high] (every schedule but ``mage`` is
    monotone in u, so drawing u uniformly in this interval draws the schedule's ratios conditioned on the band)."""
    if schedule == "linear":
        return low, high
    if schedule == "square":
        return math.sqrt(low), math.sqrt(high)
    if schedule == "cosine":  # decreasing: rho = cos(pi u / 2)
        return 2 / math.pi * math.acos(high), 2 / math.pi * math.acos(low)
    if schedule == "arccos":  # decreasing: rho = arccos(u) / (pi / 2)
        return math.cos(high * math.pi / 2), math.cos(low * math.pi / 2)
    raise ValueError(f"no u interval for schedule {schedule!r}")


def sample_mask_ratio(
    batch_size: int,
    schedule: str,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clamp: tuple[float, float] | None = None,
    band: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Draw u ~ U(0, 1) per sample and return rho(u), shape (B,).

    ``clamp`` clamps the ratios (the Meissonic recipe); it piles every draw outside the range onto its edges.
    ``band`` instead draws from the schedule's distribution conditioned on [low, high]: u uniform in the u interval
    that maps into the band (a truncated normal for ``mage``), so the ratios spread over the band as the schedule
    spreads them.
    """
    if band is not None:
        low, high = band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask ratio band must be [low, high] within [0, 1], got {list(band)}")
        if schedule == "mage":
            if high < 0.5:
                raise ValueError(f"the mage schedule draws ratios in [0.5, 1]; the band {list(band)} excludes them")
            ratio = truncated_normal((batch_size,), 0.55, 0.25, max(low, 0.5), high, generator=generator,
                                     device=device)
        else:
            u_low, u_high = schedule_u_interval(schedule, low, high)
            u = u_low + (u_high - u_low) * torch.rand(batch_size, generator=generator, device=device)
            ratio = mask_ratio(u, schedule).clamp(low, high)  # clamp: float rounding at the interval ends only
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
        ratio = mask_ratio(u, schedule, generator=generator)
    if clamp is not None:
        ratio = ratio.clamp(*clamp)
    return ratio


def mask_counts(num_tokens: int, ratio: float | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Exact number of masked positions per row: max(1, round(N * ratio)), shape (B,), on the device of ``ratio``
    (CPU for a number)."""
    ratio_t = ratio.float() if torch.is_tensor(ratio) else torch.as_tensor(ratio, dtype=torch.float32)
    if ratio_t.ndim == 0 and batch_size is not None:
        ratio_t = ratio_t.expand(batch_size)
    return torch.round(num_tokens * ratio_t).long().clamp(1, num_tokens)


def random_positions_mask(
    batch_size: int,
    num_tokens: int,
    counts: torch.Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask (B, N) with exactly ``counts[b]`` True positions in row b, chosen uniformly at random."""
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each position in a random permutation
    return ranks < counts.to(ranks.device)[:, None]


def mask_tokens(
    codes: torch.Tensor,
    ratio: float | torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask exactly max(1, round(N * ratio)) random positions per row (forward process q(x_t | x_0)).

    Args:
        codes: (B, N) token ids.
        ratio: scalar or (B,) mask ratio.
        mask_id: id written at masked positions.
        generator: random source.

    Returns:
        (masked codes (B, N), mask (B, N) bool, True = masked).
    """
    b, n = codes.shape
    counts = mask_counts(n, ratio.detach() if torch.is_tensor(ratio) else ratio, b)  # stays on the device
    mask = random_positions_mask(b, n, counts, generator=generator, device=codes.device)
    return codes.masked_fill(mask, mask_id), mask


def hybrid_initial_sequence(
    batch_size: int,
    num_tokens: int,
    codebook_size: int,
    r_init: float,
    mask_id: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The student's input x_init (docs/method.md#student-input): uniform random codes in [0, K) with exactly
    max(1, round(N * r_init)) positions per row set to the mask id. Returns (B, N) long.
    """
    if not 0.0 <= r_init <= 1.0:
        raise ValueError(f"r_init must lie in [0, 1], got {r_init}")
    codes = torch.randint(0, codebook_size, (batch_size, num_tokens), generator=generator, device=device)
    masked, _ = mask_tokens(codes, r_init, mask_id, generator=generator)
    return masked


def parse_range(value: float | list[float] | tuple[float, float], name: str) -> tuple[float, float]:
    """A fixed value or a [low, high] range as (low, high); a clear error names the flag."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be a number or a [low, high] pair with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


SIGMA_SCHEDULES = ("constant", "linear", "exp", "cos")


def sigma_at(step: int, sigma: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """Embedding-noise sigma at generator step ``step``.

    ``constant`` returns ``sigma``. The warm-up schedules ramp from 0 to ``sigma`` over ``warmup_steps``:
    ``linear`` min(1, s/K), ``exp`` 1 - exp(-s/K), ``cos`` (1 - cos(pi min(1, s/K))) / 2, each times ``sigma``.
    (The official code ramps to 1, i.e. pure noise; with ``sigma=1`` these reproduce it.)
    """
    if schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    if schedule == "constant" or warmup_steps <= 0:
        return sigma
    s = step / warmup_steps
    if schedule == "linear":
        factor = min(1.0, s)
    elif schedule == "exp":
        factor = 1.0 - math.exp(-s)
    else:
        factor = (1.0 - math.cos(math.pi * min(1.0, s))) / 2.0
    return sigma * factor


def remask(
    codes: torch.Tensor,
    schedule: str,
    mask_id: int,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = None,
    band: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward masking q(x_t | x) of a sample with per-row ratios from ``schedule`` (the re-mask of every Di[M]O
    update): codes (B, N) -> (x_t (B, N), mask (B, N) bool, ratio (B,))."""
    ratio = sample_mask_ratio(codes.shape[0], schedule, generator, codes.device, clamp, band=band)
    x_t, mask = mask_tokens(codes, ratio, mask_id, generator)
    return x_t, mask, ratio
