"""Every example runs (tiny sizes through their arguments): the custom teacher's YAML through `dimo fit`, the
Python API run with its export, and Lightning-free sampling of that export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimo_lightning.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_custom_teacher_yaml_distills_with_dimo_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    main(["fit", "--config", str(EXAMPLES / "custom_teacher.yaml"), "--model.init_args.optim.max_generator_steps=2",
          "--data.init_args.batch_size=4", "--data.init_args.batches_per_epoch=2",
          "--trainer.enable_progress_bar=false"])
    ckpt = torch.load(tmp_path / "runs/custom_teacher/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["dimo"]["generator_step"] == 2
    assert ckpt["hyper_parameters"]["teacher"]["class_path"] == "custom_teacher.BitPatchTeacher"
    import custom_teacher

    tokenizer = custom_teacher.BinaryPatchTokenizer(2)
    images = (torch.rand(3, 1, 14, 14) > 0.5).float()
    assert torch.equal(tokenizer.decode(tokenizer.encode(images)), images)  # the tokenizer is exact


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import python_api

        return python_api.main(["--steps", "2", "--batch_size", "4", "--no_progress_bar", "--output",
                                str(tmp_path_factory.mktemp("python_api"))])
    finally:
        sys.path.remove(str(EXAMPLES))


def test_python_api_trains_and_exports(exported):
    from dimo_lightning.inference.export import read_export_config

    config = read_export_config(exported)
    assert config["generator_step"] == 2 and config["weights_source"] == "ema"
    assert config["tokenizer"]["class_path"] == "custom_teacher.BinaryPatchTokenizer"


def test_sample_exported_imports_no_lightning(exported, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sample_exported.py"), "--student", str(exported), "--labels", "0,1,2,3",
         "--num", "5", "--output", str(grid)], capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Lightning modules imported: none" in result.stdout
    from PIL import Image

    assert Image.open(grid).size == (5 * 16 + 2, 4 * 16 + 2)  # 14 px samples, 2 px padding, a row per label
