"""The shipped configs' ModelCheckpoint callbacks: last.ckpt is the newest state, the best checkpoint the best one.

Lightning 2.6 writes a monitored callback's ``save_last`` file only when a top-k checkpoint was saved in the same
validation, so ``monitor: val/fid, save_top_k: 1, save_last: true`` left last.ckpt at the best epoch. Here the
callbacks are built from the YAML files and a tiny manual-optimization fit logs a ``val/fid`` that gets worse after
the first evaluation, so "best" and "newest" differ.
"""

import importlib
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from dimo_lightning.training.checkpoint_io import AtomicCheckpointIO

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EPOCH_END_CONFIGS = ["mnist/dimo.yaml", "mnist/dimo_gan.yaml", "mnist/t2i.yaml"]  # saved at each validation end
STEP_CONFIGS = ["imagenet.yaml", "imagenet512.yaml"]  # every_n_train_steps, no validation loop
BATCHES = 4  # per epoch; two optimizer steps each (global_step += 2, as DiMOModule)


def build(spec: dict, **overrides):
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**(spec.get("init_args") or {}), **overrides})


def config_checkpointing(config: str, dirpath: Path, **overrides) -> tuple[list[ModelCheckpoint], list]:
    """The config's ModelCheckpoint callbacks (in config order, writing to ``dirpath``) and its plugins."""
    trainer = yaml.safe_load((CONFIGS / config).read_text())["trainer"]
    callbacks = [build(spec, dirpath=str(dirpath), **overrides) for spec in trainer["callbacks"]
                 if spec["class_path"].endswith(".ModelCheckpoint")]
    return callbacks, [build(spec) for spec in trainer.get("plugins") or []]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with a generator and an auxiliary optimizer, like DiMOModule (which also stops a run
    mid-epoch with ``trainer.should_stop``, at ``stop_at`` global steps here)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.stop_at = stop_at
        self.generator = torch.nn.Linear(2, 1)
        self.auxiliary = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx) -> None:
        for optimizer, net in zip(self.optimizers(), (self.generator, self.auxiliary)):
            optimizer.zero_grad()
            self.manual_backward(net(batch[0]).square().mean())
            optimizer.step()
        if self.stop_at is not None and self.trainer.global_step >= self.stop_at:
            self.trainer.should_stop = True

    def validation_step(self, batch, batch_idx) -> None:  # a no-op batch per epoch, as the MNIST configs
        pass

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.1), torch.optim.SGD(self.auxiliary.parameters(),
                                                                                       lr=0.1)]


