"""SampleGrid: a fixed set of conditions rendered by the student as an image grid (TensorBoard and PNG)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from dimo_lightning.callbacks.common import run_directory, student_sampler
from dimo_lightning.callbacks.ema import evaluation_student


class SampleGrid(Callback):
    """Every ``every_n_generator_steps`` (and at the start and end of fit), render ``samples_per_class`` one-step
    samples of every class (a row per class) with fixed seeds; log the grid to TensorBoard as ``samples/student``
    and save ``samples/step_XXXXXX.png`` in the run directory.

    Args:
        every_n_generator_steps: cadence in generator steps.
        samples_per_class: columns of the grid.
        seed: seed of the fixed samples.
    """

    def __init__(self, every_n_generator_steps: int = 100, samples_per_class: int = 10, seed: int = 0) -> None:
        if every_n_generator_steps < 1 or samples_per_class < 1:
            raise ValueError("every_n_generator_steps and samples_per_class must be >= 1")
        self.every = every_n_generator_steps
        self.samples_per_class = samples_per_class
        self.seed = seed
        self._last_step = -1
        self.last_path = None

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """The grid image (C, H, W) of the current (EMA) student."""
        num_classes = pl_module.teacher.num_classes
        labels = torch.arange(num_classes).repeat_interleave(self.samples_per_class)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        codes = student_sampler(pl_module)(evaluation_student(pl_module), labels, generator)
        images = pl_module.teacher.decode(codes).float().cpu()
        return make_grid(images, nrow=self.samples_per_class, padding=2, pad_value=0.5)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = pl_module.generator_step
        if step == self._last_step:
            return
        self._last_step = step
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it, before the rank-zero branch.
        directory = run_directory(trainer) / "samples"
        grid = self.render(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.last_path = directory / f"step_{step:06d}.png"
        save_image(grid, self.last_path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/student", grid, global_step=step)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        if not getattr(trainer, "fast_dev_run", False):
            self._log(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.generator_step % self.every == 0:
            self._log(trainer, pl_module)

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)
