"""Evaluation callbacks, the report schema and `dimo predict` output, on a tiny teacher."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from dimo_lightning.callbacks.ema import StudentEMA, ema_rate, ema_update, evaluation_student
from dimo_lightning.callbacks.fid import FIDMonitor
from dimo_lightning.callbacks.report import EvaluationReport
from dimo_lightning.callbacks.samples import SampleGrid
from dimo_lightning.callbacks.writer import SampleWriter
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation import REPORT_COLUMNS, load_reference
from dimo_lightning.module import DiMOModule


def trainer(tmp_path, callbacks, **kwargs):
    # default_root_dir: fast_dev_run swaps the logger for a dummy one, and files must still land under tmp_path
    return pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, **kwargs)


def test_callbacks_under_fast_dev_run(tiny_teacher, tmp_path):
    fid = FIDMonitor(every_n_generator_steps=1, num_samples=40, batch_size=20)
    grid = SampleGrid(every_n_generator_steps=1, samples_per_class=2)
    module = DiMOModule(tiny_teacher, max_generator_steps=5, seed=0)
    t = trainer(tmp_path, [StudentEMA(0.9), fid, grid], fast_dev_run=1)
    t.fit(module, ClassLabelDataModule(10, 8, 3))
    metrics = t.callback_metrics
    for name in ("val/fid", "val/kid", "val/precision", "val/recall", "val/accuracy"):
        assert name in metrics and torch.isfinite(metrics[name])
    assert float(metrics["val/fid"]) > 0
    assert grid.last_path is not None and grid.last_path.is_file()
    assert grid.last_path.is_relative_to(tmp_path)


def test_report_schema_and_files(tiny_teacher, tmp_path, capsys):
    report = EvaluationReport(num_samples=40, teacher_steps=[1, 2], batch_size=20, teacher_cfg_scale=2.0)
    module = DiMOModule(tiny_teacher, max_generator_steps=2, seed=0)
    ema = StudentEMA(0.9)
    t = trainer(tmp_path, [ema, report], max_epochs=-1)
    t.fit(module, ClassLabelDataModule(10, 8, 3))
    run_dir = tmp_path / "run" / "version_0"
    payload = json.loads((run_dir / "eval.json").read_text())
    rows = payload["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 1), ("teacher", 2), ("student", 1)]
    for row in rows:
        assert set(REPORT_COLUMNS) <= set(row)
        assert row["fid"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert 0 <= row["accuracy"] <= 1 and row["images_per_s"] > 0
    assert payload["student"] == "ema"
    md = (run_dir / "eval.md").read_text()
    assert "| student | 1 |" in md and "| teacher | 2 |" in md
    assert "| model | steps | FID |" in capsys.readouterr().out
    # the EMA is what was evaluated, and it differs from the raw student after training
    assert evaluation_student(module) is ema.module
    # `dimo validate --ckpt_path` path: a fresh trainer loads the checkpoint and writes the report again
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    report2 = EvaluationReport(num_samples=40, teacher_steps=[], batch_size=20)
    fresh = DiMOModule(tiny_teacher, max_generator_steps=2, seed=0)
    ema2 = StudentEMA(0.9)
    trainer(tmp_path / "v", [ema2, report2]).validate(fresh, ClassLabelDataModule(10, 8, 3), ckpt_path=str(ckpt))
    assert [r.model for r in report2.rows] == ["student"]
    for a, b in zip(ema2.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)  # the EMA came back from the checkpoint
    assert report2.rows[0].fid == pytest.approx(rows[-1]["fid"], rel=1e-5)  # same seed, same samples


def test_predict_writes_npz_and_png(tiny_teacher, tmp_path):
    writer = SampleWriter(max_png=5)
    module = DiMOModule(tiny_teacher, seed=0)
    trainer(tmp_path, [writer]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    data = np.load(writer.path)
    assert data["images"].shape == (30, 28, 28) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["labels"].tolist() == [i % 10 for i in range(30)]
    assert len(list((writer.path.parent / "png").glob("*.png"))) == 5
    # teacher sampling through the same command, and seeded: two runs agree
    module.hparams.predict_with = "teacher"
    module.teacher_sampling.steps = 4
    w2, w3 = SampleWriter(str(tmp_path / "t1"), 0), SampleWriter(str(tmp_path / "t2"), 0)
    trainer(tmp_path, [w2]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    trainer(tmp_path, [w3]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    assert np.array_equal(np.load(w2.path)["images"], np.load(w3.path)["images"])
    assert not np.array_equal(np.load(w2.path)["images"], data["images"])


def test_ema_math():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.3 * pa + 0.7 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.3)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p, e.detach())
    assert ema_rate(0, 0.999, True) == pytest.approx(0.1)
    assert ema_rate(10_000, 0.999, True) == 0.999
    assert ema_rate(0, 0.999, False) == 0.999


def test_reference_loading(tmp_path):
    images, labels = load_reference("mnist-val")
    assert images.shape == (1000, 1, 28, 28) and labels.shape == (1000,)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))  # ADM layout
    assert load_reference(str(tmp_path / "ref.npz"))[0].shape == (4, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_reference(str(tmp_path / "nope.npz"))
