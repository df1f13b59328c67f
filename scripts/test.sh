#!/usr/bin/env bash
# Sets up (if needed), lints (ruff + mypy, scripts/lint.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
export FLWR_TELEMETRY_ENABLED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
