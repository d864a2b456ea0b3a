"""The `dimo` CLI: every config parses against the signatures; fit smoke runs; bad keys get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dimo_lightning.commands.cli import DiMOCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


class ParseOnlyCLI(DiMOCLI):
    """Parses and type-checks the whole config (class paths and init args) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"mnist/teacher.yaml", "mnist/dimo.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_config_parses(config):
    if config.parent.name == "strategy":
        pytest.skip("strategy fragments are combined with a base config (tested below)")
    if config.name == "gan_base.yaml":
        pytest.skip("an override of configs/mnist/dimo_gan.yaml (tests/test_soft_dimo.py parses the pair)")
    if "sweep" in (yaml.safe_load(config.read_text()) or {}):
        pytest.skip("a `dimo sweep` spec: tests/test_ablations.py parses each grid point's config")
    cli = ParseOnlyCLI(args=["--config", str(config)], run=False)
    assert cli.config.model.class_path
    assert cli.config.data.class_path


def test_strategy_fragment_combines_with_base_config():
    cli = ParseOnlyCLI(args=["--config", str(ROOT / "configs/imagenet.yaml"), "--config",
                             str(ROOT / "configs/strategy/ddp.yaml")], run=False)
    assert cli.config.trainer.strategy == "ddp_find_unused_parameters_true"
    assert cli.config.model.init_args.teacher.class_path.endswith("MaskGITTeacher")


def test_unknown_key_is_rejected_with_its_name(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--model.init_args.no_such_knob=3"])
    assert excinfo.value.code == 2
    assert "dimo: error: --model.init_args.no_such_knob" in capsys.readouterr().err


def test_bad_choice_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--model.init_args.aux.sample=both"])
    assert "--model.init_args.aux.sample" in capsys.readouterr().err


def test_generator_step_progress_bar_is_added_unless_disabled():
    from dimo_lightning.training.progress import GeneratorStepProgressBar

    config = ["--config", str(ROOT / "configs/mnist/dimo.yaml"), "--trainer.callbacks=[]"]
    cli = DiMOCLI(args=config, run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, GeneratorStepProgressBar)]
    assert len(bars) == 1 and cli.trainer.progress_bar_callback is bars[0]
    cli = DiMOCLI(args=[*config, "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None
    cli = DiMOCLI(args=[*config[:2], "--trainer.callbacks=[{class_path: "
                        "lightning.pytorch.callbacks.TQDMProgressBar, init_args: {refresh_rate: 5}}]"], run=False)
    assert type(cli.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"  # the user's bar replaces ours


def test_teacher_pretraining_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/mnist/teacher.yaml"), "--trainer.fast_dev_run=2",
          "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false"])


def _mnist_dimo_args(steps: int) -> list[str]:
    """The demo config shrunk to seconds: tiny batches, no evaluation callbacks."""
    return [
        "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {save_last: true}}]",
        f"--model.init_args.optim.max_generator_steps={steps}", "--data.init_args.batch_size=4",
        "--data.init_args.batches_per_epoch=2",
    ]


def test_resume_with_ckpt_path_keeps_command_line_arguments(tmp_path, monkeypatch, capsys):
    """LightningCLI alone would replace --model.init_args.* with the checkpoint's values: extend a run instead."""
    import torch

    monkeypatch.chdir(tmp_path)
    main(["fit", *_mnist_dimo_args(2)])
    first = tmp_path / "runs/mnist_dimo/version_0/checkpoints/last.ckpt"
    assert torch.load(first, weights_only=False)["dimo"]["generator_step"] == 2
    capsys.readouterr()
    main(["fit", *_mnist_dimo_args(5), "--ckpt_path", str(first)])
    err = capsys.readouterr().err
    assert "optim.max_generator_steps: 2 -> 5" in err and str(first) in err
    resumed = torch.load(tmp_path / "runs/mnist_dimo/version_1/checkpoints/last.ckpt", weights_only=False)
    assert resumed["dimo"]["generator_step"] == 5
    assert resumed["hyper_parameters"]["optim"]["max_generator_steps"] == 5


def test_corrupt_ckpt_path_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SystemExit) as excinfo:
        main(["validate", *_mnist_dimo_args(2), "--ckpt_path", str(bad)])
    assert excinfo.value.code == 2 and "broken.ckpt" in capsys.readouterr().err
