"""One set of teacher decoding settings: `dimo predict` (sampling.predict_with=teacher) and EvaluationReport read the
module's `sampling.teacher`; the report's own arguments only override."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dimo_lightning.evaluation.callbacks.evaluation_report as report_module
from dimo_lightning.commands.cli import DiMOCLI
from dimo_lightning.core.teacher_sampling import TeacherSampling
from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
from dimo_lightning.training.module import DiMOModule

ROOT = Path(__file__).resolve().parents[1]


def _report_settings(module, report, tmp_path, monkeypatch) -> dict:
    """The keyword arguments the report hands the teacher's sampler (the sampling itself is stubbed out)."""
    seen = {}
    teacher = module.teacher
    monkeypatch.setattr(teacher, "sample", lambda cond, **kw: seen.update(kw) or torch.zeros(len(cond), 49).long())

    def one_batch(pl_module, sample_codes, conditions, *args, **kwargs):
        sample_codes(conditions[:2], torch.Generator().manual_seed(0))

    monkeypatch.setattr(report_module, "sharded_sample_features", one_batch)
    monkeypatch.setattr(report_module, "evaluation_row", lambda *a, **kw: SimpleNamespace(fid=0.0, fid2=None))
    monkeypatch.setattr(report_module, "write_report", lambda rows, directory, meta: (tmp_path / "j", tmp_path / "m"))
    monkeypatch.setattr(report_module, "format_table", lambda rows, second_name="2": "")
    monkeypatch.setattr(report_module, "summary_ratios", lambda rows: {})
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True,
                              world_size=1, global_rank=0, datamodule=None,
                              strategy=SimpleNamespace(barrier=lambda name=None: None,
                                                       broadcast=lambda obj, src=0: obj))
    report.teacher_steps = [3]
    report.run(trainer, module)
    return {"teacher_choice_temperature": seen["choice_temperature"], "teacher_cfg_scale": seen["cfg_scale"],
            "steps": seen["steps"]}


def test_predict_and_report_decode_the_teacher_alike(tiny_teacher, tmp_path, monkeypatch):
    module = DiMOModule(tiny_teacher, targets={"cfg_scale": 3.0},
                        sampling={"predict_with": "teacher",
                                  "teacher": {"steps": 5, "choice_temperature": 16.0, "schedule": "cosine"}})
    calls = []
    original = tiny_teacher.sample
    monkeypatch.setattr(tiny_teacher, "sample", lambda cond, **kw: calls.append(kw) or original(cond, **kw))
    out = module.predict_step(torch.tensor([0, 1]), 0)
    assert out["images"].shape == (2, 1, 28, 28)
    assert calls[0]["steps"] == 5 and calls[0]["choice_temperature"] == 16.0 and calls[0]["schedule"] == "cosine"
    assert calls[0]["cfg_scale"] == 3.0  # cfg_scale None: the distillation's targets.cfg_scale

    seen = _report_settings(module, EvaluationReport(num_samples=10, accuracy_network=None), tmp_path, monkeypatch)
    assert seen["teacher_choice_temperature"] == 16.0 and seen["teacher_cfg_scale"] == 3.0
    seen = _report_settings(module, EvaluationReport(num_samples=10, accuracy_network=None,
                                                     teacher_choice_temperature=2.0, teacher_cfg_scale=1.5),
                            tmp_path, monkeypatch)
    assert seen["teacher_choice_temperature"] == 2.0 and seen["teacher_cfg_scale"] == 1.5  # explicit overrides


def test_mnist_config_sets_choice_temperature_16_in_one_place():
    class ParseOnly(DiMOCLI):
        def instantiate_classes(self) -> None:
            pass

    config = ParseOnly(args=["--config", str(ROOT / "configs/mnist/dimo.yaml")], run=False).config
    assert config.model.init_args.sampling.teacher.choice_temperature == 16.0
    reports = [c for c in config.trainer.callbacks if c.class_path.endswith("EvaluationReport")]
    assert reports and reports[0].init_args.teacher_choice_temperature is None
    assert reports[0].init_args.teacher_cfg_scale is None


def test_teacher_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match="sampling.teacher.schedule"):
        TeacherSampling(schedule="fast")
    with pytest.raises(ValueError, match="sampling.teacher.steps"):
        TeacherSampling(steps=0)
    with pytest.raises(ValueError, match="unknown sampling.teacher keys: stepz"):
        TeacherSampling.coerce({"stepz": 3})
