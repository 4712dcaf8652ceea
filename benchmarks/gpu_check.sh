#!/usr/bin/env bash
# GPU readiness check, run as it is on a fresh CUDA machine with only this repository:
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
# Sets up .venv (make install) and prints one table: a ViT-B-32 PO step at fp32 / bf16 / fp16
# (images/s, peak GPU memory), the input path that feeds it, and 2-worker DDP when there are 2 GPUs.
# Without CUDA it says so and exits 0, so it is safe to run anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (nvidia-smi finds none); nothing to measure"
  exit 0
fi
nvidia-smi -L
make --no-print-directory install
if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: nvidia-smi sees a GPU but this torch build has no CUDA; nothing to measure"
  exit 0
fi
exec .venv/bin/python benchmarks/gpu_check.py --device cuda "$@"
