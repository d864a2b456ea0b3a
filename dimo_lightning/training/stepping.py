"""One optimizer update of a manually optimized module: accumulate an objective over the micro-batches, then clip,
skip or step, with one host sync.

Lightning's precision plugin owns ``optimizer.step()`` (it unscales ``16-mixed`` gradients first) and calls the
module's ``on_before_optimizer_step`` in between. So the decision (the global gradient norm, whether any rank kept a
valid row, clipping) is taken there: :meth:`GuardedStep.step` leaves what it needs in a pending record, the hook
(which delegates to :meth:`GuardedStep.before_optimizer_step`) fills it in, and :meth:`GuardedStep.step` reads it
back.
"""

from __future__ import annotations

from typing import Any

import torch

from dimo_lightning.objectives.context import IterationContext, Objective
from dimo_lightning.training.distributed import clip_grads_, global_grad_norm


def accumulate(module: Any, optimizer: Any, objective: Objective, ctx: IterationContext) -> dict[str, torch.Tensor]:
    """Backward ``objective.loss / parts`` of every micro-batch of ``ctx`` (gradients synchronised over the ranks on
    the last one only) -> ``{"loss": mean loss, **mean of each log}`` (detached).

    Args:
        module: the LightningModule (its ``manual_backward`` applies the precision plugin's scaling).
        optimizer: the LightningOptimizer whose parameters the objective trains.
        objective: the loss of one micro-batch.
        ctx: the iteration.
    """
    parts = ctx.parts
    totals: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        totals[name] = totals.get(name, torch.zeros((), device=ctx.device)) + value / parts

    for part in range(parts):
        with optimizer.toggle_model(sync_grad=part == parts - 1):
            loss, logs = objective.loss(ctx, part)
            module.manual_backward(loss / parts)
        add("loss", loss.detach())
        for name, value in logs.items():
            add(name, value)
    return totals


class _PendingStep:
    """What :meth:`GuardedStep.step` hands to the ``on_before_optimizer_step`` hook and gets back."""

    def __init__(self, max_norm: float, kept_rows: torch.Tensor) -> None:
        self.max_norm = max_norm
        self.kept_rows = kept_rows
        self.norm = torch.full((), float("nan"))
        self.stepped: bool | None = None


class GuardedStep:
    """The clip / skip / step handshake of one module (its optimizers share it; one step at a time)."""

    def __init__(self) -> None:
        self._pending: _PendingStep | None = None

    def step(self, module: Any, optimizer: Any, max_norm: float,
             kept_rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Step ``optimizer`` through Lightning's precision plugin; clipping and the skip decision happen in the
        module's ``on_before_optimizer_step``, i.e. after the plugin has unscaled the gradients (``16-mixed``).

        A step is skipped (no weight or optimizer-state change, counted in ``module.skipped_steps``) when the global
        gradient norm is not finite (a fp16 overflow included: the GradScaler then skips and lowers its scale) or no
        rank kept a valid row.

        Args:
            module: the LightningModule (``skipped_steps`` is its counter).
            optimizer: the LightningOptimizer to step.
            max_norm: clipping threshold of the global L2 norm (0: no clipping).
            kept_rows: (,) share of valid rows of this rank's batch.

        Returns:
            (pre-clipping global gradient norm (,) on device, whether the weights were updated).
        """
        self._pending = _PendingStep(max_norm, kept_rows.detach().float())
        try:
            optimizer.step()
            decision = self._pending
        finally:
            self._pending = None
        optimizer.zero_grad(set_to_none=True)
        if decision.stepped is None:
            raise RuntimeError("the precision plugin stepped without calling on_before_optimizer_step")
        if not decision.stepped:
            module.skipped_steps += 1
        return decision.norm, decision.stepped

    def before_optimizer_step(self, module: Any, optimizer: torch.optim.Optimizer) -> None:
        """The decision, from the module's ``on_before_optimizer_step`` hook (a no-op outside :meth:`step`)."""
        pending = self._pending
        if pending is None:
            return
        if pending.max_norm > 0 and getattr(module.trainer.precision_plugin, "scaler", None) is not None and getattr(
            optimizer, "_step_supports_amp_scaling", False
        ):
            # Such (fused) optimizers unscale inside step(): the gradients here are still scaled (Lightning's own
            # clip_gradients refuses them for the same reason).
            raise RuntimeError(
                f"{type(optimizer).__name__} unscales gradients inside step(), so they cannot be clipped under "
                "16-mixed: use a non-fused optimizer, bf16-mixed, or optim.gen_grad_clip/optim.aux_grad_clip 0"
            )
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm, plain_norm = global_grad_norm(params)  # global over ranks and shards, computed once
        plain_norm = plain_norm.to(module.device)
        kept_anywhere = module.trainer.strategy.reduce(pending.kept_rows, reduce_op="sum") > 0
        step_ok = torch.isfinite(plain_norm) & kept_anywhere
        # The one host sync of an optimizer step: whether to step. Norm and row count are global, so every rank
        # takes the same decision and the replicas (or shards) stay consistent.
        pending.stepped = bool(step_ok)
        pending.norm = plain_norm.detach()
        if pending.stepped:
            clip_grads_(params, pending.max_norm, norm)
        else:
            # No gradient, no update: torch optimizers skip parameters without .grad (momentum must not move the
            # weights); under 16-mixed the GradScaler skips an overflow step itself and still updates its scale.
            optimizer.zero_grad(set_to_none=True)
