#!/usr/bin/env bash
# Install (first time), check the style (ruff) and run the whole test suite. Real-data tests run when MVTEC_ROOT points at
# the folder holding an MVTec AD category (bottle/), and skip with a reason otherwise.
# Usage: [MVTEC_ROOT=/path/to/mvtec_ad] bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
# style first: the linter and the formatter configured in pyproject.toml ([tool.ruff])
ruff check .
ruff format --check .
exec python -m pytest "$@"
