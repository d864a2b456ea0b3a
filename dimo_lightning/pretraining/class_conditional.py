"""MaskedDiffusionModule: trains a class-conditional masked token model (a teacher) on real token data.

The MaskGIT objective: mask a scheduled share of each sequence, predict the original codes at the masked positions
with label-smoothed cross-entropy, and drop the class label at random so the model also learns the unconditional
branch that classifier-free guidance needs. Used to build the shipped MNIST teacher (configs/mnist/teacher.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from dimo_lightning.core.masking import MASK_SCHEDULES, mask_tokens, sample_mask_ratio
from dimo_lightning.core.weight_files import save_safetensors
from dimo_lightning.nn.transformer import MaskTransformer


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over masked positions.

    Args:
        logits: (B, N, V).
        targets: (B, N) target codes.
        mask: (B, N) bool, True where the loss applies.
        label_smoothing: smoothing mass spread over all V classes.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).masked_fill(~mask.reshape(-1), -100)
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, label_smoothing=label_smoothing)


class MaskedDiffusionModule(pl.LightningModule):
    """Pretrains a :class:`MaskTransformer` teacher with the masked-token objective.

    Args:
        codebook_size: K.
        num_classes: C.
        grid_size: tokens per side.
        hidden_dim: transformer width.
        depth: transformer layers.
        heads: attention heads.
        mlp_dim: MLP width.
        dropout: dropout rate.
        mask_schedule: mask-ratio schedule for training (arccos is MaskGIT's).
        label_smoothing: cross-entropy label smoothing.
        class_dropout: probability of replacing the label with the null class (for CFG).
        optimizer: optimizer factory (LightningCLI fills it from YAML).
        scheduler: optional LR-scheduler factory, stepped every optimizer step.
        export_name: on fit end, the weights are written as ``<log_dir>/<export_name>.safetensors`` plus a
            ``.json`` with the architecture (what ``make assets`` installs); None disables the export.
        seed: seed of the masking generator.
    """

    def __init__(
        self,
        codebook_size: int = 256,
        num_classes: int = 10,
        grid_size: int = 7,
        hidden_dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 512,
        dropout: float = 0.1,
        mask_schedule: str = "arccos",
        label_smoothing: float = 0.1,
        class_dropout: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        export_name: str | None = "teacher",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1), got {class_dropout}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.architecture = dict(
            codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, hidden_dim=hidden_dim,
            depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
        )
        self.network = MaskTransformer(**self.architecture)
        self.mask_schedule = mask_schedule
        self.label_smoothing = label_smoothing
        self.class_dropout = class_dropout
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_name = export_name
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed + self.global_rank)
        return self._generator

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], drop_classes: bool) -> torch.Tensor:
        codes, labels = batch
        codes = codes.reshape(codes.shape[0], -1)
        gen = self._rng()
        ratio = sample_mask_ratio(codes.shape[0], self.mask_schedule, generator=gen, device=self.device)
        masked, mask = mask_tokens(codes, ratio, self.network.mask_id, generator=gen)
        drop = None
        if drop_classes and self.class_dropout > 0:
            drop = torch.rand(codes.shape[0], generator=gen, device=self.device) < self.class_dropout
        logits = self.network(masked, labels, drop)
        return masked_token_loss(logits, codes, mask, self.label_smoothing)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, drop_classes=True)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch, drop_classes=False), prog_bar=True)

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def export(self, directory: str | Path) -> Path:
        """Write ``<name>.safetensors`` (network weights) and ``<name>.json`` (architecture) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / f"{self.export_name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_safetensors(state, weights)
        (directory / f"{self.export_name}.json").write_text(json.dumps(self.architecture, indent=2) + "\n")
        return weights

    @override
    def on_fit_end(self) -> None:
        if self.export_name and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            if getattr(self.trainer, "fast_dev_run", False):
                return
            log_dir = self.trainer.log_dir or self.trainer.default_root_dir
            path = self.export(log_dir)
            print(f"teacher weights written to {path} (install with: python scripts/build_assets.py "
                  f"teacher {log_dir})")
