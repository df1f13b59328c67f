#!/usr/bin/env bash
# What `flwr run .` needs on top of privfl: Flower's simulation extra (Ray, at the version the installed
# flwr pins), in privfl's own .venv — created first by scripts/setup.sh if needed. Safe to run again.
# Not part of CI's set-up: the tests run this app in-process (privfl_app/local_grid.py), without Ray.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash scripts/setup.sh
flwr_version=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("flwr"))')
echo "[flower-app] installing flwr[simulation]==$flwr_version (Ray) into .venv ..."
# pinning flwr to the installed version keeps pip from changing it; the extra brings Flower's own Ray pin
.venv/bin/python -m pip install -q --disable-pip-version-check "flwr[simulation]==$flwr_version"
.venv/bin/python -c 'import ray, flwr; print(f"[flower-app] ready: flwr {flwr.__version__}, ray {ray.__version__}")'
