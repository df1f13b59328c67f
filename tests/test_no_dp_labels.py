"""A run without DP says so everywhere: never ``"dp": true`` or a number beside ε = ∞.

``[dp] enabled = false`` is for simulate/compare baselines (a node refuses it: it would
release models with no guarantee). The summary, comparison.json, the console table and
the plot legends all say "no DP", and comparison.json stays valid JSON (no Infinity).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from privfl.experiment import load_experiment, run_experiment


def test_compare_without_dp_says_no_dp(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text(textwrap.dedent('''
        name = "nodp"
        [data]
        source = "breast_cancer"
        num_sites = 2
        [model]
        name = "logreg"
        [dp]
        enabled = false
        sample_rate = 0.2
        [strategy]
        local_steps = 2
        [stop]
        max_steps = 4
        [simulation]
        device = "cpu"
        [compare]
        strategies = ["async_gossip", "fedavg"]
    '''))
    exp = load_experiment(cfg)
    out = tmp_path / "run"
    out.mkdir()
    results = run_experiment(exp, out)
    text = (out / "comparison.json").read_text()
    comparison = json.loads(text)
    for name in ("async_gossip", "fedavg"):
        assert comparison[name]["privacy"] == "no DP"
        assert comparison[name]["epsilon_max"] is None
        assert results[name].summary["dp"] is False and results[name].summary["privacy"] == "no DP"
    assert "Infinity" not in text
