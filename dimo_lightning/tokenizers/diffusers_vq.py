"""The VQ image tokenizer of Meissonic and aMUSEd: a diffusers ``VQModel`` (``vqvae/`` folder), decode only.

Layout of the published folder (docs/meissonic.md#what-to-download): ``config.json`` plus
``diffusion_pytorch_model.safetensors`` (or its ``.fp16.safetensors`` variant). The weights load strictly (a missing,
unexpected or mis-shaped key fails with the file named); the encoder and ``quant_conv`` are then dropped, because
distillation is data-free and only the codes -> image path runs (the official code deletes ``vqvae.encoder`` too).
Decoding: codebook lookup, ``post_quant_conv``, decoder, then clipped to [0, 1] (the pixel range these VQ models were
trained on). Images are decoded in chunks of ``decode_batch_size``, so that a 1024 px batch never holds every image's
decoder activations at once.

diffusers is imported when a tokenizer is built, not when this module is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.core.weight_files import load_state_dict_checked

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"
CONFIG_NAME = "config.json"
# Parts of a VQModel that only encode images: dropped after the strict load.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def read_diffusers_config(folder: Path, what: str) -> dict[str, Any]:
    """``folder/config.json`` as a dict; a clear error naming ``what`` and the path otherwise."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{what} config not found: {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    return config


def read_diffusers_weights(folder: Path, what: str, variant: str | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of ``diffusion_pytorch_model[.fp16].safetensors`` in ``folder`` -> (state, file).

    Args:
        folder: a diffusers model folder.
        what: named in errors (e.g. "Meissonic VQ model").
        variant: None (the fp32 file, else the fp16 one when only it exists) or "fp16".
    """
    if variant not in (None, "fp16"):
        raise ValueError(f"variant must be None or 'fp16', got {variant!r}")
    names = [FP16_WEIGHTS_NAME] if variant == "fp16" else [WEIGHTS_NAME, FP16_WEIGHTS_NAME]
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no {what} weights in {folder}: expected {' or '.join(names)}")
    try:
        return load_file(str(weights)), weights
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {what} weights {weights}: {err}") from err


def build_diffusers_model(model_class: type, config: dict[str, Any], what: str, config_path: Path,
                          class_name: str | None = None) -> nn.Module:
    """``model_class.from_config(config)`` on the meta device (no random init of large models); a config that names
    another class than ``class_name`` (default: the class's own name) or that the class rejects fails with the
    path."""
    name, expected = config.get("_class_name"), class_name or model_class.__name__
    if name is not None and name != expected:
        raise ValueError(f"{config_path} describes a {name}, expected a {expected} ({what})")
    try:
        with torch.device("meta"):
            return model_class.from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build the {what} from {config_path}: {err}") from err


class DiffusersVQTokenizer(nn.Module):
    """Codes (B, h, w) -> images (B, 3, 16h, 16w) in [0, 1] through a diffusers ``VQModel`` without its encoder.

    Build it with :meth:`from_pretrained`.

    Args:
        vq_model: a diffusers ``VQModel`` (its encoder may already be removed).
        decode_batch_size: images decoded per chunk (bounds the decoder's activation memory).
    """

    def __init__(self, vq_model: nn.Module, decode_batch_size: int = 8) -> None:
        super().__init__()
        if decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.vq = vq_model
        self.decode_batch_size = decode_batch_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, variant: str | None = None,
                        decode_batch_size: int = 8) -> DiffusersVQTokenizer:
        """Load a ``vqvae/`` folder strictly, then drop the encoder.

        Raises:
            FileNotFoundError: config or weights missing.
            ValueError: a config of another class, unreadable weights, or missing / unexpected / mis-shaped keys.
        """
        from diffusers import VQModel

        folder = Path(folder)
        config = read_diffusers_config(folder, "VQ model")
        if not config.get("lookup_from_codebook", False):
            raise ValueError(f"{folder / CONFIG_NAME}: lookup_from_codebook must be true (codes index the codebook)")
        model = build_diffusers_model(VQModel, config, "VQ model", folder / CONFIG_NAME)
        state, weights = read_diffusers_weights(folder, "VQ model", variant)
        load_state_dict_checked(model, state, str(weights), hint=f"Is {folder / CONFIG_NAME} the config of these "
                                "weights?")
        del model.encoder, model.quant_conv  # decode only (data-free distillation)
        return cls(model.eval().requires_grad_(False), decode_batch_size)

    @property
    def codebook_size(self) -> int:
        """K: number of codes."""
        return self.vq.quantize.embedding.num_embeddings

    @property
    def latent_channels(self) -> int:
        return self.vq.quantize.embedding.embedding_dim

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: 2^(number of decoder levels - 1) (16 for the released models)."""
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) long in [0, K) -> float32 images (B, 3, 16h, 16w) clipped to [0, 1], decoded in chunks of
        ``decode_batch_size``."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got shape {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        images = []
        dtype = next(self.vq.parameters()).dtype
        for chunk in codes.split(self.decode_batch_size):
            b, h, w = chunk.shape
            latents = self.vq.quantize.get_codebook_entry(chunk.reshape(-1), (b, h, w, self.latent_channels))
            latents = latents.to(dtype)
            spatial = latents if self.vq.config.norm_type == "spatial" else None  # as VQModel.decode does
            decoded = self.vq.decoder(self.vq.post_quant_conv(latents), spatial)
            images.append(decoded.float().clamp(0, 1))
        return torch.cat(images)
