"""End to end: four real node processes gossip over mutual TLS on 127.0.0.1.

Each node starts from its own random model; after DP training (ε ≤ 3 each) and the
consensus finish, the four final models agree, classify far better than chance, and
each node's ledger verifies with an independently recomputed ε equal to the node's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from privfl.data import load_dataset, split_sites
from privfl.launch import launch_consortium, load_model
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site
from tests.helpers import patched_copy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"


def _config(tmp_path: Path) -> Path:
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ("distinct_init = false", "distinct_init = true"),
        ("timeout = 300.0", "timeout = 150.0"),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


def _pooled_accuracy(model_path: Path) -> tuple[float, float]:
    """Accuracy of a final model on every site's test split, and the majority-class rate there."""
    data = load_dataset("breast_cancer", seed=11)
    spec = PreprocessingSpec()  # the example's default: the dataset's published feature ranges
    sites = [preprocess_site(spec, s, dataset_name="breast_cancer")[0]
             for s in split_sites(data, 4, "dirichlet", seed=11, alpha=0.5)]
    model = build_model("logreg", (30,), 2)
    params = load_model(model_path)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(model.state_dict(), params)})
    correct = total = majority = 0
    for s in sites:  # each site preprocesses with the public statistics, as its node does
        with torch.no_grad():
            pred = model(torch.as_tensor(s.test.x)).argmax(1).numpy()
        correct += int((pred == s.test.y).sum())
        total += len(s.test.y)
    ys = np.concatenate([s.test.y for s in sites])
    majority = max(np.mean(ys), 1 - np.mean(ys))
    return correct / total, float(majority)


@pytest.mark.timeout(200)
def test_four_nodes_reach_private_consensus(tmp_path: Path) -> None:
    summary = launch_consortium(_config(tmp_path), progress=False, run_name="e2e")
    nodes = summary["nodes"]
    assert set(nodes) == {"st-mary", "general", "childrens", "university"}
    for nid, e in nodes.items():
        assert e["exit_code"] == 0, (nid, e)
        assert e["stop_reason"] == "max_steps", (nid, e)
        assert e["steps"] == 150
        assert 0 < e["epsilon"] <= e["target_epsilon"] == 3.0
        assert e["audit_ok"], (nid, e.get("audit_issue"))
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        assert e["exchanges"] + e["served"] > 10  # they really gossiped
        assert e["bytes_sent"] > 0 and e["bytes_received"] > 0
    # consensus: from four different random inits to (nearly) one model
    assert summary["initial_distance"] > 0.5
    assert summary["consensus_distance"] <= 1e-3 * summary["initial_distance"]
    # useful: well above chance on the nodes' own test splits and on all sites' tests pooled
    assert summary["mean_accuracy"] >= 0.8
    run_dir = Path(summary["run_dir"])
    acc, majority = _pooled_accuracy(run_dir / "st-mary" / "final_model.npz")
    assert acc >= 0.8 and acc >= majority + 0.15, (acc, majority)
