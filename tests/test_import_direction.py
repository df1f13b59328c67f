"""The dependency direction of DESIGN.md holds: ``accounting`` imports nothing of ours,
``clients`` and ``strategies`` only ``accounting`` (and themselves), the ``privfl`` runtime
anything; nothing but the console entry point imports ``privfl.cli``. Checked on the
source (every import statement, at any depth: a function-level import counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("accounting", "clients", "strategies", "privfl")
ALLOWED = {
    "accounting": {"accounting"},
    "clients": {"accounting", "clients"},
    "strategies": {"accounting", "strategies"},
    "privfl": set(OURS),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", OURS)
def test_each_layer_imports_only_the_layers_below_it(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    bad = []
    for package in OURS:
        for path in _sources(package):
            if path.is_relative_to(ROOT / "privfl" / "cli") or path == ROOT / "privfl" / "__main__.py":
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}" for line, module in _imports(path)
                    if module == "privfl.cli" or module.startswith("privfl.cli.")]
    assert not bad, bad


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The scan itself can fail: an import of the runtime from a lower layer is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from privfl.node import Node\n")
    assert _imports(bad) == [(2, "privfl.node")]
