#!/usr/bin/env bash
# Lint and types: ruff on all code, mypy on the packages. scripts/test.sh (and so CI) runs it first.
# mypy reads the installed layout (privfl.clients lives in clients/ and so on), so it runs
# over a tree of links that mirrors the installed namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
.venv/bin/ruff check privfl clients strategies accounting tests benchmarks scripts examples
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/privfl"
for entry in privfl/*; do ln -s "$root/$entry" "$tree/privfl/$(basename "$entry")"; done
for layer in clients strategies accounting; do ln -s "$root/$layer" "$tree/privfl/$layer"; done
(cd "$tree" && "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" \
  --cache-dir "${MYPY_CACHE_DIR:-$root/.mypy_cache}" -p privfl)
echo "[lint] ruff and mypy clean"
