#!/usr/bin/env bash
# GPU check: a few training steps of every trainer on CUDA, tiny and real-size models
# (random init, synthetic data, no downloads), printed as a table: images/s, data vs compute time
# per step, peak GPU memory. Under 5 minutes on one GPU.
#
#   scripts/gpu_check.sh              # CUDA (falls back to tiny models on CPU when no GPU is visible)
#   scripts/gpu_check.sh --dry-run    # CPU, tiny models, 2 steps
#   scripts/gpu_check.sh --sizes real --trainers classifier,sam-decoder --steps 20
#
# Uses the project's virtual environment (.venv) when present, else $PYTHON or python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" benchmarks/gpu_check.py "$@"
