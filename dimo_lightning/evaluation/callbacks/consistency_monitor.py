"""ConsistencyMonitor: logs the consistency diagnostic (objectives/consistency.py) during training."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition
from dimo_lightning.core.masking import MASK_SCHEDULES
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.sharding import slice_conditions
from dimo_lightning.evaluation.callbacks.common import evaluation_conditions
from dimo_lightning.inference.one_step import StudentInput, TokenSampling, remask_sample, student_sample
from dimo_lightning.objectives.consistency_gap import band_labels, consistency_kl_by_band


class ConsistencyMonitor(Callback):
    """Every ``every_n_generator_steps`` student updates, measure the mean KL between the student's token
    distribution on a re-masked sample and on its initial sequence, at the masked positions, per mask-ratio band:
    ``train/consistency_kl/<low>-<high>`` and ``train/consistency_kl/all``. Small values mean the consistency
    assumption behind the Di[M]O gradient holds at those ratios; a band whose KL grows is where it breaks.

    The callback draws its own conditions (balanced classes) and randomness (a generator seeded by ``seed``, the
    rank and the generator step), runs the raw student in eval mode under no_grad after the iteration's optimizer
    steps, and leaves training untouched. Each rank measures its share of ``num_samples``; sums and counts are
    reduced over ranks (a collective: every rank runs it at the same generator step).

    Args:
        every_n_generator_steps: cadence in generator steps.
        num_samples: samples per measurement, over all ranks.
        batch_size: samples per student forward.
        band_edges: mask-ratio band edges (increasing, within [0, 1]).
        mask_schedule: schedule of the re-masking ratios; ``linear`` (uniform) fills every band evenly.
        seed: base seed of the draws.
    """

    def __init__(
        self,
        every_n_generator_steps: int = 50,
        num_samples: int = 256,
        batch_size: int = 256,
        band_edges: Sequence[float] = (0.0, 0.3, 0.7, 1.0),
        mask_schedule: str = "linear",
        seed: int = 0,
    ) -> None:
        if every_n_generator_steps < 1 or num_samples < 1 or batch_size < 1:
            raise ValueError("every_n_generator_steps, num_samples and batch_size must be >= 1")
        edges = [float(e) for e in band_edges]
        if len(edges) < 2 or edges[0] < 0 or edges[-1] > 1 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
            raise ValueError(f"band_edges must be increasing within [0, 1], at least two, got {list(band_edges)}")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {mask_schedule!r}")
        self.every = every_n_generator_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.edges = edges
        self.labels = band_labels(edges)
        self.mask_schedule = mask_schedule
        self.seed = seed
        self._last_step = -1
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """``{band: mean KL}`` (NaN for an empty band) and ``all``, over every rank's samples."""
        teacher = pl_module.teacher
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = -(-self.num_samples // world)
        conditions = evaluation_conditions(trainer, pl_module, per_rank * world)  # labels or prompts
        labels = slice_conditions(conditions, rank * per_rank, (rank + 1) * per_rank)
        step = pl_module.generator_step
        seed = derive_seed(self.seed, rank, step, modulus=SAMPLE_SEED_MODULUS)
        generator = torch.Generator(device=pl_module.device).manual_seed(seed)
        student_input = StudentInput(pl_module.draw_r_init(seed), pl_module.current_sigma(), pl_module.emb_noise_scale)
        student = pl_module.student
        # x is drawn at the student's training temperature, from its K codes (never the mask slot); the distributions
        # compared are at temperature 1.
        sampling = TokenSampling(pl_module.settings.student.temperature,
                                 exclude=tuple(range(teacher.codebook_size, teacher.logit_width)))
        was_training = student.training
        student.eval()  # deterministic measurement: no dropout
        sums = torch.zeros(len(self.labels), device=pl_module.device)
        counts = torch.zeros(len(self.labels), device=pl_module.device)
        try:
            for start in range(0, len(labels), self.batch_size):
                batch = slice_conditions(labels, start, start + self.batch_size)
                cond = move_condition(teacher.encode_condition(batch), pl_module.device)
                x, init_logits = student_sample(teacher, student, cond, student_input, sampling, generator,
                                                pl_module.device)
                x_t, mask, _ = remask_sample(teacher, x, cond, self.mask_schedule, generator)
                s, c = consistency_kl_by_band(
                    init_logits, lambda codes, cond=cond: teacher.apply_network(student, codes, cond), x_t, mask,
                    teacher.codebook_size, self.edges,
                )
                sums += s
                counts += c
        finally:
            student.train(was_training)
        totals = trainer.strategy.reduce(torch.stack([sums, counts]), reduce_op="sum")
        sums, counts = totals[0], totals[1]
        means = sums / counts.clamp_min(1)
        result = {label: float(m) if c > 0 else float("nan") for label, m, c in zip(self.labels, means, counts)}
        result["all"] = float(sums.sum() / counts.sum().clamp_min(1))
        return result

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        if step == 0 or step == self._last_step or step % self.every:
            return
        self._last_step = step
        self.last = self.measure(trainer, pl_module)
        for label, value in self.last.items():
            if value == value:  # skip empty bands (NaN)
                pl_module.log(f"train/consistency_kl/{label}", value, on_step=True, on_epoch=False)
