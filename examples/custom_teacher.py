"""A teacher the package does not ship: a class-conditional masked model over a binary-patch tokenizer.

Adding a teacher is one subclass of :class:`~dimo_lightning.teachers.base.MaskedTeacher` (here of
``ClassConditionalTeacher``, which already implements the MaskGIT-style conditioning, CFG and decoding) plus one
``class_path`` in YAML. This one:

* tokenizes 14x14 binary images into a 7x7 grid of 2x2 patches; each code is one of the 16 bit patterns of a patch,
  so decoding is exact and needs no learned codebook (``BinaryPatchTokenizer``);
* runs a :class:`~dimo_lightning.nn.transformer.MaskTransformer` over the 49 tokens, loaded from a safetensors file,
  or seeded random weights when none is given (enough to show the API end to end; distill a trained one in practice).

Distill it for a few steps with the CLI (this folder must be importable, as for any ``class_path``)::

    PYTHONPATH=examples dimo fit --config examples/custom_teacher.yaml
    python examples/custom_teacher.py --steps 5          # the same, from this file

The module imports no Lightning (``examples/sample_exported.py`` imports the tokenizer from here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.teachers.base import ClassConditionalTeacher

HERE = Path(__file__).resolve().parent


class BinaryPatchTokenizer(nn.Module):
    """Codes <-> binary images: code c of a ``patch_size`` x ``patch_size`` patch is its pixels read as bits.

    Args:
        patch_size: side p of a patch; there are 2 ** (p * p) codes (16 for p = 2).
    """

    def __init__(self, patch_size: int = 2) -> None:
        super().__init__()
        if not 1 <= patch_size <= 3:
            raise ValueError(f"patch_size must be 1, 2 or 3 (2**(p*p) codes), got {patch_size}")
        self.patch_size = patch_size
        self.codebook_size = 2 ** (patch_size * patch_size)
        bits = (torch.arange(self.codebook_size)[:, None] >> torch.arange(patch_size * patch_size)) & 1
        self.register_buffer("patterns", bits.float().reshape(-1, patch_size, patch_size), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (M, 1, H, W) in [0, 1] -> codes (M, H/p, W/p) (pixels thresholded at 0.5)."""
        p = self.patch_size
        m, _, h, w = images.shape
        bits = (images[:, 0] > 0.5).long().reshape(m, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
        return (bits.reshape(m, h // p, w // p, p * p) << torch.arange(p * p)).sum(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (M, h, w) in [0, K) -> images (M, 1, h*p, w*p) in {0, 1}."""
        m, h, w = codes.shape
        p = self.patch_size
        patches = self.patterns[codes]  # (M, h, w, p, p)
        return patches.permute(0, 1, 3, 2, 4).reshape(m, 1, h * p, w * p)

    def export_record(self) -> dict:
        """How `dimo export` rebuilds this tokenizer: nothing to copy, the patterns follow from ``patch_size``."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"patch_size": self.patch_size}}


class BitPatchTeacher(ClassConditionalTeacher):
    """A MaskGIT-style teacher over :class:`BinaryPatchTokenizer` codes.

    Args:
        checkpoint: MaskTransformer weights (safetensors) with this architecture; None: seeded random weights.
        image_size: image side in pixels (a multiple of ``patch_size``).
        patch_size: tokenizer patch side (2: 16 codes).
        num_classes: number of class labels.
        hidden_dim: transformer width.
        depth: transformer layers.
        heads: attention heads.
        mlp_dim: MLP width.
        seed: seed of the random weights when ``checkpoint`` is None.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        image_size: int = 14,
        patch_size: int = 2,
        num_classes: int = 4,
        hidden_dim: int = 32,
        depth: int = 1,
        heads: int = 2,
        mlp_dim: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.tokenizer = BinaryPatchTokenizer(patch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = MaskTransformer(
                codebook_size=self.tokenizer.codebook_size, num_classes=num_classes,
                grid_size=image_size // patch_size, hidden_dim=hidden_dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
            )
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"BitPatchTeacher weights not found: {checkpoint}")
            load_state_dict_checked(self.network, load_file(checkpoint), checkpoint)
        self.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    """`dimo fit --config examples/custom_teacher.yaml`, with this folder importable."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="generator steps")
    # Any other flag goes to `dimo fit`, e.g. --trainer.enable_progress_bar=false
    args, extra = parser.parse_known_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from dimo_lightning.commands.cli import main as dimo

    dimo(["fit", "--config", str(HERE / "custom_teacher.yaml"),
          f"--model.init_args.optim.max_generator_steps={args.steps}", *extra])


if __name__ == "__main__":
    main()