class WorseningFID(pl.Callback):
    """Logs ``val/fid`` = global step from ``on_train_batch_end`` every ``every`` batches and at the last step (as
    FIDMonitor does)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0 or trainer.should_stop:
            pl_module.log("val/fid", float(trainer.global_step), on_step=True, on_epoch=False)


def data(validation: bool):
    loader = DataLoader(TensorDataset(torch.randn(BATCHES, 2)), batch_size=1)
    return (loader, DataLoader(TensorDataset(torch.randn(1, 2)), batch_size=1)) if validation else (loader,)


def fit(callbacks, plugins, root: Path, max_epochs: int, fid_every: int, validation: bool = True,
        stop_at: int | None = None, **fit_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         limit_val_batches=None if validation else 0, plugins=plugins,
                         callbacks=[WorseningFID(fid_every), *callbacks])
    trainer.fit(TwoOptimizers(stop_at), *data(validation), **fit_kwargs)
    return trainer


def saved(path) -> tuple[int, int]:
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["global_step"], checkpoint["epoch"]


@pytest.mark.parametrize("config", EPOCH_END_CONFIGS)
def test_epoch_end_configs_keep_the_newest_last_and_the_best(config, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    callbacks, plugins = config_checkpointing(config, folder)
    renames = []  # the config's AtomicCheckpointIO writes a temp file in the folder and os.replace()s it
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((Path(src), Path(dst))) or replace(src, dst))
    trainer = fit(callbacks, plugins, tmp_path, max_epochs=3, fid_every=BATCHES)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert [src.name.startswith(".last.ckpt.tmp") for src, dst in renames if dst == folder / "last.ckpt"] == [True] * 3
    last = folder / "last.ckpt"
    assert saved(last) == (3 * 2 * BATCHES, 2), "last.ckpt is not the final state"
    best = Path(trainer.checkpoint_callback.best_model_path)  # what ckpt_path="best" loads: the first epoch
    assert trainer.checkpoint_callback.monitor == "val/fid" and saved(best) == (2 * BATCHES, 0)
    assert sorted(p.name for p in folder.iterdir()) == sorted([best.name, "last.ckpt"])  # no temp files left over
    keys = [c.state_key for c in callbacks]
    assert len(set(keys)) == len(keys)  # each callback's state is checkpointed under its own key
    assert set(keys) <= set(torch.load(last, weights_only=False)["callbacks"])

    # Resume by Lightning's "last" lookup, then by the explicit file: last.ckpt is overwritten in place (no
    # last-v1.ckpt), the best checkpoint stays the first epoch's.
    for max_epochs, ckpt_path in ((5, "last"), (6, str(last))):
        callbacks, plugins = config_checkpointing(config, folder)
        trainer = fit(callbacks, plugins, tmp_path, max_epochs=max_epochs, fid_every=BATCHES, ckpt_path=ckpt_path)
        assert trainer.ckpt_path == str(last)
        assert saved(last) == (max_epochs * 2 * BATCHES, max_epochs - 1)
        assert Path(trainer.checkpoint_callback.best_model_path) == best and saved(best) == (2 * BATCHES, 0)
        assert sorted(p.name for p in folder.iterdir()) == sorted([best.name, "last.ckpt"])


@pytest.mark.parametrize("config", EPOCH_END_CONFIGS)
def test_a_new_run_in_the_same_folder_overwrites_last(config, tmp_path):
    """Without resuming (a fixed dirpath reused), last.ckpt is the new run's state, never a stale file next to a
    last-v1.ckpt."""
    folder = tmp_path / "checkpoints"
    fit(*config_checkpointing(config, folder), tmp_path, max_epochs=3, fid_every=BATCHES)
    fit(*config_checkpointing(config, folder), tmp_path, max_epochs=1, fid_every=BATCHES)
    assert saved(folder / "last.ckpt") == (2 * BATCHES, 0)
    assert not any(p.name.startswith("last-") for p in folder.iterdir())


@pytest.mark.parametrize("config", [*EPOCH_END_CONFIGS, "mnist/ablations/base.yaml"])
def test_last_is_written_during_the_run_and_at_a_mid_epoch_stop(config, tmp_path):
    """An interrupted run leaves the previous epoch's last.ckpt; a stop mid-epoch (DiMOModule at max_generator_steps)
    runs one more validation, whose save is the final state."""
    folder = tmp_path / "checkpoints"
    during = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                during.append(saved(folder / "last.ckpt"))

    callbacks, plugins = config_checkpointing(config, folder)
    fit([*callbacks, Watch()], plugins, tmp_path, max_epochs=-1, fid_every=BATCHES, stop_at=2 * (2 * BATCHES + 2))
    assert during == [(2 * BATCHES, 0)]
    assert saved(folder / "last.ckpt") == (2 * (2 * BATCHES + 2), 2)


@pytest.mark.parametrize("config", STEP_CONFIGS)
def test_step_configs_save_last_at_every_periodic_checkpoint(config, tmp_path):
    """ImageNet: every_n_train_steps under manual optimization writes top-k and last.ckpt at each periodic save."""
    folder = tmp_path / "checkpoints"
    callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)  # every 2 batches
    trainer = fit(callbacks, plugins, tmp_path, max_epochs=2, fid_every=2, validation=False)
    assert saved(folder / "last.ckpt")[0] == 2 * 2 * BATCHES
    top_k = {p.name: saved(p)[0] for p in folder.iterdir() if p.name != "last.ckpt"}
    assert sorted(top_k.values()) == [4, 8, 12]  # save_top_k: 3 of the saves at 4, 8, 12, 16 by lowest val/fid
    assert saved(trainer.checkpoint_callback.best_model_path)[0] == 4
