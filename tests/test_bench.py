"""`dimo bench`, the speed levers (output head, compile switch) and the time-to-quality records."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import save_tiny_mnist_teacher
from lightning.pytorch.loggers import TensorBoardLogger

from dimo_lightning.commands.cli import main
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.callbacks.fid_monitor import FIDMonitor
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.nn.transformer import MaskTransformer, count_parameters
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.training.module import DiMOModule
from dimo_lightning.training.speed import compile_networks, set_full_head

ROOT = Path(__file__).resolve().parents[1]


def _noisy_transformer(**kwargs) -> MaskTransformer:
    torch.manual_seed(0)
    net = MaskTransformer(16, 10, 7, 32, 2, 2, 64, 0.0, **kwargs).eval()
    with torch.no_grad():  # a non-zero bias over every row and column, so a wrong slice would show
        net.bias.normal_()
    return net


def test_lean_head_equals_the_full_computation_values_and_gradients():
    net = _noisy_transformer()
    codes = torch.randint(0, 17, (5, 49))
    labels = torch.tensor([0, 3, 9, 1, 5])
    drop = torch.tensor([False, True, False, True, False])
    # Independent reference: the released code's head over all N+1 positions and all ids, then sliced.
    hidden = net.last_layer(net.transformer(net.first_layer(
        torch.cat([net.tok_emb(codes), net.tok_emb(torch.where(drop, net.null_class_id, labels + 17))[:, None]], 1)
        + net.pos_emb)))
    reference = (hidden @ net.tok_emb.weight.T + net.bias)[:, :49, :17]
    lean = net(codes, labels, drop)
    assert not net.full_head
    net.full_head = True
    full = net(codes, labels, drop)
    assert lean.shape == full.shape == (5, 49, 17)
    torch.testing.assert_close(lean, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lean, full, rtol=1e-6, atol=1e-6)

    grads = {}
    for full_head in (False, True):
        net.zero_grad(set_to_none=True)
        net.full_head = full_head
        (net(codes, labels, drop) * torch.linspace(-1, 1, 17)).sum().backward()
        grads[full_head] = {n: p.grad.clone() for n, p in net.named_parameters()}
    for name in grads[True]:
        torch.testing.assert_close(grads[False][name], grads[True][name], rtol=1e-5, atol=1e-6, msg=name)
    # The class-token row and the class/null columns of the bias get no gradient either way (never returned).
    assert grads[False]["bias"][49:].abs().sum() == 0 and grads[False]["bias"][:, 17:].abs().sum() == 0


def test_head_switch_keeps_the_maskgit_state_dict_layout():
    with torch.device("meta"):
        full = MaskTransformer(1024, 1000, 16, 768, 24, 16, 3072, full_head=True)
        lean = MaskTransformer(1024, 1000, 16, 768, 24, 16, 3072)
    assert [(k, v.shape) for k, v in lean.state_dict().items()] == [(k, v.shape) for k, v in full.state_dict().items()]
    assert len(lean.state_dict()) == 305 and "full_head" not in lean.state_dict()
    small = _noisy_transformer(full_head=True)
    other = _noisy_transformer()
    other.load_state_dict(small.state_dict(), strict=True)  # checkpoints move between the two modes


def test_set_full_head_and_compile_switch_validation():
    nets = [_noisy_transformer(), torch.nn.Linear(2, 2)]
    assert set_full_head(nets, True) == 1 and nets[0].full_head
    with pytest.raises(ValueError, match="compile_networks.*studnet"):
        compile_networks({"student": nets[0]}, ["studnet"])
    with pytest.raises(ValueError, match="compile_networks lists a network twice"):
        compile_networks({"student": nets[0]}, ["student", "student"])


def test_compile_switch_builds_and_keeps_checkpoint_keys(tiny_teacher):
    plain = DiMOModule(tiny_teacher, run={"seed": 0, "full_output_head": True})
    assert plain.student.full_head and plain.aux.full_head and tiny_teacher.network.full_head
    compiled = DiMOModule(tiny_teacher, run={"seed": 0, "compile_networks": ["student", "aux"]})
    assert compiled.student._compiled_call_impl is not None and compiled.aux._compiled_call_impl is not None
    assert compiled.teacher.network._compiled_call_impl is None
    assert not compiled.student.full_head  # the module's default computes only the returned logits
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())


BENCH_KEYS = {"schema", "command", "environment", "clock", "settings", "batch_size", "sampling", "training",
              "memory", "host_syncs_per_iteration", "levers", "targets"}


def test_dimo_bench_on_a_tiny_teacher_writes_the_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights, codebook = save_tiny_mnist_teacher(tmp_path / "teacher")
    output = tmp_path / "out" / "bench.json"
    # Record how the bench calls the samplers: the teacher with the configured decoding, the student in blocks.
    teacher_calls, student_calls = [], []
    original_sample, original_sample_codes = MaskedTeacher.sample, OneStepPipeline.sample_codes

    def recording_sample(self, cond, **kwargs):
        teacher_calls.append(kwargs)
        return original_sample(self, cond, **kwargs)

    def recording_sample_codes(self, *args, **kwargs):
        student_calls.append(len(teacher_calls))
        return original_sample_codes(self, *args, **kwargs)

    monkeypatch.setattr(MaskedTeacher, "sample", recording_sample)
    monkeypatch.setattr(OneStepPipeline, "sample_codes", recording_sample_codes)
    main(["bench", "--config", str(ROOT / "configs/mnist/dimo.yaml"),
          f"--model.init_args.teacher.init_args.checkpoint={weights}",
          f"--model.init_args.teacher.init_args.codebook={codebook}", "--data.init_args.batch_size=4",
          "--repeats", "2", "--warmup", "1", "--rounds", "1", "--teacher-steps", "1,4",
          "--skip-levers", "compile,bf16_mixed",
          "--output", str(output)])
    record = json.loads(output.read_text())
    assert set(record) == BENCH_KEYS
    assert record["batch_size"] == 4 and record["environment"]["device"] == "cpu"
    sampling = record["sampling"]
    assert set(sampling["teacher_images_per_s"]) == {"1", "4"}
    assert sampling["ideal_ratio"] == 8  # CFG 2.0 in the config: 2 passes x 4 steps
    # the teacher decodes as the report does (the config's choice temperature 16, not the function default 4.5)
    assert teacher_calls and {call["choice_temperature"] for call in teacher_calls} == {16.0}
    assert {call["steps"] for call in teacher_calls} == {1, 4}
    assert sampling["teacher_sampling"]["choice_temperature"] == 16.0
    # each timed student sample is a block of max(teacher steps) = 4 calls between two teacher decodes
    assert sampling["student_calls_per_sample"] == 4
    assert set(sampling["page_faults_per_call"]) == {"student", "1", "4", "other_cfg_form"}
    # the longest decode is timed with the other CFG form too (two passes of B: the config batches CFG)
    other_form = sampling["teacher_other_cfg_form"]
    assert other_form["steps"] == 4 and other_form["cfg_batched"] is False
    assert [call.get("cfg_batched") for call in teacher_calls].count(False) >= 4
    for clock in ("wall", "cpu"):
        fastest = max(sampling["teacher_images_per_s"]["4"][clock], other_form["images_per_s"][clock])
        assert sampling["ratio_of_ideal_vs_fastest_teacher"][clock] == pytest.approx(
            sampling["student_images_per_s"][clock] / fastest / 8)
        assert sampling["ratio_of_ideal_vs_fastest_teacher"][clock] <= sampling["ratio_of_ideal"][clock] + 1e-12
    assert min(sampling["page_faults_per_call"].values()) >= 0
    blocks = [student_calls.count(n) for n in sorted(set(student_calls))]
    assert len(blocks) >= 4 and all(count == 4 for count in blocks)
    assert record["clock"] == "cpu"  # a CPU run: process CPU time is the headline, wall time beside it
    training = record["training"]
    assert set(training["passes_s"]) == {"student_fwd_bwd", "teacher_cfg_fwd_2b", "aux_fwd", "aux_fwd_bwd",
                                         "adam_steps"}  # the config reuses the sample: no fresh student forward
    for clock in ("wall", "cpu"):
        assert sampling["ratio_student_vs_teacher"][clock] == pytest.approx(
            sampling["student_images_per_s"][clock] / sampling["teacher_images_per_s"]["4"][clock])
        assert sampling["ratio_of_ideal"][clock] == pytest.approx(sampling["ratio_student_vs_teacher"][clock] / 8)
        assert training["passes_sum_s"][clock] == pytest.approx(sum(t[clock] for t in training["passes_s"].values()))
        assert training["overhead_factor"][clock] == pytest.approx(
            training["iteration_s"][clock] / training["passes_sum_s"][clock])
        assert sum(training["split"][clock].values()) == pytest.approx(1.0)
    assert record["targets"]["overhead_factor"]["value"] == training["overhead_factor"]["cpu"]
    assert record["memory"]["kind"] == "cpu_max_rss" and record["memory"]["bytes"] > 10 * 2**20
    per_iteration = training["memory_per_iteration"]
    assert per_iteration["page_faults"] >= 0 and per_iteration["system_cpu_s"] >= 0
    levers = {row["lever"]: row for row in record["levers"]}
    assert "compile" not in levers and "bf16_mixed" not in levers
    for name in ("output_head", "aux_sample", "batched_cfg (teacher pass)", "batched_cfg (teacher@4 sampling)"):
        row = levers[name]
        assert row["status"] == "measured" and row["value_off"]["wall"] > 0 and row["value_on"]["cpu"] > 0
        assert row["gain"] == pytest.approx(1 - row["value_on"]["cpu"] / row["value_off"]["cpu"])
    assert levers["host_syncs"]["status"] == "pending" and record["host_syncs_per_iteration"] is None  # CUDA only
    assert levers["tf32"]["status"] == "skipped" and levers["fused_adam"]["status"] == "skipped"
    assert set(record["targets"]) == {"ratio_of_ideal", "overhead_factor", "aux_reuse_speedup"}
    printed = capsys.readouterr().out
    assert "overhead factor" in printed and "| aux_sample | fresh | reuse |" in printed
    assert "minor page faults" in printed
    assert not (tmp_path / "runs").exists()  # the bench writes no logs or checkpoints


def test_dimo_bench_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--skip-levers", "warp_drive"])
    assert "--skip-levers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(ROOT / "configs/mnist/dimo.yaml"), "--repeats", "1"])
    assert "--repeats" in capsys.readouterr().err


def test_fid_is_recorded_against_wall_time_and_plotted(tiny_teacher, tmp_path):
    fid = FIDMonitor(every_n_generator_steps=1, num_samples=20, batch_size=20)
    module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 2}, run={"seed": 0})
    trainer = pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[fid],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1)
    trainer.fit(module, ClassLabelDataModule(10, 8, 5))
    run_dir = Path(trainer.log_dir)
    with (run_dir / "fid_vs_time.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["generator_step"]) for r in rows] == [1, 2]
    assert {"seconds", "fid", "recall", "precision"} <= set(rows[0])
    assert 0 < float(rows[0]["seconds"]) <= float(rows[1]["seconds"])
    assert float(rows[1]["fid"]) == pytest.approx(float(trainer.callback_metrics["val/fid"]), rel=1e-4)
    assert fid.state_dict()["elapsed_seconds"] >= float(rows[1]["seconds"]) - 0.05  # the CSV rounds to 0.1 s

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "val_vs_seconds/fid" in events.Tags()["scalars"]

    resumed = FIDMonitor()
    resumed.load_state_dict({"elapsed_seconds": 100.0})
    assert resumed.elapsed_seconds() == 100.0  # a resumed fit continues the clock

    spec = importlib.util.spec_from_file_location("plot_ttq", ROOT / "scripts/plot_time_to_quality.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    assert plot.read_curve(run_dir) == [(float(r["seconds"]), float(r["fid"])) for r in rows]
    (run_dir / "fid_vs_time.csv").rename(tmp_path / "moved.csv")  # now only the TensorBoard scalars are left
    assert [v for _, v in plot.read_curve(run_dir)] == pytest.approx([float(r["fid"]) for r in rows], rel=1e-5)
    png = plot.main([str(run_dir), str(tmp_path / "moved.csv"), "--output", str(tmp_path / "ttq.png"),
                     "--teacher-fid", "3.9"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_teacher_for_the_gpu_bench_loads_as_an_mnist_teacher(tmp_path):
    spec = importlib.util.spec_from_file_location("make_random_teacher", ROOT / "scripts/make_random_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with torch.device("meta"):  # the full-size preset is the released MaskGIT-256 transformer, parameter for parameter
        assert count_parameters(MaskTransformer(**script.PRESETS["maskgit256"])) == 174_160_874
    weights = script.main([str(tmp_path / "t"), "--preset", "tiny"])
    from dimo_lightning.teachers.mnist import MNISTTeacher

    teacher = MNISTTeacher(str(weights), str(tmp_path / "t" / "codebook.safetensors"))
    assert (teacher.codebook_size, teacher.num_classes, teacher.seq_len) == (1024, 1000, 256)
    logits = teacher(torch.zeros(2, 256, dtype=torch.long), torch.tensor([0, 999]))
    assert logits.shape == (2, 256, 1025)
