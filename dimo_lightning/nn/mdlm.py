"""MDLM's diffusion transformer (``kuleshov-group/mdlm-owt``), written from its documented architecture.

A DiT over token sequences (Sahoo et al. 2024; ``models/dit.py`` of kuleshov-group/mdlm and the Hub's
``modeling_mdlm.py``): a raw embedding table, a sinusoidal sigma embedding feeding adaLN modulation, blocks of
weight-only LayerNorm -> bidirectional attention with half-split rotary on q and k -> GELU(tanh) MLP, each branch
gated, and an adaLN-modulated output layer. Parameter names are the released ones under ``backbone.``, so the Hub's
``config.json`` builds a module of exactly 169,627,218 parameters (:data:`MDLM_OWT_PARAMETERS`) in 5 + 10 x n_blocks
+ 5 = 130 tensors, and its ``model.safetensors`` loads strictly.

Departures from the reference code, none of which changes the function:
- attention is ``F.scaled_dot_product_attention`` instead of flash-attn's varlen kernel (the Hub's modeling files
  import ``flash_attn`` at module level, so they cannot run without CUDA);
- rotary tables are recomputed per call in float32 instead of cached in the ``rotary_emb.inv_freq`` buffer; that
  buffer, if the file holds it (it is persistent in the reference), is checked against the recomputed frequencies
  and dropped (:data:`IGNORED_KEYS`);
- the rotation is computed in float32 and cast back (the reference's kernel takes bf16 cos/sin under autocast).

With ``time_conditioning`` false (the released model) sigma is replaced by zeros, as in the reference: the adaLN
modulations are then a constant learned function of ``sigma_map(0)``, not zero. Shapes: B batch, L sequence length
(<= model_length), V vocab_size (GPT-2's 50257 tokens + the appended mask, id V - 1), D hidden_dim.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.core.weight_folders import CONFIG_NAME, WEIGHTS_NAME, load_safetensors, read_config
from dimo_lightning.nn.meissonic import call_block
from dimo_lightning.nn.rotary import apply_rotary, rotary_cos_sin

PREFIX = "backbone."
# The reference's persistent rotary buffer; recomputed here, so accepted in a file but not required.
IGNORED_KEYS = (PREFIX + "rotary_emb.inv_freq",)
ROTARY_BASE = 10_000.0
FREQUENCY_EMBEDDING_SIZE = 256  # sigma_map's sinusoid width (TimestepEmbedder default in the reference)
MLP_RATIO = 4
# A meta-device build of the released config.json (mdlm-owt, 679 MB of float32).
MDLM_OWT_PARAMETERS = 169_627_218
LAYOUT = (
    f"an MDLM folder as released in kuleshov-group/mdlm-owt: {CONFIG_NAME} (vocab_size, model_length, hidden_dim, "
    f"cond_dim, n_blocks, n_heads, dropout, time_conditioning) and {WEIGHTS_NAME} with keys "
    "backbone.vocab_embed.embedding, backbone.sigma_map.mlp.{0,2}.{weight,bias}, backbone.blocks.N.{norm1.weight, "
    "attn_qkv.weight, attn_out.weight, norm2.weight, mlp.{0,2}.{weight,bias}, adaLN_modulation.{weight,bias}}, "
    "backbone.output_layer.{norm_final.weight, linear.{weight,bias}, adaLN_modulation.{weight,bias}} "
    "(optionally backbone.rotary_emb.inv_freq)"
)


@dataclass(frozen=True)
class MDLMConfig:
    """The fields of the released ``config.json`` (defaults: ``kuleshov-group/mdlm-owt``).

    Attributes:
        vocab_size: V, embedding rows and logit width; the mask id is V - 1 (GPT-2's 50257 + 1).
        model_length: the training sequence length; longer inputs are rejected.
        hidden_dim: D.
        cond_dim: width of the sigma embedding that feeds the adaLN modulations.
        n_blocks: transformer blocks.
        n_heads: attention heads (D / n_heads per head, even).
        dropout: residual-branch dropout in training mode.
        time_conditioning: feed sigma to the network; False (released) zeroes it.
    """

    vocab_size: int = 50258
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must split into n_heads ({self.n_heads}) heads of even "
                             "width (rotary embeddings)")
        if min(self.vocab_size, self.model_length, self.cond_dim, self.n_blocks) < 1:
            raise ValueError(f"vocab_size, model_length, cond_dim and n_blocks must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = CONFIG_NAME) -> MDLMConfig:
        """Read the released ``config.json`` fields; Hugging Face metadata (architectures, auto_map, return_dict,
        torch_dtype, ...) is ignored. The shape fields are required; dropout, model_length and time_conditioning
        default as in the reference's ``MDLMConfig``.

        Raises:
            ValueError: ``model_type`` is present and not ``mdlm``, or a shape field is missing (names ``source``).
        """
        if config.get("model_type", "mdlm") != "mdlm":
            raise ValueError(f"{source} has model_type {config['model_type']!r}, not 'mdlm'. Expected layout: {LAYOUT}")
        required = ("vocab_size", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
        absent = [name for name in required if name not in config]
        if absent:
            raise ValueError(f"{source} lacks {', '.join(absent)}. Expected layout: {LAYOUT}")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- layers (names follow the released state dict) -----------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with (B, 1, D) shift/scale."""
    return x * (1 + scale) + shift


def sigma_sinusoid(sigma: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10_000.0):
    """(B,) -> (B, dim) ``[cos(sigma f_j), sin(sigma f_j)]`` with f_j = max_period^(-j / (dim/2)) (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm (no bias), eps 1e-5 (``F.layer_norm``'s default)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics as in the reference; the result returns to x's dtype, a no-op under autocast (the
        # residual stream is float32 there) that lets a bf16 module run without autocast.
        return (F.layer_norm(x.float(), self.weight.shape) * self.weight).to(x.dtype)


class EmbeddingLayer(nn.Module):
    """The token table as a raw parameter ``embedding`` (V, D), as in the released keys."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[input_ids]


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> sinusoid (B, 256) -> Linear -> SiLU -> Linear -> (B, cond_dim); keys ``mlp.0``, ``mlp.2``."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sigma_sinusoid(sigma).to(self.mlp[0].weight.dtype))


class DDiTBlock(nn.Module):
    """x + g1 * attn(mod(norm1 x)); x + g2 * mlp(mod(norm2 x)); six modulations from ``adaLN_modulation(c)``."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(MLP_RATIO * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)  # DiT's adaLN-Zero start (only matters for fresh modules)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), cos/sin (L, D / heads), c (B, cond_dim) -> (B, L, D)."""
        b, length, dim = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, 2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(b, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, L, d)
        attn = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        attn = attn.transpose(1, 2).reshape(b, length, dim)
        x = x + gate_msa * F.dropout(self.attn_out(attn), self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


class DDitFinalLayer(nn.Module):
    """mod(norm_final x) -> linear (D -> V, with bias); two modulations from ``adaLN_modulation(c)``."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for p in (*self.linear.parameters(), *self.adaLN_modulation.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTBackbone(nn.Module):
    """The ``backbone`` submodule: ``vocab_embed``, ``sigma_map``, ``blocks`` (ModuleList), ``output_layer``."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.blocks = nn.ModuleList([DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim, config.dropout)
                                     for _ in range(config.n_blocks)])
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)


