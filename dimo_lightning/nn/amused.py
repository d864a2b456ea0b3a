"""The aMUSEd token network: diffusers ``UVit2DModel`` with the forward Di[M]O needs.

:class:`AmusedTransformer` subclasses diffusers' ``UVit2DModel`` (amused/amused-256 and -512 ``transformer/``), so
its modules, state-dict keys and config are the released ones. Only ``forward`` is new; it runs the same submodules in
the same order as ``UVit2DModel.forward`` (diffusers ``models/unets/uvit_2d.py``; checked against it numerically in
``tests/test_released_teachers.py``) and adds what distillation needs:

* the calling convention of every dimo network: ``(codes (B, N), text states, pooled, micro-conditions, timestep,
  embedding-noise sigma, noise scale, generator) -> logits (B, N, K)``. aMUSEd has no timestep input: it is accepted
  and ignored;
* the student's embedding noise ``e' = sigma * scale * eps + sqrt(1 - sigma^2) * e`` on the output of ``embed``, as
  for Meissonic (docs/method.md#student-input);
* gradient checkpointing of every attention block (``gradient_checkpointing``). diffusers 0.42.1's own checkpointing
  path of this model calls the layer with keyword arguments through a ``*args``-only wrapper and raises a TypeError.

Shapes: B batch, h x w token grid (N = h w), L text tokens, K codebook size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import UVit2DModel

from dimo_lightning.core.weight_files import give_default_mode
from dimo_lightning.nn.meissonic import NUM_MICRO_CONDS, call_block, sinusoidal_embedding

AESTHETIC_SCORE = 6.0  # the pipeline's default micro-condition


class AmusedTransformer(UVit2DModel):
    """``UVit2DModel`` (same constructor arguments, keys and config) with the dimo forward (module docstring)."""

    @property
    def codebook_size(self) -> int:
        """K: number of image codes (logit width)."""
        return int(self.config.codebook_size)

    @property
    def mask_id(self) -> int:
        """The mask token: ``vocab_size - 1`` (8255 for the released models), as the aMUSEd scheduler uses."""
        return int(self.config.vocab_size) - 1

    def code_embedding_rms(self) -> float:
        """RMS of the ``embed`` output over all K codes (the scale the student's embedding noise perturbs)."""
        with torch.no_grad():
            codes = torch.arange(self.codebook_size, device=self.embed.embeddings.weight.device)
            return float(self.embed(codes.view(1, 1, -1)).float().pow(2).mean().sqrt())

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
            encoder_hidden_states: (B, L, encoder_hidden_size) text states (CLIP penultimate layer).
            pooled: (B, cond_embed_dim) pooled text embedding (CLIP ``text_embeds``).
            micro_conds: (B, 5) [orig width, orig height, crop top, crop left, aesthetic score]; None uses
                (16 sample_size, 16 sample_size, 0, 0, 6), the pipeline's defaults.
            timestep: ignored (aMUSEd is not timestep-conditioned); accepted for the common calling convention.
            emb_noise_sigma: scalar or (B,) sigma of the variance-preserving noise on the ``embed`` output.
            emb_noise_scale: multiplies eps (1: the paper's absolute form).
            generator: random source of eps.

        Returns:
            (B, N, K) logits, N = h * w in row-major order.
        """
        del timestep
        if codes.ndim == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes (B, N) need a square grid; N={codes.shape[1]} is not a square")
            codes = codes.view(codes.shape[0], side, side)
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w) or (B, N), got shape {list(codes.shape)}")
        b, h, w = codes.shape
        if self.config.downsample and (h % 2 or w % 2):
            raise ValueError(f"a down-sampling aMUSEd transformer needs an even token grid, got {h}x{w}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be (B={b}, L, D), got {list(encoder_hidden_states.shape)}")
        if micro_conds is None:
            size = 16.0 * self.config.sample_size
            micro_conds = torch.tensor([size, size, 0.0, 0.0, AESTHETIC_SCORE], device=codes.device).expand(b, -1)
        if micro_conds.shape != (b, NUM_MICRO_CONDS):
            raise ValueError(f"micro_conds must be (B={b}, {NUM_MICRO_CONDS}), got {list(micro_conds.shape)}")

        context = self.encoder_proj_layer_norm(self.encoder_proj(encoder_hidden_states))  # (B, L, D)
        micro = sinusoidal_embedding(micro_conds.reshape(-1), self.config.micro_cond_encode_dim).reshape(b, -1)
        cond = self.cond_embed(torch.cat([pooled, micro.to(pooled.dtype)], dim=1)).to(context.dtype)  # (B, D)

        x = self.embed(codes)  # (B, C, h, w)
        sigma = torch.as_tensor(emb_noise_sigma, dtype=x.dtype, device=x.device)
        if bool((sigma != 0).any()):
            sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = sigma * emb_noise_scale * eps + torch.sqrt(1 - sigma * sigma) * x

        x = call_block(self.gradient_checkpointing, _uvit_block(self.down_block), x, cond, context)
        _, channels, gh, gw = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, gh * gw, channels)))
        for layer in self.transformer_layers:
            x = call_block(self.gradient_checkpointing, _transformer_layer(layer), x, context, cond)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.reshape(b, gh, gw, channels).permute(0, 3, 1, 2)
        x = call_block(self.gradient_checkpointing, _uvit_block(self.up_block), x, cond, context)
        logits = self.mlm_layer(x)  # (B, K, h, w)
        return logits.permute(0, 2, 3, 1).reshape(b, h * w, self.codebook_size)

    def save_pretrained(self, folder: str | Path, **kwargs) -> Path:
        """Write the released layout (``config.json`` naming ``UVit2DModel`` + ``diffusion_pytorch_model.safetensors``),
        which diffusers' ``UVit2DModel.from_pretrained`` and the aMUSEd pipeline load."""
        with torch.device("meta"):
            plain = UVit2DModel.from_config(dict(self.config))
        plain.load_state_dict({k: v.detach() for k, v in self.state_dict().items()}, strict=True, assign=True)
        plain.save_pretrained(str(folder), **kwargs)
        give_default_mode(Path(folder).glob("*.safetensors"))  # written 0600 by safetensors
        return Path(folder)


def _uvit_block(block):
    """UVitBlock call with positional tensors (checkpoint-friendly)."""

    def run(x, cond, context):
        return block(x, pooled_text_emb=cond, encoder_hidden_states=context, cross_attention_kwargs=None)

    return run


def _transformer_layer(layer):
    """BasicTransformerBlock call (ada_norm_continuous on the pooled embedding) with positional tensors."""

    def run(x, context, cond):
        return layer(x, encoder_hidden_states=context, added_cond_kwargs={"pooled_text_emb": cond})

    return run
