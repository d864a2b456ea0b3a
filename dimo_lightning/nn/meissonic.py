"""The Meissonic transformer (MeissonFlow/Meissonic ``transformer/``), written from its documented architecture.

A Flux-like MMDiT body (dual-stream blocks, then single-stream blocks, joint attention with RMS qk-norm and RoPE over
the [text; image] sequence, AdaLN-Zero from timestep + pooled text + micro-conditions) wrapped in aMUSEd-style token
layers (embedding + RMSNorm + 1x1 conv in, optional 2x down/up-sampling, conv MLM head out). Module and parameter
names follow the released state dict, so the released ``config.json`` builds a module with exactly its 867 keys and
1,006,946,304 parameters and the released safetensors load strictly. No diffusers import: attention runs through
``F.scaled_dot_product_attention`` (diffusers' attention-processor API broke the reference class at 0.40).

The published layout and the checks against diffusers: docs/text-to-image.md#meissonictransformer. Shapes: B batch,
h x w token grid (N = h w), L text tokens, D = heads x head_dim inner width, K codebook size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from dimo_lightning.core.weight_files import load_state_dict_checked, save_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"
CONFIG_NAME = "config.json"
# Config keys of the released file that this implementation does not read (the reference ignores them too).
_UNUSED_CONFIG_KEYS = ("in_channels", "patch_size")
# Inside the reference __init__, not in config.json.
LAYER_NORM_EPS = 1e-6
MICRO_COND_ENCODE_DIM = 256
NUM_MICRO_CONDS = 5
TIMESTEP_PROJ_DIM = 256
ROPE_THETA = 10000.0
# The DiMO / pipeline micro-conditions: original width, height, crop top, crop left, aesthetic score.
DEFAULT_MICRO_CONDS = (1024.0, 1024.0, 0.0, 0.0, 6.0)


# ---- pure functions -------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def call_block(gradient_checkpointing: bool, block: nn.Module, *args):
    """``block(*args)``, recomputed in backward instead of keeping its activations when ``gradient_checkpointing``
    is on and gradients are being recorded (the frozen teacher, run without gradients, never pays the recompute)."""
    if gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (M,) -> (M, dim) as ``[cos, sin]`` (diffusers' flip_sin_to_cos=True, shift 0).

    Frequencies ``exp(-ln(max_period) * i / (dim/2))`` for i < dim/2; an odd ``dim`` gets one zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def rope_frequencies(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
    """Per-axis 1-D rotary tables for position ids (S, n_axes) -> (cos, sin), each (S, sum(axes_dims)) float32.

    Axis a with dim d_a rotates pairs (2i, 2i+1) of its slice by ``ids[:, a] * theta^(-2i/d_a)``; cos and sin are
    repeat-interleaved so that both members of a pair see the same angle. Computed in float64 (as the reference).
    """
    cos_parts, sin_parts = [], []
    pos = ids.to(torch.float64)
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = pos[:, axis, None] * freqs[None, :]  # (S, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1).float(), torch.cat(sin_parts, dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, Dh) by the tables (S, Dh): pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x1, x0) per pair
    return (x.float() * cos + rotated * sin).to(x.dtype)


def image_position_ids(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids (height * width, 3) rows ``(0, row, col)`` in row-major order (the reference's latent ids)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


# ---- layers ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with an optional weight (diffusers ``RMSNorm``: key ``weight``)."""

    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _channels_last_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a last-axis norm to (B, C, H, W)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TokenEmbed(nn.Module):
    """Token ids (B, h, w) -> (B, D, h, w): Embedding, RMSNorm, 1x1 conv (keys ``embeddings``, ``layer_norm``,
    ``conv``)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(codes)).permute(0, 3, 1, 2))


class Downsample2D(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv (diffusers ``Downsample2D(use_conv, kernel 2, padding 0, rms_norm)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference pads right/bottom by one before a padding-0 conv; with kernel 2 stride 2 on an even grid the
        # padded row/column is never read, but keep it for odd grids.
        return self.conv(F.pad(_channels_last_norm(self.norm, x), (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """RMSNorm then a 2x2 stride-2 transposed conv (diffusers ``Upsample2D(use_conv_transpose, kernel 2)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_channels_last_norm(self.norm, x))


