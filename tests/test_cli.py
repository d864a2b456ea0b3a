"""The `dimo` CLI: every config parses against the signatures; fit smoke runs; bad keys get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dimo_lightning.cli import DiMOCLI, main

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
        ParseOnlyCLI(args=["--config", str(ROOT / "configs/mnist/dimo.yaml"),
                           "--model.init_args.no_such_knob=3"], run=False)
    assert excinfo.value.code != 0
    assert "no_such_knob" in capsys.readouterr().err


def test_bad_choice_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        ParseOnlyCLI(args=["--config", str(ROOT / "configs/mnist/dimo.yaml"), "--model.init_args.aux_sample=both"],
                     run=False)
    assert "aux_sample" in capsys.readouterr().err


def test_teacher_pretraining_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/mnist/teacher.yaml"), "--trainer.fast_dev_run=2",
          "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false"])
