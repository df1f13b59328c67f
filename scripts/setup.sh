#!/usr/bin/env bash
# Creates .venv and installs privfl with its test tools. Safe to run again.
# torch is pinned here to the CPU build 2.13.0; the package's own ranges stay open.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.privfl-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and privfl into .venv ..."
  .venv/bin/python -m pip install -q torch==2.13.0
  # the [ray] extra (the simulator's Ray backend and its tests): ~15 s on top, measured in a fresh venv
  .venv/bin/python -m pip install -q -e ".[test,ray]" "ray==2.58.0"
  # byte-compile our own sources too (imports are several times slower otherwise)
  .venv/bin/python -m compileall -q privfl clients strategies accounting >/dev/null
  echo "$want" > "$stamp"
fi
echo "[setup] ready: .venv/bin/privfl"
