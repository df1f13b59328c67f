"""Lint stays in CI: ``.ci/run`` runs ``scripts/test.sh``, which runs ``scripts/lint.sh``
(ruff on all code, mypy on the packages) before pytest, and ruff's configuration excludes
nothing but generated protobuf code.

A future edit that drops the lint step, narrows what ruff reads, or silences a whole rule
family fails here instead of quietly passing CI.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the only files ruff may skip: protoc output, next to the .proto it came from
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")
#: folders that hold no source of ours (all .gitignored): run outputs, caches, build trees
NOT_SOURCE = {"__pycache__", "runs", "build", "dist"}
FAMILIES = {"E", "F", "W", "I", "B", "UP"}


def _commands(path: Path) -> list[str]:
    """The non-blank, non-comment lines of a shell script (a line ending in ``\\`` joined to the next)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ruff_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]


def _ruff_targets() -> list[str]:
    """The paths scripts/lint.sh hands to ``ruff check``."""
    calls = [shlex.split(c) for c in _commands(ROOT / "scripts" / "lint.sh") if re.search(r"\bruff check\b", c)]
    assert len(calls) == 1, f"scripts/lint.sh should run `ruff check` once, found {calls}"
    args = calls[0][calls[0].index("check") + 1:]
    return [a for a in args if not a.startswith("-")]


def _is_source_dir(p: Path) -> bool:
    return not (p.name.startswith(".") or p.name in NOT_SOURCE or p.name.endswith(".egg-info"))


def _python_files(top: Path) -> set[Path]:
    out: set[Path] = set()
    for f in [*top.rglob("*.py"), *top.rglob("*.pyi")]:
        rel = f.relative_to(ROOT)
        if all(_is_source_dir(ROOT / part) for part in rel.parts[:-1]):
            out.add(f.resolve())
    return out


def _generated(f: Path) -> bool:
    if not any(fnmatch(f.name, g) for g in GENERATED):
        return False
    stem = re.sub(r"_pb2(_grpc)?$", "", f.name.rsplit(".", 1)[0])
    return (f.parent / f"{stem}.proto").is_file()


def test_ci_runs_the_test_script() -> None:
    cmds = _commands(ROOT / ".ci" / "run")
    assert any(re.search(r"\bbash scripts/test\.sh\b", c) for c in cmds), cmds


def test_test_script_lints_before_pytest() -> None:
    cmds = _commands(ROOT / "scripts" / "test.sh")
    assert any(re.match(r"set -[a-z]*e", c) for c in cmds), \
        "scripts/test.sh must stop on the first failing command (set -e)"
    lint = [i for i, c in enumerate(cmds) if c == "bash scripts/lint.sh"]
    pytest_ = [i for i, c in enumerate(cmds) if re.search(r"-m pytest\b", c)]
    assert lint, "scripts/test.sh must run `bash scripts/lint.sh` (on a line of its own, nothing masking a failure)"
    assert pytest_ and lint[0] < pytest_[0], "scripts/lint.sh must run before pytest"


def test_lint_script_runs_ruff_and_mypy() -> None:
    cmds = _commands(ROOT / "scripts" / "lint.sh")
    assert "set -euo pipefail" in cmds
    assert any(re.search(r"\bmypy\b.*-p privfl\b", c) for c in cmds), "scripts/lint.sh must type-check privfl"
    targets = set(_ruff_targets())
    code_dirs = {p.name for p in ROOT.iterdir()
                 if p.is_dir() and _is_source_dir(p) and _python_files(p)}
    assert code_dirs <= targets, f"ruff does not read {sorted(code_dirs - targets)}"
    assert not list(ROOT.glob("*.py")) or "." in targets


def test_ruff_config_excludes_only_generated_files() -> None:
    cfg = _ruff_config()
    for key in ("exclude", "include", "extend-include"):  # exclude/include replace ruff's own defaults
        assert key not in cfg, f"[tool.ruff].{key}: use extend-exclude, for generated files only"
    assert cfg.get("respect-gitignore", True) is True
    patterns = cfg.get("extend-exclude", [])
    for pattern in patterns:
        folder, _, name = pattern.rpartition("/")
        assert folder == "privfl/transport/proto" and "_pb2" in name, \
            f"[tool.ruff].extend-exclude {pattern!r}: only generated protobuf code may be excluded"
    lint = cfg.get("lint", {})
    assert "exclude" not in lint and "per-file-ignores" not in lint and "extend-per-file-ignores" not in lint
    assert FAMILIES <= set(lint.get("select", [])), f"[tool.ruff.lint].select lost {FAMILIES - set(lint['select'])}"
    for code in [*lint.get("ignore", []), *lint.get("extend-ignore", [])]:
        assert re.fullmatch(r"[A-Z]+\d{3,4}", code), f"[tool.ruff.lint].ignore {code!r}: ignore single rules only"


def test_ruff_reads_every_source_file_but_generated_ones() -> None:
    targets = _ruff_targets()
    listed = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", *targets], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    read = {Path(p).resolve() for p in listed if p.endswith((".py", ".pyi"))}
    expected = set().union(*(_python_files(ROOT / t) for t in targets))
    skipped = expected - read
    assert all(_generated(f) for f in skipped), f"ruff skips {sorted(str(f) for f in skipped if not _generated(f))}"
    assert any(_generated(f) for f in skipped), "the generated protobuf files should be excluded (see pyproject.toml)"
    assert read <= expected
