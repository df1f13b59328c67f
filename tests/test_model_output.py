"""Every run writes a model the user can load: the module's own ``state_dict`` (``final_model.pt``,
or ``.safetensors`` when safetensors is installed) plus the public preprocessing it expects; loaded
into a freshly built module and applied to the raw test records it reproduces the reported accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privfl.clients import evaluate_model
from privfl.data import load_dataset, split_sites
from privfl.launch import dump_toml
from privfl.models import build_model
from privfl.node_config import load_node_config
from privfl.pki import Policy, init_consortium
from privfl.preprocessing import load_preprocessing

pytestmark = pytest.mark.timeout(120)

NODES = ["h-a", "h-b"]
CPU = torch.device("cpu")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """What the README tells the user to do (safetensors when that is what was written)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    assert path.suffix == ".pt"
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("models", NODES, d, base_port=47340, policy=Policy(min_noise_multiplier=0.8, max_epsilon=5.0))
    return d


def _node_tables(pki: Path, out: Path, data: dict | None = None) -> dict[str, dict]:
    return {
        "node": {"id": "h-a", "output": str(out), "seed": 3, "device": "auto"},
        "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0, **(data or {})},
        "model": {"name": "mlp", "hidden": [8]},
        "dp": {"noise_multiplier": 1.0, "target_epsilon": 5.0, "batch_size": 32, "sample_rate": 0.14, "lr": 0.5},
        "stop": {"max_steps": 10},
    }


@pytest.mark.parametrize("data", [{"scaling": "public"},
                                  {"scaling": "dp", "dp_noise_multiplier": 20.0, "dp_bound": 3000.0}],
                         ids=["public", "dp"])
def test_node_writes_a_loadable_model_and_its_preprocessing(pki: Path, tmp_path: Path, data: dict) -> None:
    from privfl.node import Node

    out = tmp_path / "out"
    cfg_path = tmp_path / "node.toml"
    cfg_path.write_text(dump_toml(_node_tables(pki, out, data)))
    cfg = load_node_config(cfg_path)
    node = Node(cfg)
    try:
        assert (out / "preprocessing.json").is_file()  # written at start, public ranges too
        trained, _, _ = node.client.fit(node.client.get_parameters({}), {"local_steps": 5})
        node.strategy.params = trained
        row = node.evaluate("final")
        summary = node.summary()
    finally:
        node.ledger.close()  # type: ignore[union-attr]
        node.network.client.close()  # type: ignore[union-attr]
    assert summary["accuracy"] == row["accuracy"] and summary["device"] == str(node.device)
    assert (out / "final_model.npz").is_file()
    path = Path(summary["model"])
    assert path.parent == out and path.name in ("final_model.pt", "final_model.safetensors")
    state = load_state(path)
    raw = cfg.common.data.sites(cfg.path.parent)[cfg.site_index]
    fresh = build_model("mlp", tuple(raw.train.x.shape[1:]), raw.train.num_classes, seed=12345, hidden=(8,))
    assert list(state) == list(fresh.state_dict())  # the module's own parameter names
    fresh.load_state_dict(state, strict=True)
    pre = load_preprocessing(Path(summary["preprocessing"]))
    assert pre.kind == data["scaling"]
    _, acc = evaluate_model(fresh, torch.as_tensor(pre.apply(raw.test.x)), torch.as_tensor(raw.test.y), CPU)
    assert acc == pytest.approx(summary["accuracy"], abs=1e-9)
    npz = np.load(out / "final_model.npz")
    assert all(np.array_equal(npz[k], state[k].numpy()) for k in state)


EXPERIMENT = """
name = "models"

[data]
source = "breast_cancer"
num_sites = 3
partitioning = "iid"
scaling = "{scaling}"

[model]
name = "mlp"
hidden = [8]

[dp]
clipping = "flat"
noise_multiplier = 1.0
target_epsilon = 50.0
batch_size = 16
sample_rate = 0.1
lr = 0.2

[topology]
kind = "complete"

[strategy]
name = "async_gossip"
local_steps = 3

[stop]
max_steps = 9
max_seconds = 0

[simulation]
eval_every = 0.01
device = "auto"
"""


def _reproduce(run: Path, spec: object, node_ids: list[str], reported: dict[str, float]) -> None:
    """Load every node's model and every site's preprocessing from ``run``; check the accuracy."""
    data = load_dataset(spec.dataset, label_column=spec.label_column, seed=spec.seed)  # type: ignore[attr-defined]
    raw = split_sites(data, spec.num_nodes, spec.partitioning, seed=spec.seed,  # type: ignore[attr-defined]
                      alpha=spec.alpha, test_fraction=spec.test_fraction,  # type: ignore[attr-defined]
                      shards_per_site=spec.shards_per_site)  # type: ignore[attr-defined]
    pres = [load_preprocessing(run / f"preprocessing_{nid}.json") for nid in node_ids]
    test_x = np.concatenate([p.apply(s.test.x) for p, s in zip(pres, raw)])  # each site's own preprocessing
    test_y = np.concatenate([s.test.y for s in raw])
    for nid in node_ids:
        files = [p for p in (run / f"final_model_{nid}.pt", run / f"final_model_{nid}.safetensors") if p.exists()]
        assert len(files) == 1, files
        fresh = build_model("mlp", tuple(data.x.shape[1:]), data.num_classes, seed=999, hidden=(8,))
        fresh.load_state_dict(load_state(files[0]), strict=True)
        _, acc = evaluate_model(fresh, torch.as_tensor(test_x), torch.as_tensor(test_y), CPU)
        assert acc == pytest.approx(reported[nid], abs=1e-9), nid


@pytest.mark.parametrize("scaling", ["public", "none"])
def test_simulate_writes_a_loadable_model_per_node(tmp_path: Path, scaling: str) -> None:
    from privfl.experiment import load_experiment, run_experiment, spec_for

    cfg = tmp_path / "experiment.toml"
    cfg.write_text(EXPERIMENT.format(scaling=scaling))
    exp = load_experiment(cfg)
    run = tmp_path / "run"
    run.mkdir()
    results = run_experiment(exp, run)
    res = results["async_gossip"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["model_files"]) == set(res.node_ids)
    reported = {r["node"]: float(r["accuracy"]) for r in res.final()}
    assert reported == pytest.approx(summary["final_accuracy"])
    _reproduce(run, spec_for(exp, "async_gossip"), res.node_ids, reported)


def test_compare_writes_a_loadable_model_per_run_label(tmp_path: Path) -> None:
    from privfl.experiment import load_experiment, run_experiment, spec_for

    cfg = tmp_path / "compare.toml"
    cfg.write_text(EXPERIMENT.format(scaling="public") + '\n[compare]\nstrategies = ["async_gossip", "fedavg"]\n')
    exp = load_experiment(cfg)
    run = tmp_path / "run"
    run.mkdir()
    results = run_experiment(exp, run)
    for label, res in results.items():
        reported = {r["node"]: float(r["accuracy"]) for r in res.final()}
        _reproduce(run / label, spec_for(exp, label), res.node_ids, reported)
