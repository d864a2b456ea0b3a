"""LLaDA (``GSAI-ML/LLaDA-8B-Base`` / ``-Instruct``), written from its documented architecture.

A LLaMA-style transformer without a causal mask and without a timestep input (Nie et al. 2025; the Hub's
``modeling_llada.py``, an OLMo derivative with ``block_type: llama``): token embedding ``wte``, blocks of
RMSNorm -> q/k/v projections -> half-split rotary on q and k (float32) -> bidirectional attention -> ``attn_out``,
then RMSNorm -> ``ff_out(silu(ff_proj(h)) * up_proj(h))``, each added to the residual stream; a final RMSNorm ``ln_f``
and an untied output projection ``ff_out``. No biases anywhere. Parameter names are the released ones under
``model.transformer.``, so the released ``config.json`` builds a module of exactly 8,015,581,184 parameters
(:data:`LLADA_8B_PARAMETERS`; the index's ``total_size`` of 16,031,162,368 bytes is that many bf16 values) in
9 x n_layers + 3 = 291 tensors, and the six shards load strictly through ``model.safetensors.index.json``.

FSDP: the blocks are :class:`LLaDABlock` modules in one ``nn.ModuleList``, so ``auto_wrap_policy={LLaDABlock}``
makes one FSDP unit per block; the module holds no buffers. Gradient checkpointing recomputes one block at a time
(``torch.utils.checkpoint``, non-reentrant); with Lightning's FSDP ``activation_checkpointing_policy={LLaDABlock}``
leave :attr:`LLaDA.gradient_checkpointing` off. The module runs in bf16 (the released dtype) or float32; RMSNorm
statistics and the rotation are always float32, as in the reference.

Shapes: B batch, L sequence length (<= max_sequence_length), D d_model, E embedding_size (the logit width; 126464
for the 8B models, equal to vocab_size). The mask id is ``mask_token_id`` (126336, the tokenizer's ``<|mdm_mask|>``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.core.weight_folders import CONFIG_NAME, INDEX_NAME, load_sharded_safetensors, read_config
from dimo_lightning.nn.meissonic import call_block
from dimo_lightning.nn.rotary import apply_rotary, rotary_cos_sin

PREFIX = "model.transformer."
MASK_TOKEN = "<|mdm_mask|>"
# A meta-device build of the released config.json (LLaDA-8B-Base and -Instruct share it).
LLADA_8B_PARAMETERS = 8_015_581_184
LAYOUT = (
    f"a LLaDA folder as released in GSAI-ML/LLaDA-8B-Base: {CONFIG_NAME} (d_model, n_heads, n_kv_heads, n_layers, "
    f"mlp_hidden_size, vocab_size, embedding_size, rope_theta, mask_token_id, block_type 'llama', ...), {INDEX_NAME} "
    "whose weight_map assigns every key to a shard, and those model-0000i-of-0000n.safetensors shards, with keys "
    "model.transformer.wte.weight, model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,"
    "ff_proj,up_proj,ff_out}.weight, model.transformer.ln_f.weight, model.transformer.ff_out.weight"
)
# config.json fields that select code paths of the reference: the value this implementation supports and the
# reference's default when the field is absent (its ModelConfig).
ARCHITECTURE: dict[str, tuple[Any, Any]] = {
    "block_type": ("llama", "sequential"),
    "layer_norm_type": ("rms", "default"),
    "activation_type": ("silu", "swiglu"),
    "rope": (True, False),
    "rope_full_precision": (True, True),
    "alibi": (False, False),
    "weight_tying": (False, True),
    "include_bias": (False, False),
    "include_qkv_bias": (False, False),
    "bias_for_layer_norm": (False, None),  # None inherits include_bias
    "layer_norm_with_affine": (True, True),
    "attention_layer_norm": (False, False),
    "input_emb_norm": (False, False),
    "scale_logits": (False, False),
    "block_group_size": (1, 1),
}


@dataclass(frozen=True)
class LLaDAConfig:
    """The fields of the released ``config.json`` this network uses (defaults: LLaDA-8B).

    Attributes:
        d_model: D.
        n_heads: query heads (D / n_heads per head, even).
        n_kv_heads: key/value heads (grouped-query attention when fewer than n_heads).
        n_layers: transformer blocks.
        mlp_hidden_size: width of ``ff_proj`` / ``up_proj``.
        vocab_size: the tokenizer's id range the model was trained on.
        embedding_size: E, rows of ``wte`` and outputs of ``ff_out`` (>= vocab_size).
        max_sequence_length: the training length; longer inputs are rejected.
        rope_theta: rotary base.
        rms_norm_eps: RMSNorm epsilon.
        mask_token_id: the mask id (``<|mdm_mask|>``).
        eos_token_id: end of text (also the padding id of the released tokenizer).
        attention_dropout, residual_dropout, embedding_dropout: training-mode dropouts (0 in the release).
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even width")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) must be at least vocab_size ({self.vocab_size})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id ({self.mask_token_id}) must lie in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = CONFIG_NAME) -> LLaDAConfig:
        """Read a released ``config.json`` the way the reference does (absent fields take its ``ModelConfig``
        defaults), requiring the shape fields and rejecting architecture switches this implementation lacks.

        Raises:
            ValueError: wrong ``model_type``, a missing shape field, or an unsupported architecture field (each names
                ``source``, the field, its value and the supported one).
        """
        def fail(message: str):
            raise ValueError(f"{source}: {message}. Expected layout: {LAYOUT}")

        if config.get("model_type", "llada") != "llada":
            fail(f"model_type is {config['model_type']!r}, not 'llada'")
        absent = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size", "embedding_size", "mask_token_id")
                  if k not in config]
        if absent:
            fail(f"lacks {', '.join(absent)}")
        for name, (supported, default) in ARCHITECTURE.items():
            value = config.get(name, default)
            if name == "bias_for_layer_norm" and value is None:
                value = config.get("include_bias", ARCHITECTURE["include_bias"][1])
            if value != supported:
                fail(f"{name} is {value!r}{'' if name in config else ' (the default when absent)'}; only "
                     f"{supported!r} is implemented")
        n_heads = config["n_heads"]
        mqa = config.get("multi_query_attention")
        n_kv_heads = config.get("n_kv_heads")
        if n_kv_heads is None:
            n_kv_heads = 1 if mqa else n_heads
        elif mqa is not None and n_kv_heads != (1 if mqa else n_heads):
            fail(f"multi_query_attention={mqa} contradicts n_kv_heads={n_kv_heads}")
        mlp_hidden_size = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * config["d_model"]
        reference_defaults = dict(max_sequence_length=1024, rope_theta=10000.0, rms_norm_eps=1e-5, eos_token_id=50256,
                                  attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1)
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        values.update(n_kv_heads=n_kv_heads, mlp_hidden_size=mlp_hidden_size,
                      embedding_size=config["embedding_size"] or config["vocab_size"])
        try:
            return cls(**{**reference_defaults, **values})
        except (TypeError, ValueError) as err:
            fail(str(err))

    def to_dict(self) -> dict[str, Any]:
        """The config.json fields that rebuild this network (with the architecture switches it implements)."""
        return {"model_type": "llada", **asdict(self), **{k: v for k, (v, _) in ARCHITECTURE.items()}}


