"""TextEvaluationReport: the text teacher-vs-student table at the end of fit and for ``dimo validate --ckpt_path``.

See :mod:`dimo_lightning.evaluation.text_report` for what each row measures and how the ranks share the work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition
from dimo_lightning.core.run_directory import run_directory
from dimo_lightning.data.prompt_files import load_prompts
from dimo_lightning.evaluation.callbacks.common import student_pipeline
from dimo_lightning.evaluation.metrics.text import DISTINCT_ORDERS
from dimo_lightning.evaluation.text_report import (
    TextBatch,
    TextEvalRow,
    TextScoring,
    describe_samples,
    format_text_table,
    log_examples,
    reference_text_rows,
    require_text_teacher,
    score_rank_texts,
    teacher_sample_settings,
    text_conditions,
    text_row,
    write_examples,
    write_text_report,
)
from dimo_lightning.training.ema import evaluation_student


class TextEvaluationReport(Callback):
    """Scores a text teacher at several step counts and the (EMA) student at one step (and held-out real text, when
    given); writes ``eval.json``, ``eval.md`` and ``samples_<row>.txt`` (the first ``num_text_samples`` texts of each
    row) into the run's log directory, logs those texts to TensorBoard as ``text/<row>`` and prints the table.

    Every rank samples and scores its share of every row; only metric sums are reduced, so every rank holds the same
    rows and rank zero writes the files. The judge, the copy reference, the held-out text and the prompts are loaded
    and checked in ``setup`` (fit and validate), before any step. An image teacher is refused there.

    Args:
        num_samples: samples per row (the conditions: ``prompts`` cycled, else the DataModule's
            ``evaluation_conditions``, else unconditional).
        teacher_steps: step counts of the teacher rows (the teacher's own ``sample(cond, steps=...)``).
        teacher_sampling: overrides of the module's teacher sampling settings (``sampling.teacher``) for these rows,
            e.g. ``{softmax_temperature: 0.9}``; only the settings the teacher's ``sample`` takes are passed.
        judge: a local folder with a causal LM (any ``AutoModelForCausalLM``) and its tokenizer for the generative
            perplexity; null: none.
        judge_context_length: the judge's chunk length (null: its ``n_positions`` / ``max_position_embeddings``).
        judge_batch_size: judge chunks per forward.
        judge_max_tokens: cut each text's judge ids to this many (MDLM: the generator's length); null: all.
        copy_reference: the training text for the copy rate: an ``.npz`` of ``ReferenceNgrams`` or a text file (one
            document a line); null: no copy rate.
        copy_n: n of the copy rate (for a text file; an ``.npz`` carries its own).
        reference_text: held-out real text (a text file, one document a line, or ``kjv-val``: the shipped corpus's
            validation chapters packed as the teacher's rows), cut into rows of the teacher's length and scored as a
            ``reference`` row; null: no reference row.
        reference_samples: rows of the reference row at most (null: ``num_samples``); a fixed held-out set is best
            measured whole.
        prompts: prompts of prefix-conditioned evaluation (a ``.txt`` / ``.jsonl`` file or ``module:function``);
            null: the DataModule's ``evaluation_conditions`` or unconditional samples.
        batch_size: sampling batch size per rank.
        seed: seed of the samples (same conditions and seed for every row).
        subset_size: samples (the first) of Self-BLEU and corpus distinct-n.
        bleu_order: largest n-gram order of Self-BLEU.
        distinct_orders: the n of distinct-n.
        num_text_samples: texts per row written to ``samples_<row>.txt`` and TensorBoard.
        temperature: the student's sampling temperature (null: the module's sampling settings).
        on_fit_end: run at the end of ``dimo fit``.
    """

    def __init__(
        self,
        num_samples: int = 256,
        teacher_steps: Sequence[int] = (16, 32, 64, 128),
        teacher_sampling: Mapping[str, Any] | None = None,
        judge: str | None = None,
        judge_context_length: int | None = None,
        judge_batch_size: int = 8,
        judge_max_tokens: int | None = None,
        copy_reference: str | None = None,
        copy_n: int = 8,
        reference_text: str | None = None,
        reference_samples: int | None = None,
        prompts: str | None = None,
        batch_size: int = 64,
        seed: int = 0,
        subset_size: int = 500,
        bleu_order: int = 4,
        distinct_orders: Sequence[int] = DISTINCT_ORDERS,
        num_text_samples: int = 8,
        temperature: float | None = None,
        on_fit_end: bool = True,
    ) -> None:
        if num_samples < 2 or batch_size < 1 or num_text_samples < 0:
            raise ValueError(f"TextEvaluationReport: num_samples must be >= 2, batch_size >= 1 and num_text_samples "
                             f">= 0, got {num_samples}, {batch_size}, {num_text_samples}")
        if any(int(s) < 1 for s in teacher_steps):
            raise ValueError(f"TextEvaluationReport.teacher_steps must be >= 1, got {list(teacher_steps)}")
        self.num_samples = num_samples
        self.teacher_steps = [int(s) for s in teacher_steps]
        self.teacher_sampling = dict(teacher_sampling or {})
        self.scoring = TextScoring(judge, judge_context_length, judge_batch_size, judge_max_tokens, copy_reference,
                                   copy_n, subset_size, bleu_order, distinct_orders, flag="TextEvaluationReport")
        self.reference_text = reference_text
        if reference_samples is not None and reference_samples < 2:
            raise ValueError(f"TextEvaluationReport.reference_samples must be >= 2, got {reference_samples}")
        self.reference_samples = reference_samples
        self.prompts_source = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.num_text_samples = num_text_samples
        self.temperature = temperature
        self.run_on_fit_end = on_fit_end
        self.rows: list[TextEvalRow] | None = None
        self.written: tuple | None = None
        self.reference_rows: torch.Tensor | None = None  # built in setup
        self.prompts: list[str] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (stage == "validate" or (stage == "fit" and self.run_on_fit_end)):
            return
        teacher = pl_module.teacher
        require_text_teacher(teacher, "TextEvaluationReport")
        teacher_sample_settings(pl_module, self.teacher_sampling, "TextEvaluationReport.teacher_sampling")
        self.scoring.load(teacher.text_tokenizer, trainer.strategy.root_device)
        if self.prompts_source is not None:
            self.prompts = list(load_prompts(self.prompts_source, "TextEvaluationReport.prompts"))
        if self.reference_text is not None:
            self.reference_rows = reference_text_rows(self.reference_text, teacher.text_tokenizer, teacher.seq_len,
                                                      self.reference_samples or self.num_samples,
                                                      "TextEvaluationReport.reference_text")

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank: sample and score its share of each row, reduce the sums; rank zero writes the report."""
        directory = run_directory(trainer)  # a collective (log_dir broadcasts): every rank, before any branch
        teacher = pl_module.teacher
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        settings = teacher_sample_settings(pl_module, self.teacher_sampling, "TextEvaluationReport.teacher_sampling")
        conditions = text_conditions(trainer, self.num_samples, self.prompts)
        student = evaluation_student(pl_module)
        pipeline = student_pipeline(pl_module, student)
        rank_zero_info(f"Evaluating the text teacher ({self.teacher_steps} steps) and the student on "
                       f"{self.num_samples} samples ...")

        def encode(batch: Any) -> Any:
            return move_condition(teacher.encode_condition(batch), device)

        def teacher_sample(batch: Any, generator: torch.Generator, steps: int) -> tuple[torch.Tensor, Any]:
            cond = encode(batch)
            return teacher.sample(cond, steps=steps, generator=generator, **settings), cond

        def student_sample(batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
            cond = encode(batch)
            codes = pipeline.sample_codes(cond=cond, generator=generator, temperature=self.temperature)
            return teacher.fix_positions(codes, cond), cond

        def describe(codes: torch.Tensor, cond: Any) -> TextBatch:
            return describe_samples(teacher, codes, cond)

        def reduce(vector: torch.Tensor, op: str) -> torch.Tensor:
            return trainer.strategy.reduce(vector, reduce_op=op)

        runs = [("teacher", s, lambda b, g, s=s: teacher_sample(b, g, s), conditions) for s in self.teacher_steps]
        runs.append(("student", 1, student_sample, conditions))
        if self.reference_rows is not None:
            rows_tensor = self.reference_rows

            def reference_sample(batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
                return rows_tensor[batch], None

            runs.append(("reference", None, reference_sample, torch.arange(len(rows_tensor))))
        rows, examples = [], {}
        for name, steps, sample, row_conditions in runs:
            real = name == "reference"
            part = score_rank_texts(
                sample, (lambda codes, cond: reference_batch(teacher, codes)) if real else describe, row_conditions,
                self.scoring.accumulator(), self.batch_size, self.seed, rank, world, device, self.num_text_samples)
            row = text_row(name, steps, part, reduce, rank, world, device, timed=not real)
            rows.append(row)
            examples[row.label] = part.examples
            ppl = row.metrics.get("gen_ppl")
            rank_zero_info(f"  evaluated {row.label}: entropy {row.metrics['entropy']:.3f}"
                           + (f", gen PPL {ppl:.2f}" if ppl is not None else ""))
        self.rows = rows
        if not trainer.is_global_zero:
            return
        step = int(getattr(pl_module, "generator_step", 0))
        meta = {
            "generator_step": step,
            "num_samples": self.num_samples,
            "teacher_sampling": settings,
            "temperature": self.temperature,
            "student": "ema" if student is not pl_module.student else "raw",
            "conditions": ("prompts" if self.prompts is not None
                           else "unconditional" if isinstance(conditions, torch.Tensor) else "datamodule"),
            "seq_len": int(teacher.seq_len),
            "reference_text": self.reference_text,
            "world_size": world,
            **self.scoring.meta(),
        }
        self.written = write_text_report(rows, directory, meta, self.scoring.distinct_orders)
        for label, kept in examples.items():
            write_examples(directory, label, kept)
            log_examples(trainer, f"text/{label}", kept, step)
        print("\n" + format_text_table(rows, self.scoring.distinct_orders) + "\n")
        print(f"report written to {self.written[0]} and {self.written[1]}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_fit_end and not trainer.sanity_checking and not getattr(trainer, "fast_dev_run", False):
            self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module)


def reference_batch(teacher: Any, rows: torch.Tensor) -> TextBatch:
    """Real token rows (B, L) as a scored batch: every position generated, no prompt, the teacher's
    ``decode_text`` (the decoding its samples get) as the texts."""
    return TextBatch(list(rows.cpu().numpy()), [""] * len(rows), list(teacher.decode_text(rows)))
