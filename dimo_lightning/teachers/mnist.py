"""MNISTTeacher: the small MaskGIT-style teacher this project trained on real MNIST tokens (shipped asset)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from dimo_lightning.assets import asset_path
from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.teachers.base import ClassConditionalTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer


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
        load_state_dict_checked(self.network, state, str(weights), hint=f"Is {config_path} the architecture of it?")
        self.tokenizer = PatchVQTokenizer.from_file(codebook)
        if self.tokenizer.codebook_size != self.network.codebook_size:
            raise ValueError(
                f"codebook {codebook or 'asset'} has {self.tokenizer.codebook_size} codes but the teacher {weights} "
                f"expects {self.network.codebook_size}"
            )
        self.eval().requires_grad_(False)