# ---- layers (names follow the released state dict) -----------------------------------------------------------------
class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``: statistics in float32, the product in x's dtype (as the reference)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LLaDABlock(nn.Module):
    """x + attn_out(attention(attn_norm x)); x + ff_out(silu(ff_proj h) * up_proj h), h = ff_norm x."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attention_dropout, self.residual_dropout = config.attention_dropout, config.residual_dropout
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), cos/sin (L, head_dim) -> (B, L, D)."""
        b, length, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves n_heads / n_kv_heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        att = self.attn_out(att.transpose(1, 2).reshape(b, length, d))
        x = x + F.dropout(att, self.residual_dropout, self.training)
        h = self.ff_norm(x)
        h = self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x + F.dropout(h, self.residual_dropout, self.training)


class LLaDAModel(nn.Module):
    """The ``model`` submodule: ``transformer`` = {``wte``, ``blocks`` (ModuleList), ``ln_f``, ``ff_out``}."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList([LLaDABlock(config) for _ in range(config.n_layers)]),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))


class LLaDA(nn.Module):
    """LLaDA's bidirectional transformer with the released parameter names (``model.transformer.*``).

    Args:
        config: the architecture (:class:`LLaDAConfig`; defaults: LLaDA-8B).
        gradient_checkpointing: recompute each block in backward (memory for compute); results are identical.
    """

    def __init__(self, config: LLaDAConfig | None = None, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config or LLaDAConfig()
        self.gradient_checkpointing = gradient_checkpointing
        self.model = LLaDAModel(self.config)

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def token_embeddings(self) -> torch.Tensor:
        """The (E, D) input embedding table ``wte.weight``."""
        return self.model.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits over the E embedding ids.

        Args:
            input_ids: (B, L) ids in [0, E), L <= max_sequence_length; masked positions hold ``mask_token_id``.
            inputs_embeds: (B, L, D) instead of ``input_ids``: embeddings fed to the blocks in place of ``wte``.

        Returns:
            (B, L, E) logits in the parameters' dtype (or the autocast dtype).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) and inputs_embeds (B, L, D)")
        transformer = self.model.transformer
        x = transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"expected input_ids (B, L) or inputs_embeds (B, L, {self.config.d_model}); "
                             f"got embeddings of shape {list(x.shape)}")
        length = x.shape[1]
        if length > self.config.max_sequence_length:
            raise ValueError(f"sequence length {length} exceeds max_sequence_length {self.config.max_sequence_length}")
        x = F.dropout(x, self.config.embedding_dropout, self.training)
        cos, sin = rotary_cos_sin(length, self.config.head_dim, self.config.rope_theta, x.device)
        for block in transformer.blocks:
            x = call_block(self.gradient_checkpointing, block, x, cos, sin)
        return transformer.ff_out(transformer.ln_f(x))


# ---- files ----------------------------------------------------------------------------------------------------------
def check_llada_tokenizer(config: LLaDAConfig, tokenizer: Any, source: str) -> None:
    """The tokenizer must map ``<|mdm_mask|>`` to ``mask_token_id`` and fit in the embedding (LLaDA-8B: 126,349
    tokens, mask 126336, embedding 126464).

    Raises:
        ValueError: either disagrees (names ``source``, the config holding the ids).
    """
    size = len(tokenizer)
    if size > config.embedding_size:
        raise ValueError(f"{source}: the tokenizer has {size} tokens but embedding_size is {config.embedding_size}; "
                         f"ids past the embedding cannot be embedded. Expected layout: {LAYOUT}")
    mask = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask != config.mask_token_id:
        raise ValueError(f"{source}: mask_token_id is {config.mask_token_id} but the tokenizer maps {MASK_TOKEN} to "
                         f"{mask}. Expected layout: {LAYOUT}")


def load_llada(folder: str | Path, tokenizer: Any | None = None, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", gradient_checkpointing: bool = False) -> LLaDA:
    """Build :class:`LLaDA` from a released folder (``config.json``, ``model.safetensors.index.json`` and its
    shards), strictly: built on the meta device, the shards' tensors assigned (cast to ``dtype``), shard by shard.

    Args:
        folder: the model folder (a download of GSAI-ML/LLaDA-8B-Base or -Instruct).
        tokenizer: if given (e.g. ``AutoTokenizer.from_pretrained(folder)``), checked with
            :func:`check_llada_tokenizer`.
        dtype: parameter dtype (the release is bfloat16; float32 doubles the 16 GB).
        device: where the weights are loaded.
        gradient_checkpointing: see :class:`LLaDA`.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: config, index or a listed shard missing (names the path and the expected layout).
        ValueError: a bad config; keys missing from or unexpected in the index; a shard that disagrees with the
            index or has mis-shaped tensors (names the shard); a tokenizer that disagrees with the config.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    config = LLaDAConfig.from_dict(read_config(config_path, LAYOUT), str(config_path))
    if tokenizer is not None:
        check_llada_tokenizer(config, tokenizer, str(config_path))
    with torch.device("meta"):
        model = LLaDA(config, gradient_checkpointing=gradient_checkpointing)
    model.to(dtype)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state = load_sharded_safetensors(folder, shapes, LAYOUT, device)
    load_state_dict_checked(model, state, str(folder / INDEX_NAME), hint=f"Expected layout: {LAYOUT}")
    return model.eval()
