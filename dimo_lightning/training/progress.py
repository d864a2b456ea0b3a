"""GeneratorStepProgressBar: a TQDM bar that counts Di[M]O generator steps up to ``max_generator_steps``.

Lightning's bar counts batches per epoch and labels the line with the epoch, which means nothing for a run that
stops at ``max_generator_steps`` with ``max_epochs: -1`` (an iteration may or may not update the student). This bar
shows ``generator step n / max_generator_steps`` for the whole fit, across epochs and resumes. Modules without a
``generator_step`` counter (e.g. teacher pretraining) get Lightning's usual bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from dimo_lightning.training.settings import DiMOSettings


def counts_generator_steps(pl_module: pl.LightningModule) -> bool:
    return hasattr(pl_module, "generator_step") and isinstance(getattr(pl_module, "settings", None), DiMOSettings)


class GeneratorStepProgressBar(TQDMProgressBar):
    """The training bar's total is ``max_generator_steps`` and its position the module's ``generator_step``.

    ``dimo`` adds it by default; ``--trainer.enable_progress_bar=false`` turns it off, and giving another progress
    bar in ``trainer.callbacks`` replaces it.

    Args:
        refresh_rate: redraw every this many generator steps (0 disables the bar).
        process_position: as in ``TQDMProgressBar`` (for several bars in one terminal).
        leave: keep the finished bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._counting = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._counting = counts_generator_steps(pl_module)
        if self._counting:
            bar = self.train_progress_bar
            bar.reset(total=int(pl_module.settings.optim.max_generator_steps))
            bar.set_description("generator step")
            self._show(pl_module.generator_step)  # a resumed run starts where it stopped

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counting:
            super().on_train_epoch_start(trainer, *args)  # the epoch bar for other modules

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._counting:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = pl_module.generator_step
        if self.refresh_rate and (step % self.refresh_rate == 0 or step >= self.train_progress_bar.total):
            self._show(step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counting:
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _show(self, step: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = min(step, bar.total)
            bar.refresh()
