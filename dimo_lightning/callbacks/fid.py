"""FIDMonitor: FID (and KID, precision, recall, accuracy) of the one-step student during training."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dimo_lightning.callbacks.common import accuracy_function, student_sampler
from dimo_lightning.callbacks.ema import evaluation_student
from dimo_lightning.evaluation import balanced_labels, load_reference


class FIDMonitor(Callback):
    """Every ``every_n_generator_steps`` student updates, sample the (EMA) student, shard the samples across ranks,
    gather them, score them on rank zero and log ``val/fid``, ``val/kid``, ``val/precision``, ``val/recall`` and
    ``val/accuracy`` (all ranks log the broadcast values, so ``ModelCheckpoint(monitor="val/fid")`` works).

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

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.generator_step
        due = step % self.every == 0 or step >= pl_module.hparams.max_generator_steps
        if step == 0 or step == self._last_step or not due:
            return
        self._last_step = step
        metrics = self.compute(trainer, pl_module)
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
