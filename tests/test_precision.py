"""Precision-correct optimizer steps: clipping after the precision plugin unscales, overflow skips through the
GradScaler, the skip decision, and the bound on host syncs per training step."""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import merge_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)  # a weight change is exactly minus the (clipped, unscaled) gradient


def make_module(teacher, **kwargs):
    defaults = dict(student={"r_init": [0.3, 0.9], "emb_noise_sigma": 0.2, "emb_noise_relative": True},
                    optim={"max_generator_steps": 3, "train_dropout": False}, run={"seed": 3}, optimizer_gen=sgd,
                    optimizer_aux=sgd)
    return DiMOModule(teacher, **merge_settings(defaults, kwargs))


def make_trainer(tmp_path, callbacks=(), **kwargs):
    return pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=list(callbacks), **kwargs)


def trainable(network):
    return {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}


def update_norm(before, after):
    return torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before)).item()


class StepWatcher(Callback):
    """Per iteration: the student's weights before/after, the logged pre-clip norm, skips and the loss scale."""

    def __init__(self, overflow_at=None):
        self.overflow_at = overflow_at
        self.rows = []
        self._before = None
        self._backward_calls = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = trainable(pl_module.student)
        self._backward_calls = 0

    def on_after_backward(self, trainer, pl_module):
        # The first backward of the iteration is the generator's: poison one (scaled) student gradient, as an fp16
        # overflow would.
        self._backward_calls += 1
        if pl_module.iteration == self.overflow_at and self._backward_calls == 1:
            grad = next(p.grad for p in pl_module.student.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.rows.append(dict(
            iteration=pl_module.iteration - 1,
            update=update_norm(self._before, trainable(pl_module.student)),
            norm=float(trainer.callback_metrics["train/grad_norm_gen"]),
            generator_step=pl_module.generator_step,
            skipped=pl_module.skipped_steps,
            scale=scaler.get_scale() if scaler is not None else None,
        ))


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_bf16_mixed_steps_are_clipped_to_the_global_norm(tiny_teacher, tmp_path, max_norm):
    watcher = StepWatcher()
    module = make_module(tiny_teacher, optim={"gen_grad_clip": max_norm})
    make_trainer(tmp_path, [watcher], precision="bf16-mixed").fit(module, ClassLabelDataModule(10, 8, 4))
    assert module.generator_step == 3 and module.skipped_steps == 0
    for row in watcher.rows:
        assert row["norm"] > 1e-3  # the logged norm is the pre-clipping one
        expected = min(max_norm, row["norm"])  # SGD(lr=1): the update is the clipped gradient
        assert row["update"] == pytest.approx(expected, rel=1e-3)


def test_fp16_overflow_is_skipped_through_the_scaler(tiny_teacher, tmp_path):
    """16-mixed emulated on CPU with a real torch.amp.GradScaler("cpu"): a scaled overflow step is skipped and
    counted, the scale halves, and the next step applies the unscaled, clipped gradient."""
    max_norm = 0.05
    watcher = StepWatcher(overflow_at=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    module = make_module(tiny_teacher, optim={"gen_grad_clip": max_norm, "aux_grad_clip": 0.0})
    trainer = make_trainer(tmp_path, [watcher], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, ClassLabelDataModule(10, 8, 6))
    rows = {r["iteration"]: r for r in watcher.rows}
    assert rows[0]["update"] == pytest.approx(min(max_norm, rows[0]["norm"]), rel=1e-3)
    assert rows[0]["scale"] == 2.0**12
    # iteration 1: the generator's scaled gradient overflows -> no update, counted, scale halved
    assert rows[1]["update"] == 0.0
    assert not torch.isfinite(torch.tensor(rows[1]["norm"]))
    assert rows[1]["generator_step"] == 1 and rows[1]["skipped"] == 1
    assert rows[1]["scale"] == 2.0**11
    # iteration 2: a finite step again; the update is the unscaled gradient clipped to max_norm (a scaled one would
    # be 2048x larger before clipping and still clipped: so check the norm is the unscaled one, of order 1)
    assert rows[2]["generator_step"] == 2 and rows[2]["skipped"] == 1
    assert rows[2]["update"] == pytest.approx(min(max_norm, rows[2]["norm"]), rel=1e-3)
    assert 1e-3 < rows[2]["norm"] < 100
    assert rows[2]["scale"] == 2.0**11
    assert module.generator_step == 3


def test_fp16_unscaled_norm_matches_fp32(tiny_teacher, tmp_path):
    """The logged norm under 16-mixed is the unscaled gradient norm: within fp16 error of the fp32 run's."""
    norms = {}
    for name, kwargs in {"fp32": {}, "fp16": dict(plugins=[MixedPrecision(
            "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**14))])}.items():
        watcher = StepWatcher()
        module = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 1})
        make_trainer(tmp_path / name, [watcher], **kwargs).fit(module, ClassLabelDataModule(10, 8, 2))
        norms[name] = watcher.rows[0]["norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)


class Poison(Callback):
    """Sets a student gradient to inf right before the optimizer step of the generator at ``at``."""

    def __init__(self, at):
        self.at = at
        self.before = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if pl_module.iteration == self.at and optimizer is trainer.optimizers[0]:
            self.before = (trainable(pl_module.student), copy.deepcopy(optimizer.state_dict()),
                           pl_module.skipped_steps, pl_module.generator_step)
            next(p for p in pl_module.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def test_nonfinite_gradient_step_is_skipped(tiny_teacher, tmp_path):
    poison = Poison(at=2)
    adam = torch.optim.Adam
    module = make_module(tiny_teacher, optimizer_gen=adam, optimizer_aux=adam,
                         scheduler_gen=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
                         scheduler_aux=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
                         optim={"max_generator_steps": 4})
    lrs = []

    class LR(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = make_trainer(tmp_path, [poison, LR()])
    trainer.fit(module, ClassLabelDataModule(10, 8, 10))
    weights, opt_state, skipped, step = poison.before
    # momentum must not move the weights: compare the state right after the skipped iteration's generator update
    assert module.skipped_steps == skipped + 1
    assert module.generator_step == 4 and module.iteration == 5
    assert lrs == pytest.approx([5e-4, 2.5e-4, 2.5e-4, 1.25e-4, 6.25e-5])  # no scheduler step on a skip
    assert int(trainer.optimizers[0].state_dict()["state"][0]["step"]) == 4  # Adam counted 4 real steps


def test_skipped_step_leaves_weights_and_adam_state(tiny_teacher, tmp_path):
    class Stop(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.iteration == 3:
                self.after = (trainable(pl_module.student), copy.deepcopy(trainer.optimizers[0].state_dict()))
                trainer.should_stop = True

    poison, stop = Poison(at=2), Stop()
    module = make_module(tiny_teacher, optimizer_gen=torch.optim.Adam, optim={"max_generator_steps": 10})
    make_trainer(tmp_path, [poison, stop]).fit(module, ClassLabelDataModule(10, 8, 10))
    weights, opt_state, _, _ = poison.before
    after_weights, after_state = stop.after
    for name in weights:
        assert torch.equal(weights[name], after_weights[name]), name
    for key, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after_state["state"][key][name]), (key, name)


class SyncCounter(Callback):
    """Counts host reads of tensor values (``item``, ``bool``, ``float``, ``int``, ``tolist``) during each training
    step (from ``on_train_batch_start`` to ``on_train_batch_end``: the step, its optimizer steps and its logging)."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self):
        self.counts = []
        self.where = []
        self._originals = {}

    def _patch(self):
        import traceback

        counter = self

        def wrap(name, original):
            def counted(tensor, *args, **kwargs):
                where = traceback.format_stack(limit=2)[0].strip()
                # torch.optim keeps Adam's step counters as host tensors (unless capturable/fused): reading them
                # is no device sync. Everything else counts, CPU tensors included (this test runs on a CPU).
                if f"torch{os.sep}optim{os.sep}" not in where:
                    counter.counts[-1] += 1
                    counter.where.append((name, where))
                return original(tensor, *args, **kwargs)

            return counted

        for name in self.NAMES:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, wrap(name, self._originals[name]))

    def _unpatch(self):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts.append(0)
        self._patch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._unpatch()

    def on_exception(self, trainer, pl_module, exception):
        self._unpatch()


@pytest.mark.parametrize("options", [dict(), dict(optim={"accumulate_micro_batches": 2},
                                                  targets={"adaptive_cfg": True, "mask_schedule": "mage"},
                                                  aux={"cfg_drop_ratio": 0.1})])
def test_one_host_sync_per_optimizer_step(tiny_teacher, tmp_path, options):
    counter = SyncCounter()
    options = merge_settings({"optim": {"max_generator_steps": 3}}, options)
    module = make_module(tiny_teacher, optimizer_gen=torch.optim.Adam, optimizer_aux=torch.optim.Adam, **options)
    make_trainer(tmp_path, [counter, StudentEMA(0.9)]).fit(module, ClassLabelDataModule(10, 8, 4))
    # two optimizer steps (generator and aux) per iteration, one skip decision each
    assert counter.counts == [2, 2, 2], counter.where
    # the decision of GuardedStep.before_optimizer_step, which the module's on_before_optimizer_step hook delegates to
    assert all("in before_optimizer_step" in where for _, where in counter.where), counter.where


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_clip_with_precomputed_norm(max_norm):
    """One norm pass (parameters without .grad ignored), then scaling by min(1, max_norm / (norm + 1e-6))."""
    from dimo_lightning.training.distributed import clip_grads_, global_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(
        torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params[:2]]
    norm, plain = global_grad_norm(params)
    torch.testing.assert_close(plain, torch.cat([g.flatten() for g in reference]).norm())
    clip_grads_(params, max_norm, norm)
    scale = 1.0 if max_norm <= 0 else min(1.0, max_norm / (float(plain) + 1e-6))
    for p, g in zip(params[:2], reference):
        torch.testing.assert_close(p.grad, g * scale)
    assert params[2].grad is None
