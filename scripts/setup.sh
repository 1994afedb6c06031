#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test extras. Idempotent.
# Sourced by scripts/demo.sh and scripts/test.sh; run it alone to only install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pipeline and its dependencies into .venv (first time: a few minutes)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test,backbones]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# ultralytics needs opencv-python; a second OpenCV distribution beside it would overwrite cv2.
if python -m pip show --quiet opencv-python-headless >/dev/null 2>&1; then
  echo "[setup] error: opencv-python-headless is installed beside opencv-python; remove it" >&2
  exit 1
fi
