"""The shipped callback set under 2-rank DDP on CPU (gloo): fit, validate and predict complete, metrics agree across
ranks, only rank zero writes the run's files, and predict writes each global index once, in order."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from dimo_lightning.inference.prediction_writer import iter_prediction_shards, read_prediction_index


def test_shipped_callbacks_under_two_rank_ddp(tmp_path):
    script = Path(__file__).with_name("ddp_callbacks_script.py")
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    # A fresh rendezvous port, and no rank variables inherited from an in-process run earlier in the session (a
    # MASTER_PORT left in os.environ may still be bound by that run's store: EADDRINUSE).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update({"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_outputs(tmp_path)
    check_one_process_gives_the_same_results(tmp_path)


def check_outputs(tmp_path: Path) -> None:
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    r0, r1 = ranks

    assert r0["generator_step"] == r1["generator_step"] == 4
    # uneven shards (40 samples in batches of 16, 23 predictions in batches of 8) still give every rank the same
    # number of sampling forwards: a sharded (FSDP) network would hang otherwise
    assert r0["forwards"] == r1["forwards"] and r0["forwards"]["teacher"] > 0 and r0["forwards"]["student"] > 0
    # FIDMonitor: evaluated at generator steps 2 and 4, on both ranks, with identical numbers everywhere
    assert r0["fid_evaluations"] == r1["fid_evaluations"] == 2
    assert r0["computed"] == r1["computed"] and r0["logged_fid"] == r1["logged_fid"]
    assert r0["logged_fid"] == pytest.approx(r0["computed"][-1]["fid"], rel=1e-6)  # logged as float32
    assert r0["computed"][-1]["fid"] > 0 and r0["computed"][-1]["accuracy"] is not None
    # EvaluationReport at fit end and in validate: the same rows on both ranks; the same samples both times
    assert r0["fit_rows"] == r1["fit_rows"] and r0["validate_rows"] == r1["validate_rows"]
    assert [(r["model"], r["steps"]) for r in r0["fit_rows"]] == [("teacher", 1), ("teacher", 2), ("student", 1)]
    for fit_row, validate_row in zip(r0["fit_rows"], r0["validate_rows"]):
        assert fit_row["fid"] == validate_row["fid"]

    # only rank zero wrote files: report twice, grids (start, steps 2 and 4, end), checkpoints, the predict index
    assert r1["writes"] == []
    assert r0["writes"].count("eval.json") == 2 and r0["writes"].count("index.json") == 1
    assert r0["writes"].count("grid") >= 3 and r0["writes"].count("checkpoint") >= 3
    run_dir = tmp_path / "run" / "version_0"
    assert (run_dir / "eval.json").is_file() and len(list((run_dir / "samples").glob("step_*.png"))) >= 3
    # retention: last + best by val/fid (MNIST); last + top 3 of the every-2,000-step checkpoints (ImageNet)
    mnist_ckpts = sorted(p.name for p in (tmp_path / "ckpt_mnist").iterdir())
    imagenet_ckpts = sorted(p.name for p in (tmp_path / "ckpt_imagenet").iterdir())
    assert "last.ckpt" in mnist_ckpts and len(mnist_ckpts) == 2, mnist_ckpts
    assert "last.ckpt" in imagenet_ckpts and len(imagenet_ckpts) == 3, imagenet_ckpts  # saves at steps 2 and 4
    assert not [p for p in tmp_path.rglob("*.tmp*")]  # atomic writes leave no temporaries

    # predict: contiguous rank ranges of whole batches of 8 (8 + 15 samples), each global index once, in order
    assert r0["predicted_index"] == list(range(8)) and r1["predicted_index"] == list(range(8, 23))
    index = read_prediction_index(r0["predict_dir"])
    assert index["count"] == 23
    shards = list(iter_prediction_shards(r0["predict_dir"]))
    assert np.concatenate([s["index"] for s in shards]).tolist() == list(range(23))
    assert np.concatenate([s["labels"] for s in shards]).tolist() == [i % 10 for i in range(23)]


def check_one_process_gives_the_same_results(tmp_path: Path) -> None:
    """One process validating and predicting from the 2-rank run's last checkpoint scores and writes the very same
    samples: the evaluation and predict shards do not depend on the world size."""
    import lightning.pytorch as pl

    from dimo_lightning.data.labels import ClassLabelDataModule
    from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
    from dimo_lightning.inference.prediction_writer import SampleWriter
    from dimo_lightning.teachers.mnist import MNISTTeacher
    from dimo_lightning.training.ema import StudentEMA
    from dimo_lightning.training.module import DiMOModule

    teacher = MNISTTeacher(str(tmp_path / "teacher" / "teacher.safetensors"),
                           str(tmp_path / "teacher" / "codebook.safetensors"))
    writer = SampleWriter(str(tmp_path / "single"), max_png=0)
    report = EvaluationReport(num_samples=40, teacher_steps=[1, 2], batch_size=16, teacher_cfg_scale=2.0,
                              teacher_choice_temperature=16.0)  # as configs/mnist/dimo.yaml
    last = str(tmp_path / "ckpt_imagenet" / "last.ckpt")
    data = ClassLabelDataModule(10, 8, 2, predict_samples=23)
    # one trainer per command, as `dimo validate` and `dimo predict` (an EMA built under validate's inference mode
    # cannot take a checkpoint's weights again in the same process)
    # The ranks ran with one thread (torch and BLAS); so does this process, or the metrics' float reductions
    # (covariances, the matrix square root) differ in the last digits from the thread count alone.
    torch.set_num_threads(1)  # restored by conftest
    with threadpool_limits(limits=1):
        for callback, run in ((report, "validate"), (writer, "predict")):
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[StudentEMA(0.99), callback],
                                 default_root_dir=tmp_path / "single")
            module = DiMOModule(teacher, optim={"max_generator_steps": 4}, run={"seed": 0})
            getattr(trainer, run)(module, data, ckpt_path=last)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    for row, distributed in zip(report.rows, rank0["validate_rows"], strict=True):
        for column in ("fid", "kid", "precision", "recall", "accuracy", "is"):
            assert row.as_dict()[column] == pytest.approx(distributed[column], rel=1e-9, abs=1e-12), column
    single = np.concatenate([s["images"] for s in iter_prediction_shards(writer.path)])
    distributed = np.concatenate([s["images"] for s in iter_prediction_shards(rank0["predict_dir"])])
    assert np.array_equal(single, distributed)

