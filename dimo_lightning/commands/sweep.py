"""``dimo sweep``: grid sweeps over any config key on Optuna, each trial a normal ``dimo fit`` run.

    dimo sweep run configs/mnist/ablations/r_init.yaml                      # a sweep spec (see below)
    dimo sweep run --config configs/mnist/dimo.yaml --study lr \\
        --grid model.init_args.optimizer_gen.init_args.lr=3e-5,7e-5,1e-4 --grid seed_everything=0,1 --workers 2
    dimo sweep worker --storage postgresql://host/db --study lr            # join from another machine
    dimo sweep summary --study lr                                           # table + one PNG per metric

Engine: an Optuna study with a ``GridSampler`` (the product of the grid's values) in an RDB storage (a SQLite file
by default; any SQLAlchemy URL, e.g. PostgreSQL, lets workers on many machines share the study). Each trial runs
``python -m dimo_lightning fit --config ... --KEY=VALUE ...`` in a subprocess with its own log directory
``OUT/STUDY/trial_NNNN`` and reads the student row of its ``eval.json`` (written by the ``EvaluationReport``
callback): the trial's value is the FID; recall, precision, accuracy and KID are user attributes.

Order and deadlines: grid points run in the grid's order with the ``average_over`` keys (seeds) outermost, so a
sweep stopped early is balanced; ``--until HH:MM`` starts a trial only if it is expected to end by then (the
study's longest finished trial, or ``--trial-estimate-s``), for batch allocations and shared time slots.

Resuming: running the same command again skips finished grid points. A trial whose worker died stays RUNNING in
the storage; its heartbeat (recorded every ``heartbeat_s`` seconds by Optuna) stops, and once it is older than
``grace_s`` the trial is marked FAIL (``optuna.storages.fail_stale_trials``). A FAIL trial (dead worker, Ctrl-C,
a crashed run) is re-queued with its grid point by Optuna's ``RetryHeartbeatStaleTrialCallback``, at most
``max_retries`` times per grid point. Workers wait for trials that other live workers are running, so every
worker returns only when the whole grid is done.

A sweep spec is a YAML file with one ``sweep`` section; relative config paths are relative to the spec file::

    sweep:
      study: mnist_r_init
      configs: [base.yaml]                      # `dimo fit` configs, in order
      args: [--model.init_args.optim.max_generator_steps=300]   # fixed overrides of every trial
      grid:                                     # key -> values; several keys = their product
        model.init_args.student.r_init: [0.0, 0.5, 1.0]
      average_over: [seed_everything]           # grid keys the summary plots average (error bars: min..max)
      workers: 2
      env: {OMP_NUM_THREADS: "1"}               # environment of the trial processes
      command: [python, -m, dimo_lightning, fit]   # the trial launcher (default); e.g. [torchrun, --nproc-per-node, 8,
                                                   # -m, dimo_lightning, fit]; `python` is this worker's interpreter
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

METRICS = ("fid", "recall", "precision", "accuracy", "kid", "fid2", "recall2")  # *2: the report's second distance
PLOTTED_METRICS = ("fid", "recall", "precision", "accuracy")
DEFAULT_OUT = "runs/sweeps"
DEFAULT_COMMAND = ("python", "-m", "dimo_lightning", "fit")


class TrialFailed(Exception):
    """A trial's ``dimo fit`` failed or wrote no usable ``eval.json``; Optuna records the trial as FAIL."""


# ---- the sweep definition -------------------------------------------------------------------------------------------
def parse_values(text: str, flag: str = "--grid") -> list[Any]:
    """``"0.0,0.2"`` -> ``[0.0, 0.2]``; YAML scalars and flow lists: ``"[0.0,0.3],[0.3,0.7]"`` -> two lists."""
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError as err:
        raise ValueError(f"{flag}: cannot parse the values {text!r}: {err}") from err
    if not values:
        raise ValueError(f"{flag}: no values in {text!r}")
    return values


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """``"model.init_args.student.r_init=0.0,0.5"`` -> ``("model.init_args.student.r_init", [0.0, 0.5])``."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--grid expects KEY=V1,V2,..., got {text!r}")
    return key.strip().removeprefix("--"), parse_values(values, f"--grid {key}")


def encode_choice(value: Any) -> str | int | float | bool | None:
    """Grid values as Optuna categorical choices (scalars only): lists and mappings become JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value)


