"""``device`` = "auto" | "cpu" | "cuda" | "cuda:N" in ``[node]`` and ``[simulation]``: CUDA asked for and
absent (or cuda:N out of range) is a one-line ConfigError naming the field; "auto" is CUDA when
present, else CPU; ``scripts/gpu-check.sh`` skips (exit 0) on a machine without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from privfl.config import resolve_device
from privfl.errors import ConfigError
from privfl.launch import dump_toml
from privfl.node_config import load_node_config
from privfl.pki import init_consortium

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("dev", ["h-a", "h-b"], d, base_port=47400)
    return d


def _node_config(pki: Path, tmp_path: Path, device: object | None) -> Path:
    node = {"id": "h-a", "output": str(tmp_path / "out")}
    if device is not None:
        node["device"] = device
    t = {"node": node,
         "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                      "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
         "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0},
         "model": {"name": "logreg"},
         "dp": {"noise_multiplier": 1.0, "batch_size": 32, "sample_rate": 0.14}}
    p = tmp_path / "node.toml"
    p.write_text(dump_toml(t))
    return p


def _experiment(tmp_path: Path, device: str | None) -> Path:
    text = ('name = "dev"\n[data]\nsource = "breast_cancer"\nnum_sites = 2\n[model]\nname = "logreg"\n'
            '[dp]\nnoise_multiplier = 1.0\nsample_rate = 0.1\n[stop]\nmax_steps = 2\nmax_seconds = 0\n'
            '[simulation]\neval_every = 0.01\n')
    if device is not None:
        text += f'device = "{device}"\n'
    p = tmp_path / "experiment.toml"
    p.write_text(text)
    return p


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "CUDA"])
def test_node_cuda_without_cuda_is_one_line_naming_the_field(pki: Path, tmp_path: Path, device: str) -> None:
    with pytest.raises(ConfigError, match=r"node\.toml: \[node\]\.device: .*CUDA is not available") as exc:
        load_node_config(_node_config(pki, tmp_path, device))
    _one_line(exc)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cpu:0", "", "mps", 3])
def test_node_bad_device_values_are_refused_naming_the_field(pki: Path, tmp_path: Path, device: object) -> None:
    with pytest.raises(ConfigError, match=r"\[node\]\.device") as exc:
        load_node_config(_node_config(pki, tmp_path, device))
    _one_line(exc)


@no_cuda
@pytest.mark.parametrize("device", [None, "auto", "cpu"])
def test_node_auto_is_cpu_here_and_the_node_trains_there(pki: Path, tmp_path: Path, device: str | None) -> None:
    from privfl.node import Node

    cfg = load_node_config(_node_config(pki, tmp_path, device))
    assert cfg.node.device == (device or "auto") and cfg.device == torch.device("cpu")
    if device is None:  # build one node: the client and its model are on the CPU
        node = Node(cfg)
        try:
            assert node.client.device == torch.device("cpu")
            assert all(p.device.type == "cpu" for p in node.client.module.parameters())
        finally:
            node.ledger.close()  # type: ignore[union-attr]
            node.network.client.close()  # type: ignore[union-attr]


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_simulation_cuda_without_cuda_is_one_line_naming_the_field(tmp_path: Path, device: str) -> None:
    from privfl.experiment import load_experiment

    with pytest.raises(ConfigError, match=r"experiment\.toml: \[simulation\]\.device: .*CUDA is not available") \
            as exc:
        load_experiment(_experiment(tmp_path, device))
    _one_line(exc)


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "tpu"])
def test_simulation_bad_device_values_are_refused_naming_the_field(tmp_path: Path, device: str) -> None:
    from privfl.experiment import load_experiment

    with pytest.raises(ConfigError, match=r"\[simulation\]\.device") as exc:
        load_experiment(_experiment(tmp_path, device))
    _one_line(exc)


@no_cuda
@pytest.mark.parametrize("device", [None, "auto", "cpu"])
def test_simulation_auto_is_cpu_here(tmp_path: Path, device: str | None) -> None:
    from privfl.experiment import load_experiment, spec_for

    exp = load_experiment(_experiment(tmp_path, device))
    assert exp.simulation.device == (device or "auto")
    assert spec_for(exp, exp.runs[0]).device == "cpu"


@no_cuda
def test_sim_spec_refuses_cuda_and_runs_auto_on_cpu() -> None:
    from privfl.clients import DPConfig
    from privfl.sim import SimSpec, StopCriteria, run_simulation

    dp = DPConfig(noise_multiplier=1.0, batch_size=16, lr=0.5, sample_rate=0.1)
    with pytest.raises(ConfigError, match=r"\[simulation\]\.device: 'cuda' asked for"):
        run_simulation(SimSpec(num_nodes=2, device="cuda", dp=dp, stop=StopCriteria(max_steps=1)))
    res = run_simulation(SimSpec(num_nodes=2, device="auto", dp=dp, stop=StopCriteria(max_steps=1)))
    assert res.final() and all(p.dtype == np.float32 for p in res.models["node0"])


@no_cuda
def test_resolve_device_out_of_range_and_auto() -> None:
    assert resolve_device("auto", "x.device") == torch.device("cpu")
    assert resolve_device(" CPU ", "x.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^\[s\]\.device: 'cuda:7' asked for"):
        resolve_device("cuda:7", "[s].device")


@no_cuda
def test_gpu_check_script_skips_without_cuda() -> None:
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["skipped"] is True and "skipped" in report["reason"]


def test_gpu_check_checks_hold_on_cpu() -> None:
    """The checker itself, on the CPU: both engines agree and the empty-step noise has std σ·C."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"], json.dumps(report, indent=2) + res.stderr[-2000:]
    names = [c["name"] for c in report["checks"]]
    assert any("same update" in n for n in names) and sum("noise std" in n for n in names) == 2
