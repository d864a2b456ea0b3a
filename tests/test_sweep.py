"""`dimo sweep`: grid studies of `dimo fit` runs on Optuna (real runs on a tiny teacher, and a fast fake trial
command for the process-level checks: a killed worker's trial is re-queued, several workers share one study)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna")

from dimo_lightning.commands import sweep  # noqa: E402
from dimo_lightning.commands.cli import main as dimo_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_fit_config(tmp_path: Path) -> Path:
    """A 2-step Di[M]O run of a tiny random teacher that ends with a 20-sample EvaluationReport (student row only)."""
    from helpers import save_tiny_mnist_teacher

    weights, codebook = save_tiny_mnist_teacher(tmp_path / "teacher")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": -1, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
            "callbacks": [{"class_path": "dimo_lightning.evaluation.callbacks.evaluation_report.EvaluationReport",
                           "init_args": {"num_samples": 20, "teacher_steps": [], "batch_size": 20}},
                          {"class_path": "dimo_lightning.evaluation.callbacks.consistency_monitor.ConsistencyMonitor",
                           "init_args": {"every_n_generator_steps": 1, "num_samples": 8, "band_edges": [0, 0.5, 1]}}],
        },
        "model": {"class_path": "dimo_lightning.training.module.DiMOModule", "init_args": {
            "teacher": {"class_path": "dimo_lightning.teachers.mnist.MNISTTeacher",
                        "init_args": {"checkpoint": str(weights), "codebook": str(codebook)}},
            "optim": {"max_generator_steps": 2},
        }},
        "data": {"class_path": "dimo_lightning.data.labels.ClassLabelDataModule",
                 "init_args": {"num_classes": 10, "batch_size": 4, "batches_per_epoch": 2}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FAKE_FIT = """
import json, os, sys, time
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
logger = json.loads(args["trainer.logger"])["init_args"]
x = float(args["model.init_args.student.r_init"])
if x == float(os.environ.get("FAKE_SLOW_VALUE", "nan")):
    Path(os.environ["FAKE_MARKER"]).write_text(str(os.getpid()))
    time.sleep(120)
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
out = Path(logger["save_dir"]) / logger["name"] / logger["version"]
row = {"model": "student", "steps": 1, "fid": 10 + x, "kid": 0.01, "precision": 0.5, "recall": x / 2,
       "accuracy": 0.9, "images_per_s": 1.0}
