"""2-rank DDP and FSDP2 (ModelParallelStrategy + fully_shard) on CPU/gloo: ranks draw different conditions and
noise, every parameter of student, aux and EMA stays equal across ranks (and equal between DDP and FSDP2), the
teacher stays out of checkpoints, and a checkpoint resumes at the same world size and at a different one (2 -> 1)
with the same generator step, sigma, LR schedulers and EMA counter.

The two 2-rank runs are launched once per session, concurrently (tests/distributed_script.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_script import (
    FIRST_STEPS,
    GRAD_CLIP,
    NETWORKS,
    RESUMED_STEPS,
    Record,
    build_module,
    full_weights,
    make_trainer,
)
from helpers import save_tiny_mnist_teacher

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.training.ema import StudentEMA

SCRIPT = Path(__file__).with_name("distributed_script.py")
MODES = ("ddp", "fsdp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    save_tiny_mnist_teacher(out / "teacher")
    root = str(Path(__file__).resolve().parents[1])
    procs = {}
    ports = set()
    while len(ports) < len(MODES):
        ports.add(free_port())
    for mode, port in zip(MODES, sorted(ports)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "PL_GLOBAL_SEED"):
            env.pop(key, None)
        procs[mode] = subprocess.Popen([sys.executable, str(SCRIPT), mode, str(out)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for mode, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            pytest.fail(f"{mode} run timed out:\n{log[-3000:]}")
        assert proc.returncode == 0, f"{mode} run failed:\n{log[-4000:]}"
        results[mode] = [torch.load(out / mode / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, results


@pytest.mark.parametrize("mode", MODES)
def test_ranks_draw_differently_and_stay_in_sync(runs, mode):
    _, results = runs
    rank0, rank1 = results[mode]
    assert rank0["generator_step"] == rank1["generator_step"] == FIRST_STEPS
    assert rank0["labels"] != rank1["labels"]  # each rank draws its own conditions
    assert all(a != b for a, b in zip(rank0["losses"], rank1["losses"]))  # and its own noise
    # the clipping norm is global (all-reduced gradients; under FSDP2 all shards of all ranks): the same on both
    # ranks, and above the threshold, so every step was clipped with it
    assert rank0["norms"] == rank1["norms"]
    assert min(min(n) for n in rank0["norms"]) > GRAD_CLIP
    # every parameter of student, aux and EMA (full tensors; gathered from the shards under FSDP2)
    for name in NETWORKS:
        assert any(k.startswith(name + ".") for k in rank0["weights"]), name
    assert rank0["weights"].keys() == rank1["weights"].keys()
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    assert rank0["ema_updates"] == rank1["ema_updates"] == FIRST_STEPS
    assert rank0["codes"].shape == (4, 49) and int(rank0["codes"].max()) < 16  # the EMA samples


def test_fsdp_shards_student_aux_and_ema_and_trains_like_ddp(runs):
    _, results = runs
    facts = results["fsdp"][0]["sharding"]
    for name in NETWORKS:
        assert facts[name]["dtensor"], name
        assert facts[name]["local_rows"] * 2 == facts[name]["full_rows"], name  # half the rows on each rank
    assert not facts["teacher_dtensor"]  # replicated
    assert not results["ddp"][0]["sharding"]["student"]["dtensor"]
    ddp, fsdp = results["ddp"][0], results["fsdp"][0]
    assert ddp["weights"].keys() == fsdp["weights"].keys()
    for a, b in zip(ddp["norms"], fsdp["norms"]):
        assert a == pytest.approx(b, rel=1e-5)
    for phase in ("weights", "resumed_weights"):
        for key, value in ddp[phase].items():  # same seeds and data: only the reduction order differs
            torch.testing.assert_close(fsdp[phase][key], value, rtol=0, atol=1e-5, msg=f"{phase} {key}")
    # and training moved the networks
    assert not torch.equal(ddp["weights"]["student.transformer.layers.0.0.fn.mha.in_proj_weight"],
                           ddp["resumed_weights"]["student.transformer.layers.0.0.fn.mha.in_proj_weight"])


def expected_start(steps: int) -> dict:
    return dict(generator_step=steps, iteration=steps, sigma=pytest.approx(0.3 * steps / 10),
                lr=pytest.approx(1e-3 * 0.9**steps), ema_updates=steps)


def check_start(start: dict) -> None:
    exp = expected_start(FIRST_STEPS)
    assert start["generator_step"] == exp["generator_step"]
    assert start["iteration"] == exp["iteration"]
    assert start["sigma"] == exp["sigma"]
    assert start["lr_gen"] == exp["lr"] and start["lr_aux"] == exp["lr"]
    assert start["sched_gen"]["last_epoch"] == start["sched_aux"]["last_epoch"] == FIRST_STEPS
    assert start["ema_updates"] == exp["ema_updates"]


@pytest.mark.parametrize("mode", MODES)
def test_resume_same_world_size(runs, mode):
    _, results = runs
    for rank in results[mode]:
        check_start(rank["resumed_start"])
        assert rank["end_state"]["sched_gen"] == rank["resumed_start"]["sched_gen"]
        assert rank["resumed_generator_step"] == RESUMED_STEPS


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_holds_student_aux_ema_but_no_teacher(runs, mode):
    out, _ = runs
    path = out / mode / "first.ckpt"
    if mode == "fsdp":  # a DCP directory: one shard file per rank plus metadata
        from torch.distributed.checkpoint import FileSystemReader

        assert path.is_dir()
        keys = {k.removeprefix("state_dict.") for k in FileSystemReader(path).read_metadata().state_dict_metadata
                if k.startswith("state_dict.")}
    else:
        keys = set(torch.load(path, weights_only=False)["state_dict"])
    assert not {k for k in keys if k.startswith("teacher.")}
    assert {k.split(".")[0] for k in keys} == set(NETWORKS)


class WeightsAtStart(Record):
    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.weights = full_weights(pl_module)


@pytest.mark.parametrize("mode", MODES)
def test_resume_on_one_rank(runs, mode, tmp_path):
    """2 -> 1 ranks: DDP's full checkpoint on one device; FSDP2's DCP checkpoint resharded onto a 1-rank mesh."""
    out, results = runs
    record = WeightsAtStart()
    module = build_module(out / "teacher", RESUMED_STEPS)
    trainer = make_trainer(mode, 1, tmp_path, [record, StudentEMA(0.9)])
    trainer.fit(module, ClassLabelDataModule(10, 8, 20), ckpt_path=str(out / mode / "first.ckpt"))
    check_start(record.start)
    assert module.generator_step == RESUMED_STEPS
    if mode == "fsdp":  # configure_model is idempotent: a second call keeps the sharded networks as they are
        networks = [getattr(module, name) for name in NETWORKS]
        module.configure_model()
        assert [getattr(module, name) for name in NETWORKS] == networks
    # student, aux and EMA come back exactly as the 2-rank run left them
    saved = results[mode][0]["weights"]
    assert record.weights.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(record.weights[key], value, rtol=0, atol=0, msg=key)
