"""Run by tests/test_distributed.py in a subprocess: a 2-rank CPU (gloo) Di[M]O fit on a tiny teacher under DDP or
FSDP2 (ModelParallelStrategy + fully_shard), a checkpoint, and a resume at the same world size.

Usage: python distributed_script.py {ddp,fsdp} OUT_DIR. Each rank writes OUT_DIR/MODE/rank{r}.pt with what it saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule

FIRST_STEPS = 3
RESUMED_STEPS = 5
NETWORKS = ("student", "aux", "student_ema")
GRAD_CLIP = 0.05  # below every gradient norm of these runs: each step is clipped, with the global norm


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


def build_module(teacher_dir: Path, max_generator_steps: int) -> DiMOModule:
    teacher = MNISTTeacher(str(teacher_dir / "teacher.safetensors"), str(teacher_dir / "codebook.safetensors"))
    return DiMOModule(
        teacher, scheduler_gen=step_lr, scheduler_aux=step_lr,
        student={"r_init": [0.3, 0.9], "emb_noise_sigma": 0.3, "emb_noise_schedule": "linear",
                 "emb_noise_warmup_steps": 10},
        optim={"max_generator_steps": max_generator_steps, "accumulate_micro_batches": 2, "gen_grad_clip": GRAD_CLIP,
               "aux_grad_clip": GRAD_CLIP},
        run={"seed": 0},
    )


def strategy(mode: str, devices: int):
    if mode == "fsdp":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return "ddp_find_unused_parameters_true" if devices > 1 else "auto"


def make_trainer(mode: str, devices: int, root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy(mode, devices), max_epochs=-1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=callbacks, default_root_dir=root)


class Record(Callback):
    """Labels and local (un-reduced) losses per iteration, and the resumable state at the start of training."""

    def __init__(self):
        self.labels, self.losses, self.norms, self.start = [], [], [], None

    def on_train_start(self, trainer, pl_module):
        sch_g, sch_a = pl_module.lr_schedulers()
        self.start = dict(
            generator_step=pl_module.generator_step, iteration=pl_module.iteration,
            sigma=pl_module.current_sigma(), sched_gen=sch_g.state_dict(), sched_aux=sch_a.state_dict(),
            lr_gen=trainer.optimizers[0].param_groups[0]["lr"], lr_aux=trainer.optimizers[1].param_groups[0]["lr"],
            ema_updates=next(c for c in trainer.callbacks if isinstance(c, StudentEMA)).num_updates,
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch.conditions.tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.losses.append((float(metrics["train/loss_gen"]), float(metrics["train/loss_aux"])))
        self.norms.append((float(metrics["train/grad_norm_gen"]), float(metrics["train/grad_norm_aux"])))


def full_weights(module: DiMOModule) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of student, aux and EMA: a collective under FSDP2, called on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.split(".")[0] in NETWORKS}


def sharding_facts(module: DiMOModule) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    facts = {}
    for name in NETWORKS:
        params = dict(getattr(module, name).named_parameters())
        weight = params["transformer.layers.0.0.fn.mha.in_proj_weight"]
        facts[name] = dict(
            dtensor=all(isinstance(p, DTensor) for p in params.values()),
            local_rows=weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
            full_rows=weight.shape[0],
        )
    facts["teacher_dtensor"] = any(isinstance(p, DTensor) for p in module.teacher.parameters())
    return facts


def main(mode: str, out: Path) -> None:
    teacher_dir = out / "teacher"  # written by the test before the launch
    run = out / mode
    data = dict(num_classes=10, batch_size=8, batches_per_epoch=20)

    record = Record()
    module = build_module(teacher_dir, FIRST_STEPS)
    trainer = make_trainer(mode, 2, run, [record, StudentEMA(0.9)])
    trainer.fit(module, ClassLabelDataModule(**data))
    checkpoint = run / "first.ckpt"
    trainer.save_checkpoint(checkpoint)  # every rank: a collective (a DCP directory under FSDP2)
    with torch.no_grad():  # the sharded EMA runs a forward on every rank, as the evaluation callbacks do
        codes = module.generate(torch.arange(4) + 2 * trainer.global_rank, network=module.student_ema)
    result = dict(
        rank=trainer.global_rank, labels=record.labels, losses=record.losses, norms=record.norms,
        generator_step=module.generator_step, iteration=module.iteration, weights=full_weights(module),
        sharding=sharding_facts(module),
        codes=codes, ema_updates=next(c for c in trainer.callbacks if isinstance(c, StudentEMA)).num_updates,
        end_state=dict(sigma=module.current_sigma(), sched_gen=module.lr_schedulers()[0].state_dict()),
    )

    resumed_record = Record()
    resumed = build_module(teacher_dir, RESUMED_STEPS)
    trainer = make_trainer(mode, 2, run / "resumed", [resumed_record, StudentEMA(0.9)])
    trainer.fit(resumed, ClassLabelDataModule(**data), ckpt_path=str(checkpoint))
    result.update(resumed_start=resumed_record.start, resumed_generator_step=resumed.generator_step,
                  resumed_weights=full_weights(resumed))
    torch.save(result, run / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