(out / "eval.json").write_text(json.dumps({"rows": [row], "generator_step": 2}))
# the seed as LightningCLI saves it in the run's config.yaml
(out / "config.yaml").write_text(f"seed_everything: {int(args.get('seed_everything', 0))}\\n")
"""


def fake_spec(tmp_path: Path, values: list, **extra) -> Path:
    """A spec whose trials run FAKE_FIT (writes eval.json with FID 10 + r_init) as their launcher."""
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    (tmp_path / "base.yaml").write_text("{}\n")
    spec = {"sweep": {"study": "fake", "configs": ["base.yaml"], "grid": {"model.init_args.student.r_init": values},
                      "out": str(tmp_path / "runs"), "command": ["python", str(tmp_path / "fake_fit.py")], **extra}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with the worktree first on PYTHONPATH (prepended: CI's own path stays)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_grid_flag_parsing():
    assert sweep.parse_grid_flag("model.init_args.student.r_init=0.0,0.5,1") == ("model.init_args.student.r_init",
                                                                                 [0.0, 0.5, 1])
    assert sweep.parse_grid_flag("--a.b=[0.0,0.3],[0.3,0.7]") == ("a.b", [[0.0, 0.3], [0.3, 0.7]])
    assert sweep.parse_grid_flag("m.aux.mode=full,none") == ("m.aux.mode", ["full", "none"])
    assert sweep.encode_choice([0.0, 0.3]) == "[0.0, 0.3]"
    assert sweep.format_override("a.b", True) == "--a.b=true" and sweep.format_override("a", None) == "--a=null"
    with pytest.raises(ValueError, match="KEY=V1"):
        sweep.parse_grid_flag("model.init_args.student.r_init")


def test_bad_definitions_name_the_problem(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    with pytest.raises(ValueError, match="repeated values"):
        sweep.build_definition([str(config)], [], {"a": [1, 1]})
    with pytest.raises(ValueError, match="average_over"):
        sweep.build_definition([str(config)], [], {"a": [1, 2]}, average_over=["seed"])
    assert dimo_main_code(["sweep", "run", "--config", str(tmp_path / "missing.yaml"), "--grid", "a=1,2",
                           "--study", "s", "--out", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    spec = tmp_path / "spec.yaml"
    spec.write_text("sweep: {study: s, configs: [c.yaml], grid: {a: [1]}, typo: 1}\n")
    assert dimo_main_code(["sweep", "run", str(spec)]) == 2
    assert "typo" in capsys.readouterr().err


def dimo_main_code(argv: list[str]) -> int:
    try:
        dimo_main(argv)
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


def test_sweep_of_real_runs_resumes_and_summarizes(tmp_path, capsys):
    """A 2-value grid of 2-step `dimo fit` runs: both trials complete with the FID of their eval.json; running the
    command again skips them; the summary prints every trial and writes one PNG per metric."""
    import optuna

    config = tiny_fit_config(tmp_path)
    out = tmp_path / "runs"
    argv = ["sweep", "run", "--config", str(config), "--grid", "model.init_args.student.r_init=0.2,0.8",
            "--set", "trainer.log_every_n_steps=1", "--study", "tiny", "--out", str(out)]
    assert dimo_main_code(argv) == 0
    storage = sweep.make_storage(sweep.default_storage(out))
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert sorted(t.params["model.init_args.student.r_init"] for t in trials) == [0.2, 0.8]
    for trial in trials:
        assert trial.state.name == "COMPLETE"
        run_dir = Path(trial.user_attrs["log_dir"])
        assert run_dir == out / "tiny" / f"trial_{trial.number:04d}"
        student = json.loads((run_dir / "eval.json").read_text())["rows"][-1]
        assert trial.value == pytest.approx(student["fid"])
        assert trial.user_attrs["recall"] == pytest.approx(student["recall"])
        assert trial.user_attrs["generator_step"] == 2
        hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        # the override reached the module's settings group
        assert hparams["student"]["r_init"] == trial.params["model.init_args.student.r_init"]
        kl = {k: v for k, v in trial.user_attrs.items() if k.startswith("consistency_kl/")}
        assert "consistency_kl/all" in kl and all(v >= 0 for v in kl.values())  # the run's last diagnostic
    finished = {t.number: t.datetime_complete for t in trials}
    capsys.readouterr()

    assert dimo_main_code(argv) == 0  # resume: nothing left to run
    again = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert {t.number: t.datetime_complete for t in again} == finished
    printed = capsys.readouterr().out
    assert "| trial | r_init | run seed | FID | recall | precision | accuracy | KID |" in printed
    assert "KL all | state |" in printed
    assert [t.user_attrs["seed"] for t in again] == [0, 0]  # read back from each run's saved config
    assert printed.count("| COMPLETE |") == 2
    assert (out / "tiny" / "tiny_summary.md").read_text().count("| COMPLETE |") == 2
    for metric in sweep.PLOTTED_METRICS:
        png = out / "tiny" / f"tiny_{metric}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"

    # A different grid under the same study name is refused rather than mixed in.
    assert dimo_main_code([*argv[:4], "--grid", "model.init_args.student.r_init=0.1,0.9", *argv[6:]]) == 2
    assert "different definition" in capsys.readouterr().err


def test_killed_worker_trial_is_requeued_and_rerun(tmp_path):
    """SIGKILL a worker in the middle of a trial: its run dies with it, the trial stays RUNNING, and a resumed
    sweep fails it once its heartbeat is stale and re-runs the grid point, leaving the finished one alone."""
    import optuna

    spec = fake_spec(tmp_path, [0.0, 1.0])
    marker = tmp_path / "slow.pid"
    env = subprocess_env(FAKE_SLOW_VALUE="1.0", FAKE_MARKER=str(marker))
    sweep_cmd = [sys.executable, "-m", "dimo_lightning.commands.sweep", "run", str(spec), "--heartbeat-s", "1",
                 "--grace-s", "2"]
    worker = subprocess.Popen(sweep_cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the slow trial never started"
    run_pid = int(marker.read_text())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(0.5)
    stat = Path(f"/proc/{run_pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the trial's run outlived its worker"

    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"), heartbeat_s=1, grace_s=2)
    states = {t.params["model.init_args.student.r_init"]: t.state.name
              for t in optuna.load_study(study_name="fake", storage=storage).get_trials()}
    assert states[1.0] == "RUNNING"  # the dead worker could not mark it
    finished_before_kill = states.get(0.0) == "COMPLETE"

    env.pop("FAKE_SLOW_VALUE")
    result = subprocess.run(sweep_cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="fake", storage=storage).get_trials()
    by_state: dict[str, list] = {}
    for t in trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert sorted(t.params["model.init_args.student.r_init"] for t in by_state["COMPLETE"]) == [0.0, 1.0]
    assert [t.params["model.init_args.student.r_init"] for t in by_state["FAIL"]] == [1.0]
    rerun = next(t for t in by_state["COMPLETE"] if t.params["model.init_args.student.r_init"] == 1.0)
    assert rerun.system_attrs["retry_history"] == [by_state["FAIL"][0].number]
    assert rerun.value == pytest.approx(11.0)
    if finished_before_kill:  # the point finished before the kill was not run again
        assert sum(t.params["model.init_args.student.r_init"] == 0.0 for t in trials) == 1
    assert result.stdout.count("| COMPLETE |") == 2


def test_failed_run_is_retried_then_given_up(tmp_path, capsys):
    """A run that exits non-zero fails its trial; the point is re-run up to max_retries times, then reported."""
    import optuna

    spec = fake_spec(tmp_path, [0.5, 2.0])
    (tmp_path / "fake_fit.py").write_text(
        "import sys\nif '--model.init_args.student.r_init=2.0' in sys.argv:\n    sys.exit(3)\n" + FAKE_FIT)
    assert sweep.main(["run", str(spec), "--max-retries", "1"]) == 0
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    trials = optuna.load_study(study_name="fake", storage=storage).get_trials()
    states = sorted((t.params["model.init_args.student.r_init"], t.state.name) for t in trials)
    assert states == [(0.5, "COMPLETE"), (2.0, "FAIL"), (2.0, "FAIL")]
    assert "given up" in capsys.readouterr().out
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert (Path(failed.user_attrs["log_dir"]) / "fit.log").is_file()


def test_parallel_workers_share_one_study(tmp_path):
    """--workers 2: two worker processes split a 4-point grid; every point completes exactly once."""
    import optuna

    spec = fake_spec(tmp_path, [0.0, 1.0, 2.0, 3.0])
    result = subprocess.run([sys.executable, "-m", "dimo_lightning.commands.sweep", "run", str(spec), "--workers", "2",
                             "--heartbeat-s", "1"],
                            env=subprocess_env(FAKE_SECONDS="1.5"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    trials = optuna.load_study(study_name="fake", storage=storage).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["model.init_args.student.r_init"] for t in complete) == [0.0, 1.0, 2.0, 3.0]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker"] for t in complete}) == 2


def test_plot_series_average_seeds_and_split_series(tmp_path):
    """x = the first swept key; average_over keys are averaged (min..max bars); other keys make separate lines;
    categorical values (aux modes, JSON bands) plot on an index axis."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    definition = sweep.build_definition(
        [str(config)], [], {"m.band": [[0.0, 0.3], [0.7, 1.0]], "m.aux_mode": ["full", "none"], "seed": [0, 1]},
        average_over=["seed"])
    rows = []
    for number, (band, mode, seed) in enumerate(
            [(b, m, s) for b in definition["grid"]["m.band"] for m in ("full", "none") for s in (0, 1)]):
        fid = 10.0 + (band == "[0.7, 1.0]") * 5 + (mode == "none") * 2 + seed
        rows.append({"trial": number, "state": "COMPLETE", "m.band": band, "m.aux_mode": mode, "seed": seed,
                     "fid": fid, "recall": 0.5, "precision": 0.5, "accuracy": 0.9, "kid": 0.1, "log_dir": ""})
    rows.append({**rows[0], "trial": 99, "state": "FAIL", "fid": 1000.0})  # failed trials are not plotted
    series = sweep.plot_series(rows, definition, "fid")
    assert series == {
        "aux_mode=full": [("[0.0, 0.3]", 10.5, 10.0, 11.0), ("[0.7, 1.0]", 15.5, 15.0, 16.0)],
        "aux_mode=none": [("[0.0, 0.3]", 12.5, 12.0, 13.0), ("[0.7, 1.0]", 17.5, 17.0, 18.0)],
    }
    paths = sweep.write_plots(rows, definition, "bands", tmp_path / "plots")
    assert [p.name for p in paths] == [f"bands_{m}.png" for m in sweep.PLOTTED_METRICS]
    table = sweep.format_summary(rows, definition)
    header = "| trial | band | aux_mode | seed | run seed | FID | recall | precision | accuracy | KID | state |"
    assert table.splitlines()[0] == header
    assert "| 99 | [0.0, 0.3] | full | 0 | - | 1000.000 |" in table


