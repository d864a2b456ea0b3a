"""``dimo bench``: where the time of Di[M]O sampling and training goes, and what each speed lever buys.

    dimo bench --config configs/mnist/dimo.yaml [--trainer.accelerator=gpu --trainer.precision=bf16-mixed]
               [--output bench.json] [--repeats 10] [--warmup 3] [--rounds 4] [--skip-levers compile,...]

Everything is measured in one process, with warm-up and medians over repeats, on two clocks (wall time after a CUDA
synchronize, and the process's CPU time; see "timing" below), so the ratios compare like with like:

* sampling: images/s of the one-step student and of the teacher's MaskGIT decoder at 1, 8 and 16 steps with its
  CFG, and the student / teacher@16 ratio against the ideal (2 x steps network passes with CFG, 32x at 16 steps);
* training: the time of one Di[M]O iteration, i.e. the module's real ``training_step`` inside a real Lightning
  ``Trainer.fit`` loop (its logging, optimizer wrappers, precision plugin and data loader included; only the
  config's callbacks are left out), divided by the sum of its necessary passes timed alone on the same batch
  (student fwd+bwd, teacher CFG fwd on 2B, aux fwd, aux fwd+bwd, the two Adam steps): the overhead factor. Each
  timed iteration is followed by one timed run of every pass, so both see the same machine load;
* peak memory: CPU max RSS of the process, or CUDA max allocated during the iterations (and, on CUDA, the number of
  host syncs in one iteration);
* levers: each speed lever switched off and on: iteration time from interleaved training runs, or, for levers that
  act on one pass, that pass in alternating calls.

The model and data come from the config through the same ``DiMOCLI`` parser as ``dimo fit``, so any config and any
``--model.*`` / ``--data.*`` / ``--trainer.*`` flag works. The bench runs on one device (``devices`` is forced to 1):
per-device throughput is what it measures; multi-device scaling is out of its scope.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from dimo_lightning.commands.cli import DiMOCLI
from dimo_lightning.core.losses import aux_loss, generator_loss
from dimo_lightning.inference.one_step import StudentInput, TokenSampling, remask_sample, student_logits, student_sample
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.training.module import DiMOModule
from dimo_lightning.training.settings import group_fields

SCHEMA_VERSION = 1
TEACHER_STEPS = (1, 8, 16)
LEVERS = ("output_head", "aux_sample", "batched_cfg", "teacher_inference_mode", "teacher_precision", "host_syncs",
          "compile", "bf16_mixed", "tf32", "fused_adam")
TARGETS = {"ratio_of_ideal_min": 0.90, "overhead_factor_max": 1.15, "aux_reuse_speedup_min": 0.08}


# ---- timing ---------------------------------------------------------------------------------------------------------
# Every timing is a pair of medians: wall-clock seconds (time.perf_counter, after a device synchronize) and process
# CPU seconds (time.process_time). On a dedicated machine they agree for CPU work; on a shared CPU the wall clock
# also counts the time other processes held the cores, while the CPU clock counts only this process's work, so
# ratios from the CPU clock are the trustworthy ones there. On CUDA the CPU clock is meaningless (asynchronous
# kernels) and the wall clock is the headline.
Timing = dict[str, float]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _medians(samples: list[tuple[float, float]]) -> Timing:
    return {"wall": statistics.median(w for w, _ in samples), "cpu": statistics.median(c for _, c in samples)}


def memory_counters() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far. Fresh pages that the allocator maps for
    tensors are faulted in (and zeroed by the kernel) on first touch: work that shows as system time, not in the
    operator profile, and that can differ between a small and a large batch."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


class IterationTimer(Callback):
    """Times each training batch (``training_step`` plus Lightning's per-batch hooks), stops after
    ``warmup + repeats`` batches, and then runs ``after`` (sampling) while the model is still on its device under
    the trainer's precision. ``between(trainer, pl_module, record)`` runs after each batch's end timestamp (the pass
    timings: interleaved with the iterations, so both see the same machine load)."""

    def __init__(self, warmup: int, repeats: int, after: Callable[[pl.Trainer, pl.LightningModule], None] | None,
                 track_cuda_memory: bool, between: Callable[..., None] | None = None) -> None:
        self.warmup, self.repeats, self.after, self.between = warmup, repeats, after, between
        self.track_cuda_memory = track_cuda_memory
        self.starts: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []
        self.memory: list[tuple[int, float]] = []  # (page faults, system seconds) of each batch
        self._memory_start = (0, 0.0)
        self.cuda_peak_bytes: int | None = None
        # On CUDA, one extra untimed batch runs under torch.cuda's sync debug mode to count the host syncs.
        self.host_syncs: int | None = None
        self._sync_catcher: warnings.catch_warnings | None = None
        self._sync_records: list | None = None

    def _counting(self, pl_module) -> bool:
        return self.track_cuda_memory and pl_module.device.type == "cuda"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronizer(pl_module.device)()
        if len(self.starts) == self.warmup and self._counting(pl_module):
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if len(self.starts) == self.warmup + self.repeats and self._counting(pl_module):
            self._sync_catcher = warnings.catch_warnings(record=True)
            self._sync_records = self._sync_catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._memory_start = memory_counters()
        self.starts.append((time.perf_counter(), time.process_time()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronizer(pl_module.device)()
        self.ends.append((time.perf_counter(), time.process_time()))
        faults, system = memory_counters()
        self.memory.append((faults - self._memory_start[0], system - self._memory_start[1]))
        if self._sync_catcher is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._sync_catcher.__exit__(None, None, None)
            self.host_syncs = sum("synchroniz" in str(w.message) for w in self._sync_records)
            self._sync_catcher = None
        if self.between is not None and len(self.ends) <= self.warmup + self.repeats:
            self.between(trainer, pl_module, len(self.ends) > self.warmup)
        if len(self.ends) >= self.warmup + self.repeats + (1 if self._counting(pl_module) else 0):
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.track_cuda_memory and pl_module.device.type == "cuda":
            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(pl_module.device))
        if self.after is not None:
            self.after(trainer, pl_module)

    def first_step_wall_seconds(self) -> float:
        return self.ends[0][0] - self.starts[0][0]

    def samples(self) -> list[tuple[float, float]]:
        """(wall, cpu) seconds of each batch after warm-up."""
        timed = list(zip(self.starts, self.ends))[self.warmup : self.warmup + self.repeats]
        return [(e[0] - s[0], e[1] - s[1]) for s, e in timed]

    def step_times(self) -> Timing:
        """Median time of one batch after warm-up."""
        return _medians(self.samples())

    def memory_medians(self) -> dict[str, float]:
        """Median minor page faults and system CPU seconds of one batch after warm-up."""
        timed = self.memory[self.warmup : self.warmup + self.repeats]
        return {"page_faults": statistics.median(f for f, _ in timed),
                "system_cpu_s": statistics.median(t for _, t in timed)}


# ---- building from the config ---------------------------------------------------------------------------------------
class BenchSetup:
    """Builds the model and data from the config (plus overrides) and runs a short, real ``Trainer.fit``."""

    def __init__(self, cli_args: list[str], warmup: int, repeats: int) -> None:
        self.cli_args = cli_args
        self.warmup, self.repeats = warmup, repeats

    def build(self, overrides: list[str] = ()) -> tuple[pl.LightningModule, pl.LightningDataModule, Any]:

        # The bench drives its own iterations: never let the module's step limit end the fit first.
        args = [*self.cli_args, "--model.init_args.optim.max_generator_steps=1000000000", *overrides]
        cli = DiMOCLI(args=args, run=False, save_config_callback=None)
        if not isinstance(cli.model, DiMOModule):
            raise SystemExit(f"dimo bench: the config's model is {type(cli.model).__name__}, not a DiMOModule")
        return cli.model, cli.datamodule, cli.config.trainer

    def fit(
        self,
        overrides: list[str] = (),
        after: Callable[[pl.Trainer, pl.LightningModule], None] | None = None,
        between: Callable[..., None] | None = None,
        precision: str | None = None,
        repeats: int | None = None,
        track_cuda_memory: bool = False,
    ) -> IterationTimer:
        model, datamodule, trainer_config = self.build(overrides)
        timer = IterationTimer(self.warmup, self.repeats if repeats is None else repeats, after, track_cuda_memory,
                               between)
        trainer = pl.Trainer(
            accelerator=trainer_config.accelerator,
            devices=1,
            precision=precision or trainer_config.precision,
            max_epochs=-1,
            logger=False,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=datamodule)
        return timer


# ---- pass timings and sampling (run on the fitted model, on its device) ----------------------------------------------
def first_condition_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    batch = next(iter(trainer.train_dataloader))  # a ConditionBatch (dimo_lightning.data.batch)
    cond = pl_module.teacher.encode_condition(batch.conditions)
    return cond.to(pl_module.device) if isinstance(cond, torch.Tensor) else cond


class PassBench:
    """The necessary passes of one iteration, each timed alone on one batch of the run's conditions, one sample per
    call of :meth:`sample_once` (called between training batches, so passes and iterations alternate in time).

    The networks run in the modes of the training step (student/aux: ``train_dropout``; teacher: eval) under the
    trainer's precision context. It also times, alternating with their baselines, the levers that act on one pass:
    two CFG passes of B vs one of 2B, the teacher under ``torch.inference_mode`` (and in fp32 when the trainer's
    precision is not), and the student with the full output head.
    """

    def __init__(self, trainer: pl.Trainer, pl_module) -> None:
        s = pl_module.settings
        teacher = pl_module.teacher
        self.sync = synchronizer(pl_module.device)
        cond = first_condition_batch(trainer, pl_module)
        generator = torch.Generator(device=pl_module.device).manual_seed(0)
        opt_g, opt_a = trainer.optimizers[:2]
        self.optimizers = (opt_g, opt_a)
        context = trainer.precision_plugin.train_step_context
        student_input = StudentInput(sum(s.student.r_init_range) / 2, pl_module.current_sigma(),
                                     pl_module.emb_noise_scale)
        device = pl_module.device
        student = pl_module.student
        with torch.no_grad(), context():
            sampling = TokenSampling(s.student.temperature, exclude=(teacher.mask_id,))
            x, z = student_sample(teacher, student, cond, student_input, sampling, generator, device)
            x_t, mask, _ = remask_sample(teacher, x, cond, s.targets.mask_schedule, generator)
            grad = torch.randn_like(z, dtype=torch.float32) * 1e-3
        self.batch_size = int(x.shape[0])

        def student_fwd_bwd():
            with context():
                logits = student_logits(teacher, student, cond, student_input, generator, device)
                loss = generator_loss(logits, grad, mask)
            loss.backward()

        def student_fwd():
            with torch.no_grad(), context():
                student_logits(teacher, student, cond, student_input, generator, device)

        def with_full_head(fn):
            def run():
                previous = getattr(student, "full_head", None)
                if previous is None:
                    return fn()
                student.full_head = not previous
                try:
                    fn()
                finally:
                    student.full_head = previous
            return run

        def teacher_cfg(mode=torch.no_grad, ctx=context):
            def run():
                with mode(), ctx():
                    teacher.guided_logits(teacher.network, x_t, cond, s.targets.cfg_scale)
            return run

        def teacher_two_passes():
            drop = torch.ones(x_t.shape[0], dtype=torch.bool, device=x_t.device)
            with torch.no_grad(), context():
                conditional = teacher.apply_network(teacher.network, x_t, cond)
                unconditional = teacher.apply_network(teacher.network, x_t, cond, drop)
                unconditional + s.targets.cfg_scale * (conditional - unconditional)

        def aux_fwd():
            with torch.no_grad(), context():
                teacher.apply_network(pl_module.aux, x_t, cond)

        def aux_fwd_bwd():
            with context():
                logits = teacher.apply_network(pl_module.aux, x_t, cond)
                loss = aux_loss(logits, x, mask, s.aux.label_smoothing)
            loss.backward()

        def adam_steps():  # uses the gradients the timed backward passes left (weights change; timings do not)
            opt_g.step()
            opt_a.step()

        self.passes: dict[str, Callable[[], None]] = {
            "student_fwd_bwd": student_fwd_bwd,
            "teacher_cfg_fwd_2b": teacher_cfg(),
            "aux_fwd": aux_fwd,
            "aux_fwd_bwd": aux_fwd_bwd,
            "adam_steps": adam_steps,
        }
        if s.aux.sample == "fresh":
            self.passes["student_fwd_fresh_aux_sample"] = student_fwd
        flipped = "full" if not getattr(student, "full_head", True) else "lean"
        self.extra: dict[str, Callable[[], None]] = {
            "teacher_cfg_two_passes_b": teacher_two_passes,
            "teacher_cfg_fwd_2b_inference_mode": teacher_cfg(torch.inference_mode),
            "student_fwd": student_fwd,
            f"student_fwd_{flipped}_head": with_full_head(student_fwd),
            f"student_fwd_bwd_{flipped}_head": with_full_head(student_fwd_bwd),
        }
        if str(trainer.precision) not in ("32-true", "32", "64-true"):
            self.extra["teacher_cfg_fwd_2b_fp32"] = teacher_cfg(ctx=contextlib.nullcontext)
        self.samples: dict[str, list[tuple[float, float]]] = {k: [] for k in [*self.passes, *self.extra]}

    def sample_once(self, record: bool = True) -> None:
        """Run every pass once (timed when ``record``), then drop the gradients the backward passes left."""
        for name, fn in [*self.passes.items(), *self.extra.items()]:
            self.sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            self.sync()
            if record:
                self.samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def results(self) -> dict[str, Any]:
        medians = {name: _medians(samples) for name, samples in self.samples.items()}
        return {"passes": {k: medians[k] for k in self.passes}, "extra": {k: medians[k] for k in self.extra},
                "batch_size": self.batch_size}


def time_sampling(trainer: pl.Trainer, pl_module, warmup: int, repeats: int,
                  teacher_steps=TEACHER_STEPS) -> dict[str, Any]:
    """Images per second (wall and CPU clock; codes only, no pixel decoding) of the one-step student and of the
    teacher's MaskGIT decoder at ``teacher_steps`` with its CFG, under ``torch.inference_mode``.

    Both samplers run as configured: the student through its one-step pipeline (the module's sampling defaults, as
    ``generate``), the teacher with the module's ``sampling.teacher`` (choice temperature, schedule, CFG ramp; what
    the evaluation report and ``dimo predict`` decode with), at each step count. The samplers take turns in each
    round, so a change of machine load hits all of them alike; and each timed student sample is a block of
    ``max(teacher_steps)`` calls (its per-call mean), so that it spans a comparable stretch of time to a teacher
    sample: one call of a few milliseconds would otherwise see the load of that instant only, while a teacher decode
    averages over seconds.
    The longest teacher decode is also timed with the other CFG form (two passes of B instead of one of 2B, or the
    reverse; ``sampling.teacher.cfg_batched``), so the ratio can be read against the faster form as well.
    """
    settings = pl_module.settings
    sync = synchronizer(pl_module.device)
    cond = first_condition_batch(trainer, pl_module)
    b = pl_module.teacher.condition_batch_size(cond)
    context = trainer.precision_plugin.forward_context
    generator = torch.Generator(device=pl_module.device).manual_seed(0)
    student_block = max(teacher_steps)
    pipeline = OneStepPipeline.from_teacher(pl_module.teacher, pl_module.student, pl_module.sampling_defaults(),
                                            pl_module.device)

    def student():
        with torch.inference_mode(), context():
            for _ in range(student_block):
                pipeline.sample_codes(cond=cond, generator=generator)

    def teacher(steps):
        kwargs = settings.teacher_sample_kwargs(steps=steps)

        def run():
            with torch.inference_mode(), context():
                pl_module.teacher.sample(cond, generator=generator, **kwargs)
        return run

    samplers = {"student": student, **{str(steps): teacher(steps) for steps in teacher_steps}}
    longest = max(teacher_steps)
    flipped_cfg_batched = not settings.sampling.teacher.cfg_batched
    if settings.targets.cfg_scale != 1.0:
        flipped = {**settings.teacher_sample_kwargs(steps=longest),
                   "cfg_batched": flipped_cfg_batched}

        def teacher_other_cfg_form():
            with torch.inference_mode(), context():
                pl_module.teacher.sample(cond, generator=generator, **flipped)

        samplers["other_cfg_form"] = teacher_other_cfg_form
    calls = {"student": student_block}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in samplers}
    faults: dict[str, list[float]] = {name: [] for name in samplers}
    for round_index in range(1 + max(3, repeats // 2)):  # one warm-up round
        for name, fn in samplers.items():
            sync()
            faults_before = memory_counters()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if round_index:
                per_call = calls.get(name, 1)
                samples[name].append(((time.perf_counter() - wall) / per_call, (time.process_time() - cpu) / per_call))
                faults[name].append((memory_counters()[0] - faults_before) / per_call)

    def rate(name: str) -> Timing:
        return {clock: b / seconds for clock, seconds in _medians(samples[name]).items()}

    other_form = None
    if "other_cfg_form" in samplers:
        other_form = {"steps": longest, "cfg_batched": flipped_cfg_batched, "images_per_s": rate("other_cfg_form")}
    return {"batch_size": b, "student_images_per_s": rate("student"),
            "teacher_images_per_s": {str(steps): rate(str(steps)) for steps in teacher_steps},
            "teacher_other_cfg_form": other_form,
            "student_calls_per_sample": student_block,
            "page_faults_per_call": {name: statistics.median(values) for name, values in faults.items()},
            "teacher_sampling": settings.teacher_sample_kwargs()}


# ---- the bench ------------------------------------------------------------------------------------------------------
def peak_cpu_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _gain(off: float | None, on: float | None, lower_is_better: bool) -> float | None:
    if off is None or on is None or off <= 0 or on <= 0:
        return None
    return (off - on) / off if lower_is_better else (on - off) / off


def lever_row(name: str, setting_off: str, setting_on: str, off: Timing | None, on: Timing | None, unit: str,
              clock: str, status: str = "measured", note: str = "", lower_is_better: bool = True) -> dict[str, Any]:
    """One lever: its two settings, the measured values on both clocks, and ``gain``: the fraction of time saved
    (or of rate won) on the headline ``clock``."""
    gains = {c: _gain(off[c], on[c], lower_is_better) for c in ("wall", "cpu")} if off and on else {}
    return {"lever": name, "off": setting_off, "on": setting_on, "value_off": off, "value_on": on, "unit": unit,
            "gain": gains.get(clock), "gain_by_clock": gains, "status": status, "note": note}


def run_bench(cli_args: list[str], warmup: int = 3, repeats: int = 10, skip_levers: tuple[str, ...] = (),
              teacher_steps: tuple[int, ...] = TEACHER_STEPS, rounds: int = 4,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement for the config given by ``cli_args`` -> the bench record (see the module docstring).

    Lever settings that need their own training run are measured in ``rounds`` interleaved rounds (off, on, off,
    on, ...) whose iterations are pooled, so a load change on a shared machine hits both settings alike. The
    default is 4 short rounds: on the shared 2-core machine the iteration time drifted by ~10% between fits a minute
    apart, which 2 rounds of 5 iterations did not average out (the aux_sample gain, one student forward of ~9%,
    read 11.6% in one run and 6.2% in the next).
    """
    unknown = [lever for lever in skip_levers if lever not in LEVERS]
    if unknown:
        raise ValueError(f"--skip-levers: unknown lever(s) {unknown}; choose from {', '.join(LEVERS)}")
    setup = BenchSetup(cli_args, warmup, repeats)
    found: dict[str, Any] = {}

    pass_bench: list[PassBench] = []

    def time_passes_between(trainer, pl_module, record):
        if not pass_bench:
            pass_bench.append(PassBench(trainer, pl_module))
        pass_bench[0].sample_once(record)

    def measure_base(trainer, pl_module):
        found.update(pass_bench[0].results())
        log("timing sampling ...")
        found["sampling"] = time_sampling(trainer, pl_module, warmup, repeats, teacher_steps)
        found["device"] = str(pl_module.device)
        found["precision"] = str(trainer.precision)
        fields = group_fields(pl_module.hparams)
        found["hparams"] = {k: fields[k] for k in ("aux.sample", "aux.rounds", "targets.cfg_scale",
                                                   "run.full_output_head", "run.compile_networks",
                                                   "optim.train_dropout") if k in fields}

    log("training iterations (the config as given), each followed by the passes alone ...")
    base = setup.fit(after=measure_base, between=time_passes_between, track_cuda_memory=True)
    on_cuda = found["device"].startswith("cuda")
    clock = "wall" if on_cuda else "cpu"
    memory = ({"kind": "cuda_max_allocated", "bytes": base.cuda_peak_bytes} if on_cuda
              else {"kind": "cpu_max_rss", "bytes": peak_cpu_rss_bytes()})

    hp = found["hparams"]
    passes = found["passes"]
    gen_share = 1.0 / hp.get("aux.rounds", 1)  # generator passes run on every aux.rounds-th iteration
    weights = {"student_fwd_bwd": gen_share, "teacher_cfg_fwd_2b": gen_share, "aux_fwd": gen_share,
               "aux_fwd_bwd": 1.0, "adam_steps": 1.0, "student_fwd_fresh_aux_sample": 1.0}
    clocks = ("wall", "cpu")
    passes_sum = {c: sum(t[c] * weights[k] for k, t in passes.items()) for c in clocks}
    nets_only = {c: passes_sum[c] - passes["adam_steps"][c] for c in clocks}
    iteration = base.step_times()
    overhead = {c: iteration[c] / passes_sum[c] for c in clocks}
    split = {c: {k: t[c] * weights[k] / iteration[c] for k, t in passes.items()} for c in clocks}
    for c in clocks:
        split[c]["other"] = 1.0 - passes_sum[c] / iteration[c]

    sampling = found["sampling"]
    cfg_on = hp.get("targets.cfg_scale", 1.0) != 1.0
    longest = str(max(teacher_steps))
    ideal = (2 if cfg_on else 1) * int(longest)
    ratio = {c: sampling["student_images_per_s"][c] / sampling["teacher_images_per_s"][longest][c] for c in clocks}
    sampling.update({"ratio_student_vs_teacher": ratio, "ratio_teacher_steps": int(longest), "ideal_ratio": ideal,
                     "ratio_of_ideal": {c: ratio[c] / ideal for c in clocks}})
    other_form = sampling.get("teacher_other_cfg_form")
    if other_form is not None:
        # Against whichever CFG form of the teacher decodes faster here: the ratio without a slow teacher in it.
        fastest = {c: max(sampling["teacher_images_per_s"][longest][c], other_form["images_per_s"][c]) for c in clocks}
        sampling["ratio_of_ideal_vs_fastest_teacher"] = {
            c: sampling["student_images_per_s"][c] / fastest[c] / ideal for c in clocks}

    levers: list[dict[str, Any]] = []
    extra = found["extra"]
    per_round = max(2, -(-repeats // rounds))

    def pair(off_overrides: list[str], on_overrides: list[str], **kwargs) -> tuple[Timing, Timing]:
        """Interleaved runs of the two settings -> pooled median iteration times (off, on)."""
        pooled: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for _ in range(rounds):
            for key, overrides in (("off", off_overrides), ("on", on_overrides)):
                timer = setup.fit(overrides, repeats=per_round, **kwargs.get(key, {}))
                pooled[key] += timer.samples()
        return _medians(pooled["off"]), _medians(pooled["on"])

    def row(name, off, on, value_off, value_on, unit, **kwargs):
        levers.append(lever_row(name, off, on, value_off, value_on, unit, clock, **kwargs))

    if "output_head" not in skip_levers:
        log("lever: output head (full vs returned-only) ...")
        full, lean = pair(["--model.init_args.run.full_output_head=true"],
                          ["--model.init_args.run.full_output_head=false"])
        row("output_head", "full (all N+1 positions x all ids)", "returned rows only", full, lean, "s/iteration")
        base_full = bool(hp.get("run.full_output_head"))
        for label, base_key in (("student fwd+bwd pass", "student_fwd_bwd"), ("student fwd pass", "student_fwd")):
            base_timing = passes.get(base_key) or extra[base_key]
            flipped = extra[f"{base_key}_{'lean' if base_full else 'full'}_head"]
            full_t, lean_t = (base_timing, flipped) if base_full else (flipped, base_timing)
            row(f"output_head ({label})", "full", "returned rows only", full_t, lean_t, "s/pass",
                note="alternating calls")
    if "aux_sample" not in skip_levers:
        log("lever: aux_sample (fresh vs reuse) ...")
        fresh, reuse = pair(["--model.init_args.aux.sample=fresh"], ["--model.init_args.aux.sample=reuse"])
        row("aux_sample", "fresh", "reuse", fresh, reuse, "s/iteration")
    if "batched_cfg" not in skip_levers:
        row("batched_cfg (teacher pass)", "2 passes of B", "1 pass of 2B", extra["teacher_cfg_two_passes_b"],
            passes["teacher_cfg_fwd_2b"], "s/pass")
    if "batched_cfg" not in skip_levers and other_form is not None:
        b_sampling = sampling["batch_size"]
        configured = {c: b_sampling / sampling["teacher_images_per_s"][longest][c] for c in clocks}
        other_seconds = {c: b_sampling / other_form["images_per_s"][c] for c in clocks}
        two_passes, one_pass = (configured, other_seconds) if other_form["cfg_batched"] else (other_seconds, configured)
        row(f"batched_cfg (teacher@{longest} sampling)", "2 passes of B", "1 pass of 2B", two_passes, one_pass,
            "s/decode", note="the decode as configured vs the other CFG form; alternating rounds")
    if "teacher_inference_mode" not in skip_levers:
        row("teacher_inference_mode (teacher CFG pass)", "torch.no_grad", "torch.inference_mode",
            passes["teacher_cfg_fwd_2b"], extra["teacher_cfg_fwd_2b_inference_mode"], "s/pass")
    if "teacher_precision" not in skip_levers:
        if "teacher_cfg_fwd_2b_fp32" not in extra:
            row("teacher_precision (teacher CFG pass)", "32-true", found["precision"], None, None, "s/pass",
                status="not applicable", note="the configured precision is full fp32: nothing to compare")
        else:
            row("teacher_precision (teacher CFG pass)", "32-true", found["precision"],
                extra["teacher_cfg_fwd_2b_fp32"], passes["teacher_cfg_fwd_2b"], "s/pass")
    if "host_syncs" not in skip_levers:
        counted = f"{base.host_syncs} host syncs in one iteration (torch.cuda sync debug mode); " if (
            base.host_syncs is not None) else "host syncs are counted on CUDA only; "
        row("host_syncs", "syncs in the step", "no syncs in the step", None, None, "s/iteration", status="pending",
            note=counted + "the training step reads one host value per optimizer step (the NaN/overflow skip "
                 "decision); run the bench on a GPU to count them")
    if "compile" not in skip_levers:
        log("lever: torch.compile of student, aux and teacher (compilation takes a while) ...")
        eager = setup.fit([])  # right before the compiled run: the two see about the same machine load
        start = time.perf_counter()
        compiled = setup.fit(["--model.init_args.run.compile_networks=[student, aux, teacher]"])
        total = time.perf_counter() - start
        row("compile", "eager", "torch.compile (student, aux, teacher)", eager.step_times(), compiled.step_times(),
            "s/iteration", note=f"first iteration {compiled.first_step_wall_seconds():.0f} s wall (compilation); "
                                f"whole compiled run {total:.0f} s wall")
    gpu_levers = [("bf16_mixed", "32-true", "bf16-mixed"), ("tf32", "fp32 matmul", "TF32 matmul"),
                  ("fused_adam", "foreach Adam", "fused Adam")]
    for name, off, on in gpu_levers:
        if name in skip_levers:
            continue
        if not on_cuda:
            row(name, off, on, None, None, "s/iteration", status="skipped", note="needs a CUDA device")
            continue
        log(f"lever: {name} ...")
        if name == "bf16_mixed":
            a, b = pair([], [], off={"precision": "32-true"}, on={"precision": "bf16-mixed"})
        elif name == "tf32":
            previous = torch.get_float32_matmul_precision()
            try:
                torch.set_float32_matmul_precision("highest")
                a = setup.fit(precision="32-true").step_times()
                torch.set_float32_matmul_precision("high")
                b = setup.fit(precision="32-true").step_times()
            finally:
                torch.set_float32_matmul_precision(previous)
        else:
            a, b = pair(["--model.init_args.optimizer_gen.init_args.fused=false",
                         "--model.init_args.optimizer_aux.init_args.fused=false"],
                        ["--model.init_args.optimizer_gen.init_args.fused=true",
                         "--model.init_args.optimizer_aux.init_args.fused=true"])
        row(name, off, on, a, b, "s/iteration")

    reuse_row = next((r for r in levers if r["lever"] == "aux_sample"), None)
    reuse_gain = reuse_row["gain"] if reuse_row else None

    def target(bound: float, value: float | None, at_least: bool, other: float | None) -> dict[str, Any]:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        return {"target": f"{'>=' if at_least else '<='} {bound}", "value": value, "met": met,
                "other_clock_value": other}

    other = "cpu" if clock == "wall" else "wall"
    return {
        "schema": SCHEMA_VERSION,
        "command": ["dimo", "bench", *cli_args],
        "environment": {
            "device": found["device"], "precision": found["precision"], "torch": torch.__version__,
            "lightning": pl.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if on_cuda else None, "warmup": warmup, "repeats": repeats,
            "lever_rounds": rounds, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "clock": clock,
        "settings": hp,
        "batch_size": found["batch_size"],
        "sampling": sampling,
        "training": {
            "measured_as": "median time of the module's training_step in a real Trainer.fit loop (per-batch hooks "
                           "included, the config's callbacks excluded), after warm-up; each iteration is followed by "
                           "the passes timed alone on the same device, precision and batch",
            "iteration_s": iteration,
            "passes_s": passes,
            "pass_weights": {k: weights[k] for k in passes},
            "passes_sum_s": passes_sum,
            "overhead_factor": overhead,
            "overhead_factor_networks_only": {c: iteration[c] / nets_only[c] for c in clocks},
            "memory_per_iteration": base.memory_medians(),
            "split": split,
        },
        "memory": memory,
        "host_syncs_per_iteration": base.host_syncs,
        "levers": levers,
        "targets": {
            "ratio_of_ideal": target(TARGETS["ratio_of_ideal_min"], sampling["ratio_of_ideal"][clock], True,
                                     sampling["ratio_of_ideal"][other]),
            "overhead_factor": target(TARGETS["overhead_factor_max"], overhead[clock], False, overhead[other]),
            "aux_reuse_speedup": target(TARGETS["aux_reuse_speedup_min"], reuse_gain, True,
                                        reuse_row["gain_by_clock"].get(other) if reuse_row else None),
        },
    }


# ---- printing -------------------------------------------------------------------------------------------------------
def _fmt(value: Timing | None, unit: str, clock: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("s/"):
        return f"{value[clock] * 1000:.1f} ms"
    return f"{value[clock]:.1f}"


def format_tables(record: dict[str, Any]) -> str:
    """Markdown tables of a bench record (what ``dimo bench`` prints and the README shows)."""
    env, s, t, clock = record["environment"], record["sampling"], record["training"], record["clock"]
    other = "cpu" if clock == "wall" else "wall"
    where = env["gpu"] or f"CPU, {env['cpu_threads']} thread(s)"
    lines = [f"device {env['device']} ({where}), precision {env['precision']}, batch {record['batch_size']}, "
             f"medians of {env['repeats']} after {env['warmup']} warm-up; headline clock: {clock} time "
             f"(other clock in brackets)", "",
             "| sampling | images/s |", "|---|---:|",
             f"| student, 1 pass | {s['student_images_per_s'][clock]:.0f} ({s['student_images_per_s'][other]:.0f}) |"]
    for steps, rate in s["teacher_images_per_s"].items():
        lines.append(f"| teacher, {steps} steps with CFG | {rate[clock]:.1f} ({rate[other]:.1f}) |")
    ratio = s["ratio_student_vs_teacher"]
    lines.append(f"| student / teacher@{s['ratio_teacher_steps']} | {ratio[clock]:.1f}x ({ratio[other]:.1f}x); "
                 f"ideal {s['ideal_ratio']}x: {100 * s['ratio_of_ideal'][clock]:.0f}% |")
    if s.get("ratio_of_ideal_vs_fastest_teacher"):
        other_form = s["teacher_other_cfg_form"]
        form = "1 pass of 2B" if other_form["cfg_batched"] else "2 passes of B"
        fastest = s["ratio_of_ideal_vs_fastest_teacher"]
        lines.append(f"| teacher, {other_form['steps']} steps, CFG as {form} | "
                     f"{other_form['images_per_s'][clock]:.1f} ({other_form['images_per_s'][other]:.1f}) |")
        lines.append(f"| student / the faster teacher@{other_form['steps']} | {100 * fastest[clock]:.0f}% of the ideal "
                     f"({100 * fastest[other]:.0f}%) |")
    lines += ["", "| training iteration | ms | share |", "|---|---:|---:|"]
    for name, timing in t["passes_s"].items():
        share = 100 * t["split"][clock][name]
        lines.append(f"| {name} (x{t['pass_weights'][name]:g}) | {timing[clock] * 1000:.1f} "
                     f"({timing[other] * 1000:.1f}) | {share:.0f}% |")
    rest = {c: (t["iteration_s"][c] - t["passes_sum_s"][c]) * 1000 for c in ("wall", "cpu")}
    lines.append(f"| other (sampling, masking, losses, clipping, logging, Lightning) | {rest[clock]:.1f} "
                 f"({rest[other]:.1f}) | {100 * t['split'][clock]['other']:.0f}% |")
    lines.append(f"| **iteration** | **{t['iteration_s'][clock] * 1000:.1f}** ({t['iteration_s'][other] * 1000:.1f}) "
                 f"| overhead factor **{t['overhead_factor'][clock]:.3f}** ({t['overhead_factor'][other]:.3f}) |")
    memory = record["memory"]
    lines.append(f"\npeak memory ({memory['kind']}): {memory['bytes'] / 2**20:.0f} MiB")
    per_iteration = t.get("memory_per_iteration")
    if per_iteration:
        lines.append(f"per iteration: {per_iteration['page_faults']:.0f} minor page faults, "
                     f"{per_iteration['system_cpu_s'] * 1000:.0f} ms system CPU time (fresh pages for tensors)")
    lines.append("")
    lines += ["| lever | off | on | off value | on value | gain | note |", "|---|---|---|---:|---:|---:|---|"]
    for row in record["levers"]:
        gain = f"{100 * row['gain']:+.1f}%" if row["gain"] is not None else row["status"]
        lines.append(f"| {row['lever']} | {row['off']} | {row['on']} | {_fmt(row['value_off'], row['unit'], clock)} "
                     f"| {_fmt(row['value_on'], row['unit'], clock)} | {gain} | {row['note']} |")
    lines += ["", f"| target ({clock} clock) | value | met | {other} clock |", "|---|---:|---|---:|"]
    for name, item in record["targets"].items():
        value = "-" if item["value"] is None else f"{item['value']:.3f}"
        second = "-" if item["other_clock_value"] is None else f"{item['other_clock_value']:.3f}"
        lines.append(f"| {name} {item['target']} | {value} | {item['met']} | {second} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``dimo bench``; every argument it does not know goes to the config parser."""
    parser = argparse.ArgumentParser(
        prog="dimo bench", description=__doc__.split("\n\n")[0],
        epilog="Other flags (--model.*, --data.*, --trainer.accelerator/precision) go to the config parser.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file (repeatable, as for fit)")
    parser.add_argument("--output", default="bench.json", help="where to write the JSON record (default bench.json)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per measurement")
    parser.add_argument("--skip-levers", default="", help=f"comma-separated levers to skip: {', '.join(LEVERS)}")
    parser.add_argument("--teacher-steps", default="1,8,16", help="teacher decoding steps to time (default 1,8,16)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved off/on rounds per lever run (default 4)")
    known, rest = parser.parse_known_args(argv)
    if known.repeats < 2:
        parser.error(f"--repeats must be >= 2 (medians), got {known.repeats}")
    if known.warmup < 1:
        parser.error(f"--warmup must be >= 1 (first calls pay for allocation and kernel choice), got {known.warmup}")
    try:
        steps = tuple(int(v) for v in known.teacher_steps.split(",") if v.strip())
    except ValueError:
        parser.error(f"--teacher-steps must be comma-separated integers, got {known.teacher_steps!r}")
    if not steps or min(steps) < 1:
        parser.error(f"--teacher-steps must list positive integers, got {known.teacher_steps!r}")
    skip = tuple(v.strip() for v in known.skip_levers.split(",") if v.strip())
    bad = [v for v in skip if v not in LEVERS]
    if bad:
        parser.error(f"--skip-levers: unknown lever(s) {bad}; choose from {', '.join(LEVERS)}")
    cli_args = [arg for config in known.config for arg in ("--config", config)] + rest
    # The bench builds the config through DiMOCLI(args=...) on purpose, while sys.argv holds `dimo bench ...`.
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    if known.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {known.rounds}")
    record = run_bench(cli_args, known.warmup, known.repeats, skip, steps, known.rounds,
                       log=lambda message: print(f"dimo bench: {message}", file=sys.stderr, flush=True))
    Path(known.output).parent.mkdir(parents=True, exist_ok=True)
    Path(known.output).write_text(json.dumps(record, indent=2) + "\n")
    print(format_tables(record))
    print(f"\nwrote {known.output}")
    return record


if __name__ == "__main__":
    main()
