#!/usr/bin/env bash
# Sets up (if needed), lints (ruff + mypy, scripts/lint.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
export FLWR_TELEMETRY_ENABLED=0
# Two workers (pytest-xdist): most tests wait on a subprocess, a socket or a node's deadline,
# which leaves a core idle in a single process. --dist loadfile keeps each file in one worker,
# so a file's fixed ports and module fixtures never meet another copy of themselves.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
