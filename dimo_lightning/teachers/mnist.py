"""MNISTTeacher: the small MaskGIT-style teacher this project trained on real MNIST tokens (shipped asset)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dimo_lightning.assets import asset_path
from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.teachers.base import ClassConditionalTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer


def load_network_state(network: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``network`` strictly; mismatches raise ``ValueError`` listing the keys and the file."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches: {show(wrong_shape)}")
        raise ValueError(f"checkpoint {source} does not match the network: " + "; ".join(parts))
    network.load_state_dict(state, strict=True)


class MNISTTeacher(ClassConditionalTeacher):
    """The shipped MNIST teacher: a MaskTransformer over 7x7 PatchVQ tokens (256 codes), 10 classes.

    Args:
        checkpoint: network weights (safetensors); None loads the shipped asset. A ``.json`` with the architecture
            must sit beside it (same stem).
        codebook: PatchVQ codebook (safetensors); None loads the shipped asset.
    """

    def __init__(self, checkpoint: str | None = None, codebook: str | None = None) -> None:
        super().__init__()
        weights = Path(checkpoint) if checkpoint is not None else asset_path("mnist_teacher.safetensors")
        config_path = weights.with_suffix(".json")
        for path in (weights, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"MNIST teacher file not found: {path}. The teacher is a safetensors file plus a .json "
                    "architecture file of the same stem; `make assets` rebuilds the shipped ones."
                )
        architecture = json.loads(config_path.read_text())
        try:
            self.network = MaskTransformer(**architecture)
        except TypeError as err:
            raise ValueError(f"{config_path} is not a MaskTransformer architecture: {err}") from err
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read teacher weights {weights}: {err}") from err
        load_network_state(self.network, state, weights)
        self.tokenizer = PatchVQTokenizer.from_file(codebook)
        if self.tokenizer.codebook_size != self.network.codebook_size:
            raise ValueError(
                f"codebook {codebook or 'asset'} has {self.tokenizer.codebook_size} codes but the teacher {weights} "
                f"expects {self.network.codebook_size}"
            )
        self.eval().requires_grad_(False)