class DownBlock(nn.Module):
    """Holds ``downsample`` (keys ``down_block.downsample.*``); no parameters and identity when disabled."""

    def __init__(self, dim: int, enabled: bool) -> None:
        super().__init__()
        self.downsample = Downsample2D(dim) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nn.Module):
    """Holds ``upsample`` (keys ``up_block.upsample.*``); identity when disabled."""

    def __init__(self, dim: int, enabled: bool) -> None:
        super().__init__()
        self.upsample = Upsample2D(dim) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.upsample is None else self.upsample(x)


class MLPEmbedding(nn.Module):
    """Linear, SiLU, Linear (diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``: ``linear_1/2``)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """temb = MLP(sinusoid_256(timestep)) + MLP(pooled) (diffusers ``CombinedTimestepTextProjEmbeddings``)."""

    def __init__(self, dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedding(TIMESTEP_PROJ_DIM, dim)
        self.text_embedder = MLPEmbedding(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """timestep (B,) already scaled (x1000), pooled (B, Dp) -> (B, D)."""
        t_emb = self.timestep_embedder(sinusoidal_embedding(timestep, TIMESTEP_PROJ_DIM).to(pooled.dtype))
        return t_emb + self.text_embedder(pooled)


class FeedForward(nn.Module):
    """Linear, GELU(tanh), Linear with the diffusers ``FeedForward`` keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by ``Linear(SiLU(temb))`` -> 6 chunks (key ``linear``).

    Returns the modulated input and (gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D).
    """

    def __init__(self, dim: int, chunks: int = 6) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        mods = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)
        shift, scale = mods[0], mods[1]
        normed = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
        return normed, mods[2:]


class JointAttention(nn.Module):
    """Multi-head attention with RMS qk-norm and RoPE; with ``context`` the [text; image] joint form (MMDiT).

    Keys as diffusers ``Attention``: ``to_q/k/v``, ``norm_q/k``; with ``context_dim`` also ``add_q/k/v_proj``,
    ``norm_added_q/k``, ``to_add_out``; ``to_out.0`` unless ``pre_only`` (single-stream blocks).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, pre_only: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if joint:
            self.add_q_proj = nn.Linear(dim, heads * head_dim)
            self.add_k_proj = nn.Linear(dim, heads * head_dim)
            self.add_v_proj = nn.Linear(dim, heads * head_dim)
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.to_add_out = nn.Linear(heads * head_dim, dim)
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Dropout(0.0)])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None):
        """x (B, N, D) [, context (B, L, D)]; rope tables cover the sequence [context; x].

        Returns (B, N, D) or, with context, ((B, N, D), (B, L, D)).
        """
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:
            q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(context))), q], dim=2)
            k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(context))), k], dim=2)
            v = torch.cat([self._heads(self.add_v_proj(context)), v], dim=2)
        cos, sin = rope
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (B, H, S, Dh)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, self.heads * self.head_dim).to(q.dtype)
        if context is None:
            return out if not hasattr(self, "to_out") else self.to_out[0](out)
        length = context.shape[1]
        return self.to_out[0](out[:, length:]), self.to_add_out(out[:, :length])


