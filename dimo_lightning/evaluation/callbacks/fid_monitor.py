"""FIDMonitor: FID (and KID, precision, recall, IS, accuracy) of the one-step student during training."""

from __future__ import annotations

import csv
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.core.run_directory import run_directory
from dimo_lightning.evaluation.callbacks.common import (
    check_accuracy_network,
    evaluation_conditions,
    load_accuracy_network,
    require_image_teacher,
    shared_extractor,
    shared_reference,
    student_pipeline,
)
from dimo_lightning.evaluation.metrics.features import metrics_from_features
from dimo_lightning.evaluation.report import sharded_sample_features


class FIDMonitor(Callback):
    """Every ``every_n_generator_steps`` student updates, score the (EMA) student and log ``val/fid``, ``val/kid``,
    ``val/precision``, ``val/recall``, ``val/is`` (extractors with logits) and ``val/accuracy`` (label conditions;
    for prompt conditions the class accuracy against the prompts, plus ``val/thickness_accuracy`` and
    ``val/slant_accuracy``: captioned-MNIST prompt faithfulness, counted on each rank and summed).

    Each rank samples, decodes and extracts features of its own share of the ``num_samples`` conditions on its own
    device, in batches; only the features are gathered (2,048 floats per image for Inception). Every rank computes
    the metrics from the gathered features (no rank waits on another's CPU work) and rank zero's values are
    broadcast, so every rank logs the same numbers (``ModelCheckpoint(monitor="val/fid")`` works).

    The reference and the extractor are loaded and checked in ``setup`` on every rank, so a wrong path, extractor or
    feature size fails before the first step.

    For time-to-quality curves, each evaluation is also recorded against training wall time (seconds since the fit
    started, carried across resumes in the checkpoint): a row of ``fid_vs_time.csv`` in the run directory
    (seconds, generator_step, metrics) and, with a TensorBoard logger, the scalars ``val_vs_seconds/*`` whose
    x-axis is whole seconds. ``scripts/plot_time_to_quality.py`` draws the curve.

    Args:
        every_n_generator_steps: cadence in generator steps (also runs at the last step).
        num_samples: samples per evaluation (conditions from the DataModule, else balanced labels).
        reference: a ``dimo stats`` file (``.npz`` with ``mu``/``sigma``), or real images whose statistics are
            computed once at setup: ``mnist-val``, ``mnist-all``, an ``.npz`` of images, an image folder.
        extractor: registered torch-fidelity feature extractor (``mnist-cnn``, ``inception-local``).
        weights_path: local weights of the extractor (Inception).
        accuracy_network: ``mnist-cnn`` or null.
        batch_size: sampling, decoding and feature batch size per rank.
        seed: seed of the samples (fixed across evaluations, so curves compare like with like).
        temperature: sampling temperature (None: the module's ``sampling.temperature``).
        second_extractor: a second feature space (e.g. ``mnist-dae``) on the same samples against the same
            reference: logs ``val/fid2``, ``val/precision2``, ``val/recall2``. None: off.
        second_weights_path: local weights of the second extractor.
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
        second_extractor: str | None = None,
        second_weights_path: str | None = None,
    ) -> None:
        if every_n_generator_steps < 1:
            raise ValueError(f"every_n_generator_steps must be >= 1, got {every_n_generator_steps}")
        if num_samples < 4 or batch_size < 1:
            raise ValueError(f"num_samples must be >= 4 and batch_size >= 1, got {num_samples}, {batch_size}")
        check_accuracy_network(accuracy_network)
        self.every = every_n_generator_steps
        self.num_samples = num_samples
        self.reference_spec = reference
        self.extractor_name = extractor
        self.weights_path = weights_path
        self.accuracy_network_name = accuracy_network
        self.batch_size = batch_size
        self.seed = seed
        self.temperature = temperature
        self.second_extractor_name = second_extractor
        self.second_weights_path = second_weights_path
        self.second_extractor = self.second_reference = None
        self.evaluations = 0  # how many times metrics were computed (tests)
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
        metrics = {name: value for name, value in metrics.items() if value is not None}  # no IS without logits
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
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_image_teacher(pl_module.teacher, "FIDMonitor")
        device = trainer.strategy.root_device
        self.extractor = shared_extractor(self.extractor_name, self.weights_path, device, "FIDMonitor.extractor")
        self.reference = shared_reference(self.reference_spec, self.extractor, "FIDMonitor.reference",
                                          need_features=4)
        self.accuracy_network = load_accuracy_network(self.accuracy_network_name, device)
        if self.second_extractor_name is not None:
            self.second_extractor = shared_extractor(self.second_extractor_name, self.second_weights_path, device,
                                                     "FIDMonitor.second_extractor")
            self.second_reference = shared_reference(self.reference_spec, self.second_extractor,
                                                     "FIDMonitor.reference", need_features=4)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        due = step % self.every == 0 or step >= pl_module.settings.optim.max_generator_steps
        if step == 0 or step == self._last_step or not due:
            return
        self._last_step = step
        metrics = self.compute(trainer, pl_module)
        self.record_against_time(trainer, step, self.elapsed_seconds(), metrics)
        for name, value in metrics.items():
            if value is not None:
                pl_module.log(f"val/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "fid")

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | None]:
        """This rank's share of samples -> gathered features -> metrics (rank zero's, on every rank)."""

        conditions = evaluation_conditions(trainer, pl_module, self.num_samples)
        pipeline = student_pipeline(pl_module)
        samples = sharded_sample_features(
            pl_module, lambda batch, gen: pipeline.sample_codes(batch, gen, temperature=self.temperature), conditions,
            self.extractor, self.batch_size, self.seed, self.accuracy_network, self.second_extractor,
        )
        metrics = metrics_from_features(samples.features, self.reference, samples.logits)
        metrics = {"fid": metrics["fid"], "kid": metrics["kid"], "precision": metrics["precision"],
                   "recall": metrics["recall"], "is": metrics["is"], "accuracy": samples.accuracy}
        if samples.attribute_counts is not None:  # prompt conditions: the other two attributes of the prompts
            metrics.update({f"{name}_accuracy": samples.attribute_accuracy(name) for name in ("thickness", "slant")})
        if samples.second_features is not None:
            second = metrics_from_features(samples.second_features, self.second_reference)
            metrics.update(fid2=second["fid"], precision2=second["precision"], recall2=second["recall"])
        metrics = trainer.strategy.broadcast(metrics, src=0)  # rank zero's numbers everywhere, bit for bit
        self.evaluations += 1
        rank_zero_info(f"generator step {pl_module.generator_step}: " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
        return metrics
