"""FIDMonitor: FID (and KID, precision, recall, accuracy) of the one-step student during training."""

from __future__ import annotations

import csv
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.callbacks.common import accuracy_function, run_directory, student_sampler
from dimo_lightning.callbacks.ema import evaluation_student
from dimo_lightning.evaluation import balanced_labels, load_reference


class FIDMonitor(Callback):
    """Every ``every_n_generator_steps`` student updates, sample the (EMA) student, shard the samples across ranks,
    gather them, score them on rank zero and log ``val/fid``, ``val/kid``, ``val/precision``, ``val/recall`` and
    ``val/accuracy`` (all ranks log the broadcast values, so ``ModelCheckpoint(monitor="val/fid")`` works).

    For time-to-quality curves, each evaluation is also recorded against training wall time (seconds since the fit
    started, carried across resumes in the checkpoint): a row of ``fid_vs_time.csv`` in the run directory
    (seconds, generator_step, metrics) and, with a TensorBoard logger, the scalars ``val_vs_seconds/*`` whose
    x-axis is whole seconds. ``scripts/plot_time_to_quality.py`` draws the curve.

    Args:
        every_n_generator_steps: cadence in generator steps (also runs at the last step).
        num_samples: samples per evaluation, balanced over classes.
        reference: real images (``mnist-val``, ``mnist-all`` or an ``.npz`` path).
        extractor: torch-fidelity feature extractor name.
        weights_path: local weights of the extractor (Inception).
        accuracy_network: ``mnist-cnn`` or null.
        batch_size: sampling batch size per rank.
        seed: seed of the samples (fixed across evaluations, so curves compare like with like).
        temperature: sampling temperature (None: the module's ``sample_temperature``).
    """

    def __init__(
        self,
        every_n_generator_steps: int = 100,
        num_samples: int = 1000,
        reference: str = "mnist-val",
        extractor: str = "mnist-cnn",
        weights_path: str | None = None,
        accuracy_network: str | None = "mnist-cnn",
        batch_size: int = 250,
        seed: int = 1234,
        temperature: float | None = None,
    ) -> None:
        if every_n_generator_steps < 1:
            raise ValueError(f"every_n_generator_steps must be >= 1, got {every_n_generator_steps}")
        self.every = every_n_generator_steps
        self.num_samples = num_samples
        self.reference_spec = reference
        self.extractor = extractor
        self.weights_path = weights_path
        self.accuracy_fn = accuracy_function(accuracy_network)
        self.batch_size = batch_size
        self.seed = seed
        self.temperature = temperature
        self._reference: torch.Tensor | None = None
        self._last_step = -1
        self._elapsed_before = 0.0  # training seconds of earlier (resumed-from) runs
        self._fit_start: float | None = None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = time.monotonic()

    def elapsed_seconds(self) -> float:
        """Training wall time so far, earlier runs of a resumed fit included."""
        now = time.monotonic() if self._fit_start is not None else 0.0
        return self._elapsed_before + (now - self._fit_start if self._fit_start is not None else 0.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_seconds": self.elapsed_seconds()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed_before = float(state_dict.get("elapsed_seconds", 0.0))

    def record_against_time(self, trainer: pl.Trainer, step: int, seconds: float, metrics: dict[str, float]) -> None:
        """Append (seconds, generator step, metrics) to ``fid_vs_time.csv`` and TensorBoard, on rank zero."""
        directory = run_directory(trainer)  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        path = directory / "fid_vs_time.csv"
        new_file = not path.is_file()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["seconds", "generator_step", *metrics])
            writer.writerow([f"{seconds:.1f}", step, *(f"{v:.6g}" for v in metrics.values())])
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_scalar"):  # TensorBoard's SummaryWriter: a custom x-axis (seconds)
                for name, value in metrics.items():
                    experiment.add_scalar(f"val_vs_seconds/{name}", value, global_step=round(seconds))

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        due = step % self.every == 0 or step >= pl_module.hparams.max_generator_steps
        if step == 0 or step == self._last_step or not due:
            return
        self._last_step = step
        metrics = self.compute(trainer, pl_module)
        self.record_against_time(trainer, step, self.elapsed_seconds(), metrics)
        for name, value in metrics.items():
            pl_module.log(f"val/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "fid")

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate this rank's shard, gather, score on rank zero, broadcast -> metrics."""
        rank, world = trainer.global_rank, trainer.world_size
        labels = balanced_labels(self.num_samples, pl_module.teacher.num_classes)
        per_rank = -(-self.num_samples // world)  # ceil: every rank makes the same count (gather needs it)
        padded = torch.cat([labels, labels[: per_rank * world - len(labels)]])
        mine = padded[rank * per_rank : (rank + 1) * per_rank]
        sampler = student_sampler(pl_module, self.temperature)
        network = evaluation_student(pl_module)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + rank)
        images = []
        for start in range(0, len(mine), self.batch_size):
            codes = sampler(network, mine[start : start + self.batch_size], generator)
            images.append(pl_module.teacher.decode(codes).float())
        gathered = pl_module.all_gather(torch.cat(images))  # (world, per_rank, C, H, W) or (per_rank, ...)
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            from dimo_lightning.metrics.fidelity import compute_metrics

            all_images = gathered.reshape(-1, *gathered.shape[-3:]).cpu()[: self.num_samples]
            if self._reference is None:
                self._reference, _ = load_reference(self.reference_spec)
            metrics = compute_metrics(all_images, self._reference, extractor=self.extractor,
                                      weights_path=self.weights_path)
            if self.accuracy_fn is not None:
                metrics["accuracy"] = self.accuracy_fn(all_images, labels)
            rank_zero_info(f"generator step {pl_module.generator_step}: " +
                           ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return trainer.strategy.broadcast(metrics, src=0)
