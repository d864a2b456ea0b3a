"""Run by tests/test_distributed.py in a subprocess: a 2-rank CPU DDP (gloo) Di[M]O fit on a tiny teacher."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import save_tiny_mnist_teacher
from lightning.pytorch.callbacks import Callback

from dimo_lightning.callbacks.ema import StudentEMA
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.module import DiMOModule
from dimo_lightning.teachers.mnist import MNISTTeacher


class RecordLabels(Callback):
    def __init__(self):
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch.tolist())


def main(out_dir: str) -> None:
    out = Path(out_dir)
    weights, codebook = save_tiny_mnist_teacher(out / "teacher")
    teacher = MNISTTeacher(str(weights), str(codebook))
    module = DiMOModule(teacher, max_generator_steps=3, accumulate_micro_batches=2, seed=0)
    recorder = RecordLabels()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=-1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder, StudentEMA(0.9)], default_root_dir=out)
    trainer.fit(module, ClassLabelDataModule(10, 8, 4))
    digest = float(sum(p.double().sum() for p in module.student.parameters()))
    result = {"rank": trainer.global_rank, "labels": recorder.labels, "student_sum": digest,
              "generator_step": module.generator_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
