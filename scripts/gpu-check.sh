#!/usr/bin/env bash
# GPU check: a few DP steps of a small GroupNorm CNN on CUDA with both engines (opacus, fast)
# from the same seeded streams; same update, noise std sigma*C. Prints JSON, exits 0/1.
# Without CUDA it prints that it skipped and exits 0. Needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export FLWR_TELEMETRY_ENABLED=0
exec "$PY" scripts/gpu_check.py "$@"
