#!/usr/bin/env bash
# Scale check on a lent GPU: full-size MaskGIT-256 (random weights) under DDP on 1 GPU and under FSDP2, bf16-mixed,
# batch 64, a few iterations, a FID-1k evaluation (random-weight Inception: throughput, not quality) and a sample grid.
# Prints one GPU_CHECK JSON line per strategy (peak memory, iterations/s) and writes OUT/{ddp,fsdp}/result.json.
#   scripts/gpu_check.sh [OUT]          # OUT defaults to $OUT (the device tool's folder) or runs/gpu_check
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh /tmp/dry   # CPU dry run with a tiny architecture (what CI-less machines can do)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  extra=(--tiny --accelerator cpu --iterations 4 --warmup 1 --fid-samples 32 --batch-size 16)
  : "${GPU_CHECK_TIMEOUT:=900}"   # Inception at 299 px on a CPU is slow
else
  extra=(--iterations "${GPU_CHECK_ITERATIONS:-12}" --fid-samples "${GPU_CHECK_FID_SAMPLES:-1000}" --batch-size 64)
  "$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run with GPU_CHECK_DRY=1 for the CPU dry run"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
PY
fi
status=0
for strategy in ddp fsdp; do
  echo "=== $strategy ==="
  # One process per strategy: a clean device (peak memory) and a fresh process group each.
  timeout "${GPU_CHECK_TIMEOUT:-280}" "$python" -W ignore::UserWarning scripts/gpu_check.py \
    --strategy "$strategy" --precision bf16-mixed --out "$out/$strategy" "${extra[@]}" || status=$?
done
exit $status
