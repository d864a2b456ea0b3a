"""Run by tests/test_distributed_callbacks.py: the shipped callback set under 2-rank CPU DDP (gloo) on a tiny teacher,
fit + validate + predict in one launch. Each rank writes rank<R>.json with what it computed and which files it wrote.
"""

import importlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from helpers import save_tiny_mnist_teacher

import dimo_lightning.evaluation.callbacks.evaluation_report as report_module
import dimo_lightning.evaluation.callbacks.sample_grid as samples_module
import dimo_lightning.inference.prediction_writer as writer_module
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
from dimo_lightning.evaluation.callbacks.fid_monitor import FIDMonitor
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.module import DiMOModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = {  # the shipped arguments, scaled down to a few samples and steps
    "FIDMonitor": dict(every_n_generator_steps=2, num_samples=40, batch_size=16),
    "SampleGrid": dict(every_n_generator_steps=2, batch_size=16, samples_per_class=3),
    "EvaluationReport": dict(num_samples=40, teacher_steps=[1, 2], batch_size=16),
    "SampleWriter": dict(shard_size=5, max_png=4),
}


def build(spec: dict, overrides: dict):
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**(spec.get("init_args") or {}), **overrides})


def main(out_dir: str) -> None:
    out = Path(out_dir)
    writes: list[str] = []  # files this rank wrote through the callbacks' writers

    def record(name, function):
        def wrapped(*args, **kwargs):
            writes.append(name)
            return function(*args, **kwargs)
        return wrapped

    report_module.write_report = record("eval.json", report_module.write_report)
    samples_module.save_image = record("grid", samples_module.save_image)
    writer_module.write_prediction_index = record("index.json", writer_module.write_prediction_index)

    mnist = yaml.safe_load((CONFIGS / "mnist" / "dimo.yaml").read_text())
    imagenet = yaml.safe_load((CONFIGS / "imagenet.yaml").read_text())
    callbacks = []
    for spec in mnist["trainer"]["callbacks"]:
        name = spec["class_path"].rpartition(".")[2]
        extra = {"dirpath": str(out / "ckpt_mnist")} if name == "ModelCheckpoint" else {}
        callbacks.append(build(spec, {**SMALL.get(name, {}), **extra}))
    imagenet_ckpt = next(s for s in imagenet["trainer"]["callbacks"] if s["class_path"].endswith("ModelCheckpoint"))
    callbacks.append(build(imagenet_ckpt, {"every_n_train_steps": 4, "dirpath": str(out / "ckpt_imagenet")}))
    plugins = [build(spec, {}) for spec in mnist["trainer"]["plugins"]]

    weights, codebook = save_tiny_mnist_teacher(out / "teacher")
    module = DiMOModule(MNISTTeacher(str(weights), str(codebook)), optim={"max_generator_steps": 4}, run={"seed": 0})
    forwards = {"student": 0, "teacher": 0}  # sampling calls: equal on every rank, as sharded networks need

    def count(name, function):
        def wrapped(*args, **kwargs):
            forwards[name] += 1
            return function(*args, **kwargs)
        return wrapped

    OneStepPipeline.sample_codes = count("student", OneStepPipeline.sample_codes)
    module.teacher.sample = count("teacher", module.teacher.sample)
    fid = next(c for c in callbacks if isinstance(c, FIDMonitor))
    computed = []
    compute = fid.compute
    fid.compute = lambda trainer, pl_module: computed.append(compute(trainer, pl_module)) or computed[-1]

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=-1,
                         num_sanity_val_steps=0, logger=pl.loggers.TensorBoardLogger(out, name="run"),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, plugins=plugins,
                         default_root_dir=out)
    rank = trainer.global_rank
    original_save = trainer.strategy.checkpoint_io.save_checkpoint
    trainer.strategy.checkpoint_io.save_checkpoint = record("checkpoint", original_save)
    data = ClassLabelDataModule(10, 8, 2, predict_samples=23)  # 3 batches of 8: the ranks get 8 and 15 samples
    trainer.fit(module, data)
    logged_fid = float(trainer.callback_metrics["val/fid"])
    report = next(c for c in callbacks if isinstance(c, EvaluationReport))
    fit_rows = [r.as_dict() for r in report.rows]
    trainer.validate(module, data)
    predictions = trainer.predict(module, data)
    result = {
        "rank": rank,
        "generator_step": module.generator_step,
        "fid_evaluations": fid.evaluations,
        "computed": computed,
        "logged_fid": logged_fid,
        "fit_rows": fit_rows,
        "validate_rows": [r.as_dict() for r in report.rows],
        "writes": writes,
        "forwards": forwards,
        "predicted_index": [int(i) for p in predictions for i in p["index"]],
        "predict_dir": str(next(c for c in callbacks if isinstance(c, writer_module.SampleWriter)).path),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
