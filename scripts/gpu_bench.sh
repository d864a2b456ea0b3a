#!/usr/bin/env bash
# `dimo bench` on a full-size MaskGIT-256 teacher with random weights, bf16-mixed, batch 64, on one GPU.
#   bash scripts/gpu_bench.sh                      # writes docs/bench_gpu.json and prints the tables
# Dry run of the same Python path on a CPU with a tiny architecture:
#   PRESET=tiny ACCELERATOR=cpu PRECISION=32-true BATCH=4 REPEATS=2 OUTPUT=/tmp/bench_dry.json bash scripts/gpu_bench.sh
# Network passes of random weights cost what the released weights' do; sampling steps and CFG follow the MNIST
# config's model settings (targets.cfg_scale 2.0, aux.sample reuse), with the paper's absolute embedding noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
PRESET=${PRESET:-maskgit256}
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
BATCH=${BATCH:-64}
REPEATS=${REPEATS:-10}
WARMUP=${WARMUP:-3}
OUTPUT=${OUTPUT:-docs/bench_gpu.json}
SKIP=${SKIP:-}
TEACHER_DIR=${TEACHER_DIR:-$(mktemp -d)/teacher_${PRESET}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

[ -f "$TEACHER_DIR/teacher.safetensors" ] || "$PYTHON" scripts/make_random_teacher.py "$TEACHER_DIR" --preset "$PRESET"
"$PYTHON" -m dimo_lightning bench --config configs/mnist/dimo.yaml \
  --model.init_args.teacher.init_args.checkpoint="$TEACHER_DIR/teacher.safetensors" \
  --model.init_args.teacher.init_args.codebook="$TEACHER_DIR/codebook.safetensors" \
  --model.init_args.student.emb_noise_relative=false \
  --data.init_args.num_classes=1000 --data.init_args.batch_size="$BATCH" \
  --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
  --repeats "$REPEATS" --warmup "$WARMUP" ${SKIP:+--skip-levers "$SKIP"} --output "$OUTPUT"
