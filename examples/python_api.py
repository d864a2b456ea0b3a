"""The distillation of ``examples/custom_teacher.yaml`` from Python: no CLI, the Lightning objects by hand.

    python examples/python_api.py --steps 20 --output runs/python_api

builds the teacher, the DiMOModule, the label DataModule and the Trainer with the EMA, checkpoint and
generator-step progress-bar callbacks, trains, then exports the EMA student to ``OUTPUT/student`` (sample it with
``examples/sample_exported.py``). The checkpoint records the teacher, so ``DiMOModule.load_from_checkpoint`` works
on it as on a CLI-made one.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # custom_teacher.py sits next to this file

from custom_teacher import BitPatchTeacher  # noqa: E402

from dimo_lightning.data.labels import ClassLabelDataModule  # noqa: E402
from dimo_lightning.inference.export import export_student  # noqa: E402
from dimo_lightning.training.ema import StudentEMA  # noqa: E402
from dimo_lightning.training.module import DiMOModule  # noqa: E402
from dimo_lightning.training.progress import GeneratorStepProgressBar  # noqa: E402
from dimo_lightning.training.settings import OptimSettings, StudentSettings, TargetSettings  # noqa: E402


def distill(steps: int, output: Path, batch_size: int = 16, progress_bar: bool = True) -> Path:
    """Train for ``steps`` generator steps and export the student -> the export folder."""
    pl.seed_everything(0)
    teacher = BitPatchTeacher(num_classes=4, hidden_dim=32, depth=1, heads=2, mlp_dim=64, seed=0)
    module = DiMOModule(
        teacher,
        optimizer_gen=functools.partial(torch.optim.Adam, lr=1e-4),  # an OptimizerCallable: params -> optimizer
        optimizer_aux=functools.partial(torch.optim.Adam, lr=4e-4),
        student=StudentSettings(r_init=0.6, emb_noise_sigma=0.1, emb_noise_relative=True),  # the settings groups
        targets=TargetSettings(cfg_scale=2.0),
        optim=OptimSettings(max_generator_steps=steps, train_dropout=False),
    )
    data = ClassLabelDataModule(num_classes=teacher.num_classes, batch_size=batch_size, batches_per_epoch=10)
    checkpoint = ModelCheckpoint(dirpath=output / "checkpoints", save_last=True)
    callbacks = [StudentEMA(decay=0.9), checkpoint]
    if progress_bar:
        callbacks.append(GeneratorStepProgressBar())
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, limit_val_batches=0, logger=False, default_root_dir=output,
        callbacks=callbacks, enable_progress_bar=progress_bar, enable_model_summary=False,
    )
    trainer.fit(module, data)
    return export_student(checkpoint.last_model_path, output / "student")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="generator steps")
    parser.add_argument("--batch_size", type=int, default=16, help="labels per iteration")
    parser.add_argument("--output", type=Path, default=Path("runs/python_api"), help="output folder")
    parser.add_argument("--no_progress_bar", action="store_true", help="no progress bar (logs, tests)")
    args = parser.parse_args(argv)
    student = distill(args.steps, args.output, args.batch_size, not args.no_progress_bar)
    print(f"student exported to {student}")
    return student


if __name__ == "__main__":
    main()