def format_override(key: str, value: Any) -> str:
    """One ``--key=value`` argument of ``dimo fit`` (jsonargparse reads YAML/JSON values)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"--{key}={text}"


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a sweep spec (the ``sweep`` section of a YAML file), with config paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec not found: {path}")
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict) or not isinstance(document.get("sweep"), dict):
        raise ValueError(f"{path}: a sweep spec needs a top-level 'sweep:' section")
    spec = dict(document["sweep"])
    unknown = set(spec) - {"study", "configs", "args", "grid", "average_over", "workers", "env", "out", "storage",
                           "max_retries", "command"}
    if unknown:
        raise ValueError(f"{path}: unknown sweep key(s) {', '.join(sorted(unknown))}")
    spec["configs"] = [str((path.parent / c).resolve()) for c in spec.get("configs", [])]
    return spec


def build_definition(
    configs: Sequence[str], args: Sequence[str], grid: dict[str, list[Any]], average_over: Sequence[str] = (),
    env: dict[str, str] | None = None, out: str = DEFAULT_OUT, command: Sequence[str] = DEFAULT_COMMAND,
) -> dict[str, Any]:
    """The JSON-able definition stored in the study (workers on other machines read it from there)."""
    if not configs:
        raise ValueError("a sweep needs at least one `dimo fit` config (--config or `configs:` in the spec)")
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config: file not found: {config}")
    if not grid:
        raise ValueError("a sweep needs a grid (--grid KEY=V1,V2 or `grid:` in the spec)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"grid key {key!r} has repeated values: {values}")
    missing = [k for k in average_over if k not in grid]
    if missing:
        raise ValueError(f"average_over names keys that are not in the grid: {', '.join(missing)}")
    return {
        "configs": [str(Path(c).resolve()) for c in configs],
        "args": list(args),
        "grid": {k: [encode_choice(v) for v in values] for k, values in grid.items()},
        "average_over": list(average_over),
        "env": {str(k): str(v) for k, v in (env or {}).items()},
        "out": str(Path(out).resolve()),
        "command": [str(c) for c in command],
    }


# ---- storage and study ----------------------------------------------------------------------------------------------
def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'sweeps.db'}"


def make_storage(url: str, heartbeat_s: int = 60, grace_s: int | None = None, max_retries: int = 2):
    """An RDB storage with heartbeats: trials of dead workers go stale, fail and are re-queued."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several worker processes write one SQLite file: wait for its lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
            grace_period=grace_s if grace_s is not None else 3 * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries),
        )


def grid_sampler(definition: dict[str, Any]):
    import optuna

    return optuna.samplers.GridSampler(definition["grid"], seed=0)


