"""Soft embeddings (Soft-Di[M]O, arXiv 2509.22925): the expectation of an embedding table under the student's softmax.

``e_i = sum_j softmax(z_i)_j * E_j``: no temperature, no straight-through. A one-step student has peaked logits, so
``e_i`` sits close to the embedding of the token it would sample, yet it is differentiable in the logits, which the
sampled token is not. The Di[M]O loss keeps using sampled tokens; the soft path carries only the extra objectives
(the GAN of :mod:`dimo_lightning.objectives.gan`, and pixel-space terms through the tokenizers' ``decode_soft``).
"""

from __future__ import annotations

import torch


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 would round a peaked student's small probabilities to zero; float64 stays (gradcheck).
    return x if x.dtype == torch.float64 else x.float()


def soft_probabilities(logits: torch.Tensor, num_codes: int | None = None) -> torch.Tensor:
    """Softmax of the student's logits, in float32, optionally over the first ``num_codes`` ids only.

    Args:
        logits: (B, N, V) student logits.
        num_codes: keep only ids ``[0, num_codes)`` (e.g. K, to drop the mask slot the sampler never emits);
            None keeps all V.

    Returns:
        (B, N, V') probabilities summing to 1 over the last axis, V' = num_codes or V.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, N, V), got {tuple(logits.shape)}")
    if num_codes is not None:
        if not 1 <= num_codes <= logits.shape[-1]:
            raise ValueError(f"num_codes must lie in [1, {logits.shape[-1]}] (the logit width), got {num_codes}")
        logits = logits[..., :num_codes]
    return _at_least_float32(logits).softmax(dim=-1)


def soft_embedding(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``softmax(logits) @ table[:V]``: the expected embedding under the logits' distribution.

    Args:
        logits: (B, N, V) logits; the softmax runs over all V of them (slice them first to exclude ids).
        table: (V', D) embedding table with V' >= V; row j is the embedding of id j. Rows from V on (mask, class
            tokens) are not covered by the logits and are ignored.

    Returns:
        (B, N, D) embeddings in the table's dtype.
    """
    if table.ndim != 2:
        raise ValueError(f"table must have shape (V, D), got {tuple(table.shape)}")
    width = logits.shape[-1]
    if table.shape[0] < width:
        raise ValueError(f"the logits cover {width} ids but the embedding table has only {table.shape[0]} rows")
    probs = soft_probabilities(logits)
    return (probs @ table[:width].to(probs.dtype)).to(table.dtype)


def expected_codebook(probs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``probs @ codebook``: the expected codebook vector per position (a soft ``codebook[codes]``).

    Args:
        probs: (..., K) probabilities over the K codes (rows need not be checked to sum to 1: any weights work).
        codebook: (K, d) code vectors.

    Returns:
        (..., d) in float32 (float64 if ``probs`` is float64).
    """
    if codebook.ndim != 2 or probs.shape[-1] != codebook.shape[0]:
        raise ValueError(
            f"probs must end in the codebook size {codebook.shape[0] if codebook.ndim == 2 else '?'}; got probs "
            f"{tuple(probs.shape)} and codebook {tuple(codebook.shape)}"
        )
    probs = _at_least_float32(probs)
    return probs @ codebook.to(probs.dtype)


def grid_probabilities(probs: torch.Tensor, grid_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, N, K) or (B, h, w, K) probabilities -> (B, h, w, K); a flat N needs ``grid_shape`` or a square N."""
    if probs.ndim == 4:
        if grid_shape is not None and tuple(probs.shape[1:3]) != tuple(grid_shape):
            raise ValueError(f"probs grid {tuple(probs.shape[1:3])} differs from grid_shape {tuple(grid_shape)}")
        return probs
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (B, N, K) or (B, h, w, K), got {tuple(probs.shape)}")
    b, n, k = probs.shape
    if grid_shape is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} positions do not form a square grid: pass grid_shape=(h, w)")
        grid_shape = (side, side)
    h, w = grid_shape
    if h * w != n:
        raise ValueError(f"grid_shape {tuple(grid_shape)} holds {h * w} positions, probs have {n}")
    return probs.reshape(b, h, w, k)
