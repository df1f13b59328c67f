"""Topologies: MH weights are symmetric doubly stochastic, spectral gaps match closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.errors import ConfigError
from privfl.strategies.topology import Topology, TopologyError, build_topology

pytestmark = pytest.mark.timeout(60)


def ids(n: int) -> list[str]:
    return [f"h{i:02d}" for i in range(n)]


ALL_KINDS: list[tuple[str, dict]] = [
    ("ring", {}),
    ("torus", {}),
    ("exponential", {}),
    ("random_regular", {"degree": 3, "seed": 7}),
    ("random_regular", {"degree": 4, "seed": 1}),
    ("complete", {}),
]


def _valid(n: int, params: dict) -> bool:
    d = params.get("degree")
    return d is None or (d < n and (n * d) % 2 == 0)


@pytest.mark.parametrize(
    "kind,params,n",
    [(k, p, n) for n in (4, 6, 9, 12, 16) for k, p in ALL_KINDS if _valid(n, p)],
)
def test_mh_weights_symmetric_doubly_stochastic_nonnegative(kind: str, params: dict, n: int) -> None:
    topo = build_topology(kind, ids(n), **params)
    w = topo.metropolis_hastings_weights()
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    # support is exactly the edges plus the diagonal
    off = (w > 0) & ~np.eye(n, dtype=bool)
    assert (off == topo.adjacency().astype(bool)).all()
    deg = topo.degrees()
    for a, b in topo.edges:
        i, j = topo.index(a), topo.index(b)
        assert w[i, j] == pytest.approx(1.0 / (1 + max(deg[i], deg[j])))
    assert 0.0 < topo.spectral_gap() <= 1.0


@pytest.mark.parametrize("n", [5, 6, 7, 8, 16, 32, 64])
def test_ring_gap_matches_closed_form(n: int) -> None:
    topo = Topology.ring(ids(n))
    w = topo.metropolis_hastings_weights()
    assert np.allclose(np.diag(w), 1 / 3) and all(topo.degree(x) == 2 for x in topo.nodes)
    lam2 = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)
    assert topo.spectral_gap() == pytest.approx(1 - lam2, abs=1e-12)


def test_published_gap_oracles() -> None:
    # communication-algorithms.md §10.2 table
    assert Topology.ring(ids(16)).spectral_gap() == pytest.approx(0.05075, abs=1e-5)
    assert Topology.ring(ids(64)).spectral_gap() == pytest.approx(0.00321, abs=1e-5)
    assert Topology.torus(ids(16)).spectral_gap() == pytest.approx(0.4, abs=1e-9)
    assert Topology.torus(ids(64)).spectral_gap() == pytest.approx(0.11716, abs=1e-5)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_complete_graph_is_exact_average(n: int) -> None:
    topo = Topology.complete(ids(n))
    np.testing.assert_allclose(topo.metropolis_hastings_weights(), np.full((n, n), 1 / n))
    assert topo.spectral_gap() == pytest.approx(1.0)


def test_exponential_beats_ring_at_16() -> None:
    exp, ring = Topology.exponential(ids(16)), Topology.ring(ids(16))
    assert exp.spectral_gap() > 5 * ring.spectral_gap()
    # i linked to i ± 1, 2, 4, 8 (8 is its own inverse mod 16) -> degree 7
    assert exp.degree("h00") == 7
    assert set(exp.neighbors("h00")) == {f"h{j:02d}" for j in (1, 2, 4, 8, 12, 14, 15)}


def test_torus_shapes_and_errors() -> None:
    assert Topology.torus(ids(12)).name == "torus3x4"
    assert Topology.torus(ids(12), rows=2).name == "torus2x6"
    assert Topology.torus(ids(6), rows=2, cols=3).degree("h00") == 3  # 2 rows: up == down
    with pytest.raises(TopologyError, match="prime"):
        Topology.torus(ids(7))
    assert Topology.torus(ids(7), allow_degenerate=True).spectral_gap() == pytest.approx(
        Topology.ring(ids(7)).spectral_gap()
    )
    with pytest.raises(TopologyError, match="rows×cols"):
        Topology.torus(ids(12), rows=5, cols=3)
    with pytest.raises(TopologyError, match="does not divide"):
        Topology.torus(ids(12), cols=5)


@pytest.mark.parametrize("n,d", [(10, 3), (12, 4), (16, 5), (9, 2), (20, 6)])
def test_random_regular_is_regular_connected_and_seeded(n: int, d: int) -> None:
    a = Topology.random_regular(ids(n), d, seed=3)
    assert (a.degrees() == d).all()
    assert len(a.edges) == n * d // 2
    assert a.spectral_gap() > 0  # connected
    b = Topology.random_regular(ids(n), d, seed=3)
    assert a == b and a.edges == b.edges
    others = {Topology.random_regular(ids(n), d, seed=s).edges for s in range(6)}
    assert len(others) > 1 or d == n - 1  # the seed actually matters


def test_random_regular_errors() -> None:
    with pytest.raises(TopologyError, match="odd"):
        Topology.random_regular(ids(7), 3)
    with pytest.raises(TopologyError, match="must be < n"):
        Topology.random_regular(ids(6), 6)
    with pytest.raises(TopologyError, match="degree"):
        Topology.random_regular(ids(6), 0)
    with pytest.raises(TopologyError, match="never connected"):
        Topology.random_regular(ids(6), 1)


def test_explicit_edges_and_their_errors() -> None:
    topo = build_topology("explicit", ["a", "b", "c", "d"], edges=[["a", "b"], ["b", "c"], ["d", "c"], ["c", "b"]])
    assert len(topo.edges) == 3
    assert topo.neighbors("c") == ["b", "d"]
    assert topo.is_bipartite()
    with pytest.raises(TopologyError, match="unknown node id 'z'"):
        Topology.from_edges(["a", "b"], [["a", "z"]])
    with pytest.raises(TopologyError, match="self-loop on node 'a'"):
        Topology.from_edges(["a", "b"], [["a", "b"], ["a", "a"]])
    with pytest.raises(TopologyError, match="disconnected: 2 components"):
        Topology.from_edges(["a", "b", "c", "d"], [["a", "b"], ["c", "d"]])
    with pytest.raises(TopologyError, match="pair of node ids"):
        Topology.from_edges(["a", "b"], [["a", "b", "c"]])
    with pytest.raises(TopologyError, match="duplicate node id"):
        Topology.ring(["a", "b", "a"])
    with pytest.raises(TopologyError, match="empty"):
        Topology.ring([])
    with pytest.raises(TopologyError, match="not in topology"):
        Topology.ring(["a", "b"]).neighbors("q")


def test_factory_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown topology kind 'star'.*ring"):
        build_topology("star", ids(4))
    with pytest.raises(ValueError, match="does not take parameter.*degre"):
        build_topology("random_regular", ids(4), degre=2)
    with pytest.raises(TopologyError, match="needs parameter.*degree"):
        build_topology("d-regular", ids(4))
    with pytest.raises(TopologyError, match="needs parameter.*edges"):
        build_topology("explicit", ids(4))
    assert build_topology("Exp", ids(8)).name == "exponential"


@pytest.mark.parametrize("n", [4, 6, 8, 16])
def test_even_ring_bipartite(n: int) -> None:
    split = Topology.ring(ids(n)).two_coloring()
    assert split is not None
    active, passive = split
    assert set(active) | set(passive) == set(ids(n)) and not set(active) & set(passive)
    assert "h00" in active
    for a, b in Topology.ring(ids(n)).edges:
        assert (a in active) != (b in active)  # every edge joins active to passive


@pytest.mark.parametrize("n", [3, 5, 7, 9])
def test_odd_ring_not_bipartite(n: int) -> None:
    topo = Topology.ring(ids(n))
    assert not topo.is_bipartite()
    assert topo.two_coloring() is None


@pytest.mark.parametrize("kind,params", ALL_KINDS)
def test_repeated_averaging_converges_at_spectral_rate(kind: str, params: dict) -> None:
    n = 12
    topo = build_topology(kind, ids(n), **params)
    w = topo.metropolis_hastings_weights()
    rho = 1 - topo.spectral_gap()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5))
    mean = x.mean(axis=0)
    err0 = np.linalg.norm(x - mean)
    for t in range(1, 41):
        x = w @ x
        np.testing.assert_allclose(x.mean(axis=0), mean, atol=1e-12)  # mean preserved
        assert np.linalg.norm(x - mean) <= rho**t * err0 * (1 + 1e-9) + 1e-12
    # and the rate is tight: the slowest mode decays like rho^t, not faster
    if rho > 0.3:
        assert np.linalg.norm(x - mean) >= 1e-3 * rho**40 * err0


def test_summary_line() -> None:
    line = Topology.ring(ids(8)).summary()
    assert "\n" not in line
    assert "ring" in line and "n=8" in line and "degree 2..2" in line and "0.19526" in line