def test_deadline_starts_only_trials_that_fit(tmp_path, capsys):
    """--until: no trial starts when the expected duration (--trial-estimate-s before any finished, then the
    study's longest finished trial) would pass the deadline; the same command later resumes the grid."""
    import datetime as dt

    import optuna

    spec = fake_spec(tmp_path, [0.0, 1.0, 2.0])
    in_an_hour = (dt.datetime.now() + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    assert sweep.main(["run", str(spec), "--until", in_an_hour, "--trial-estimate-s", "7200"]) == 0
    printed = capsys.readouterr().out
    assert "stopping before the deadline" in printed and "3 grid point(s) left" in printed
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    assert optuna.load_study(study_name="fake", storage=storage).get_trials() == []

    assert sweep.main(["run", str(spec), "--max-trials", "1"]) == 0  # one finished trial: now the estimate
    # A finished trial took well under an hour, so the too-long fallback no longer blocks: the rest runs.
    assert sweep.main(["run", str(spec), "--until", in_an_hour, "--trial-estimate-s", "7200"]) == 0
    trials = optuna.load_study(study_name="fake", storage=storage).get_trials()
    complete = [t.params["model.init_args.student.r_init"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == [0.0, 1.0, 2.0]
    assert all(t.user_attrs["seconds"] < 3600 for t in trials)

    capsys.readouterr()
    past = (dt.datetime.now() - dt.timedelta(minutes=1)).strftime("%H:%M:%S")
    (tmp_path / "other").mkdir()
    spec_2 = fake_spec(tmp_path / "other", [0.0])
    assert sweep.main(["run", str(spec_2), "--until", past]) == 0  # a deadline already past: nothing starts
    assert "stopping before the deadline" in capsys.readouterr().out
    assert sweep.main(["run", str(spec_2), "--until", "5pm"]) == 2
    assert "--until expects HH:MM" in capsys.readouterr().err


def test_parse_deadline():
    import datetime as dt

    noon = dt.datetime(2026, 3, 4, 12, 0).timestamp()
    assert sweep.parse_deadline("17:20", now=noon) == dt.datetime(2026, 3, 4, 17, 20).timestamp()
    assert sweep.parse_deadline("09:05:30", now=noon) == dt.datetime(2026, 3, 4, 9, 5, 30).timestamp()
    assert sweep.parse_deadline("2026-03-05T01:00", now=noon) == dt.datetime(2026, 3, 5, 1, 0).timestamp()
    with pytest.raises(ValueError, match="--until"):
        sweep.parse_deadline("tomorrow")


def test_consistency_kl_is_read_from_tensorboard_and_tabled(tmp_path):
    """The last train/consistency_kl/* scalar of every band (any event file of the run) becomes a KL column."""
    from torch.utils.tensorboard import SummaryWriter

    for part, rows in (("a", [(50, 0.30, 0.10), (100, 0.20, 0.05)]), ("b", [(150, 0.25, 0.07)])):
        writer = SummaryWriter(str(tmp_path / "run" / part))
        for step, high, low in rows:
            writer.add_scalar("train/consistency_kl/0.5-1", high, step)
            writer.add_scalar("train/consistency_kl/0-0.5", low, step)
            writer.add_scalar("train/consistency_kl/all", (high + low) / 2, step)
            writer.add_scalar("train/loss", 1.0, step)
        writer.close()
    kl = sweep.read_consistency_kl(tmp_path / "run")
    assert kl == pytest.approx({"0-0.5": 0.07, "0.5-1": 0.25, "all": 0.16})  # step 150 is the latest
    assert sweep.read_consistency_kl(tmp_path / "nothing") == {}

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    definition = sweep.build_definition([str(config)], [], {"m.r": [0.1, 0.2]})
    rows = [{"trial": 0, "state": "COMPLETE", "m.r": 0.1, "fid": 5.0, "recall": 0.5, "precision": 0.5,
             "accuracy": 0.9, "kid": 0.1, "consistency_kl": kl, "log_dir": ""},
            {"trial": 1, "state": "FAIL", "m.r": 0.2, "fid": math.nan, "recall": math.nan, "precision": math.nan,
             "accuracy": math.nan, "kid": math.nan, "consistency_kl": {}, "log_dir": ""}]
    table = sweep.format_summary(rows, definition).splitlines()
    assert table[0].endswith("| KID | KL 0-0.5 | KL 0.5-1 | KL all | state |")
    assert table[2].endswith("| 0.1000 | 0.0700 | 0.2500 | 0.1600 | COMPLETE |")
    assert table[3].endswith("| - | - | - | - | FAIL |")


def test_trials_run_in_grid_order_seeds_outermost(tmp_path):
    """A sweep stopped early has run every swept value at its first seed, in the order the values are listed."""
    import optuna

    spec = fake_spec(tmp_path, [1.0, 0.0, 0.5], average_over=["seed_everything"])
    document = yaml.safe_load(spec.read_text())
    document["sweep"]["grid"]["seed_everything"] = [7, 8]
    spec.write_text(yaml.safe_dump(document))
    definition = sweep.build_definition(
        [str(tmp_path / "base.yaml")], [], document["sweep"]["grid"], average_over=["seed_everything"])
    assert [(p["model.init_args.student.r_init"], p["seed_everything"]) for p in sweep.traversal_order(definition)] == [
        (1.0, 7), (0.0, 7), (0.5, 7), (1.0, 8), (0.0, 8), (0.5, 8)]

    assert sweep.main(["run", str(spec), "--max-trials", "4"]) == 0
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    trials = sorted(optuna.load_study(study_name="fake", storage=storage).get_trials(), key=lambda t: t.number)
    assert [(t.params["model.init_args.student.r_init"], t.params["seed_everything"], t.state.name)
            for t in trials] == [(1.0, 7, "COMPLETE"), (0.0, 7, "COMPLETE"), (0.5, 7, "COMPLETE"), (1.0, 8, "COMPLETE")]
    # The plot's numeric axis runs left to right whatever the run order: FID = 10 + r_init (FAKE_FIT).
    study, stored = sweep.load_study(storage, "fake")
    table_order = [(r["model.init_args.student.r_init"], r["seed_everything"])
                   for r in sweep.summary_rows(study, stored)]
    assert table_order == [(0.0, 7), (0.5, 7), (1.0, 7), (1.0, 8)]  # the table sorts numbers by value too
    series = sweep.plot_series(sweep.summary_rows(study, stored), stored, "fid")
    assert series == {"": [(0.0, 10.0, 10.0, 10.0), (0.5, 10.5, 10.5, 10.5), (1.0, 11.0, 11.0, 11.0)]}
    assert sweep.plot_note(sweep.summary_rows(study, stored), stored, "fid") == (
        "mean and min-max over seed_everything: 1-2 run(s) per point; 2 generator steps")


def test_a_point_queued_twice_runs_once_even_before_the_first_trial_suggests(tmp_path):
    """The race two workers hit: both queue the same grid point at the same moment, and the higher-numbered trial
    starts while the other is RUNNING but has not suggested its params yet. It must stand down (PRUNED), and a
    fresh trial that Optuna creates when the queue is empty must not run a point of its own choosing."""

    spec = fake_spec(tmp_path, [0.0, 1.0])
    spec_section = yaml.safe_load(spec.read_text())["sweep"]
    definition = sweep.build_definition([str(tmp_path / "base.yaml")], [], spec_section["grid"],
                                        out=spec_section["out"], command=spec_section["command"])
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    study = sweep.create_or_load_study(storage, "fake", definition)
    point = {"model.init_args.student.r_init": 0.0}
    study.enqueue_trial(point)
    study.enqueue_trial(point)
    first = study.ask()  # worker A took trial 0: RUNNING, no params yet
    assert first.number == 0 and not first.params
    objective = sweep.make_objective("fake", definition)
    study.optimize(objective, n_trials=1)  # worker B runs trial 1 with the same point
    study.optimize(objective, n_trials=1)  # the queue is empty: Optuna creates trial 2 with no queued point
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "RUNNING", 1: "PRUNED", 2: "PRUNED"}
    assert not (tmp_path / "runs" / "fake" / "trial_0001").exists()


def test_seeds_of_a_sweep_are_distinct_and_recorded_in_its_summary(tmp_path, capsys):
    """Three training seeds of one grid point: each trial runs its own seed, the summary lists the seed each run
    saved in its config.yaml, and a grid that repeats a seed is refused."""
    import optuna

    spec = fake_spec(tmp_path, [0.5], average_over=["seed_everything"])
    definition = yaml.safe_load(spec.read_text())
    definition["sweep"]["grid"]["seed_everything"] = [0, 1, 2]
    spec.write_text(yaml.safe_dump(definition))
    assert dimo_main_code(["sweep", "run", str(spec)]) == 0
    storage = sweep.make_storage(sweep.default_storage(tmp_path / "runs"))
    study = optuna.load_study(study_name="fake", storage=storage)
    seeds = sorted(t.user_attrs["seed"] for t in study.get_trials())
    assert seeds == [0, 1, 2]
    rows = sweep.summary_rows(study, sweep.load_study(storage, "fake")[1])
    assert [r["run_seed"] for r in rows] == [r["seed_everything"] for r in rows]  # the run used the seed it was given
    table = (tmp_path / "runs" / "fake" / "fake_summary.md").read_text()
    assert "| trial | r_init | seed_everything | run seed | FID |" in table
    for seed in (0, 1, 2):
        assert f"| 0.5 | {seed} | {seed} |" in table
    capsys.readouterr()
    definition["sweep"]["grid"]["seed_everything"] = [0, 1, 1]
    definition["sweep"]["study"] = "repeated"
    spec.write_text(yaml.safe_dump(definition))
    assert dimo_main_code(["sweep", "run", str(spec)]) == 2
    assert "repeated values" in capsys.readouterr().err
