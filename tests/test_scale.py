"""What lets one machine simulate 1,000 sites: linear-time structures and once-per-run work.

(The wall time and memory at 8 → 1,000 nodes are in ``benchmarks/scale.py``, never asserted.)
"""

from __future__ import annotations

import numpy as np
import pytest

from privfl.clients import DPConfig
from privfl.sim import SimSpec, StopCriteria, run_simulation
from privfl.strategies import topology as topo
from privfl.strategies.topology import Topology


def test_the_swap_check_is_exactly_connectivity() -> None:
    """random_regular's bidirectional check says 'connected' exactly when the graph is, for every
    double-edge swap of a connected graph (the only case it is asked about)."""
    rng = np.random.default_rng(0)
    asked = disconnected = 0
    for n, d in [(12, 2), (30, 2), (20, 3), (40, 3), (16, 4)]:
        g = Topology.random_regular([f"n{i}" for i in range(n)], d, seed=int(rng.integers(1000)))
        adj = [set(s) for s in g._adjacency_sets()]
        edges = sorted({(min(i, j), max(i, j)) for i in range(n) for j in adj[i]})
        for _ in range(300):
            e1, e2 = rng.choice(len(edges), size=2, replace=False)
            (a, b), (c, dd) = edges[e1], edges[e2]
            if len({a, b, c, dd}) < 4 or c in adj[a] or dd in adj[b]:
                continue
            swapped = [set(s) for s in adj]
            for u, v in ((a, b), (c, dd)):
                swapped[u].discard(v)
                swapped[v].discard(u)
            for u, v in ((a, c), (b, dd)):
                swapped[u].add(v)
                swapped[v].add(u)
            truth = len(topo._components(n, swapped)) == 1
            assert topo._joined(swapped, (a, c), (b, dd)) == truth
            asked += 1
            disconnected += not truth
    assert asked > 500 and disconnected > 20  # both answers were exercised


def test_random_regular_at_1000_nodes_is_regular_connected_and_reproducible() -> None:
    ids = [f"n{i}" for i in range(1000)]
    g = Topology.random_regular(ids, 3, seed=5)
    assert set(g.degrees().tolist()) == {3} and len(g.edges) == 1500
    assert g == Topology.random_regular(ids, 3, seed=5)
    assert g.neighbors("n7") == sorted(g.neighbors("n7"), key=ids.index) and len(g.neighbors("n7")) == 3


def test_sigma_is_calibrated_once_per_run_not_once_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    from privfl.clients import dp_client

    calls: list[tuple[float, ...]] = []
    real = dp_client.calibrate_noise

    def counting(*args: object, **kw: object) -> float:
        calls.append(tuple(float(a) for a in args[:4]))  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dp_client, "calibrate_noise", counting)
    spec = SimSpec(dataset="synthetic", num_nodes=6, model="logreg", topology="ring",
                   dp=DPConfig(target_epsilon=4.0, planned_steps=2, batch_size=8, sample_rate=1.0),  # q=1: quick
                   strategy="async_gossip", stop=StopCriteria(max_steps=2), seed=1)
    res = run_simulation(spec)
    assert len(calls) == 1
    assert all(v == 2 for v in res.summary["steps"].values())
    assert all(abs(e - 4.0) < 0.05 for e in res.summary["epsilon"].values())  # every node: the calibrated σ


def test_a_hundred_and_twenty_nodes_each_train_their_steps() -> None:
    spec = SimSpec(dataset="synthetic", num_nodes=120, model="logreg", topology="random_regular",
                   topology_params={"degree": 3},
                   dp=DPConfig(noise_multiplier=1.0, batch_size=4, sample_rate=0.5, target_epsilon=1e6),
                   strategy="async_gossip", stop=StopCriteria(max_steps=2), seed=0)
    res = run_simulation(spec)
    assert res.summary["num_nodes"] == 120 and set(res.summary["steps"].values()) == {2}
    assert len(res.final()) == 120 and sum(res.summary["messages_sent"].values()) > 0
