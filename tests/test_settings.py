"""The settings groups of DiMOModule: one-line checks naming ``group.field``, documented fields in ``--help`` and
``--print_config``, plain checkpoints, and old flat keys and checkpoints (tests/fixtures/legacy_dimo, written by the
code before the groups with tests/fixtures/make_legacy_checkpoint.py) that still load, resume and export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.commands.cli import differing_arguments, main
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.checkpoint_state import migrate_hparams, needs_migration, student_init_state
from dimo_lightning.training.module import DiMOModule
from dimo_lightning.training.settings import (
    GROUPS,
    LEGACY_KEYS,
    AuxSettings,
    DiMOSettings,
    GANSettings,
    OptimSettings,
    SamplingSettings,
    StudentSettings,
    TargetSettings,
    legacy_key_message,
)

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_dimo"


@pytest.mark.parametrize("group, value, message", [
    (StudentSettings, dict(r_init=1.5), "student.r_init must lie in [0, 1], got 1.5"),
    (StudentSettings, dict(r_init=[0.9, 0.1]), "student.r_init must be a number or a [low, high] pair"),
    (StudentSettings, dict(temperature=0.0), "student.temperature must be > 0, got 0.0"),
    (TargetSettings, dict(mask_schedule="cubic"), "targets.mask_schedule must be one of"),
    (TargetSettings, dict(mask_ratio_clamp=[0.5]), "targets.mask_ratio_clamp must be [low, high] within [0, 1]"),
    (AuxSettings, dict(rounds=0), "aux.rounds must be >= 1, got 0"),
    (AuxSettings, dict(cfg_drop_ratio=1.0), "aux.cfg_drop_ratio must lie in [0, 1), got 1.0"),
    (OptimSettings, dict(accumulate_micro_batches=0), "optim.accumulate_micro_batches must be >= 1, got 0"),
    (SamplingSettings, dict(r_init=2.0), "sampling.r_init must lie in [0, 1], got 2.0"),
    (SamplingSettings, dict(teacher={"steps": 0}), "sampling.teacher.steps must be >= 1, got 0"),
    (GANSettings, dict(coverage_bank=-1), "gan.coverage_bank must be >= 0"),
])
def test_a_bad_value_is_one_line_naming_group_and_field(group, value, message):
    with pytest.raises(ValueError) as excinfo:
        group(**value)
    text = str(excinfo.value)
    assert text.startswith(message) and "\n" not in text


def test_groups_coerce_and_stay_plain_in_hparams(tiny_teacher):
    with pytest.raises(ValueError, match="unknown aux keys: roundz"):
        DiMOSettings.build(aux={"roundz": 2})
    shared = StudentSettings(r_init=0.4)
    module = DiMOModule(tiny_teacher, student=shared, aux={"rounds": 2}, sampling={"teacher": {"steps": 3}})
    assert module.settings.student == shared and module.settings.student is not shared  # never a shared instance
    assert module.settings.aux.rounds == 2 and module.settings.sampling.teacher.steps == 3
    for name in GROUPS:
        assert module.hparams[name] == dataclasses.asdict(getattr(module.settings, name))
    assert json.loads(json.dumps(dict(module.hparams))) == dict(module.hparams)  # plain values only


def test_legacy_keys_cover_every_flat_argument_and_point_at_a_field():
    old = torch.load(LEGACY / "dimo.ckpt", weights_only=True)["hyper_parameters"]
    flat = {k for k in old if not k.startswith("_")} - {"teacher", "gan"}
    assert flat == set(LEGACY_KEYS)  # the old module's flat arguments, all of them
    for key, place in LEGACY_KEYS.items():
        group, name = place.split(".")
        assert name in {f.name for f in dataclasses.fields(GROUPS[group])}, key
    assert legacy_key_message("aux_rounds") == ("aux_rounds moved to model.init_args.aux.rounds "
                                                "(--model.init_args.aux.rounds=...)")
    assert legacy_key_message("teacher_sampling.steps").startswith(
        "teacher_sampling.steps moved to model.init_args.sampling.teacher.steps")
    assert legacy_key_message("no_such_knob") is None


def test_migrate_hparams_maps_the_flat_keys_into_groups():
    old = torch.load(LEGACY / "dimo.ckpt", weights_only=True)["hyper_parameters"]
    assert needs_migration(old)
    new = migrate_hparams(old)
    assert new["_class_path"] == "dimo_lightning.training.module.DiMOModule"
    assert not set(new) & set(LEGACY_KEYS) and new["teacher"] == old["teacher"] and new["gan"] == old["gan"]
    assert new["student"]["r_init"] == [0.5, 0.7] and new["student"]["emb_noise_sigma"] == 0.2
    assert new["student"]["top_k"] == 4 and new["targets"]["cfg_scale"] == 1.5
    assert new["targets"]["divergence_beta"] == 0.5 and new["aux"]["sample"] == "reuse"
    assert new["aux"]["label_smoothing"] == 0.05 and new["optim"]["gen_grad_clip"] == 0.5
    assert new["sampling"]["temperature"] == 0.9 and new["sampling"]["teacher"]["choice_temperature"] == 16.0
    assert new["run"]["seed"] == 3
    DiMOSettings.build(**{g: new[g] for g in GROUPS})  # every migrated value is a valid setting
    assert not needs_migration(new) and migrate_hparams(new) == new


@pytest.fixture
def legacy_ckpt(tmp_path) -> Path:
    """The fixture checkpoint with its teacher pointing at tests/fixtures/legacy_dimo wherever the tests run."""
    checkpoint = torch.load(LEGACY / "dimo.ckpt", weights_only=True)
    args = checkpoint["hyper_parameters"]["teacher"]["init_args"]
    for name in ("checkpoint", "codebook"):
        args[name] = str(ROOT / args[name])
    path = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, path)
    return path


def test_legacy_checkpoint_rebuilds_with_load_from_checkpoint(legacy_ckpt):
    module = DiMOModule.load_from_checkpoint(legacy_ckpt, map_location="cpu")
    s = module.settings
    assert s.student.r_init == [0.5, 0.7] and s.student.emb_noise_relative and s.targets.cfg_scale == 1.5
    assert s.aux.sample == "reuse" and not s.optim.train_dropout and s.optim.max_generator_steps == 3
    assert s.sampling.temperature == 0.9 and s.sampling.teacher.steps == 4 and s.run.seed == 3
    assert module.generator_step == 3 and module.iteration == 3
    state = torch.load(legacy_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert hasattr(module, "student_ema")  # the checkpoint's average, kept
    assert module.generate(torch.arange(4)).shape == (4, 49)
    assert torch.load(legacy_ckpt, weights_only=True)["hyper_parameters"]["r_init"] == [0.5, 0.7]  # file untouched


def _legacy_run_config(tmp_path: Path, steps: int) -> Path:
    """The fixture's recipe in the settings groups (tests/fixtures/legacy_dimo/dimo.yaml), for ``steps``."""
    old = yaml.safe_load((LEGACY / "dimo.yaml").read_text())
    args = old["model"]["init_args"]
    groups: dict = {}
    for key, value in args.items():
        if key in LEGACY_KEYS:
            group, name = LEGACY_KEYS[key].split(".")
            groups.setdefault(group, {})[name] = value
    groups["optim"]["max_generator_steps"] = steps
    teacher = {"class_path": args["teacher"]["class_path"],
               "init_args": {k: str(ROOT / v) for k, v in args["teacher"]["init_args"].items()}}
    config = {
        "seed_everything": 0,
        "trainer": {**old["trainer"], "default_root_dir": str(tmp_path), "callbacks": [
            {"class_path": "dimo_lightning.training.ema.StudentEMA", "init_args": {"decay": 0.9}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last", "every_n_train_steps": 1,
                           "enable_version_counter": False}}]},
        "model": {"class_path": "dimo_lightning.training.module.DiMOModule",
                  "init_args": {"teacher": teacher, **groups}},
        "data": old["data"],
    }
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_legacy_checkpoint_resumes_with_ckpt_path(legacy_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(_legacy_run_config(tmp_path, 5)), "--ckpt_path", str(legacy_ckpt)])
    err = capsys.readouterr().err
    assert "optim.max_generator_steps: 3 -> 5" in err  # compared with the migrated flat hyperparameters
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["dimo"]["generator_step"] == 5 and resumed["dimo"]["iteration"] == 5  # the counters continue
    assert resumed["global_step"] == 10 and resumed["hyper_parameters"]["optim"]["max_generator_steps"] == 5
    assert "max_generator_steps" not in resumed["hyper_parameters"]  # written in the groups' layout


