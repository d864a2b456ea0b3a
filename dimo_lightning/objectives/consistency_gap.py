"""The consistency diagnostic (docs/method.md#consistency-diagnostic): how far the student's prediction on a
re-masked sample is from its one-step prediction on the initial sequence, at the re-masked positions, binned by
mask ratio.

Di[M]O applies the divergence gradient computed at x_t (teacher and aux conditionals on a re-masked student
sample) to the student's logits on x_init. That is exact only if the student's own prediction on x_t equals its
prediction on x_init at the masked positions: the consistency assumption. Here it is measured, per sample, as

    KL( softmax(student(x_t))[i] || softmax(student(x_init))[i] ),  averaged over the masked positions i of x_t,

with x ~ softmax(student(x_init)) and x_t = x with a share ``ratio`` of its positions masked. A student that ignores
its input satisfies the assumption exactly (KL 0). Pure tensor functions; the networks come in as callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def masked_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean over masked positions of KL(softmax(p) || softmax(q)).

    Args:
        p_logits: (B, N, V).
        q_logits: (B, N, V).
        mask: (B, N) bool, the positions to average over (rows without any count as 0).

    Returns:
        (B,) float32.
    """
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, N); exp(log_p) = 0 terms contribute 0 (no -inf here)
    mask = mask.bool()
    return torch.where(mask, kl, torch.zeros_like(kl)).sum(1) / mask.sum(1).clamp_min(1)


def band_labels(edges: Sequence[float]) -> list[str]:
    """``[0, 0.3, 0.7, 1]`` -> ``["0-0.3", "0.3-0.7", "0.7-1"]``."""
    return [f"{low:g}-{high:g}" for low, high in zip(edges[:-1], edges[1:])]


def bin_by_ratio(
    values: torch.Tensor, ratios: torch.Tensor, edges: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of ``values`` per mask-ratio band.

    Band k holds ratios in [edges[k], edges[k+1]); the last band also holds its upper edge. Ratios outside
    [edges[0], edges[-1]] are left out.

    Args:
        values: (B,).
        ratios: (B,).
        edges: increasing band edges, at least two.

    Returns:
        (sums (K,), counts (K,)) float32 with K = len(edges) - 1.
    """
    if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"band edges must be increasing and at least two, got {list(edges)}")
    boundaries = torch.tensor(list(edges), dtype=torch.float32, device=ratios.device)
    ratios = ratios.float()
    index = torch.bucketize(ratios, boundaries, right=True) - 1  # edges[k] <= r < edges[k+1] -> k
    index = torch.where(ratios == boundaries[-1], torch.full_like(index, len(edges) - 2), index)
    inside = (index >= 0) & (index < len(edges) - 1)
    k = len(edges) - 1
    sums = torch.zeros(k, dtype=torch.float32, device=values.device)
    counts = torch.zeros(k, dtype=torch.float32, device=values.device)
    sums.index_add_(0, index[inside], values.float()[inside])
    counts.index_add_(0, index[inside], torch.ones_like(values, dtype=torch.float32)[inside])
    return sums, counts


@torch.no_grad()
def consistency_kl_by_band(
    init_logits: torch.Tensor,
    remasked_logits: Callable[[torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    mask: torch.Tensor,
    num_codes: int,
    edges: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the student again on a re-masked sample of its one-step logits and bin the KL by the masked share.

    Args:
        init_logits: (B, N, V) the student's logits on its initial sequence.
        remasked_logits: codes (B, N) -> (B, N, V), the student on a re-masked sample (same conditions).
        x_t: (B, N) a sample x drawn from ``init_logits``, re-masked (``inference.one_step.remask_sample``).
        mask: (B, N) bool, its masked positions.
        num_codes: K; the KL compares the distributions over the K codes (logit slots beyond, such as the mask
            slot, are dropped and the rest renormalized, as sampling never emits them).
        edges: mask-ratio band edges.

    Returns:
        (sums (K,), counts (K,)) of the per-sample KL per band, binned by the realised masked share.
    """
    kl = masked_kl(remasked_logits(x_t)[..., :num_codes], init_logits[..., :num_codes], mask)  # (B,)
    return bin_by_ratio(kl, mask.float().mean(1), edges)