class DualStreamBlock(nn.Module):
    """MMDiT block (Flux double-stream): separate AdaLN-Zero / FF for image and text, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=True, pre_only=False)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope):
        """x (B, N, D), context (B, L, D), temb (B, D) -> (context, x) updated."""
        normed, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        normed_ctx, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)
        attn, ctx_attn = self.attn(normed, rope, normed_ctx)
        x = x + gate_msa[:, None] * attn
        h = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)
        context = context + c_gate_msa[:, None] * ctx_attn
        h = F.layer_norm(context, context.shape[-1:], eps=LAYER_NORM_EPS)
        h = h * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp[:, None] * self.ff_context(h)
        if context.dtype == torch.float16:  # the reference clips to keep fp16 text states finite
            context = context.clip(-65504, 65504)
        return context, x


class SingleStreamBlock(nn.Module):
    """Flux single-stream block over the joint sequence: x + gate * proj_out([attn(h); gelu_tanh(proj_mlp(h))])."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm = nn.Module()
        self.norm.linear = nn.Linear(dim, 3 * dim)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=False, pre_only=True)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope) -> torch.Tensor:
        shift, scale, gate = self.norm.linear(F.silu(temb)).chunk(3, dim=1)
        h = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
        mixed = torch.cat([self.attn(h, rope), F.gelu(self.proj_mlp(h), approximate="tanh")], dim=2)
        out = x + gate[:, None] * self.proj_out(mixed)
        return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