def create_or_load_study(storage, study_name: str, definition: dict[str, Any]):
    """Create the study (storing ``definition``), or load it and check that the definition is the same."""
    import optuna

    study = optuna.create_study(study_name=study_name, storage=storage, sampler=grid_sampler(definition),
                                direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", definition)
    elif stored != definition:
        changed = sorted(k for k in set(stored) | set(definition) if stored.get(k) != definition.get(k))
        raise ValueError(
            f"study {study_name!r} already exists in this storage with a different definition ({', '.join(changed)} "
            "differ): resume it with the same spec and flags, or give a new --study name"
        )
    return study


def load_study(storage, study_name: str):
    """Load an existing sweep study and its definition."""
    import optuna

    try:
        summaries = optuna.get_all_study_names(storage)
    except Exception as err:  # a wrong URL or an unreadable file: name it
        raise ValueError(f"--storage: cannot open {storage.url}: {err}") from err
    if study_name not in summaries:
        known = ", ".join(summaries) or "none"
        raise ValueError(f"--study: no study {study_name!r} in {storage.url} (studies there: {known})")
    probe = optuna.load_study(study_name=study_name, storage=storage)
    definition = probe.user_attrs.get("definition")
    if definition is None:
        raise ValueError(f"study {study_name!r} was not created by `dimo sweep` (no stored definition)")
    return optuna.load_study(study_name=study_name, storage=storage, sampler=grid_sampler(definition)), definition


# ---- grid bookkeeping -----------------------------------------------------------------------------------------------
def grid_points(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid point as ``{key: choice}``, in the grid's order (first key slowest)."""
    import itertools

    keys = list(definition["grid"])
    return [dict(zip(keys, combo)) for combo in itertools.product(*definition["grid"].values())]


def traversal_order(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """The order in which a sweep runs its grid points: the ``average_over`` keys (seeds) outermost, then the
    other keys in the grid's order (first key slowest), each key's values in the order given.

    So a sweep stopped early (``--until``, ``--max-trials``) has every swept value at its first seed before any at
    its second, and the values listed first run first.
    """
    import itertools

    averaged = [k for k in definition["average_over"] if k in definition["grid"]]
    keys = averaged + [k for k in definition["grid"] if k not in averaged]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(definition["grid"][k] for k in keys))]


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def trial_point(trial, definition: dict[str, Any]) -> str | None:
    """The grid point of a trial: the point it was queued with (``enqueue_trial`` stores it at creation, and a
    retry keeps it), else its params; None for a trial that has neither."""
    fixed = trial.system_attrs.get("fixed_params")
    if fixed and set(fixed) == set(definition["grid"]):
        return point_key(fixed)
    if trial.params and set(trial.params) == set(definition["grid"]):
        return point_key(trial.params)
    return None


def grid_status(study, definition: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per grid point, how many trials are in each state (``COMPLETE``, ``RUNNING``, ``WAITING``, ``FAIL``...)."""
    status = {point_key(p): {} for p in grid_points(definition)}
    for trial in study.get_trials(deepcopy=False):
        key = trial_point(trial, definition)
        if key in status:
            status[key][trial.state.name] = status[key].get(trial.state.name, 0) + 1
    return status


def requeue_failed(study, definition: dict[str, Any], max_retries: int) -> list[int]:
    """Re-queue the latest FAIL trial of every grid point that has no COMPLETE, RUNNING or WAITING trial.

    Optuna's ``RetryHeartbeatStaleTrialCallback`` does the re-queueing (same grid point, ``retry_history`` kept),
    so a point is given up after ``max_retries`` retries. Returns the numbers of the re-queued trials.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    latest_fail: dict[str, Any] = {}
    busy: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        key = trial_point(trial, definition)
        if key is None:
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
            busy.add(key)
        elif trial.state == TrialState.FAIL and (key not in latest_fail or trial.number > latest_fail[key].number):
            latest_fail[key] = trial
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    requeued = []
    for key, trial in latest_fail.items():
        if key in busy or len(trial.system_attrs.get("retry_history", [])) >= max_retries:
            continue
        retry(study, trial)
        requeued.append(trial.number)
    return requeued


# ---- one trial ------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the worker dies, so a killed sweep leaves no orphan runs (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def trial_command(definition: dict[str, Any], params: dict[str, Any], run_root: Path, study_name: str,
                  version: str) -> list[str]:
    """The ``dimo fit`` command line of one trial; its log directory is ``run_root/study_name/version``."""
    command = [sys.executable if part == "python" else part for part in definition["command"]]
    for config in definition["configs"]:
        command += ["--config", config]
    command += definition["args"]
    # JSON text of list/mapping values passes through as it is: jsonargparse parses it.
    command += [format_override(key, choice) for key, choice in params.items()]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(run_root), "name": study_name, "version": version}}
    command.append(f"--trainer.logger={json.dumps(logger)}")
    return command


def read_student_row(eval_json: Path) -> dict[str, Any]:
    """The student row of an ``eval.json`` (the one-step student's metrics)."""
    if not eval_json.is_file():
        raise TrialFailed(f"no {eval_json}: the fit config needs the EvaluationReport callback (on_fit_end: true)")
    payload = json.loads(eval_json.read_text())
    rows = [r for r in payload.get("rows", []) if r.get("model") == "student"]
    if not rows:
        raise TrialFailed(f"{eval_json} has no student row")
    row = dict(rows[-1])
    row["generator_step"] = payload.get("generator_step")
    return row


