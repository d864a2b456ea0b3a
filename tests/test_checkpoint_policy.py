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
                 if spec["class_path"].endswith("ModelCheckpoint")]
    assert all(isinstance(c, ModelCheckpoint) for c in callbacks)
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
    """Logs ``val/fid`` = global step (times ``sign``: -1 makes it improve) from ``on_train_batch_end`` every
    ``every`` batches and at the last step (as FIDMonitor does)."""

    def __init__(self, every: int, sign: float = 1.0) -> None:
        self.every = every
        self.sign = sign

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0 or trainer.should_stop:
            pl_module.log("val/fid", self.sign * trainer.global_step, on_step=True, on_epoch=False)


def data(validation: bool):
    loader = DataLoader(TensorDataset(torch.randn(BATCHES, 2)), batch_size=1)
    return (loader, DataLoader(TensorDataset(torch.randn(1, 2)), batch_size=1)) if validation else (loader,)


def fit(callbacks, plugins, root: Path, max_epochs: int, fid_every: int, validation: bool = True,
        stop_at: int | None = None, fid_sign: float = 1.0, **fit_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         limit_val_batches=None if validation else 0, plugins=plugins,
                         callbacks=[WorseningFID(fid_every, fid_sign), *callbacks])
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


def states(folder: Path) -> dict[str, int]:
    """Checkpoint file -> its global step, for the regular files (not links) of ``folder``."""
    return {p.name: saved(p)[0] for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def check_newest_once(folder: Path, newest: int) -> None:
    """last.ckpt is a relative link to the one file holding the newest state; no state is on disk twice."""
    last = folder / "last.ckpt"
    assert last.is_symlink() and not os.path.isabs(os.readlink(last))
    assert saved(last)[0] == newest
    held = states(folder)
    assert sorted(held.values()) == sorted(set(held.values())), f"a state is on disk twice: {held}"
    assert held[last.resolve().name] == newest
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temporary file or link left over


class LinkWatch:
    """Records, at every checkpoint removal, whether last.ckpt (once it exists) still resolves to a file."""

    def __init__(self, folder: Path, monkeypatch) -> None:
        self.removed, self.dangling = [], []
        remove = AtomicCheckpointIO.remove_checkpoint

        def watched(io, path) -> None:
            remove(io, path)
            self.removed.append(Path(path).name)
            last = folder / "last.ckpt"
            if last.is_symlink() and not last.exists():
                self.dangling.append(Path(path).name)

        monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", watched)


@pytest.mark.parametrize("config", STEP_CONFIGS)
def test_step_configs_keep_the_newest_state_once(config, tmp_path, monkeypatch):
    """ImageNet: every_n_train_steps under manual optimization keeps the best 3 by val/fid and the newest state,
    each once: last.ckpt links to the newest step's file (a top-k one or one of its own), and resumes from it."""
    folder = tmp_path / "checkpoints"
    watch = LinkWatch(folder, monkeypatch)
    renames = []  # every file and the link are written under a temporary name and os.replace()d into place
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((Path(src), Path(dst))) or replace(src, dst))
    callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)  # every 2 batches
    trainer = fit(callbacks, plugins, tmp_path, max_epochs=2, fid_every=2, validation=False)
    assert all(src.parent == dst.parent == folder and src.name.startswith(f".{dst.name}.") for src, dst in renames)
    assert [dst.name for src, dst in renames if src.name.startswith(".last.ckpt.link")] == ["last.ckpt"] * 4
    assert len(renames) == 8  # 4 checkpoints, 4 link swaps, no full copy
    # saves at 4, 8, 12 (the best 3: val/fid = step gets worse) and 16 (not among them: a file of its own)
    assert sorted(states(folder).values()) == [4, 8, 12, 16]
    check_newest_once(folder, 16)
    assert saved(trainer.checkpoint_callback.best_model_path)[0] == 4

    # Resume by Lightning's "last" lookup, then by the link's path: the newest state moves on, the superseded file
    # of its own goes, the best 3 stay.
    for max_epochs, ckpt_path in ((3, "last"), (4, str(folder / "last.ckpt"))):
        callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)
        trainer = fit(callbacks, plugins, tmp_path, max_epochs=max_epochs, fid_every=2, validation=False,
                      ckpt_path=ckpt_path)
        assert trainer.ckpt_path == str(folder / "last.ckpt")
        newest = trainer.global_step - trainer.global_step % 4  # the last periodic save
        assert newest > 16 and sorted(states(folder).values()) == [4, 8, 12, newest]
        check_newest_once(folder, newest)
    assert watch.dangling == []


