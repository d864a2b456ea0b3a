"""SampleWriter: ``dimo predict`` output as ``samples.npz`` (images, labels) plus PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image
from typing_extensions import override

from dimo_lightning.callbacks.common import run_directory


class SampleWriter(BasePredictionWriter):
    """Collects the predictions (dicts with ``images`` (B, C, H, W) in [0, 1] and ``labels`` (B,)) and writes
    ``samples.npz`` (``images`` float32 (N, H, W) for one channel, else (N, C, H, W); ``labels`` int64 (N,)) and
    ``png/<index>_<label>.png`` into ``output_dir`` (default: the run's log directory).

    Args:
        output_dir: where to write (None: the run's log directory).
        max_png: write at most this many PNG files (0: none).
    """

    def __init__(self, output_dir: str | None = None, max_png: int = 1000) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.max_png = max_png
        self.path: Path | None = None

    @override
    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        images = torch.cat([p["images"] for p in predictions]).float().cpu()
        labels = torch.cat([p["labels"] for p in predictions]).long().cpu()
        if trainer.world_size > 1:
            images = pl_module.all_gather(images).reshape(-1, *images.shape[1:]).cpu()
            labels = pl_module.all_gather(labels).reshape(-1).cpu()
        directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)  # collective: all ranks
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        array = images[:, 0] if images.shape[1] == 1 else images
        self.path = directory / "samples.npz"
        np.savez_compressed(self.path, images=array.numpy().astype(np.float32), labels=labels.numpy())
        if self.max_png:
            png_dir = directory / "png"
            png_dir.mkdir(exist_ok=True)
            for i in range(min(self.max_png, len(images))):
                save_image(images[i], png_dir / f"{i:06d}_{int(labels[i])}.png")
        print(f"wrote {len(images)} samples to {self.path} (PNG files in {directory / 'png'})")
