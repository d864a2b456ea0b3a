"""Bad input to `dimo` ends in one `dimo: error: ...` line naming the flag or file, with exit status 2.

The test also owns docs/cli_errors.md, the table of every bad input tried here and the message it gets: it fails
when the table and the actual messages differ (regenerate with `DIMO_WRITE_DOCS=1 pytest tests/test_cli_errors.py`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_ARCH, save_tiny_mnist_teacher
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.commands.cli import main
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.inference.export import export_student
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer
from dimo_lightning.training.module import DiMOModule

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli_errors.md"
TEACHER = "--model.init_args.teacher.init_args."


def _fit_args(weights: Path, codebook: Path) -> list[str]:
    """The demo config on a tiny teacher, shrunk to seconds."""
    return [
        "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--trainer.callbacks=[]", f"{TEACHER}checkpoint={weights}",
        f"{TEACHER}codebook={codebook}", "--model.init_args.optim.max_generator_steps=2",
        "--data.init_args.batch_size=4", "--data.init_args.batches_per_epoch=2",
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    weights, codebook = save_tiny_mnist_teacher(root / "teacher")
    other_weights, other_codebook = save_tiny_mnist_teacher(root / "other", seed=3)
    # A checkpoint and its export, trained for 2 generator steps against `teacher`.
    module = DiMOModule(MNISTTeacher(str(weights), str(codebook)),
                        optim={"max_generator_steps": 2, "train_dropout": False})
    pl.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0,
               callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]).fit(
        module, ClassLabelDataModule(10, 4, 2))
    ckpt = root / "ckpt" / "last.ckpt"
    student = export_student(ckpt, root / "student")
    # Corrupt weights beside a valid architecture file.
    (root / "corrupt").mkdir()
    (root / "corrupt" / "teacher.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    (root / "corrupt" / "teacher.json").write_text(json.dumps(TINY_ARCH))
    # Weights whose shapes do not match their architecture file.
    (root / "shape").mkdir()
    (root / "shape" / "teacher.safetensors").write_bytes(weights.read_bytes())
    (root / "shape" / "teacher.json").write_text(json.dumps({**TINY_ARCH, "hidden_dim": 64}))
    # A codebook with 8 codes for a 16-code teacher.
    PatchVQTokenizer(torch.rand(8, 16)).save(root / "codebook8.safetensors")
    (root / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    # A config with a flat key of an earlier version (now aux.rounds).
    (root / "old_keys.yaml").write_text("model:\n  init_args:\n    aux_rounds: 2\n")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, root / "foreign.ckpt")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "notes.ckpt").write_text("a text file, not a checkpoint\n")  # the unpickler: "pop from empty list"
    (root / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:5000])
    return {"root": root, "weights": weights, "codebook": codebook, "other": (other_weights, other_codebook),
            "ckpt": ckpt, "student": student}


def _cases(f: dict) -> list[tuple[str, list[str], list[str]]]:
    """(bad input, command line, substrings the message must contain)."""
    r, w, c = f["root"], f["weights"], f["codebook"]
    fit = _fit_args(w, c)
    return [
        ("config file does not exist", ["fit", "--config", str(r / "nope.yaml")], ["nope.yaml"]),
        ("unknown key", ["fit", *fit, "--model.init_args.no_such_knob=3"], ["--model.init_args.no_such_knob"]),
        ("unknown key of the teacher", ["fit", *fit, f"{TEACHER}resolution=64"], [f"{TEACHER}resolution"]),
        ("invalid choice", ["fit", *fit, "--model.init_args.aux.sample=both"], ["--model.init_args.aux.sample"]),
        ("invalid value", ["fit", *fit, "--model.init_args.student.r_init=[0.9,0.1]"],
         ["--model.init_args.student.r_init"]),
        ("a settings group's value out of range", ["fit", *fit, "--model.init_args.student.r_init=1.5"],
         ["--model.init_args.student.r_init", "student.r_init must lie in [0, 1], got 1.5"]),
        ("a flat key of an earlier version", ["fit", *fit, "--model.init_args.aux_rounds=2"],
         ["aux_rounds moved to model.init_args.aux.rounds", "--model.init_args.aux.rounds"]),
        ("a flat key of an earlier version in a YAML", ["fit", *fit, "--config", str(r / "old_keys.yaml")],
         ["aux_rounds moved to model.init_args.aux.rounds"]),
        ("a nested flat key of an earlier version", ["fit", *fit, "--model.init_args.teacher_sampling.steps=4"],
         ["teacher_sampling.steps moved to model.init_args.sampling.teacher.steps"]),
        ("invalid teacher sampling setting", ["fit", *fit, "--model.init_args.sampling.teacher.schedule=fast"],
         ["--model.init_args.sampling.teacher.schedule"]),
        ("teacher weights missing", ["fit", *fit, f"{TEACHER}checkpoint={r}/missing.safetensors"],
         [f"{TEACHER}checkpoint", "missing.safetensors"]),
        ("teacher weights corrupt", ["fit", *fit, f"{TEACHER}checkpoint={r}/corrupt/teacher.safetensors"],
         ["corrupt/teacher.safetensors"]),
        ("weights do not match their architecture (shapes)",
         ["fit", *fit, f"{TEACHER}checkpoint={r}/shape/teacher.safetensors"], ["shape", "teacher.json"]),
        ("codebook size differs from the teacher's vocabulary",
         ["fit", *fit, f"{TEACHER}codebook={r}/codebook8.safetensors"], ["codebook8.safetensors", "16"]),
        ("MaskGIT weights not downloaded (imagenet.yaml as shipped)",
         ["fit", "--config", str(ROOT / "configs/imagenet.yaml")],
         [f"{TEACHER}checkpoint", "/path/to/MaskGIT_ImageNet_256.pth", "huggingface-cli download"]),
        ("DataModule classes differ from the teacher's", ["fit", *fit, "--data.init_args.num_classes=7"],
         ["--data.init_args.num_classes=7", "10 classes"]),
        ("batch size of zero", ["fit", *fit, "--data.init_args.batch_size=0"], ["--data.init_args.batch_size"]),
        ("batch size not divisible by the micro-batches",
         ["fit", *fit, "--model.init_args.optim.accumulate_micro_batches=3"],
         ["--data.init_args.batch_size=4", "--model.init_args.optim.accumulate_micro_batches=3"]),
        ("corrupt --ckpt_path", ["validate", *fit, "--ckpt_path", str(r / "broken.ckpt")],
         ["broken.ckpt", "--ckpt_path"]),
        ("missing --ckpt_path", ["fit", *fit, "--ckpt_path", str(r / "missing.ckpt")], ["missing.ckpt"]),
        ("empty --ckpt_path", ["fit", *fit, "--ckpt_path", str(r / "empty.ckpt")], ["--ckpt_path", "empty.ckpt"]),
        ("text file as --ckpt_path", ["predict", *fit, "--ckpt_path", str(r / "notes.ckpt")],
         ["--ckpt_path", "notes.ckpt"]),
        ("truncated --ckpt_path", ["validate", *fit, "--ckpt_path", str(r / "truncated.ckpt")],
         ["--ckpt_path", "truncated.ckpt"]),
        ("--ckpt_path not a Lightning checkpoint", ["fit", *fit, "--ckpt_path", str(r / "foreign.ckpt")],
         ["--ckpt_path", "foreign.ckpt", "pytorch-lightning_version"]),
        ("resume against another teacher", ["fit", *_fit_args(*f["other"]),
                                            "--model.init_args.optim.max_generator_steps=3", "--ckpt_path",
                                            str(f["ckpt"])],
         [str(w), str(f["other"][0]), "allow_teacher_change=true"]),
        ("export: checkpoint missing", ["export", "--ckpt_path", str(r / "missing.ckpt"), "--output", str(r / "x")],
         ["missing.ckpt", "--ckpt_path"]),
        ("export: not a DiMO checkpoint", ["export", "--ckpt_path", str(r / "foreign.ckpt"), "--output", str(r / "x")],
         ["foreign.ckpt"]),
        ("export: unknown flag", ["export", "--ckpt_path", str(f["ckpt"]), "--output", str(r / "x"), "--emma", "true"],
         ["--emma"]),
        ("sample: label out of range", ["sample", "--student", str(f["student"]), "--labels", "0,12"],
         ["--labels", "[0, 9]", "12"]),
        ("sample: labels not integers", ["sample", "--student", str(f["student"]), "--labels", "zero"], ["--labels"]),
        ("sample: not an export folder", ["sample", "--student", str(r), "--labels", "0"], ["config.json"]),
        ("sample: a prompt for a class student", ["sample", "--student", str(f["student"]), "--prompt", "a bold seven"],
         ["--prompt", "class-conditional", "--labels"]),
    ]


def _run(args: list[str], capsys, what: str = "") -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit, match=None) as excinfo:
        main(args)
        pytest.fail(f"no error for: {what}")
    return excinfo.value.code, capsys.readouterr().err


def _normalise(text: str, root: Path) -> str:
    return text.replace(str(root), "<tmp>").replace(str(ROOT) + "/", "").replace("|", "\\|")


def test_bad_inputs_print_one_line_and_exit_2(files, capsys, monkeypatch):
    monkeypatch.chdir(files["root"])
    monkeypatch.delenv("DIMO_DEBUG", raising=False)
    rows = []
    for what, args, expected in _cases(files):
        status, err = _run(args, capsys, what)
        lines = [line for line in err.splitlines() if line.startswith("dimo: error:")]
        assert status == 2, (what, err)
        assert len(lines) == 1 and "Traceback" not in err, (what, err)
        for part in expected:
            assert part in lines[0], (what, part, lines[0])
        fit = _fit_args(files["weights"], files["codebook"])
        # leave out the tiny-teacher flags
        shown = [args[0], "...", *args[1 + len(fit):]] if args[1:1 + len(fit)] == fit else args
        command = " ".join(["dimo", *shown])
        rows.append(f"| {what} | `{_normalise(command, files['root'])}` | {_normalise(lines[0], files['root'])} |")
    table = (
        "# What `dimo` prints for bad input\n\n"
        "Generated by `tests/test_cli_errors.py` (regenerate: `DIMO_WRITE_DOCS=1 pytest tests/test_cli_errors.py`).\n"
        "Each command exits with status 2 after this one line; `--debug` (or `DIMO_DEBUG=1`) shows the traceback.\n"
        "Rows marked `dimo fit ...` also pass the test's tiny-teacher flags, left out here (`--config "
        f"configs/mnist/dimo.yaml {TEACHER}checkpoint=... {TEACHER}codebook=...` and sizes in seconds); `<tmp>` is "
        "the test's folder.\n\n"
        "| bad input | command | message |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if os.environ.get("DIMO_WRITE_DOCS"):
        DOC.write_text(table)
    assert DOC.read_text() == table, "docs/cli_errors.md is stale: DIMO_WRITE_DOCS=1 pytest tests/test_cli_errors.py"


def test_bad_group_value_fails_before_the_model_is_built(files, capsys, monkeypatch):
    """A settings group is checked when it is built, before the module (no model summary, no module)."""
    built = []
    original = DiMOModule.__init__

    @functools.wraps(original)
    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DiMOModule, "__init__", counting)
    monkeypatch.chdir(files["root"])  # the valid run writes its config and checkpoint here
    args = ["fit", *_fit_args(files["weights"], files["codebook"]), "--trainer.enable_model_summary=true"]
    status, err = _run([*args, "--model.init_args.student.r_init=1.5"], capsys, "student.r_init=1.5")
    assert status == 2 and err.strip().endswith("student.r_init must lie in [0, 1], got 1.5")
    assert not built and "Total params" not in err
    main([*args, "--model.init_args.student.r_init=0.5", "--model.init_args.optim.max_generator_steps=1"])
    assert built and "Total params" in capsys.readouterr().out  # the same command line, valid: built, summarised


def test_debug_keeps_the_traceback(files, monkeypatch):
    args = ["fit", *_fit_args(files["weights"], files["codebook"]), f"{TEACHER}checkpoint=/nonexistent.safetensors"]
    with pytest.raises(ValueError, match="nonexistent.safetensors"):  # jsonargparse's wrapper, with its chain
        main([*args, "--debug"])
    monkeypatch.setenv("DIMO_DEBUG", "1")
    with pytest.raises(ValueError, match="nonexistent.safetensors"):
        main(args)


@pytest.mark.parametrize(("data", "argument", "value"), [
    ("data.labels.ClassLabelDataModule", "batch_size", 0),
    ("data.labels.ClassLabelDataModule", "num_classes", 0),
    ("data.labels.ClassLabelDataModule", "batches_per_epoch", 0),
    ("data.labels.ClassLabelDataModule", "predict_samples", 0),
    ("data.prompts.PromptDataModule", "batch_size", 0),
    ("data.prompts.PromptDataModule", "batches_per_epoch", -1),
    ("data.prompts.PromptDataModule", "predict_samples", 0),
    ("data.real_codes.RealCodesDataModule", "batch_size", 0),
    ("data.real_codes.RealCodesDataModule", "codebook_size", 0),
    ("data.mnist.MNISTDataModule", "batch_size", 0),
    ("data.mnist.MNISTDataModule", "num_workers", -1),
    ("pretraining.text_to_image.CaptionedMNISTDataModule", "batch_size", 0),
    ("pretraining.text_to_image.CaptionedMNISTDataModule", "captions_per_digit", 0),
])
def test_data_module_counts_name_their_flag(data, argument, value, capsys, monkeypatch):
    """A count of a DataModule below its minimum is reported with that argument's flag (not the first one
    checked, not another class's argument of the same name)."""
    monkeypatch.delenv("DIMO_DEBUG", raising=False)
    status, err = _run(["fit", "--config", str(ROOT / "configs/mnist/teacher.yaml"), f"--data=dimo_lightning.{data}",
                        f"--data.init_args.{argument}={value}"], capsys, argument)
    lines = [line for line in err.splitlines() if line.startswith("dimo: error:")]
    minimum = 0 if argument == "num_workers" else 1
    assert status == 2
    assert lines == [f"dimo: error: --data.init_args.{argument}: {argument} must be >= {minimum}, got {value}"]