@pytest.mark.parametrize("config", STEP_CONFIGS)
def test_step_configs_link_last_to_a_new_best(config, tmp_path, monkeypatch):
    """While val/fid improves the newest state is a top-k file: last.ckpt links to it, and the best checkpoint it
    displaces (the file last.ckpt named until then) goes only once the link has moved."""
    folder = tmp_path / "checkpoints"
    watch = LinkWatch(folder, monkeypatch)
    callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)
    fit(callbacks, plugins, tmp_path, max_epochs=3, fid_every=2, validation=False, fid_sign=-1.0)
    assert sorted(states(folder).values()) == [16, 20, 24]
    check_newest_once(folder, 24)
    assert len(watch.removed) == 3 and watch.dangling == []


@pytest.mark.parametrize("config", ["meissonic.yaml", "amused.yaml"])
def test_every_periodic_checkpoint_configs_keep_each_state_once(config, tmp_path):
    """Meissonic / aMUSEd keep every periodic checkpoint; last.ckpt links to the newest instead of copying it."""
    folder = tmp_path / "checkpoints"
    callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)
    fit(callbacks, plugins, tmp_path, max_epochs=2, fid_every=2, validation=False)
    assert sorted(states(folder).values()) == [4, 8, 12, 16]
    check_newest_once(folder, 16)
    callbacks, plugins = config_checkpointing(config, folder, every_n_train_steps=4)
    trainer = fit(callbacks, plugins, tmp_path, max_epochs=3, fid_every=2, validation=False, ckpt_path="last")
    newest = trainer.global_step - trainer.global_step % 4
    assert sorted(states(folder).values()) == list(range(4, newest + 1, 4))
    check_newest_once(folder, newest)


MANUAL_OPTIMIZATION_WARNING = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


def test_dimo_fit_keeps_the_newest_state_once_and_resumes_from_last(tmp_path, monkeypatch, recwarn):
    """`dimo fit` on a tiny teacher with the step configs' callback: each periodic state once, last.ckpt a link to
    the newest, and `--ckpt_path last` continues from it; Lightning's warning about every_n_train_steps under
    manual optimization (which does not apply to DiMOModule) is not shown."""
    from helpers import save_tiny_mnist_teacher

    from dimo_lightning.commands.cli import main

    weights, codebook = save_tiny_mnist_teacher(tmp_path / "teacher")
    folder = tmp_path / "checkpoints"
    callback = ("{class_path: dimo_lightning.training.checkpointing.LinkedLastModelCheckpoint, init_args: "
                f"{{dirpath: {folder}, every_n_train_steps: 4, save_top_k: -1}}}}")
    args = ["fit", "--config", str(CONFIGS / "mnist/dimo.yaml"), "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", "--trainer.limit_val_batches=0", f"--trainer.callbacks=[{callback}]",
            f"--model.init_args.teacher.init_args.checkpoint={weights}",
            f"--model.init_args.teacher.init_args.codebook={codebook}", "--data.init_args.batch_size=4",
            "--data.init_args.batches_per_epoch=2"]
    monkeypatch.chdir(tmp_path)
    main([*args, "--trainer.max_steps=8"])  # global steps count both optimizers: 4 generator steps
    assert sorted(states(folder).values()) == [4, 8]
    check_newest_once(folder, 8)
    main([*args, "--trainer.max_steps=12", "--ckpt_path", "last"])
    assert sorted(states(folder).values()) == [4, 8, 12]
    check_newest_once(folder, 12)
    assert torch.load(folder / "last.ckpt", weights_only=False)["dimo"]["generator_step"] == 6
    assert not [w for w in recwarn if MANUAL_OPTIMIZATION_WARNING in str(w.message)]


def test_the_silenced_warning_is_still_what_lightning_says(tmp_path):
    """The same callback under manual optimization outside `dimo` does warn (so the CLI's filter still matches a
    warning Lightning gives; drop the filter when this fails)."""
    with pytest.warns(UserWarning, match=MANUAL_OPTIMIZATION_WARNING):
        fit([ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4)], [], tmp_path, max_epochs=1,
            fid_every=2, validation=False)
