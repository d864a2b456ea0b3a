"""Shared test helpers: tiny random-weight teachers saved in the real file layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

TINY_ARCH = dict(codebook_size=16, num_classes=10, grid_size=7, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                 dropout=0.1)


def save_tiny_mnist_teacher(directory: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """A random MaskTransformer + 16-code PatchVQ codebook in the MNISTTeacher layout -> (weights, codebook)."""
    torch.manual_seed(seed)
    arch = {**TINY_ARCH, **overrides}
    net = MaskTransformer(**arch)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    (directory / "teacher.json").write_text(json.dumps(arch))
    codebook = directory / "codebook.safetensors"
    PatchVQTokenizer(torch.rand(arch["codebook_size"], 16)).save(codebook)
    return weights, codebook