def read_run_seed(log_dir: Path) -> int | None:
    """The global seed a run used: ``seed_everything`` of the ``config.yaml`` LightningCLI saved in its log directory
    (a drawn seed, ``seed_everything: true``, is saved as the number drawn); None without one."""
    path = Path(log_dir) / "config.yaml"
    if not path.is_file():
        return None
    seed = (yaml.safe_load(path.read_text()) or {}).get("seed_everything")
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None


CONSISTENCY_TAG = "train/consistency_kl/"


def read_consistency_kl(log_dir: Path) -> dict[str, float]:
    """The last logged ``train/consistency_kl/<band>`` scalars (ConsistencyMonitor) of a run's TensorBoard events.

    Returns ``{band: value}`` (e.g. ``{"0-0.3": 0.01, "all": 0.05}``); empty when the run logged none or
    TensorBoard is not installed.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    latest: dict[str, tuple[int, float, float]] = {}  # band -> (step, wall time, value)
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith(CONSISTENCY_TAG):
                last = max(accumulator.Scalars(tag), key=lambda e: (e.step, e.wall_time))
                band = tag.removeprefix(CONSISTENCY_TAG)
                if band not in latest or (last.step, last.wall_time) > latest[band][:2]:
                    latest[band] = (last.step, last.wall_time, float(last.value))
    return {band: value for band, (_, _, value) in latest.items()}


def band_order(band: str) -> tuple[float, str]:
    """Bands by their lower edge (``"0.3-0.7"`` -> 0.3), ``all`` last."""
    try:
        return float(band.split("-")[0]), band
    except ValueError:
        return math.inf, band


def make_objective(study_name: str, definition: dict[str, Any]):
    """The Optuna objective: run one ``dimo fit`` for the trial's grid point and return the student's FID."""
    import optuna
    from optuna.trial import TrialState

    run_root = Path(definition["out"])

    def objective(trial) -> float:
        # Claiming a grid point without a race: every trial a worker runs was queued with its point, and the
        # point is stored with the trial when the trial is created, so of two workers that queued the same point at
        # the same moment the one whose trial has the higher number always sees the other and stands down. Checking
        # params after suggesting them is not enough: a trial that has not suggested yet is invisible.
        trials = trial.study.get_trials(deepcopy=False)
        mine = trial_point(next(t for t in trials if t.number == trial.number), definition)
        if mine is None:  # the queued trial was taken by another worker and Optuna made a fresh one: leave it
            raise optuna.TrialPruned("no queued grid point for this trial (another worker took it)")
        busy = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        for other in trials:
            if other.number < trial.number and other.state in busy and trial_point(other, definition) == mine:
                raise optuna.TrialPruned(f"grid point {mine} is already taken by trial {other.number}")
        params = {key: trial.suggest_categorical(key, choices) for key, choices in definition["grid"].items()}
        version = f"trial_{trial.number:04d}"
        log_dir = run_root / study_name / version
        log_dir.mkdir(parents=True, exist_ok=True)
        command = trial_command(definition, params, run_root, study_name, version)
        trial.set_user_attr("log_dir", str(log_dir))
        trial.set_user_attr("command", shlex.join(command))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        env = {**os.environ, **definition["env"]}
        start = time.monotonic()
        with open(log_dir / "fit.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            try:
                code = process.wait()
            except BaseException:  # Ctrl-C or an error in the worker: never leave the run behind
                process.kill()
                process.wait()
                raise
        trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        if code != 0:
            raise TrialFailed(f"dimo fit exited with code {code}; see {log_dir / 'fit.log'}")
        row = read_student_row(log_dir / "eval.json")
        seed = read_run_seed(log_dir)
        if seed is not None:
            trial.set_user_attr("seed", seed)
        for name in (*METRICS, "generator_step"):
            if row.get(name) is not None:
                trial.set_user_attr(name, row[name])
        for band, value in read_consistency_kl(log_dir).items():  # the final student's consistency diagnostic
            trial.set_user_attr(f"consistency_kl/{band}", value)
        return float(row["fid"])

    return objective


# ---- workers --------------------------------------------------------------------------------------------------------
def parse_deadline(text: str, now: float | None = None) -> float:
    """``--until``: ``HH:MM[:SS]`` (today, local time) or an ISO date-time -> epoch seconds."""
    import datetime as dt

    now_dt = dt.datetime.fromtimestamp(time.time() if now is None else now)
    try:
        if "T" in text or "-" in text:
            moment = dt.datetime.fromisoformat(text)
        else:
            moment = dt.datetime.combine(now_dt.date(), dt.time.fromisoformat(text))
    except ValueError as err:
        raise ValueError(f"--until expects HH:MM[:SS] or an ISO date-time, got {text!r}") from err
    return moment.timestamp()


def trial_estimate(study, fallback_s: float | None) -> float | None:
    """Seconds the next trial is expected to take: the longest finished trial of the study, else ``fallback_s``."""
    from optuna.trial import TrialState

    seconds = [t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if "seconds" in t.user_attrs]
    return max(seconds) if seconds else fallback_s


def work(storage, study_name: str, max_retries: int = 2, max_trials: int | None = None,
         poll_s: float | None = None, log=print, deadline: float | None = None,
         trial_estimate_s: float | None = None) -> int:
    """Run trials of the study until every grid point is finished (or ``max_trials`` trials ran here).

    With ``deadline`` (epoch seconds), a trial is started only if it is expected to end before it: the expected
    duration is the longest COMPLETE trial of the study, or ``trial_estimate_s`` before any finished. So a sweep
    inside a time-limited allocation (a batch job, a shared slot) stops between trials, and the same command resumes
    it later without losing a run.

    Returns the number of trials this worker ran.
    """
    import warnings

    import optuna

    study, definition = load_study(storage, study_name)
    objective = make_objective(study_name, definition)
    poll_s = poll_s if poll_s is not None else min(5.0, max(0.5, storage.get_heartbeat_interval() / 2))
    ran = 0
    waiting_logged = False
    while max_trials is None or ran < max_trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        requeue_failed(study, definition, max_retries)
        status = grid_status(study, definition)
        todo = [k for k, s in status.items() if not s or s.get("WAITING")]
        running = [k for k, s in status.items() if s.get("RUNNING") and not s.get("COMPLETE")]
        if todo and deadline is not None:
            expected = trial_estimate(study, trial_estimate_s) or 0.0
            if time.time() + expected > deadline:
                until = time.strftime("%H:%M:%S", time.localtime(deadline))
                log(f"[sweep {study_name}] stopping before the deadline {until}: the next trial is expected to take "
                    f"{expected:.0f} s; {len(todo)} grid point(s) left (the same command resumes)")
                break
        if todo:
            if not any(status[k].get("WAITING") for k in todo):  # no re-queued trial first: the next grid point
                params = next(p for p in traversal_order(definition) if point_key(p) in todo)
                study.enqueue_trial(params)
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
            ran += 1
            waiting_logged = False
        elif running:
            if not waiting_logged:
                log(f"[sweep {study_name}] waiting for {len(running)} trial(s) running elsewhere "
                    f"(a dead worker's trial is re-queued {storage.grace_period} s after its last heartbeat)")
                waiting_logged = True
            time.sleep(poll_s)
        else:
            break
    gave_up = [k for k, s in grid_status(study, definition).items()
               if not s.get("COMPLETE") and s.get("FAIL") and not (s.get("RUNNING") or s.get("WAITING"))]
    if gave_up and (max_trials is None or ran < max_trials):
        log(f"[sweep {study_name}] {len(gave_up)} grid point(s) failed {max_retries + 1} times and were given up: "
            + "; ".join(gave_up) + f" (logs under {definition['out']}/{study_name})")
    return ran


def spawn_workers(count: int, storage_url: str, study_name: str, heartbeat_s: int, grace_s: int | None,
                  max_retries: int, devices: Sequence[str] = (), until: str | None = None,
                  trial_estimate_s: float | None = None) -> list[int]:
    """Start ``count`` worker processes on the study and wait for them; returns their exit codes."""
    processes = []
    for index in range(count):
        command = [sys.executable, "-m", "dimo_lightning.commands.sweep", "worker", "--storage", storage_url,
                   "--study", study_name, "--heartbeat-s", str(heartbeat_s), "--max-retries", str(max_retries)]
        if grace_s is not None:
            command += ["--grace-s", str(grace_s)]
        if until is not None:
            command += ["--until", until]
        if trial_estimate_s is not None:
            command += ["--trial-estimate-s", str(trial_estimate_s)]
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
        processes.append(subprocess.Popen(command, env=env))
    try:
        return [p.wait() for p in processes]
    except BaseException:
        for p in processes:
            p.send_signal(signal.SIGINT)  # let each worker mark its trial and stop its run
        for p in processes:
            p.wait()
        raise


# ---- summary --------------------------------------------------------------------------------------------------------
def is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def short_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def summary_rows(study, definition: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial (in grid order): number, state, params, the run's seed, metrics (NaN where missing), log
    directory."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {"trial": trial.number, "state": trial.state.name}
        row.update({key: trial.params.get(key) for key in definition["grid"]})
        row["run_seed"] = trial.user_attrs.get("seed")
        row.update({m: trial.user_attrs.get(m, math.nan) for m in METRICS})
        row["consistency_kl"] = {k.removeprefix("consistency_kl/"): v for k, v in trial.user_attrs.items()
                                 if k.startswith("consistency_kl/")}
        row["generator_step"] = trial.user_attrs.get("generator_step")
        row["log_dir"] = trial.user_attrs.get("log_dir", "")
        rows.append(row)
    grid = definition["grid"]

    def position(key: str, value: Any) -> float:  # numbers by value; other values in the order the grid lists them
        if value not in grid[key]:
            return math.inf
        return float(value) if is_numeric(grid[key]) else float(grid[key].index(value))

    def grid_order(row: dict[str, Any]) -> tuple[float, ...]:
        return (*(position(k, row[k]) for k in grid), row["trial"])

    return sorted(rows, key=grid_order)


def format_summary(rows: list[dict[str, Any]], definition: dict[str, Any]) -> str:
    """A Markdown table of every trial: its grid point, the seed the run used (``run seed``), the student's
    metrics; the second distance's FID and recall (``FID 2``, ``recall 2``) when a trial has them; ``KL <band>``
    columns (the last consistency diagnostic) if logged."""
    keys = list(definition["grid"])
    bands = sorted({b for r in rows for b in r.get("consistency_kl", {})}, key=band_order)
    second = any(not math.isnan(r.get("fid2", math.nan)) for r in rows)
    header = ["trial", *map(short_name, keys), "run seed", "FID", "recall", "precision", "accuracy", "KID",
              *(("FID 2", "recall 2") if second else ()), *(f"KL {b}" for b in bands), "state"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]

    def number(value: Any, digits: int) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    for r in rows:
        cells = [str(r["trial"]), *(str(r[k]) for k in keys), "-" if r.get("run_seed") is None else str(r["run_seed"]),
                 number(r["fid"], 3), number(r["recall"], 3), number(r["precision"], 3), number(r["accuracy"], 3),
                 number(r["kid"], 4), *((number(r["fid2"], 3), number(r["recall2"], 3)) if second else ()),
                 *(number(r.get("consistency_kl", {}).get(b), 4) for b in bands), r["state"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_series(rows: list[dict[str, Any]], definition: dict[str, Any], metric: str):
    """``{series label: [(x, mean, low, high), ...]}`` of COMPLETE trials for one metric.

    x is the first grid key not in ``average_over``; the remaining non-averaged keys make the series; the keys of
    ``average_over`` (seeds) are averaged, with their min and max as the error bar.
    """
    averaged = set(definition["average_over"])
    free = [k for k in definition["grid"] if k not in averaged]
    if not free:
        raise ValueError("every grid key is in average_over: nothing to plot against")
    x_key, series_keys = free[0], free[1:]
    groups: dict[str, dict[Any, list[float]]] = {}
    for r in rows:
        if r["state"] != "COMPLETE" or math.isnan(r[metric]):
            continue
        label = ", ".join(f"{short_name(k)}={r[k]}" for k in series_keys)
        groups.setdefault(label, {}).setdefault(r[x_key], []).append(r[metric])
    values = definition["grid"][x_key]
    if is_numeric(values):
        order = {v: v for v in values}  # a numeric axis: the line goes left to right whatever the run order
    else:
        order = {v: i for i, v in enumerate(values)}
    return {
        label: [(x, sum(v) / len(v), min(v), max(v)) for x, v in sorted(points.items(), key=lambda p: order[p[0]])]
        for label, points in groups.items()
    }


def plot_note(rows: list[dict[str, Any]], definition: dict[str, Any], metric: str) -> str:
    """What a plot's points are, for its title: the runs each point averages and the trials' generator steps."""
    averaged = [k for k in definition["grid"] if k in definition["average_over"]]
    done = [r for r in rows if r["state"] == "COMPLETE" and not math.isnan(r[metric])]
    per_point = Counter(tuple(r[k] for k in definition["grid"] if k not in averaged) for r in done)
    low, high = min(per_point.values()), max(per_point.values())
    runs = str(low) if low == high else f"{low}-{high}"
    note = (f"mean and min-max over {', '.join(map(short_name, averaged))}: {runs} run(s) per point" if averaged
            else f"{runs} run per point")
    steps = sorted({r["generator_step"] for r in done if r.get("generator_step") is not None})
    if steps:
        note += f"; {'/'.join(map(str, steps))} generator steps"
    return note


def write_plots(rows: list[dict[str, Any]], definition: dict[str, Any], study_name: str, directory: Path) -> list[Path]:
    """One PNG per metric against the swept value (numeric x axis when every value is a number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    averaged = set(definition["average_over"])
    x_key = next(k for k in definition["grid"] if k not in averaged)
    values = definition["grid"][x_key]
    numeric = is_numeric(values)
    paths = []
    for metric in PLOTTED_METRICS:
        series = plot_series(rows, definition, metric)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        for label, points in series.items():
            xs = [p[0] if numeric else values.index(p[0]) for p in points]
            means = [p[1] for p in points]
            errors = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            # Categories (aux modes, bands) are not a continuum: markers only, no line between them.
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=label or None,
                        linestyle="-" if numeric else "none")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(short_name(x_key))
        ax.set_ylabel(metric)
        ax.set_title(f"{study_name}: {metric}\n({plot_note(rows, definition, metric)})", fontsize=9)
        ax.grid(alpha=0.3)
        if any(series):  # labels exist only when a second swept key splits the points into series
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{study_name}_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(storage, study_name: str, plot_dir: str | Path | None = None, log=print) -> list[Path]:
    """Print the table of every trial, write it to ``STUDY_summary.md`` and write the plots; returns the PNG paths."""
    study, definition = load_study(storage, study_name)
    rows = summary_rows(study, definition)
    log(format_summary(rows, definition))
    directory = Path(plot_dir) if plot_dir is not None else Path(definition["out"]) / study_name
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / f"{study_name}_summary.md"
    table.write_text(format_summary(rows, definition) + "\n")
    log(f"table: {table}")
    paths = write_plots(rows, definition, study_name, directory)
    if paths:
        log("plots: " + ", ".join(str(p) for p in paths))
    else:
        log("no COMPLETE trial yet: no plots")
    return paths


