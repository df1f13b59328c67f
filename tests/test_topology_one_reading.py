"""One config, one topology: `privfl node` and `privfl simulate` read `[topology]` the same way.

Before, `kind = "grid", rows = 2` on 12 nodes gave a 3×4 torus under simulate and a 2×6
torus under node, and `d_regular` / `edges` failed under simulate. Every kind and alias is
built both ways here and must give the same edges and the same mixing weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from privfl.config import TopologySection, from_table
from privfl.errors import ConfigError
from privfl.sim import SimSpec
from privfl.strategies.topology import build_topology

IDS = [f"h{i:02d}" for i in range(12)]
EDGES = [[IDS[i], IDS[(i + 1) % 12]] for i in range(12)] + [[IDS[0], IDS[6]]]

CASES: list[dict[str, Any]] = [
    {"kind": "ring"}, {"kind": "cycle"},
    {"kind": "torus"}, {"kind": "torus", "rows": 2}, {"kind": "grid", "rows": 2}, {"kind": "torus2d", "rows": 3},
    {"kind": "exponential"}, {"kind": "exp"},
    {"kind": "random_regular", "degree": 3, "seed": 4}, {"kind": "d-regular", "degree": 3},
    {"kind": "regular", "degree": 5, "seed": 1},
    {"kind": "complete"}, {"kind": "full"},
    {"kind": "explicit", "edges": EDGES}, {"kind": "edges", "edges": EDGES}, {"kind": "edge_list", "edges": EDGES},
]


def _node_topology(table: dict[str, Any]):  # noqa: ANN202
    """What privfl.node builds (topology_of reads the parsed [topology] section)."""
    from privfl.node import topology_of

    class _Cfg:  # only .common.topology is read
        class common:  # noqa: N801
            topology = from_table(TopologySection, table, "node.toml: [topology]")

    return topology_of(_Cfg, IDS)  # type: ignore[arg-type]


def _sim_topology(table: dict[str, Any]):  # noqa: ANN202
    """What privfl simulate builds: the experiment fills SimSpec from the same section."""
    t = from_table(TopologySection, table, "experiment.toml: [topology]")
    spec = SimSpec(topology=t.canonical_kind, topology_params=t.params())
    return build_topology(spec.topology, IDS, **spec.topology_params)


@pytest.mark.parametrize("table", CASES, ids=lambda t: "-".join(f"{v}" for k, v in t.items() if k != "edges"))
def test_node_and_simulate_build_the_same_graph_and_weights(table: dict[str, Any]) -> None:
    a, b = _node_topology(table), _sim_topology(table)
    assert a.name == b.name
    np.testing.assert_array_equal(a.adjacency(), b.adjacency())
    np.testing.assert_array_equal(a.metropolis_hastings_weights(), b.metropolis_hastings_weights())
    for nid in IDS:
        assert a.neighbors(nid) == b.neighbors(nid)
        assert a.mixing_row(nid) == b.mixing_row(nid)


def test_grid_with_rows_is_the_asked_torus_everywhere() -> None:
    """The finding's own case: grid, rows = 2 on 12 nodes is the 2×6 torus under both."""
    two_by_six = _sim_topology({"kind": "grid", "rows": 2})
    most_square = _sim_topology({"kind": "grid"})  # 3×4
    np.testing.assert_array_equal(two_by_six.adjacency(), _node_topology({"kind": "grid", "rows": 2}).adjacency())
    assert not np.array_equal(two_by_six.adjacency(), most_square.adjacency())


def test_unknown_kind_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[topology\]\.kind: .*unknown topology kind 'star'"):
        from_table(TopologySection, {"kind": "star"}, "x.toml: [topology]")
