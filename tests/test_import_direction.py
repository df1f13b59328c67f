"""The dependency direction of DESIGN.md holds, and installing privfl claims no generic
top-level import name.

``accounting`` imports nothing of ours, ``clients`` and ``strategies`` only ``accounting``
(and themselves), the ``privfl`` runtime anything; nothing but the console entry point
imports ``privfl.cli``. The four folders install as ``privfl``, ``privfl.clients``,
``privfl.strategies`` and ``privfl.accounting``, so an import of a bare ``clients`` /
``strategies`` / ``accounting`` is refused anywhere. Checked on the source (every import
statement, at any depth: a function-level import counts too), and on a real interpreter
started outside the checkout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the layer it installs as
LAYERS = {"accounting": "privfl.accounting", "clients": "privfl.clients", "strategies": "privfl.strategies",
          "privfl": "privfl"}
ALLOWED = {
    "accounting": {"accounting"},
    "clients": {"accounting", "clients"},
    "strategies": {"accounting", "strategies"},
    "privfl": set(LAYERS),
}
BARE = ("accounting", "clients", "strategies")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "privfl":  # from privfl import clients
                out += [(node.lineno, f"privfl.{a.name}") for a in node.names]
    return out


def layer_of(module: str) -> str | None:
    """The layer (source folder) an imported module belongs to; None for a third-party module."""
    parts = module.split(".")
    if parts[0] != "privfl":
        return None
    if len(parts) > 1 and parts[1] in BARE:
        return parts[1]
    return "privfl"


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", list(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, module in _imports(path):
            layer = layer_of(module)
            if layer is not None and layer not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["privfl", "clients", "strategies", "accounting", "tests", "benchmarks",
                                    "examples", "scripts"])
def test_nothing_imports_a_bare_top_level_name(folder: str) -> None:
    bad = []
    for path in sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts):
        bad += [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in _imports(path)
                if module.split(".")[0] in BARE]
    assert not bad, "\n".join(bad)


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    bad = []
    for package in LAYERS:
        for path in _sources(package):
            if path.is_relative_to(ROOT / "privfl" / "cli") or path == ROOT / "privfl" / "__main__.py":
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}" for line, module in _imports(path)
                    if module == "privfl.cli" or module.startswith("privfl.cli.")]
    assert not bad, bad


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The scan itself can fail: an import of the runtime from a lower layer is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from privfl.node import Node\n    from privfl import clients\n    import clients\n")
    found = _imports(bad)
    assert found == [(2, "privfl.node"), (3, "privfl"), (3, "privfl.clients"), (4, "clients")]
    assert [layer_of(m) for _, m in found] == ["privfl", "privfl", "clients", None]


def test_installed_privfl_claims_no_generic_top_level_name(tmp_path: Path) -> None:
    """In the installed environment, outside the checkout: ``privfl.clients`` & co. import,
    ``clients``, ``strategies`` and ``accounting`` do not (a hospital's own modules keep them)."""
    code = ("import importlib, importlib.util\n"
            "import privfl.clients, privfl.strategies, privfl.accounting\n"
            f"print([n for n in {BARE!r} if importlib.util.find_spec(n) is not None])\n"
            "print(privfl.clients.__name__, privfl.strategies.__name__, privfl.accounting.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "[]", f"installing privfl exposes top-level {lines[0]}"
    assert lines[1] == "privfl.clients privfl.strategies privfl.accounting"
