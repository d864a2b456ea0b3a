"""StudentEMA: an exponential moving average of the student only (not the teacher, not the aux model).

Lightning's ``EMAWeightAveraging`` averages the whole LightningModule (teacher and aux included) and counts every
optimizer step; Di[M]O needs an average of the student updated once per *generator* step.

The EMA copy is attached to the LightningModule as the submodule ``student_ema`` (frozen, eval mode) in ``setup``,
before ``configure_model``. So it is sharded exactly like the student under FSDP2 (``DiMOModule.configure_model``),
updated shard-locally (no gather), saved and restored with the model's state dict (Lightning checkpoints or
distributed DCP checkpoints, which reshard on load), and evaluation runs it under the same sharding. The callback
state holds only the update counter.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from dimo_lightning.training.distributed import is_sharded, local_tensor


def ema_rate(step: int, decay: float, warmup: bool) -> float:
    """Rate of the average at update ``step``: ``min(decay, (1 + s) / (10 + s))`` with warm-up (the official code's
    ramp, so early averages are not dominated by the initial weights), else ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model over all parameters (buffers are copied)."""
    # Local shards of FSDP2 (DTensor) parameters: student and EMA are sharded alike, so each rank averages its own
    # shard and nothing is gathered.
    ema_params = [local_tensor(e) for e in ema.parameters()]
    model_params = [local_tensor(p.detach()).to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    if [e.shape for e in ema_params] != [p.shape for p in model_params]:
        raise ValueError("ema_update needs the EMA sharded like the model (parameter shapes differ)")
    torch._foreach_lerp_(ema_params, model_params, 1.0 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        local_tensor(eb).copy_(local_tensor(mb))


EMA_ATTRIBUTE = "student_ema"


class StudentEMA(Callback):
    """EMA of ``pl_module.student``, updated after every generator step.

    Args:
        decay: the EMA decay (the paper uses 0.9999 for 50k steps; short CPU runs need ~0.99).
        update_every_n_steps: update on every n-th generator step.
        update_starting_at_step: no updates before this generator step (the EMA tracks the student exactly).
        warmup: use the ramp ``min(decay, (1 + s) / (10 + s))``.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        warmup: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.warmup = warmup
        self.module: nn.Module | None = None
        self.num_updates = 0
        self._last_generator_step: int | None = None
        self._pending_state: dict[str, Any] | None = None

    def _ensure(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            existing = getattr(pl_module, EMA_ATTRIBUTE, None)
            if existing is None:
                if is_sharded(pl_module.student):
                    raise RuntimeError(
                        "StudentEMA must be set up before the student is sharded (add it to the Trainer's callbacks)"
                    )
                existing = copy.deepcopy(pl_module.student).eval().requires_grad_(False)
                # A submodule: moved, sharded and checkpointed with the model (see the module docstring).
                pl_module.add_module(EMA_ATTRIBUTE, existing)
            self.module = existing
        if self._pending_state is not None:
            # An older checkpoint kept the averaged weights in the callback state.
            self.module.load_state_dict(self._pending_state["weights"])
            self._pending_state = None
        return self.module

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "student"):
            raise ValueError("StudentEMA needs a LightningModule with a `student` network (DiMOModule)")
        self.module = None
        self._ensure(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(pl_module)
        self._last_generator_step = pl_module.generator_step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        if step == self._last_generator_step:
            return  # no generator update in this iteration (aux rounds or a skipped step)
        self._last_generator_step = step
        ema = self._ensure(pl_module)
        if step < self.update_starting_at_step:
            ema_update(ema, pl_module.student, 0.0)
            return
        if step % self.update_every_n_steps:
            return
        ema_update(ema, pl_module.student, ema_rate(self.num_updates, self.decay, self.warmup))
        self.num_updates += 1

    def averaged_student(self, pl_module: pl.LightningModule) -> nn.Module:
        """The EMA network (created from the current student if training has not started)."""
        return self._ensure(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The weights travel in the model's state dict (``student_ema.*``), sharded where the model is.
        return {"num_updates": self.num_updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        if state_dict.get("weights") is None:
            return
        if self.module is not None:
            self.module.load_state_dict(state_dict["weights"])
        else:
            self._pending_state = state_dict


def evaluation_student(pl_module: pl.LightningModule) -> nn.Module:
    """The network to evaluate: the StudentEMA average when the trainer has one (or, for a module rebuilt with
    ``load_from_checkpoint``, the average it loaded), else the raw student."""
    trainer = getattr(pl_module, "_trainer", None)
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, StudentEMA):
            return callback.averaged_student(pl_module)
    if trainer is None and isinstance(getattr(pl_module, EMA_ATTRIBUTE, None), nn.Module):
        return getattr(pl_module, EMA_ATTRIBUTE)
    return pl_module.student
