"""EvaluationReport: the teacher-vs-student table at the end of fit and for ``dimo validate --ckpt_path``."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.core.run_directory import run_directory
from dimo_lightning.core.sharding import are_labels
from dimo_lightning.evaluation.callbacks.common import (
    check_accuracy_network,
    evaluation_conditions,
    load_accuracy_network,
    require_image_teacher,
    shared_extractor,
    shared_reference,
    student_pipeline,
)
from dimo_lightning.evaluation.report import (
    evaluation_row,
    format_summary,
    format_table,
    sharded_sample_features,
    summary_ratios,
    write_report,
)
from dimo_lightning.training.ema import evaluation_student


class EvaluationReport(Callback):
    """Scores the teacher at several step counts and the (EMA) student at one step; writes ``eval.json`` and
    ``eval.md`` into the run's log directory and prints the table.

    Every rank samples its share of every row and extracts its features; only features are gathered, every rank
    computes the metrics and rank zero writes the files (no rank waits on rank zero's sampling). The reference and
    the extractor are checked in ``setup`` (fit and validate), before any step.

    Args:
        num_samples: samples per row (conditions from the DataModule, else balanced labels; seeded).
        teacher_steps: step counts of the teacher rows.
        teacher_cfg_scale: override of the teacher's CFG at sampling (None: the module's ``sampling.teacher``).
        teacher_choice_temperature: override of the Gumbel temperature of the teacher's MaskGIT decoder (None: the
            module's ``sampling.teacher.choice_temperature``, the value ``dimo predict`` uses too).
        reference: a ``dimo stats`` file, or real images (``mnist-val``, ``mnist-all``, an ``.npz``, a folder).
        extractor: torch-fidelity feature extractor (``mnist-cnn``, ``inception-local``).
        weights_path: local weights file of the extractor (Inception).
        accuracy_network: class-accuracy network (``mnist-cnn``) or null.
        batch_size: sampling batch size per rank.
        seed: seed of the samples (same conditions and seed for every row).
        on_fit_end: run at the end of ``dimo fit``.
        second_extractor: a second feature space for FID / precision / recall, computed on the same images against
            the same reference (columns ``FID (name)``, ...; keys ``fid2``, ``precision2``, ``recall2`` in
            ``eval.json``): e.g. ``mnist-dae``, a denoising autoencoder's stroke statistics, not a classifier.
            None: off.
        second_weights_path: local weights file of the second extractor.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        teacher_steps: Sequence[int] = (1, 2, 4, 8, 16),
        teacher_cfg_scale: float | None = None,
        teacher_choice_temperature: float | None = None,
        reference: str = "mnist-val",
        extractor: str = "mnist-cnn",
        weights_path: str | None = None,
        accuracy_network: str | None = "mnist-cnn",
        batch_size: int = 250,
        seed: int = 0,
        on_fit_end: bool = True,
        second_extractor: str | None = None,
        second_weights_path: str | None = None,
    ) -> None:
        if num_samples < 4:
            raise ValueError(f"num_samples must be >= 4, got {num_samples}")
        check_accuracy_network(accuracy_network)
        self.num_samples = num_samples
        self.teacher_steps = list(teacher_steps)
        self.teacher_cfg_scale = teacher_cfg_scale
        self.teacher_choice_temperature = teacher_choice_temperature
        self.reference_spec = reference
        self.extractor_name = extractor
        self.weights_path = weights_path
        self.accuracy_network_name = accuracy_network
        self.batch_size = batch_size
        self.seed = seed
        self.run_on_fit_end = on_fit_end
        self.second_extractor_name = second_extractor
        self.second_weights_path = second_weights_path
        self.rows = None
        self.written: tuple | None = None
        self.extractor = self.reference = self.accuracy_network = None  # built in setup, on the run's device
        self.second_extractor = self.second_reference = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" or (stage == "fit" and self.run_on_fit_end):
            require_image_teacher(pl_module.teacher, "EvaluationReport")
            device = trainer.strategy.root_device
            self.extractor = shared_extractor(self.extractor_name, self.weights_path, device,
                                              "EvaluationReport.extractor")
            self.reference = shared_reference(self.reference_spec, self.extractor, "EvaluationReport.reference",
                                              need_features=4)
            self.accuracy_network = load_accuracy_network(self.accuracy_network_name, device)
            if self.second_extractor_name is not None:
                self.second_extractor = shared_extractor(self.second_extractor_name, self.second_weights_path,
                                                         device, "EvaluationReport.second_extractor")
                self.second_reference = shared_reference(self.reference_spec, self.second_extractor,
                                                         "EvaluationReport.reference", need_features=4)

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank: sample its share of each row, gather features, score; rank zero writes the report."""
        directory = run_directory(trainer)  # a collective (log_dir broadcasts): every rank, before any branch
        teacher = pl_module.teacher
        # One home for the teacher's decoding settings: the module's sampling.teacher, unless overridden here.
        settings = pl_module.settings.teacher_sample_kwargs()
        if self.teacher_cfg_scale is not None:
            settings["cfg_scale"] = self.teacher_cfg_scale
        if self.teacher_choice_temperature is not None:
            settings["choice_temperature"] = self.teacher_choice_temperature
        cfg, tau = settings["cfg_scale"], settings["choice_temperature"]
        rank_zero_info(f"Evaluating teacher ({self.teacher_steps} steps, CFG {cfg}) and student on "
                       f"{self.num_samples} samples against {self.reference_spec} ...")
        conditions = evaluation_conditions(trainer, pl_module, self.num_samples)
        student = evaluation_student(pl_module)
        pipeline = student_pipeline(pl_module, student)

        def teacher_codes(batch, generator, steps):
            cond = teacher.encode_condition(batch)
            cond = cond.to(pl_module.device) if isinstance(cond, torch.Tensor) else cond
            return teacher.sample(cond, generator=generator, **{**settings, "steps": steps})

        rows = []
        runs = [("teacher", s, lambda b, g, s=s: teacher_codes(b, g, s)) for s in self.teacher_steps]
        runs.append(("student", 1, lambda b, g: pipeline.sample_codes(b, g)))
        for name, steps, sample_codes in runs:
            samples = sharded_sample_features(pl_module, sample_codes, conditions, self.extractor, self.batch_size,
                                              self.seed, self.accuracy_network, self.second_extractor)
            rows.append(evaluation_row(name, steps, samples, self.reference, self.second_reference))
            second = f", FID ({self.second_extractor_name}) {rows[-1].fid2:.3f}" if rows[-1].fid2 is not None else ""
            rank_zero_info(f"  evaluated {name} at {steps} step(s): FID {rows[-1].fid:.3f}{second}")
        self.rows = trainer.strategy.broadcast(rows, src=0)  # rank zero's numbers on every rank
        if trainer.is_global_zero:
            meta = {
                "generator_step": pl_module.generator_step,
                "num_samples": self.num_samples,
                "reference": self.reference_spec,
                "extractor": self.extractor_name,
                "teacher_cfg_scale": cfg,
                "teacher_choice_temperature": tau,
                "student": "ema" if student is not pl_module.student else "raw",
                "conditions": "labels" if are_labels(conditions) else "prompts",
                "world_size": trainer.world_size,
            }
            if self.second_extractor_name is not None:
                meta["second_extractor"] = self.second_extractor_name
            self.written = write_report(self.rows, directory, meta)
            second_name = self.second_extractor_name or "2"
            print("\n" + format_table(self.rows, second_name) + "\n")
            summary = summary_ratios(self.rows)
            if summary:
                print(format_summary(summary, second_name) + "\n")
            print(f"report written to {self.written[0]} and {self.written[1]}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_fit_end and not trainer.sanity_checking and not getattr(trainer, "fast_dev_run", False):
            self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module)
