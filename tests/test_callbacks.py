"""Evaluation callbacks, the report schema and `dimo predict` output, on a tiny teacher."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
from dimo_lightning.evaluation.callbacks.fid_monitor import FIDMonitor
from dimo_lightning.evaluation.callbacks.sample_grid import SampleGrid
from dimo_lightning.evaluation.metrics.image_sources import open_image_source
from dimo_lightning.evaluation.report import REPORT_COLUMNS, load_reference
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.inference.prediction_writer import SampleWriter, iter_prediction_shards, read_prediction_index
from dimo_lightning.training.ema import StudentEMA, ema_rate, ema_update, evaluation_student
from dimo_lightning.training.module import DiMOModule


def trainer(tmp_path, callbacks, **kwargs):
    # default_root_dir: fast_dev_run swaps the logger for a dummy one, and files must still land under tmp_path
    return pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, **kwargs)


def test_callbacks_under_fast_dev_run(tiny_teacher, tmp_path):
    fid = FIDMonitor(every_n_generator_steps=1, num_samples=40, batch_size=20)
    grid = SampleGrid(every_n_generator_steps=1, samples_per_class=2)
    module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 5}, run={"seed": 0})
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
    module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 2}, run={"seed": 0})
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
    fresh = DiMOModule(tiny_teacher, optim={"max_generator_steps": 2}, run={"seed": 0})
    ema2 = StudentEMA(0.9)
    trainer(tmp_path / "v", [ema2, report2]).validate(fresh, ClassLabelDataModule(10, 8, 3), ckpt_path=str(ckpt))
    assert [r.model for r in report2.rows] == ["student"]
    for a, b in zip(ema2.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)  # the EMA came back from the checkpoint
    assert report2.rows[0].fid == pytest.approx(rows[-1]["fid"], rel=1e-5)  # same seed, same samples


def test_predict_streams_ordered_shards_and_png(tiny_teacher, tmp_path):
    writer = SampleWriter(shard_size=12, max_png=5)
    module = DiMOModule(tiny_teacher, run={"seed": 0})
    predictions = trainer(tmp_path, [writer]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    index = read_prediction_index(writer.path)
    assert writer.path == tmp_path / "run" / "version_0" / "predictions"
    assert index["count"] == 30 and index["image_shape"] == [28, 28, 1]
    assert [(s["first"], s["count"]) for s in index["shards"]] == [(0, 16), (16, 14)]  # flushed at >= 12 samples
    shards = list(iter_prediction_shards(writer.path))
    images = np.concatenate([s["images"] for s in shards])
    assert images.shape == (30, 28, 28, 1) and images.dtype == np.uint8 and images.max() > 0
    assert np.concatenate([s["labels"] for s in shards]).tolist() == [i % 10 for i in range(30)]
    assert np.concatenate([s["index"] for s in shards]).tolist() == list(range(30))
    assert sorted(p.name for p in (writer.path / "png").glob("*.png")) == [f"{i:06d}_{i}.png" for i in range(5)]
    assert all("images" not in p and len(p["index"]) for p in predictions)  # images live on disk only
    # the folder is an image source for `dimo stats` / evaluation, in global order
    source = open_image_source(str(writer.path))
    assert source.count == 30 and torch.equal(torch.cat(list(source.batches(7))),
                                              torch.from_numpy(images).permute(0, 3, 1, 2))
    # teacher sampling through the same command, and seeded: two runs agree
    module.settings.sampling.predict_with = "teacher"
    module.settings.sampling.teacher.steps = 4
    w2, w3 = SampleWriter(str(tmp_path / "t1"), max_png=0), SampleWriter(str(tmp_path / "t2"), max_png=0)
    trainer(tmp_path, [w2]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    trainer(tmp_path, [w3]).predict(module, ClassLabelDataModule(10, 8, 3, predict_samples=30))
    first = [np.concatenate([s["images"] for s in iter_prediction_shards(w.path)]) for w in (w2, w3)]
    assert np.array_equal(first[0], first[1]) and not np.array_equal(first[0], images)


def test_predict_conditions_split_ranks_without_overlap(monkeypatch):
    from dimo_lightning.data import labels as labels_module

    for world in (1, 2, 3, 8):
        seen, steps = [], set()
        for rank in range(world):
            monkeypatch.setattr(labels_module, "_rank_and_world", lambda r=rank, w=world: (r, w))
            batches = list(labels_module.PredictConditions(29, 10, 4))
            for batch in batches:
                if len(batch["index"]):
                    assert torch.equal(batch["conditions"], batch["index"] % 10)
                else:  # padding, so that every rank runs as many predict steps
                    assert len(batch["conditions"]) == 4
            seen += [int(i) for batch in batches for i in batch["index"]]
            steps.add(len(batches))
        assert seen == list(range(29)), world  # contiguous, in rank order, each index once
        assert len(steps) == 1, world  # the same number of steps on every rank


def test_shards_of_the_evaluation():
    from dimo_lightning.core.sharding import rank_batches, rank_counts, slice_conditions

    for world in (1, 2, 3, 5):
        blocks = [rank_batches(23, 4, r, world) for r in range(world)]
        flat = [b for block in blocks for b in block]
        assert [i for i, _ in flat] == list(range(6)) and flat[-1][1] == (20, 23)
        assert sum(rank_counts(23, 4, world)) == 23
    assert rank_counts(23, 4, 8) == [0, 4, 4, 4, 0, 4, 4, 3]  # 6 batches over 8 ranks: some ranks get none
    assert slice_conditions(["a", "b", "c"], 1, 3) == ["b", "c"]
    assert torch.equal(slice_conditions(torch.arange(5), 1, 3), torch.tensor([1, 2]))


def test_sample_grid_batches_and_caps(tiny_teacher, tmp_path, monkeypatch):
    module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 1}, run={"seed": 0})
    calls = []
    original = OneStepPipeline.sample_codes

    def counting_sample_codes(self, conditions=None, generator=None, **kwargs):
        calls.append(len(conditions))
        return original(self, conditions, generator, **kwargs)

    monkeypatch.setattr(OneStepPipeline, "sample_codes", counting_sample_codes)
    grid = SampleGrid(samples_per_class=50, classes=[3, 1, 4, 1, 5], max_rows=4, max_columns=6, batch_size=7)
    t = trainer(tmp_path, [grid], max_epochs=1)
    t.strategy.connect(module)
    image = grid.render(t, module)
    assert calls == [7, 7, 7, 3]  # 4 rows x 6 columns in batches of 7
    assert image.shape == (3, 4 * 30 + 2, 6 * 30 + 2)  # 28-pixel samples with 2-pixel padding


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


def test_reference_is_checked_before_the_first_step(tiny_teacher, tmp_path):
    from dimo_lightning.commands.stats import stats
    from dimo_lightning.evaluation.callbacks.common import shared_extractor, shared_reference
    from dimo_lightning.evaluation.metrics.features import ReferenceStats

    modules = []

    def fit_with(reference: str) -> None:
        modules.append(DiMOModule(tiny_teacher, optim={"max_generator_steps": 3}, run={"seed": 0}))
        trainer(tmp_path, [FIDMonitor(every_n_generator_steps=1, reference=reference)], max_epochs=-1).fit(
            modules[-1], ClassLabelDataModule(10, 8, 3))

    missing = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="FIDMonitor.reference") as err:
        fit_with(missing)
    assert missing in str(err.value)
    other = ReferenceStats(np.zeros(128), np.eye(128), torch.zeros(8, 128), "inception-local", "2048", (28, 28), 8)
    with pytest.raises(ValueError, match="inception-local") as err:
        fit_with(str(other.save(tmp_path / "inception.npz")))
    assert "FIDMonitor.reference" in str(err.value) and "inception.npz" in str(err.value)
    narrow = ReferenceStats(np.zeros(64), np.eye(64), torch.zeros(8, 64), "mnist-cnn", "penultimate", (28, 28), 8)
    with pytest.raises(ValueError, match="64-d"):
        fit_with(str(narrow.save(tmp_path / "narrow.npz")))
    assert [m.generator_step for m in modules] == [0, 0, 0]  # every error came before the first step
    # a `dimo stats` file and the raw images it came from give the same statistics to the callbacks
    extractor = shared_extractor("mnist-cnn", None, torch.device("cpu"))
    from_file = shared_reference(str(stats("mnist-val", str(tmp_path / "ok.npz"), "mnist-cnn")), extractor)
    from_images = shared_reference("mnist-val", extractor)
    np.testing.assert_allclose(from_file.sigma, from_images.sigma, rtol=1e-6, atol=1e-9)
    assert torch.equal(from_file.features, from_images.features)


def test_evaluation_conditions_come_from_the_datamodule_or_the_teacher():
    from types import SimpleNamespace

    from dimo_lightning.core.sharding import are_labels
    from dimo_lightning.evaluation.callbacks.common import evaluation_conditions

    module = SimpleNamespace(teacher=SimpleNamespace(num_classes=4))
    labels = evaluation_conditions(SimpleNamespace(datamodule=None), module, 10)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and are_labels(labels)
    prompts = SimpleNamespace(evaluation_conditions=lambda n: [f"a photo of {i}" for i in range(n)])
    conditions = evaluation_conditions(SimpleNamespace(datamodule=prompts), module, 3)
    assert conditions == ["a photo of 0", "a photo of 1", "a photo of 2"] and not are_labels(conditions)
    assert evaluation_conditions(SimpleNamespace(datamodule=ClassLabelDataModule(7)), module, 8).tolist() == [
        0, 1, 2, 3, 4, 5, 6, 0]
    with pytest.raises(ValueError, match="returned 2 conditions"):
        evaluation_conditions(SimpleNamespace(datamodule=SimpleNamespace(evaluation_conditions=lambda n: [1, 2])),
                              module, 3)
    with pytest.raises(ValueError, match="num_classes"):
        evaluation_conditions(SimpleNamespace(datamodule=None), SimpleNamespace(teacher=object()), 3)
