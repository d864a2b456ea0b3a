"""Rotary position embeddings in the half-split (GPT-NeoX, ``rotate_half``) convention, shared by the text MDMs.

Both MDLM (flash-attn's ``apply_rotary_emb_qkv_`` with ``interleaved=False``) and LLaDA (OLMo's ``RotaryEmbedding``)
rotate the pair (x[j], x[j + d/2]) of each head by the angle ``position * base^(-2j/d)``. No buffers: the tables
are recomputed per call (L x d/2 values), which keeps the modules buffer-free for meta-device building, strict
loading and FSDP.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(length: int, head_dim: int, base: float, device: torch.device | str | None = None):
    """cos and sin tables (L, head_dim), float32, each half repeating the d/2 frequencies (positions 0..L-1)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head width, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (L, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in float32, returned in x's dtype.

    Args:
        x: (..., L, d) queries or keys (the position axis second to last).
        cos, sin: (L, d) tables from :func:`rotary_cos_sin`.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