class MDLM(nn.Module):
    """MDLM's DiT with the released parameter names (``backbone.*``).

    Args:
        config: the architecture (:class:`MDLMConfig`; defaults: mdlm-owt).
        gradient_checkpointing: recompute each block in backward (memory for compute); results are identical.
        bf16_autocast_on_cuda: on CUDA inputs, run the blocks and the output layer under bf16 autocast as the
            reference does (flash-attn needs 16-bit inputs). The embedding, the sigma map and the residual stream stay
            in the parameters' dtype; the LayerNorms always normalise in float32. Off: the surrounding precision rules.
    """

    def __init__(self, config: MDLMConfig | None = None, gradient_checkpointing: bool = False,
                 bf16_autocast_on_cuda: bool = True) -> None:
        super().__init__()
        self.config = config or MDLMConfig()
        self.gradient_checkpointing = gradient_checkpointing
        self.bf16_autocast_on_cuda = bf16_autocast_on_cuda
        self.backbone = DiTBackbone(self.config)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def token_embeddings(self) -> torch.Tensor:
        """The (V, D) input embedding table (row j embeds id j; the last row is the mask)."""
        return self.backbone.vocab_embed.embedding

    def forward(self, input_ids: torch.Tensor | None = None, sigma: torch.Tensor | float | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (apply :func:`dimo_lightning.core.subs.subs_log_probs` for MDLM's posterior).

        Args:
            input_ids: (B, L) token ids in [0, V), L <= model_length; the mask id is V - 1.
            sigma: (B,) or scalar noise level (the Hub model's ``timesteps``); ignored (zeroed) unless
                ``time_conditioning``; None means 0.
            inputs_embeds: (B, L, D) instead of ``input_ids``: embeddings fed to the blocks in place of the table
                lookup (a perturbed or soft input).

        Returns:
            (B, L, V) logits (bf16 under autocast on CUDA, else the parameters' dtype).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) and inputs_embeds (B, L, D)")
        x = self.backbone.vocab_embed(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3 or x.shape[-1] != self.config.hidden_dim:
            raise ValueError(f"expected input_ids (B, L) or inputs_embeds (B, L, {self.config.hidden_dim}); "
                             f"got embeddings of shape {list(x.shape)}")
        b, length, _ = x.shape
        if length > self.config.model_length:
            raise ValueError(f"sequence length {length} exceeds model_length {self.config.model_length} (the length "
                             "the network was trained at)")
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(b, device=x.device)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        c = F.silu(self.backbone.sigma_map(sigma))  # (B, cond_dim)
        cos, sin = rotary_cos_sin(length, self.config.hidden_dim // self.config.n_heads, ROTARY_BASE, x.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.bf16_autocast_on_cuda and x.device.type == "cuda" else contextlib.nullcontext())
        with autocast:
            for block in self.backbone.blocks:
                x = call_block(self.gradient_checkpointing, block, x, cos, sin, c)
            return self.backbone.output_layer(x, c)


# ---- files ----------------------------------------------------------------------------------------------------------
def check_mdlm_tokenizer(vocab_size: int, tokenizer: Any, source: str) -> None:
    """MDLM appends its mask after the tokenizer's ids: ``vocab_size`` must be ``len(tokenizer) + 1`` (GPT-2:
    50257 + 1). A tokenizer that already holds the mask (its ``mask_token_id`` is ``vocab_size - 1`` and
    ``len(tokenizer) == vocab_size``) is accepted too.

    Raises:
        ValueError: the sizes disagree (names ``source``, the config that set ``vocab_size``).
    """
    size = len(tokenizer)
    if size + 1 == vocab_size or (size == vocab_size and getattr(tokenizer, "mask_token_id", None) == vocab_size - 1):
        return
    raise ValueError(
        f"{source}: vocab_size {vocab_size} disagrees with the tokenizer ({size} tokens): MDLM's vocabulary is the "
        f"tokenizer's ids plus one appended mask id, so vocab_size must be {size + 1} (mdlm-owt: GPT-2's 50257 + 1 "
        f"= 50258). Expected layout: {LAYOUT}"
    )


def load_mdlm(folder: str | Path, tokenizer: Any | None = None, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", gradient_checkpointing: bool = False) -> MDLM:
    """Build :class:`MDLM` from a released folder (``config.json`` + ``model.safetensors``), strictly.

    The module is built on the meta device and the file's tensors are assigned (no second copy), cast to ``dtype``.

    Args:
        folder: the model folder (a download of kuleshov-group/mdlm-owt, or a saved student in that layout).
        tokenizer: if given, its size is checked against ``vocab_size`` (:func:`check_mdlm_tokenizer`).
        dtype: parameter dtype (the released file is float32).
        device: where the weights are loaded.
        gradient_checkpointing: see :class:`MDLM`.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: config or weights missing (names the path and the expected layout).
        ValueError: a bad config, missing / unexpected / mis-shaped keys, an ``inv_freq`` buffer that disagrees with
            the rotary base, or a vocabulary that disagrees with ``tokenizer``.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = MDLMConfig.from_dict(read_config(config_path, LAYOUT), str(config_path))
    if tokenizer is not None:
        check_mdlm_tokenizer(config.vocab_size, tokenizer, str(config_path))
    state = load_safetensors(weights_path, LAYOUT, device)
    for key in IGNORED_KEYS:
        if key in state:
            _check_inv_freq(state.pop(key), config, weights_path)
    with torch.device("meta"):
        model = MDLM(config, gradient_checkpointing=gradient_checkpointing)
    model.to(dtype)
    load_state_dict_checked(model, state, str(weights_path),
                            hint=f"Is {config_path} the config of these weights? Expected layout: {LAYOUT}")
    return model.eval()


def _check_inv_freq(inv_freq: torch.Tensor, config: MDLMConfig, path: Path) -> None:
    head_dim = config.hidden_dim // config.n_heads
    expected = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if tuple(inv_freq.shape) != tuple(expected.shape) or not torch.allclose(inv_freq.float().cpu(), expected):
        raise ValueError(f"{path}: backbone.rotary_emb.inv_freq {list(inv_freq.shape)} is not the rotary base-"
                         f"{ROTARY_BASE:g} table of head width {head_dim} this implementation recomputes")
