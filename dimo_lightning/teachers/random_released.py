"""Random-weight Meissonic / aMUSEd folders in the published layouts (tests, dry runs, memory and speed checks).

``save_random_released(folder, "meissonic", "full")`` writes what ``MeissonFlow/Meissonic`` holds (``transformer/``,
``vqvae/``, ``text_encoder/``, ``tokenizer/``) with the released configs and random weights, so
:class:`~dimo_lightning.teachers.meissonic.MeissonicTeacher` loads it and every pass costs what the real model's does.
``"tiny"`` presets are a few thousand parameters for CPU tests. Each part is written with the library that reads it
(``save_pretrained`` of diffusers' ``VQModel`` / ``UVit2DModel``, transformers' ``CLIPTextModelWithProjection``,
:meth:`MeissonicTransformer.save_pretrained`).

The tokenizer is a byte-level CLIP BPE without merges (one token per character, ids below 514): the real one's 49,408
entries and merges cannot be downloaded here. Its files have the published names (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) and load with ``AutoTokenizer``; with the full presets the text
encoder keeps its released vocabulary size, so only which ids a prompt maps to differs from the real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from dimo_lightning.nn.meissonic import FP16_WEIGHTS_NAME, MeissonicTransformer

# ---- configs: the released ones (teachers.md 2.2, 2.5, 2.6, 3.2, 3.4) and tiny ones --------------------------------
MEISSONIC_TRANSFORMER = dict(attention_head_dim=128, num_attention_heads=8, num_layers=14, num_single_layers=28,
                             joint_attention_dim=1024, pooled_projection_dim=1024, axes_dims_rope=[16, 56, 56],
                             vocab_size=8256, codebook_size=8192, downsample=True, upsample=True)
TINY_MEISSONIC_TRANSFORMER = dict(attention_head_dim=8, num_attention_heads=2, num_layers=1, num_single_layers=1,
                                  joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
                                  vocab_size=33, codebook_size=32, downsample=True, upsample=True)
AMUSED_256_TRANSFORMER = dict(hidden_size=1024, use_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
                              cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
                              encoder_hidden_size=768, vocab_size=8256, codebook_size=8192, in_channels=768,
                              block_out_channels=768, num_res_blocks=3, block_num_heads=12, num_hidden_layers=22,
                              num_attention_heads=16, intermediate_size=2816, layer_norm_eps=1e-6,
                              ln_elementwise_affine=True, downsample=False, upsample=False, sample_size=16)
AMUSED_512_TRANSFORMER = {**AMUSED_256_TRANSFORMER, "downsample": True, "upsample": True, "sample_size": 32}
TINY_AMUSED_TRANSFORMER = dict(hidden_size=16, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                               encoder_hidden_size=16, vocab_size=33, codebook_size=32, in_channels=8,
                               block_out_channels=8, num_res_blocks=1, block_num_heads=2, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, downsample=True, upsample=True,
                               sample_size=4)
RELEASED_VQ = dict(act_fn="silu", block_out_channels=[128, 256, 256, 512, 768],
                   down_block_types=["DownEncoderBlock2D"] * 5, up_block_types=["UpDecoderBlock2D"] * 5,
                   in_channels=3, out_channels=3, latent_channels=64, layers_per_block=2, norm_num_groups=32,
                   norm_type="group", num_vq_embeddings=8192, vq_embed_dim=None, lookup_from_codebook=True,
                   force_upcast=True, mid_block_add_attention=False, scaling_factor=0.18215, sample_size=32)
TINY_VQ = dict(RELEASED_VQ, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
               num_vq_embeddings=32, sample_size=8)
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   projection_dim=1024, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77,
                   layer_norm_eps=1e-5)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                   layer_norm_eps=1e-5)
TINY_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=16, hidden_act="gelu", vocab_size=514, max_position_embeddings=16,
                      layer_norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    "meissonic-full": dict(transformer=MEISSONIC_TRANSFORMER, vq=RELEASED_VQ, text=CLIP_H_TEXT, pad="!"),
    "meissonic-tiny": dict(transformer=TINY_MEISSONIC_TRANSFORMER, vq=TINY_VQ, text=TINY_CLIP_TEXT, pad="!"),
    "amused-256": dict(transformer=AMUSED_256_TRANSFORMER, vq=RELEASED_VQ, text=CLIP_L_TEXT, pad="<|endoftext|>"),
    "amused-512": dict(transformer=AMUSED_512_TRANSFORMER, vq=RELEASED_VQ, text=CLIP_L_TEXT, pad="<|endoftext|>"),
    "amused-tiny": dict(transformer=TINY_AMUSED_TRANSFORMER, vq=TINY_VQ, text=TINY_CLIP_TEXT, pad="<|endoftext|>"),
}


def save_clip_tokenizer(folder: Path, pad_token: str, max_length: int) -> Path:
    """A byte-level CLIP BPE tokenizer without merges, in the slow-tokenizer file layout (module docstring)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **specials},
        indent=2))
    return folder


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial norm weights and biases (a swapped or dropped one then shows in the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.device))


def _half(module: torch.nn.Module, fp16: bool) -> torch.nn.Module:
    """The module in float16 (for ``.fp16`` files) or unchanged, always on the CPU for writing."""
    module = module.cpu()
    return module.half() if fp16 else module


def save_random_released(
    folder: str | Path,
    preset: Literal["meissonic-full", "meissonic-tiny", "amused-256", "amused-512", "amused-tiny"],
    seed: int = 0,
    fp16: bool = False,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight teacher folder (``transformer/``, ``vqvae/``, ``text_encoder/``, ``tokenizer/``).

    Args:
        folder: where to write (created).
        preset: the architecture (released sizes, or tiny ones for tests).
        seed: torch seed of the random weights.
        fp16: write only the ``.fp16`` weight files (the released folders hold both).
        device: where to build the networks (a GPU makes the full presets' random init fast).

    Returns:
        ``folder``.
    """
    from diffusers import UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    variant = "fp16" if fp16 else None

    with torch.device(device):
        if preset.startswith("meissonic"):
            network = MeissonicTransformer(**spec["transformer"])
        else:
            network = UVit2DModel(**spec["transformer"])
    _perturb(network, seed)
    if isinstance(network, MeissonicTransformer):
        network.cpu().save_pretrained(root / "transformer")
        if fp16:
            weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
            save_file({k: v.detach().half().contiguous().cpu() for k, v in network.state_dict().items()},
                      str(root / "transformer" / FP16_WEIGHTS_NAME))
            weights.unlink()
    else:
        _half(network, fp16).save_pretrained(str(root / "transformer"), variant=variant)
    del network

    with torch.device(device):
        vq = VQModel(**spec["vq"])
    _perturb(vq, seed + 1)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    _half(vq, fp16).save_pretrained(str(root / "vqvae"), variant=variant)
    del vq

    text = spec["text"]
    config = CLIPTextConfig(**text, bos_token_id=512, eos_token_id=513, pad_token_id=1)
    with torch.device(device):
        encoder = CLIPTextModelWithProjection(config)
    _perturb(encoder, seed + 2)
    _half(encoder, fp16).save_pretrained(str(root / "text_encoder"), variant=variant)
    del encoder
    save_clip_tokenizer(root / "tokenizer", spec["pad"], text["max_position_embeddings"])
    return root