def test_legacy_checkpoint_exports(legacy_ckpt, tmp_path):
    main(["export", "--ckpt_path", str(legacy_ckpt), "--output", str(tmp_path / "student")])
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["sampling"] == {"r_init": pytest.approx(0.6), "emb_noise_sigma": 0.2,
                                  "emb_noise_scale": pytest.approx(0.019539106637239456), "temperature": 0.9,
                                  "top_k": 4, "top_p": 0.0}
    assert config["generator_step"] == 3 and config["weights_source"] == "ema"


def test_differing_arguments_compare_group_fields():
    saved = {"optim": {"max_generator_steps": 2, "gen_grad_clip": 1.0}, "aux": {"rounds": 1}, "teacher": {}}
    current = {"optim": {"max_generator_steps": 5, "gen_grad_clip": 1.0}, "aux": {"rounds": 1}}
    assert differing_arguments(saved, current) == [("optim.max_generator_steps", 2, 5)]
    assert differing_arguments({"max_generator_steps": 2, "aux_rounds": 2}, current) == [
        ("aux.rounds", 2, 1), ("optim.max_generator_steps", 2, 5)]
    # another module's arguments (teacher pretraining has its own `seed`) are compared as they are
    assert differing_arguments({"seed": 1, "lr": 0.1}, {"seed": 2, "lr": 0.1}) == [("seed", 1, 2)]


def test_checkpoint_and_student_init_read_with_weights_only(tiny_teacher, tmp_path):
    module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 1}, run={"seed": 0})
    pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
        module, ClassLabelDataModule(10, 4, 2))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain types only
    assert checkpoint["hyper_parameters"]["optim"]["max_generator_steps"] == 1
    networks, teacher = student_init_state(tmp_path / "last.ckpt")
    assert set(networks) == {"student", "aux"} and teacher == module.hparams["teacher"]
    rebuilt = DiMOModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert rebuilt.settings == module.settings
    checkpoint["hyper_parameters"]["extra"] = MNISTTeacher  # something only a full unpickler would rebuild
    torch.save(checkpoint, tmp_path / "object.ckpt")
    with pytest.raises(ValueError, match="run.student_init: .*object.ckpt is not a readable"):
        student_init_state(tmp_path / "object.ckpt")


def test_help_and_print_config_show_the_groups(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "dimo_lightning.training.module.DiMOModule"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model.student.r_init" in help_text and "--model.sampling.teacher.steps" in help_text
    assert "Aux updates per student update" in help_text  # the field's docstring
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["student"]["r_init"] == 0.6 and init_args["aux"]["sample"] == "reuse"
    assert init_args["optim"]["max_generator_steps"] == 1800 and init_args["sampling"]["teacher"]["steps"] == 16
    assert not set(init_args) & set(LEGACY_KEYS)
