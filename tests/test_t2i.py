"""Text-to-image end to end: prompt-faithfulness columns of the evaluation (against an independent count), SampleGrid
and `dimo predict` with prompts, the negative prompt set in one place, and a fast_dev_run of configs/mnist/t2i.yaml."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_prompt_teacher import FakePromptTeacher

from dimo_lightning.commands.cli import DiMOCLI, main
from dimo_lightning.data.prompts import PromptDataModule
from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
from dimo_lightning.evaluation.callbacks.fid_monitor import FIDMonitor
from dimo_lightning.evaluation.callbacks.sample_grid import SampleGrid
from dimo_lightning.evaluation.report import EvalRow, format_table, sharded_sample_features, write_report
from dimo_lightning.inference.prediction_writer import SampleWriter, iter_prediction_shards, read_prediction_index
from dimo_lightning.training.module import DiMOModule

ROOT = Path(__file__).resolve().parents[1]
T2I_CONFIG = ROOT / "configs/mnist/t2i.yaml"
CAPTIONS = ["a bold seven leaning right", "thin upright 3", "the digit two, light and standing upright",
            "a left-leaning heavy 8", "handwritten 0, right-slanted, medium strokes", "regular vertical one"]


def write_prompts(path: Path, prompts: list[str]) -> str:
    path.write_text("".join(f"{p}\n" for p in prompts))
    return str(path)


def fit_trainer(tmp_path, callbacks, **kwargs):
    return pl.Trainer(accelerator="cpu", max_epochs=-1, logger=pl.loggers.TensorBoardLogger(tmp_path, name="run"),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, callbacks=callbacks, **kwargs)


# ---- prompt faithfulness in the sharded evaluation ------------------------------------------------------------------
class _NumberedPrompt(str):
    """A prompt that knows which real digit "generates" it."""

    def __new__(cls, text: str, number: int):
        self = super().__new__(cls, text)
        self.number = number
        return self


class _RealDigits:
    """A fake module whose "teacher" decodes codes that are indices into real validation digits."""

    def __init__(self, images: torch.Tensor, rank: int, world: int) -> None:
        self.images = images
        self.device = torch.device("cpu")
        self.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        self.teacher = SimpleNamespace(decode=lambda codes: self.images[codes[:, 0]][:, None])

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        # every rank "sends" the same block: counts of the gathered rows must be summed, features trimmed per rank
        world = self.trainer.world_size
        return tensor if world == 1 else torch.stack([tensor] * world)


DIGIT_ONLY_FORMS = ("the digit", "handwritten", "a drawing of", "an image of", "the number", "write", "picture of",
                    "draw")


def _captioned_val_digits(n: int):
    """n real validation digits with prompts built from known attributes, some deliberately wrong -> (images,
    prompts, asked digits, whether thickness / slant are right, whether they are judged at all).

    Every fifth prompt asks for the wrong digit and names no thickness or slant (so those are not judged: they would
    be judged with the thresholds of the asked digit); every third asks for the wrong thickness, every fourth (from
    the second) for the wrong slant."""
    from dimo_lightning.data.captions import DIGIT_WORDS, SLANT, THICKNESS, render_caption, split_attributes
    from dimo_lightning.data.mnist import load_mnist_split

    images, _ = load_mnist_split("val")
    labels, thick, sl = split_attributes("val")
    rng = random.Random(0)
    prompts, asked, right, judged = [], [], {"thickness": [], "slant": []}, []
    for i in range(n):
        digit, t, s = int(labels[i]), int(thick[i]), int(sl[i])
        if i % 5 == 0:
            asked.append((digit + 1) % 10)
            prompts.append(f"{DIGIT_ONLY_FORMS[i // 5]} {DIGIT_WORDS[asked[-1]]}")
            judged.append(False)
            right["thickness"].append(False)
            right["slant"].append(False)
            continue
        wrong_t, wrong_s = i % 3 == 0, i % 4 == 1
        asked.append(digit)
        prompts.append(render_caption(digit, THICKNESS[(t + 1) % 3 if wrong_t else t],
                                      SLANT[(s + 2) % 3 if wrong_s else s], rng))
        judged.append(True)
        # the asked digit is the true one, so its own (train-split) thresholds give back its attributes exactly
        right["thickness"].append(not wrong_t)
        right["slant"].append(not wrong_s)
    return images[:n], prompts, torch.tensor(asked), {k: torch.tensor(v) for k, v in right.items()}, \
        torch.tensor(judged)


def test_prompt_accuracy_columns_match_an_independent_count():
    from dimo_lightning.evaluation.metrics.classifier import load_classifier
    from dimo_lightning.evaluation.metrics.features import FeatureExtractor

    n = 40
    images, prompts, asked, right, judged = _captioned_val_digits(n)
    classifier = load_classifier()
    predicted = classifier(images[:, None]).argmax(1)
    extractor = FeatureExtractor("mnist-cnn", None, torch.device("cpu"))
    prompts = [_NumberedPrompt(p, i) for i, p in enumerate(prompts)]  # equal captions may recur: carry the index

    def sample_codes(batch, generator):
        return torch.tensor([[p.number] for p in batch])

    def expected(rows: slice, times: int = 1) -> dict[str, tuple[int, int]]:
        class_hits = int((predicted == asked)[rows].sum())  # the classifier's reading against the asked digit
        return {"class": (times * class_hits, times * len(asked[rows])),
                **{k: (times * int(right[k][rows].sum()), times * int(judged[rows].sum())) for k in right}}

    module = _RealDigits(images, rank=0, world=1)
    samples = sharded_sample_features(module, sample_codes, prompts, extractor, 16, seed=0,
                                      accuracy_network=classifier)
    assert samples.attribute_counts == expected(slice(None))
    assert int(judged.sum()) == 32 and 0 < int(right["thickness"].sum()) < 32 and 0 < int(right["slant"].sum()) < 32
    assert samples.accuracy == pytest.approx(float((predicted == asked).float().mean()))
    assert samples.attribute_accuracy("slant") == pytest.approx(float(right["slant"].sum()) / 32)
    assert samples.features.shape == (n, extractor.feature_dim)
    # two ranks: rank 0 scores its contiguous share (global batch 0 of 3, plus a dropped padding batch); the counts
    # of all ranks are summed (this fake world sends rank 0's block twice)
    shard = _RealDigits(images, rank=0, world=2)
    halves = sharded_sample_features(shard, sample_codes, prompts, extractor, 16, seed=0, accuracy_network=classifier)
    assert halves.attribute_counts == expected(slice(0, 16), times=2)
    # label conditions keep the single accuracy column
    labels = load_val_labels()[:16]
    by_label = sharded_sample_features(module, lambda b, g: torch.arange(16)[:, None], labels, extractor, 16,
                                       seed=0, accuracy_network=classifier)
    assert by_label.attribute_counts is None
    assert by_label.accuracy == pytest.approx(float((predicted[:16] == labels).float().mean()))


def load_val_labels() -> torch.Tensor:
    from dimo_lightning.data.mnist import load_mnist_split

    return load_mnist_split("val")[1]


def test_report_table_has_prompt_columns_and_label_rows_keep_their_layout(tmp_path):
    label_row = EvalRow("student", 1, 5.0, 0.01, 0.7, 0.5, 0.9, 100.0)
    assert "thickness_accuracy" not in label_row.as_dict()
    assert "| accuracy |" in format_table([label_row]) and "thickness" not in format_table([label_row])
    rows = [EvalRow("teacher", 16, 7.2, 0.02, 0.75, 0.47, 0.948, 5.0, None, 0.762, 0.853),
            EvalRow("student", 1, 7.0, 0.02, 0.75, 0.47, 0.94, 300.0, None, 0.75, 0.84)]
    table = format_table(rows)
    assert "| class acc. | thickness acc. | slant acc. |" in table
    assert "| teacher | 16 | 7.200 | 0.0200 | 0.750 | 0.470 | 0.948 | 0.762 | 0.853 | 5 |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())
    json_path, _ = write_report(rows, tmp_path)
    import json

    written = json.loads(json_path.read_text())["rows"]
    assert written[1]["accuracy"] == 0.94 and written[1]["thickness_accuracy"] == 0.75
    assert written[1]["slant_accuracy"] == 0.84


# ---- SampleGrid, FIDMonitor and `dimo predict` with prompts ------------------------------------------------
def test_grid_fid_monitor_and_report_with_prompts(tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", CAPTIONS)
    dm = PromptDataModule(train_prompts=prompts, eval_prompts=prompts, batch_size=4, batches_per_epoch=2)
    grid = SampleGrid(every_n_generator_steps=100, samples_per_class=2, max_rows=3, batch_size=4)
    fid = FIDMonitor(every_n_generator_steps=1, num_samples=6, batch_size=4)
    report = EvaluationReport(num_samples=6, teacher_steps=[2], batch_size=4)
    module = DiMOModule(FakePromptTeacher(), optim={"max_generator_steps": 1}, run={"seed": 0})
    trainer = fit_trainer(tmp_path, [grid, fid, report])
    trainer.fit(module, dm)
    assert [(r.model, r.steps) for r in report.rows] == [("teacher", 2), ("student", 1)]
    assert all(r.scores_prompts and 0 <= r.accuracy <= 1 for r in report.rows)
    assert "| class acc. | thickness acc. | slant acc. |" in (Path(trainer.log_dir) / "eval.md").read_text()
    assert grid.last_path.name == "step_000001.png"
    assert grid.last_path.with_suffix(".txt").read_text().splitlines() == CAPTIONS[:3]  # one prompt per row
    logged = trainer.callback_metrics
    assert fid.evaluations == 1
    for name in ("val/accuracy", "val/thickness_accuracy", "val/slant_accuracy"):
        assert 0.0 <= float(logged[name]) <= 1.0, name
    header = (Path(trainer.log_dir) / "fid_vs_time.csv").read_text().splitlines()[0]
    assert header.endswith("accuracy,thickness_accuracy,slant_accuracy")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/prompts/text_summary" in events.Tags()["tensors"]


def test_predict_with_a_prompts_file_writes_prompts_in_order(tmp_path):
    from PIL import Image

    from dimo_lightning.evaluation.metrics.image_sources import open_image_source

    prompts = CAPTIONS + ["ein Prompt mit Umlaut: grün"]
    path = write_prompts(tmp_path / "predict.txt", prompts)
    dm = PromptDataModule(train_prompts=path, predict_prompts=path, batch_size=3, predict_samples=9)
    writer = SampleWriter(str(tmp_path / "out"), shard_size=4, max_png=3)
    module = DiMOModule(FakePromptTeacher(), run={"seed": 0})
    fit_trainer(tmp_path, [writer]).predict(module, dm)
    index = read_prediction_index(writer.path)
    assert index["count"] == 9 and index["conditions"] == "prompts"
    shards = list(iter_prediction_shards(writer.path))
    assert all(set(s) == {"images", "prompts", "index"} for s in shards)
    expected = [prompts[i % len(prompts)] for i in range(9)]
    assert np.concatenate([s["prompts"] for s in shards]).tolist() == expected
    assert np.concatenate([s["index"] for s in shards]).tolist() == list(range(9))
    pngs = sorted((writer.path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert [Image.open(p).text["prompt"] for p in pngs] == expected[:3]
    first = np.asarray(Image.open(pngs[0]))
    assert np.array_equal(first, shards[0]["images"][0, ..., 0])  # the PNG holds the sample's pixels
    source = open_image_source(str(writer.path))  # `dimo stats` / evaluation read the folder as before
    assert source.count == 9 and sum(len(b) for b in source.batches(4)) == 9


# ---- the negative prompt: one place (the teacher) ---------------------------------------------------------------
def test_negative_prompt_is_set_on_the_teacher_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = DiMOCLI(args=["--config", str(T2I_CONFIG), "--model.init_args.teacher.init_args.negative_prompt=thin",
                        "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    teacher = cli.model.teacher
    assert teacher.negative_prompt == "thin"
    cond = teacher.encode_condition(["a bold seven leaning right", "thin upright 3"])
    codes = torch.full((2, 49), teacher.mask_id)
    negative = teacher.encode_condition(["thin", "thin"])
    net = teacher.network
    expected = teacher(codes, negative) + 3.0 * (teacher(codes, cond) - teacher(codes, negative))
    torch.testing.assert_close(teacher.guided_logits(net, codes, cond, 3.0), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(T2I_CONFIG), "--data.init_args.negative_prompt=thin"])
    assert "negative_prompt" in capsys.readouterr().err


def test_t2i_config_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(T2I_CONFIG), "--trainer.fast_dev_run=2", "--data.init_args.batch_size=4",
          "--trainer.enable_progress_bar=false"])
