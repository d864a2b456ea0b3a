"""SampleGrid: a fixed set of conditions rendered by the student as an image grid (TensorBoard and PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from dimo_lightning.core.run_directory import run_directory
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.sharding import batch_spans, slice_conditions
from dimo_lightning.evaluation.callbacks.common import require_image_teacher, student_pipeline


def grid_conditions(trainer: pl.Trainer, pl_module: pl.LightningModule, classes: Sequence[int] | None,
                    rows: int) -> Any:
    """The grid's row conditions: ``classes`` if given, else the DataModule's ``grid_conditions(rows)`` if it has
    one, else the first ``rows`` classes of the teacher."""
    if classes is not None:
        return torch.as_tensor(list(classes), dtype=torch.long)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "grid_conditions", None)):
        return datamodule.grid_conditions(rows)
    num_classes = getattr(pl_module.teacher, "num_classes", None)
    if num_classes is None:
        raise ValueError("SampleGrid needs `classes`, a DataModule with grid_conditions(rows) or a teacher with "
                         "num_classes")
    return torch.arange(min(rows, num_classes))


def repeat_each(conditions: Any, times: int) -> Any:
    """Each condition ``times`` times in a row: a tensor or a list."""
    if isinstance(conditions, torch.Tensor):
        return conditions.repeat_interleave(times)
    return [c for c in conditions for _ in range(times)]


class SampleGrid(Callback):
    """Every ``every_n_generator_steps`` (and at the start and end of fit), render ``samples_per_class`` one-step
    samples of a few fixed conditions (a row each) with a fixed seed, in batches of ``batch_size``; log the grid to
    TensorBoard as ``samples/student`` and save ``samples/step_XXXXXX.png`` in the run directory.

    With prompt conditions (a DataModule whose ``grid_conditions`` gives prompts, e.g. ``PromptDataModule``: its
    first held-out prompts), the row prompts, top to bottom, go into the sidecar ``samples/step_XXXXXX.txt`` (one per
    line) and into TensorBoard as the text ``samples/prompts``.

    Every rank renders the same (small) grid, so no rank runs a forward the others skip (sharded models need every
    rank in each forward); rank zero writes it.

    Args:
        every_n_generator_steps: cadence in generator steps.
        samples_per_class: columns of the grid (at most ``max_columns``).
        classes: the class of each row; None: the DataModule's ``grid_conditions`` or the teacher's first
            ``max_rows`` classes.
        max_rows: cap on the rows (a 1,000-class teacher shows ``max_rows`` classes, not 1,000).
        max_columns: cap on the columns.
        batch_size: samples per student forward and decode.
        seed: seed of the fixed samples.
    """

    def __init__(
        self,
        every_n_generator_steps: int = 100,
        samples_per_class: int = 10,
        classes: list[int] | None = None,
        max_rows: int = 10,
        max_columns: int = 16,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if min(every_n_generator_steps, samples_per_class, max_rows, max_columns, batch_size) < 1:
            raise ValueError("SampleGrid: every_n_generator_steps, samples_per_class, max_rows, max_columns and "
                             "batch_size must be >= 1")
        if classes is not None and len(classes) == 0:
            raise ValueError("SampleGrid.classes must be null or non-empty")
        self.every = every_n_generator_steps
        self.columns = min(samples_per_class, max_columns)
        self.classes = list(classes) if classes is not None else None
        self.max_rows = max_rows
        self.batch_size = batch_size
        self.seed = seed
        self._last_step = -1
        self.last_path = None

    def row_conditions(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The conditions of the grid's rows, top to bottom (a label tensor or a list of prompts)."""
        rows = grid_conditions(trainer, pl_module, self.classes, self.max_rows)
        return slice_conditions(rows, 0, self.max_rows)

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: Any = None) -> torch.Tensor:
        """The grid image (C, H, W) of the current (EMA) student: at most ``max_rows`` x ``max_columns`` samples."""
        rows = self.row_conditions(trainer, pl_module) if rows is None else rows
        conditions = repeat_each(rows, self.columns)
        pipeline = student_pipeline(pl_module)
        images = []
        for index, (start, stop) in enumerate(batch_spans(len(conditions), self.batch_size)):
            seed = derive_seed(self.seed, salt=index, modulus=SAMPLE_SEED_MODULUS)
            codes = pipeline.sample_codes(slice_conditions(conditions, start, stop),
                                          torch.Generator(device=pl_module.device).manual_seed(seed))
            images.append(pipeline.decode(codes).cpu())
        return make_grid(torch.cat(images), nrow=self.columns, padding=2, pad_value=0.5)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = pl_module.generator_step
        if step == self._last_step:
            return
        self._last_step = step
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it, before the rank-zero branch.
        directory = run_directory(trainer) / "samples"
        rows = self.row_conditions(trainer, pl_module)
        grid = self.render(trainer, pl_module, rows)
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.last_path = directory / f"step_{step:06d}.png"
        save_image(grid, self.last_path)
        prompts = None if isinstance(rows, torch.Tensor) else [str(p) for p in rows]
        if prompts is not None:  # the rows' prompts next to the PNG, one per line, top to bottom
            self.last_path.with_suffix(".txt").write_text("".join(f"{p}\n" for p in prompts))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/student", grid, global_step=step)
            if prompts is not None and hasattr(experiment, "add_text"):
                text = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))  # Markdown list, a row each
                experiment.add_text("samples/prompts", text, global_step=step)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_image_teacher(pl_module.teacher, "SampleGrid")

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
