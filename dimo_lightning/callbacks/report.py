"""EvaluationReport: the teacher-vs-student table at the end of fit and for ``dimo validate --ckpt_path``."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.callbacks.common import accuracy_function, run_directory, student_sampler
from dimo_lightning.callbacks.ema import evaluation_student
from dimo_lightning.evaluation import evaluate, format_table, load_reference, write_report


class EvaluationReport(Callback):
    """Scores the teacher at several step counts and the (EMA) student at one step; writes ``eval.json`` and
    ``eval.md`` into the run's log directory and prints the table.

    Args:
        num_samples: samples per row, balanced over classes.
        teacher_steps: step counts of the teacher rows.
        teacher_cfg_scale: override of the teacher's CFG at sampling (None: the module's ``teacher_sampling``).
        teacher_choice_temperature: override of the Gumbel temperature of the teacher's MaskGIT decoder (None: the
            module's ``teacher_sampling.choice_temperature``, the value ``dimo predict`` uses too).
        reference: real images (``mnist-val``, ``mnist-all`` or an ``.npz``).
        extractor: torch-fidelity feature extractor (``mnist-cnn``, ``inception-local``).
        weights_path: local weights file of the extractor (Inception).
        accuracy_network: class-accuracy network (``mnist-cnn``) or null.
        batch_size: sampling batch size.
        seed: seed of the samples (same labels and seed for every row).
        on_fit_end: run at the end of ``dimo fit``.
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
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        self.num_samples = num_samples
        self.teacher_steps = list(teacher_steps)
        self.teacher_cfg_scale = teacher_cfg_scale
        self.teacher_choice_temperature = teacher_choice_temperature
        self.reference = reference
        self.extractor = extractor
        self.weights_path = weights_path
        self.accuracy_fn = accuracy_function(accuracy_network)
        self.batch_size = batch_size
        self.seed = seed
        self.run_on_fit_end = on_fit_end
        self.rows = None

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = run_directory(trainer)  # a collective (log_dir broadcasts): every rank, before the branch
        if trainer.is_global_zero:
            reference, _ = load_reference(self.reference)
            # One home for the teacher's decoding settings: the module's teacher_sampling, unless overridden here.
            settings = pl_module.teacher_sampling.sample_kwargs(pl_module.hparams.teacher_cfg_scale)
            cfg = self.teacher_cfg_scale if self.teacher_cfg_scale is not None else settings["cfg_scale"]
            tau = (self.teacher_choice_temperature if self.teacher_choice_temperature is not None
                   else settings["choice_temperature"])
            rank_zero_info(f"Evaluating teacher ({self.teacher_steps} steps, CFG {cfg}) and student on "
                           f"{self.num_samples} samples against {self.reference} ...")
            student = evaluation_student(pl_module)
            self.rows = evaluate(
                pl_module.teacher, student, student_sampler(pl_module), reference,
                num_samples=self.num_samples, teacher_steps=self.teacher_steps, teacher_cfg_scale=cfg,
                teacher_choice_temperature=tau, batch_size=self.batch_size,
                seed=self.seed, extractor=self.extractor, weights_path=self.weights_path,
                accuracy_fn=self.accuracy_fn, log=rank_zero_info,
            )
            meta = {
                "generator_step": pl_module.generator_step,
                "num_samples": self.num_samples,
                "reference": self.reference,
                "teacher_cfg_scale": cfg,
                "teacher_choice_temperature": tau,
                "student": "ema" if student is not pl_module.student else "raw",
            }
            json_path, md_path = write_report(self.rows, directory, meta)
            print("\n" + format_table(self.rows) + "\n")
            print(f"report written to {json_path} and {md_path}")
        trainer.strategy.barrier("evaluation_report")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_fit_end and not trainer.sanity_checking and not getattr(trainer, "fast_dev_run", False):
            self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module)