# ---- command line ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimo sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)

    def storage_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: sqlite:///OUT/sweeps.db)")
        p.add_argument("--study", help="study name")
        p.add_argument("--heartbeat-s", type=int, default=60, help="heartbeat interval of running trials (s)")
        p.add_argument("--grace-s", type=int, default=None,
                       help="a RUNNING trial without a heartbeat for this long is failed and re-queued "
                            "(default: 3 x heartbeat)")
        p.add_argument("--max-retries", type=int, default=None, help="re-runs of a failed grid point (default 2)")
        p.add_argument("--until", default=None,
                       help="start a trial only if it is expected to end by then: HH:MM[:SS] today (local time; "
                            "across midnight give an ISO date-time such as 2026-03-05T01:00) (expected: the study's "
                            "longest finished trial, else --trial-estimate-s)")
        p.add_argument("--trial-estimate-s", type=float, default=None,
                       help="expected seconds of a trial before any has finished (for --until)")

    run = sub.add_parser("run", help="create (or resume) a sweep and run its trials")
    run.add_argument("spec", nargs="?", help="sweep spec YAML (a `sweep:` section)")
    run.add_argument("--config", action="append", default=[], help="`dimo fit` config (repeatable)")
    run.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable: product)")
    run.add_argument("--set", action="append", default=[], dest="fixed",
                     help="a fixed override of every trial, KEY=VALUE (repeatable)")
    run.add_argument("--workers", type=int, default=None, help="worker processes on this machine (default 1)")
    run.add_argument("--devices", default="", help="comma list of CUDA devices, one per worker (round robin)")
    run.add_argument("--out", default=None, help=f"root of the trial log directories (default {DEFAULT_OUT})")
    run.add_argument("--command", default=None,
                     help="trial launcher, default 'python -m dimo_lightning fit' (e.g. 'torchrun ... -m ...')")
    run.add_argument("--max-trials", type=int, default=None, help="stop after this many trials (single worker)")
    storage_args(run)

    worker = sub.add_parser("worker", help="join an existing sweep (e.g. from another machine) and run trials")
    storage_args(worker)
    worker.add_argument("--max-trials", type=int, default=None)

    summary = sub.add_parser("summary", help="print the table of a sweep, write it (Markdown) and one PNG per metric")
    summary.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///runs/sweeps/sweeps.db)")
    summary.add_argument("--study", required=True)
    summary.add_argument("--plots", default=None, help="folder of the table and the PNGs (default: OUT/STUDY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dimo sweep`` (``run``, ``worker``, ``summary``)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"dimo sweep: error: {err}\n")
        return 2


def deadline_args(args: argparse.Namespace) -> dict[str, Any]:
    """``work()``'s deadline keywords from ``--until`` and ``--trial-estimate-s``."""
    if args.trial_estimate_s is not None and args.trial_estimate_s < 0:
        raise ValueError(f"--trial-estimate-s must be >= 0, got {args.trial_estimate_s}")
    deadline = parse_deadline(args.until) if args.until else None
    return {"deadline": deadline, "trial_estimate_s": args.trial_estimate_s}


def _dispatch(args: argparse.Namespace) -> int:
    if args.action == "summary":
        storage = make_storage(args.storage or default_storage(DEFAULT_OUT))
        summarize(storage, args.study, args.plots)
        return 0
    spec: dict[str, Any] = load_spec(args.spec) if getattr(args, "spec", None) else {}
    max_retries = args.max_retries if args.max_retries is not None else int(spec.get("max_retries", 2))
    if args.action == "worker":
        if not args.study:
            raise ValueError("--study is required")
        storage = make_storage(args.storage or default_storage(DEFAULT_OUT), args.heartbeat_s, args.grace_s,
                               max_retries)
        work(storage, args.study, max_retries, args.max_trials, **deadline_args(args))
        return 0
    study_name = args.study or spec.get("study")
    if not study_name:
        raise ValueError("--study is required (or `study:` in the spec)")
    grid = dict(spec.get("grid") or {})
    for text in args.grid:
        key, values = parse_grid_flag(text)
        grid[key] = values
    fixed = list(spec.get("args") or [])
    for text in args.fixed:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
        fixed.append(f"--{key.removeprefix('--')}={value}")
    out = args.out or spec.get("out") or DEFAULT_OUT
    command = shlex.split(args.command) if args.command else spec.get("command", DEFAULT_COMMAND)
    definition = build_definition(spec.get("configs", []) + args.config, fixed, grid, spec.get("average_over", []),
                                  spec.get("env"), out, command)
    storage_url = args.storage or spec.get("storage") or default_storage(out)
    storage = make_storage(storage_url, args.heartbeat_s, args.grace_s, max_retries)
    study = create_or_load_study(storage, study_name, definition)
    workers = args.workers if args.workers is not None else int(spec.get("workers", 1))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    deadline = deadline_args(args)  # a bad --until fails here, before any worker starts
    points = len(grid_points(definition))
    print(f"[sweep {study_name}] {points} grid point(s), {workers} worker(s), storage {storage_url}, "
          f"runs under {definition['out']}/{study_name}")
    del study
    if workers == 1:
        work(storage, study_name, max_retries, args.max_trials, **deadline)
    else:
        devices = [d for d in args.devices.split(",") if d]
        codes = spawn_workers(workers, storage_url, study_name, args.heartbeat_s, args.grace_s, max_retries, devices,
                              args.until, args.trial_estimate_s)
        if any(codes):
            raise ValueError(f"worker exit codes {codes}")
    summarize(storage, study_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