class ConvMlmLayer(nn.Module):
    """1x1 conv, RMSNorm, 1x1 conv to K logits (keys ``conv1``, ``layer_norm``, ``conv2``)."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(_channels_last_norm(self.layer_norm, self.conv1(x)))


# ---- the model ------------------------------------------------------------------------------------------------------
class MeissonicTransformer(nn.Module):
    """Meissonic's text-conditional masked-token transformer (the released ``transformer/`` of MeissonFlow/Meissonic).

    Arguments are the fields of the released ``transformer/config.json`` (defaults: the released 1B model).

    Args:
        attention_head_dim: width per head.
        num_attention_heads: heads; D = heads * head_dim.
        num_layers: dual-stream (MMDiT) blocks.
        num_single_layers: single-stream blocks.
        joint_attention_dim: width of the text encoder's hidden states.
        pooled_projection_dim: width of the pooled text embedding (must equal D, as in the reference, which
            feeds the cond_embed output (width D) to a projection of input width pooled_projection_dim).
        axes_dims_rope: RoPE widths per id axis (text/batch, row, col); they must sum to ``attention_head_dim``.
        vocab_size: rows of the token table; the mask id is ``vocab_size - 1``.
        codebook_size: K, the number of image codes (logit width).
        downsample: 2x down-sample the token grid before the transformer.
        upsample: 2x up-sample after it (must equal ``downsample``).
        gradient_checkpointing: recompute each block in backward (memory for compute); outputs are identical.
        guidance_embeds: must be False (the released model has no guidance embedding).
    """

    def __init__(
        self,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        num_layers: int = 14,
        num_single_layers: int = 28,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        axes_dims_rope: tuple[int, ...] | list[int] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
        gradient_checkpointing: bool = False,
        guidance_embeds: bool = False,
    ) -> None:
        super().__init__()
        dim = attention_head_dim * num_attention_heads
        axes_dims_rope = tuple(int(a) for a in axes_dims_rope)
        if sum(axes_dims_rope) != attention_head_dim or any(a % 2 for a in axes_dims_rope) or len(axes_dims_rope) != 3:
            raise ValueError(
                f"axes_dims_rope must be 3 even widths summing to attention_head_dim={attention_head_dim}, "
                f"got {list(axes_dims_rope)}"
            )
        if pooled_projection_dim != dim:
            raise ValueError(
                f"pooled_projection_dim ({pooled_projection_dim}) must equal attention_head_dim * num_attention_heads "
                f"({dim}): the condition embedding (width {dim}) feeds the pooled projection"
            )
        if downsample != upsample:
            raise ValueError(f"downsample ({downsample}) and upsample ({upsample}) must agree")
        if guidance_embeds:
            raise ValueError("guidance_embeds=True is not supported (Meissonic has no guidance embedding)")
        if not codebook_size < vocab_size:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed codebook_size ({codebook_size}): the mask id "
                             "is vocab_size - 1")
        self.config = dict(
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads, num_layers=num_layers,
            num_single_layers=num_single_layers, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, axes_dims_rope=list(axes_dims_rope), vocab_size=vocab_size,
            codebook_size=codebook_size, downsample=downsample, upsample=upsample,
        )
        self.inner_dim = dim
        self.codebook_size = codebook_size
        self.vocab_size = vocab_size
        self.mask_id = vocab_size - 1
        self.axes_dims_rope = axes_dims_rope
        self.downsample = downsample
        self.gradient_checkpointing = gradient_checkpointing

        self.embed = TokenEmbed(vocab_size, dim)
        self.down_block = DownBlock(dim, downsample)
        self.project_to_hidden_norm = RMSNorm(dim)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.encoder_proj_layer_norm = RMSNorm(dim)
        self.cond_embed = MLPEmbedding(pooled_projection_dim + NUM_MICRO_CONDS * MICRO_COND_ENCODE_DIM, dim,
                                       bias=False)
        self.time_text_embed = TimestepTextEmbedding(dim, pooled_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)]
        )
        self.project_from_hidden_norm = RMSNorm(dim)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.up_block = UpBlock(dim, upsample)
        self.mlm_layer = ConvMlmLayer(dim, codebook_size)

    # ---- construction and files ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], gradient_checkpointing: bool = False) -> MeissonicTransformer:
        """Build from a ``config.json`` dict: ``_``-prefixed metadata and the unused ``in_channels`` /
        ``patch_size`` are ignored; any other unknown key raises ``ValueError``."""
        kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in _UNUSED_CONFIG_KEYS}
        known = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount])
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown Meissonic transformer config keys: {', '.join(unknown)}")
        kwargs.setdefault("gradient_checkpointing", gradient_checkpointing)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, variant: str | None = None, gradient_checkpointing: bool = False
    ) -> MeissonicTransformer:
        """Load a diffusers-layout ``transformer/`` folder: ``config.json`` plus
        ``diffusion_pytorch_model.safetensors`` (or, with ``variant="fp16"`` or when only it exists, the
        ``.fp16.safetensors``). The module is built on the meta device and the file's tensors assigned (no second
        copy of a 4 GB model); weights load strictly, cast to float32 parameters.

        Raises:
            FileNotFoundError: folder, config or weights missing (the message names the expected files).
            ValueError: unreadable files, or missing / unexpected / mis-shaped keys (listed).
        """
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"Meissonic transformer config not found: {config_path} (expected the diffusers `transformer/` "
                "folder of MeissonFlow/Meissonic or of a saved student)"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from err
        names = [FP16_WEIGHTS_NAME] if variant == "fp16" else [WEIGHTS_NAME, FP16_WEIGHTS_NAME]
        if variant not in (None, "fp16"):
            raise ValueError(f"variant must be None or 'fp16', got {variant!r}")
        weights = next((folder / n for n in names if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"no Meissonic transformer weights in {folder}: expected {' or '.join(names)}")
        with torch.device("meta"):
            model = cls.from_config(config, gradient_checkpointing=gradient_checkpointing)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read Meissonic weights {weights}: {err}") from err
        # Parameters are float32 (the module's dtype); a fp16 file is upcast by the checked loader.
        load_state_dict_checked(model, state, str(weights), hint=f"Is {config_path} the config of these weights?")
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (the released layout) -> folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "Transformer2DModel", **self.config, "in_channels": 64, "patch_size": 1,
                  "guidance_embeds": False}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        return folder

    # ---- forward -------------------------------------------------------------------------------------------
    def code_embedding_rms(self) -> float:
        """RMS of the ``embed`` output over all K codes (the scale the student's embedding noise perturbs)."""
        with torch.no_grad():
            codes = torch.arange(self.codebook_size, device=self.embed.embeddings.weight.device)
            return float(self.embed(codes.view(1, 1, -1)).float().pow(2).mean().sqrt())

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim == 3:
            return codes
        if codes.ndim != 2:
            raise ValueError(f"codes must be (B, h, w) or (B, N), got shape {list(codes.shape)}")
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(f"flat codes (B, N) need a square grid; N={codes.shape[1]} is not a square")
        return codes.view(codes.shape[0], side, side)

    def forward(
        self,
        codes: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled: torch.Tensor,
        micro_conds: torch.Tensor | None = None,
        timestep: torch.Tensor | float = 0.0,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits over the K codes.

        Args:
            codes: (B, h, w) or (B, N) (square grid) token ids in [0, vocab_size); the mask id is vocab_size - 1.
                With down-sampling h and w must be even.
            encoder_hidden_states: (B, L, joint_attention_dim) text states (CLIP penultimate layer).
            pooled: (B, pooled_projection_dim) pooled text embedding (CLIP ``text_embeds``).
            micro_conds: (B, 5) [orig width, orig height, crop top, crop left, aesthetic score]; None uses
                ``DEFAULT_MICRO_CONDS`` (1024, 1024, 0, 0, 6) as the DiMO recipe does.
            timestep: (B,) or scalar, a fraction in [0, 1] (e.g. the mask ratio) that is multiplied by 1000 before
                the sinusoid, as in the reference. The official distillation casts the ratio to long first, so
                teacher, student and aux always see 0 there; pass 0 to reproduce it (the default).
            emb_noise_sigma: scalar or (B,) sigma of the student's variance-preserving input perturbation
                ``e' = sigma * scale * eps + sqrt(1 - sigma^2) * e``, applied to the output of ``embed`` at all image
                positions, before the down-sampling (docs/method.md#student-input).
            emb_noise_scale: multiplies eps (1: the paper's absolute form).
            generator: random source of eps.

        Returns:
            (B, N, K) logits, N = h * w in row-major order.
        """
        codes = self._grid(codes)
        b, h, w = codes.shape
        if self.downsample and (h % 2 or w % 2):
            raise ValueError(f"a down-sampling Meissonic transformer needs an even token grid, got {h}x{w}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be (B={b}, L, D), got {list(encoder_hidden_states.shape)}")
        if pooled.shape[0] != b:
            raise ValueError(f"pooled must be (B={b}, Dp), got {list(pooled.shape)}")
        dtype = pooled.dtype
        if micro_conds is None:
            micro_conds = torch.tensor(DEFAULT_MICRO_CONDS, device=codes.device).expand(b, -1)
        micro = sinusoidal_embedding(micro_conds.reshape(-1), MICRO_COND_ENCODE_DIM).reshape(b, -1).to(dtype)
        cond = self.cond_embed(torch.cat([pooled, micro], dim=1))  # (B, D)
        timestep = torch.as_tensor(timestep, device=codes.device, dtype=torch.float32).expand(b) * 1000
        temb = self.time_text_embed(timestep, cond)  # (B, D)

        x = self.embed(codes)  # (B, D, h, w)
        sigma = torch.as_tensor(emb_noise_sigma, dtype=x.dtype, device=x.device)
        if bool((sigma != 0).any()):
            sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = sigma * emb_noise_scale * eps + torch.sqrt(1 - sigma * sigma) * x
        x = self.down_block(x)
        _, dim, gh, gw = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, gh * gw, dim)))
        context = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))  # (B, L, D)

        length = context.shape[1]
        ids = torch.cat([torch.zeros(length, 3, device=x.device), image_position_ids(gh, gw, x.device)])
        rope = rope_frequencies(ids, self.axes_dims_rope)  # text ids are 0: identity rotation on the text
        for block in self.transformer_blocks:
            context, x = call_block(self.gradient_checkpointing, block, x, context, temb, rope)
        joint = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            joint = call_block(self.gradient_checkpointing, block, joint, temb, rope)
        x = self.project_from_hidden(self.project_from_hidden_norm(joint[:, length:]))
        x = self.up_block(x.reshape(b, gh, gw, dim).permute(0, 3, 1, 2))
        logits = self.mlm_layer(x)  # (B, K, h, w)
        return logits.permute(0, 2, 3, 1).reshape(b, h * w, self.codebook_size)
