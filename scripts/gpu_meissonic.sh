#!/usr/bin/env bash
# Memory and speed check on a lent GPU: full-size Meissonic (random weights, published folder layout) distilled in
# bf16-mixed with gradient checkpointing at batch 2 for a few iterations. Prints one GPU_MEISSONIC JSON line (peak
# memory, iterations/s) and writes OUT/result.json and OUT/samples.png.
#   scripts/gpu_meissonic.sh [OUT]                 # OUT defaults to $OUT (the device tool's folder) or runs/gpu_meissonic
#   GPU_MEISSONIC_DRY=1 scripts/gpu_meissonic.sh /tmp/dry   # CPU dry run with the tiny architecture
# Needs diffusers (VQModel) next to torch and lightning: `pip install -c constraints.txt diffusers`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_meissonic}}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [ -n "${GPU_MEISSONIC_DRY:-}" ]; then
  extra=(--tiny --accelerator cpu --iterations 2 --warmup 1)
else
  extra=(--iterations "${GPU_MEISSONIC_ITERATIONS:-4}" --warmup 2)
  "$python" - <<'PY'
import importlib.util
import torch
assert torch.cuda.is_available(), "no CUDA device: run with GPU_MEISSONIC_DRY=1 for the CPU dry run"
assert importlib.util.find_spec("diffusers"), "diffusers is missing: pip install -c constraints.txt diffusers"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
PY
fi
# The random folder (about 6 GB for the full size) is written under OUT's parent scratch, not into OUT (not fetched).
scratch="${GPU_MEISSONIC_SCRATCH:-$(mktemp -d)}"
timeout "${GPU_MEISSONIC_TIMEOUT:-540}" "$python" -W ignore::UserWarning scripts/gpu_meissonic.py \
  --out "$out" --folder "$scratch/random_meissonic" "${extra[@]}"
