"""Shared test set-up: quiet Flower telemetry, small deterministic torch."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from privfl.data import load_builtin, split_sites
from privfl.preprocessing import PreprocessingSpec, preprocess_site

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


@pytest.fixture()
def flwr_home(tmp_path, monkeypatch):
    """A private FLWR_HOME so tests never write to ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    return tmp_path / "flwr"


@pytest.fixture(scope="module")
def sites():
    """breast_cancer split IID across three sites, each mapped by the published feature ranges."""
    return [preprocess_site(PreprocessingSpec(), s, dataset_name="breast_cancer")[0]
            for s in split_sites(load_builtin("breast_cancer"), 3, "iid", seed=0)]


@pytest.fixture()
def make_tmpfs(tmp_path):
    """``make_tmpfs(size)``: a fresh tmpfs of ``size`` (e.g. "256k") under tmp_path, for real
    full-disk and read-only faults (root only; skipped where mounting is not allowed); every
    one mounted is unmounted after the test."""
    import shutil
    import subprocess

    mounted = []

    def make(size: str):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture()
def restore_root_logging():
    """The CLI points the root logger at the run folder; undo it after the test."""
    root = logging.getLogger()
    handlers, levels, level = list(root.handlers), [h.level for h in root.handlers], root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h, lv in zip(handlers, levels):
        h.setLevel(lv)
    root.setLevel(level)
