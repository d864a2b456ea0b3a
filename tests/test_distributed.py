"""DDP on CPU (gloo, 2 ranks): ranks draw different conditions, weights stay identical, training completes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["generator_step"] == 3 for r in ranks)
    assert ranks[0]["labels"] != ranks[1]["labels"]  # each rank draws its own conditions
    # gradients are all-reduced, so the replicas stay in sync
    assert ranks[0]["student_sum"] == pytest.approx(ranks[1]["student_sum"], rel=1e-6)
