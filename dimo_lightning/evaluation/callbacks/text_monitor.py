"""TextMonitor: the text metrics of the one-step student during training (the FIDMonitor of text teachers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition
from dimo_lightning.data.prompt_files import load_prompts
from dimo_lightning.evaluation.callbacks.common import student_pipeline
from dimo_lightning.evaluation.metrics.text import DISTINCT_ORDERS
from dimo_lightning.evaluation.text_report import (
    TextEvalRow,
    TextScoring,
    describe_samples,
    log_examples,
    max_generator_steps,
    require_text_teacher,
    score_rank_texts,
    text_conditions,
    text_row,
)

# The logged metrics (val/<name>); None values (no judge, no copy reference) are not logged.
MONITOR_METRICS = ("gen_ppl", "gen_ppl_sample_mean", "entropy", "distinct_1", "distinct_2", "distinct_3",
                   "distinct_4", "corpus_distinct_4", "self_bleu", "copy_rate")


class TextMonitor(Callback):
    """Every ``every_n_generator_steps`` student updates (and at the last), score the (EMA) student's one-step
    samples and log ``val/gen_ppl`` (with a judge), ``val/gen_ppl_sample_mean``, ``val/entropy``,
    ``val/distinct_1`` .. ``val/distinct_4``, ``val/corpus_distinct_4``, ``val/self_bleu``, ``val/copy_rate`` (with a
    copy reference) and ``val/tokens_per_s``, plus the first ``num_text_samples`` texts as TensorBoard text
    ``text/student``.

    Each rank samples and scores its share of the ``num_samples`` conditions; only metric sums are reduced, so every
    rank logs the same numbers (``ModelCheckpoint(monitor="val/gen_ppl")`` works). The judge and the copy reference
    are loaded in ``setup``, so a wrong path fails before the first step; an image teacher is refused there.

    Args:
        every_n_generator_steps: cadence in generator steps.
        num_samples: samples per evaluation.
        judge, judge_context_length, judge_batch_size, judge_max_tokens, copy_reference, copy_n, prompts,
            subset_size, bleu_order, distinct_orders: as :class:`TextEvaluationReport`'s.
        batch_size: sampling batch size per rank.
        seed: seed of the samples (fixed across evaluations, so curves compare like with like).
        num_text_samples: sample texts logged per evaluation (0: none).
        temperature: sampling temperature (null: the module's sampling settings).
    """

    def __init__(
        self,
        every_n_generator_steps: int = 100,
        num_samples: int = 128,
        judge: str | None = None,
        judge_context_length: int | None = None,
        judge_batch_size: int = 8,
        judge_max_tokens: int | None = None,
        copy_reference: str | None = None,
        copy_n: int = 8,
        prompts: str | None = None,
        batch_size: int = 64,
        seed: int = 1234,
        subset_size: int = 128,
        bleu_order: int = 4,
        distinct_orders: Sequence[int] = DISTINCT_ORDERS,
        num_text_samples: int = 4,
        temperature: float | None = None,
    ) -> None:
        if every_n_generator_steps < 1:
            raise ValueError(f"TextMonitor.every_n_generator_steps must be >= 1, got {every_n_generator_steps}")
        if num_samples < 2 or batch_size < 1 or num_text_samples < 0:
            raise ValueError(f"TextMonitor: num_samples must be >= 2, batch_size >= 1 and num_text_samples >= 0, got "
                             f"{num_samples}, {batch_size}, {num_text_samples}")
        self.every = every_n_generator_steps
        self.num_samples = num_samples
        self.scoring = TextScoring(judge, judge_context_length, judge_batch_size, judge_max_tokens, copy_reference,
                                   copy_n, subset_size, bleu_order, distinct_orders, flag="TextMonitor")
        self.prompts_source = prompts
        self.prompts: list[str] | None = None
        self.batch_size = batch_size
        self.seed = seed
        self.num_text_samples = num_text_samples
        self.temperature = temperature
        self.evaluations = 0  # how many times metrics were computed (tests)
        self.last_row: TextEvalRow | None = None
        self._last_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_text_teacher(pl_module.teacher, "TextMonitor")
        self.scoring.load(pl_module.teacher.text_tokenizer, trainer.strategy.root_device)
        if self.prompts_source is not None:
            self.prompts = list(load_prompts(self.prompts_source, "TextMonitor.prompts"))

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        due = step % self.every == 0 or step >= max_generator_steps(pl_module)
        if step == 0 or step == self._last_step or not due:
            return
        self._last_step = step
        metrics = self.compute(trainer, pl_module)
        for name, value in metrics.items():
            if value is not None:
                pl_module.log(f"val/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "gen_ppl")

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | None]:
        """This rank's share of student samples -> reduced sums -> the metrics (the same on every rank); rank zero
        logs the first texts."""
        teacher = pl_module.teacher
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        conditions = text_conditions(trainer, self.num_samples, self.prompts)
        pipeline = student_pipeline(pl_module)

        def sample(batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
            cond = move_condition(teacher.encode_condition(batch), device)
            codes = pipeline.sample_codes(cond=cond, generator=generator, temperature=self.temperature)
            return teacher.fix_positions(codes, cond), cond

        part = score_rank_texts(sample, lambda codes, cond: describe_samples(teacher, codes, cond), conditions,
                                self.scoring.accumulator(), self.batch_size, self.seed, rank, world, device,
                                self.num_text_samples)
        row = text_row("student", 1, part, lambda t, op: trainer.strategy.reduce(t, reduce_op=op), rank, world,
                       device)
        self.last_row = row
        self.evaluations += 1
        metrics = {name: row.metrics.get(name) for name in MONITOR_METRICS}
        metrics["tokens_per_s"] = row.tokens_per_s
        if trainer.is_global_zero:
            log_examples(trainer, "text/student", part.examples, int(pl_module.generator_step))
        rank_zero_info(f"generator step {pl_module.generator_step}: " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
        return metrics
