"""One strategy registry: `privfl node` and `privfl simulate` build and refuse strategies the same way.

Before, ``privfl.node`` and ``privfl.sim.runner`` each had their own strategy table, their
own params checks (with different allowed keys and messages) and probed the built
strategy with ``getattr``. Now both fill a ``StrategyBuild`` for
``privfl.strategies.registry``: one config (a node's TOML and an experiment TOML with the
same ``[topology]`` and ``[strategy]``) gives the same class with the same config on every
topology kind, and a refusal is the same one line under both (a node puts its file first).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privfl.errors import ConfigError
from privfl.experiment import load_experiment, spec_for
from privfl.launch import dump_toml
from privfl.node import Node, strategy_build, topology_of
from privfl.node_config import NodeConfig, load_node_config
from privfl.sim import LinkSpec, SimContext, SimSpec, SimWorld, run_simulation
from privfl.strategies.base import NodeStrategy, StepReport
from privfl.strategies.gossip import AsyncGossip, SyncGossip
from privfl.strategies.registry import STRATEGIES, build_node_strategy, check_strategy
from privfl.strategies.topology import Topology, build_topology
from tests.test_topology_one_reading import CASES, IDS

ROOT = Path(__file__).resolve().parents[1]
PARAMS = [np.zeros((4, 2), np.float32), np.zeros(2, np.float32)]
DP = {"noise_multiplier": 2.0, "target_epsilon": 3.0, "batch_size": 32, "sample_rate": 0.14}
STRATEGY_CASES: list[dict[str, Any]] = [
    {"name": "async_gossip", "local_steps": 3},
    {"name": "sync_gossip", "local_steps": 3},
    {"name": "sync_gossip", "local_steps": 2, "params": {"compressor": "topk", "ratio": 0.2, "gamma": 0.25}},
]


class _Net:
    """The part of a node's GrpcPeerNetwork a strategy reads while it is built."""

    def __init__(self, node_id: str, neighbors: list[str]) -> None:
        self.node_id = node_id
        self._neighbors = neighbors

    def neighbors(self) -> list[str]:
        return list(self._neighbors)


def _identity(d: Path) -> dict[str, str]:
    """Identity paths a node config needs to load (never opened: no node is started)."""
    out = {}
    for name in ("cert", "key", "ca", "roster", "crl"):
        (d / name).touch()
        out[name] = str(d / name)
    return out


def _node_toml(d: Path, node_id: str, site: int, topology: dict[str, Any], strategy: dict[str, Any]) -> Path:
    p = d / f"{node_id}.toml"
    p.write_text(dump_toml({
        "node": {"id": node_id, "output": str(d / node_id), "seed": 5},
        "identity": _identity(d),
        "data": {"source": "breast_cancer", "num_sites": len(IDS), "site_index": site},
        "dp": DP, "topology": topology, "strategy": strategy, "stop": {"max_steps": 10},
    }))
    return p


def _experiment_toml(d: Path, topology: dict[str, Any], strategy: dict[str, Any]) -> Path:
    p = d / "experiment.toml"
    p.write_text(dump_toml({
        "data": {"source": "breast_cancer", "num_sites": len(IDS)},
        "dp": DP, "topology": topology, "strategy": strategy, "stop": {"max_steps": 10},
    }))
    return p


def _node_strategy(cfg: NodeConfig, topology: Topology) -> NodeStrategy:
    """What ``Node._setup`` builds (its seeds come from ``[node].seed`` here)."""
    net = _Net(cfg.node.id, topology.neighbors(cfg.node.id))
    return build_node_strategy(strategy_build(cfg, topology, object(), net, PARAMS,  # type: ignore[arg-type]
                                              seed=5, compressor_seed=5 + 7919))


def _sim_strategies(spec: SimSpec) -> tuple[Topology, list[NodeStrategy]]:
    """What ``run_simulation`` builds for ``spec`` (no data: the strategies never train here)."""
    topology = build_topology(spec.topology, IDS, **spec.topology_params)
    world = SimWorld(IDS, {nid: topology.neighbors(nid) for nid in IDS}, LinkSpec())
    ctx = SimContext(spec, IDS, topology, {nid: object() for nid in IDS}, PARAMS)  # type: ignore[misc]
    return topology, [build_node_strategy(ctx.strategy_build(nid, world.network(nid))) for nid in IDS]


def _comparable(s: NodeStrategy) -> dict[str, Any]:
    """The strategy's config without what differs by design (seeds, a round's wait), compressor by kind."""
    cfg = {k: v for k, v in s.config.items() if k not in ("seed", "timeout", "compressor")}
    comp = s.config.get("compressor")
    cfg["compressor"] = None if comp is None else (type(comp).__name__, comp.describe())
    return cfg


@pytest.mark.parametrize("strategy", STRATEGY_CASES, ids=lambda s: "-".join([s["name"], *s.get("params", {})]))
@pytest.mark.parametrize("table", CASES, ids=lambda t: "-".join(f"{v}" for k, v in t.items() if k != "edges"))
def test_node_and_simulate_build_the_same_strategy(tmp_path: Path, table: dict[str, Any],
                                                   strategy: dict[str, Any]) -> None:
    exp = load_experiment(_experiment_toml(tmp_path, table, strategy))
    spec = dataclasses.replace(spec_for(exp, exp.runs[0]), node_ids=list(IDS))
    spec.validate()
    sim_topology, sims = _sim_strategies(spec)
    for i, (nid, b) in enumerate(zip(IDS, sims)):
        cfg = load_node_config(_node_toml(tmp_path, nid, i, table, strategy))
        topology = topology_of(cfg, IDS)
        a = _node_strategy(cfg, topology)
        assert type(a) is type(b) is (AsyncGossip if strategy["name"] == "async_gossip" else SyncGossip)
        assert _comparable(a) == _comparable(b), nid
        assert a.local_steps == b.local_steps == strategy["local_steps"]  # type: ignore[attr-defined]
        assert a.synchronous == b.synchronous
        if isinstance(a, AsyncGossip):
            assert isinstance(b, AsyncGossip)
            assert (a.active, a.bipartite, a.peers) == (b.active, b.bipartite, b.peers)
            assert a.peers == [p for p in AsyncGossip.roles(sim_topology, nid)["peers"]]
        else:  # the same Metropolis–Hastings row; the node waits [node].sync_timeout, the simulator for everyone
            assert a.mixing == b.mixing == sim_topology.mixing_row(nid)
            assert a.timeout == cfg.node.sync_timeout and b.timeout == math.inf
            assert type(a.innovation) is type(b.innovation)  # type: ignore[attr-defined]


REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"name": "nope"},
     r"^\[strategy\]\.name: unknown strategy name 'nope'; choose one of async_gossip, cocod, sync_gossip "),
    ({"name": "async_gossip", "params": {"bogus": 1}},
     r"^\[strategy\]\.params\.bogus: async_gossip does not take bogus; allowed: "),
    ({"name": "async_gossip", "params": {"compressor": "topk", "ratio": 0.1}},
     r"^\[strategy\]\.params\.compressor: async_gossip cannot compress \('topk'\)"),
    ({"name": "sync_gossip", "params": {"gama": 0.5}}, r"^\[strategy\]\.params\.gama: sync_gossip does not take gama"),
    ({"name": "sync_gossip", "params": {"compressor": "zstd"}},
     r"^\[strategy\]\.params\.compressor: unknown compressor 'zstd'"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 0.1, "gamma": 1.5}},
     r"^\[strategy\]\.params\.gamma: must be a number in \(0, 1\]"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 0.1, "ratoi": 1}},
     r"^\[strategy\]\.params\.ratoi: sync_gossip with compressor 'topk' does not take ratoi"),
    ({"name": "sync_gossip", "params": {"compressor": "cltk", "ratio": 0.1}},
     r"^\[strategy\]\.params\.compressor: 'cltk' is not supported by sync_gossip"),
]


@pytest.mark.parametrize("strategy,message", REFUSALS, ids=[m[:40] for _, m in REFUSALS])
def test_node_and_simulate_refuse_with_the_same_one_line(tmp_path: Path, strategy: dict[str, Any],
                                                         message: str) -> None:
    node_toml = _node_toml(tmp_path, IDS[0], 0, {"kind": "ring"}, strategy)
    with pytest.raises(ConfigError) as node_err:
        load_node_config(node_toml)
    with pytest.raises(ConfigError) as sim_err:  # simulate: the experiment's run, refused before any data loads
        exp = load_experiment(_experiment_toml(tmp_path, {"kind": "ring"}, strategy))
        run_simulation(spec_for(exp, exp.runs[0]))
    sim = str(sim_err.value)
    assert re.match(message, sim), sim
    assert "\n" not in sim
    assert str(node_err.value) == f"{node_toml}: {sim}"


@pytest.mark.parametrize("key,where", [("local_steps", r"\[strategy\]\.local_steps"), ("seed", r"\[node\]\.seed"),
                                       ("timeout", r"\[node\]\.sync_timeout"), ("mixing", r"\[topology\]")])
def test_a_node_points_to_where_it_sets_what_the_simulator_takes_in_params(tmp_path: Path, key: str,
                                                                           where: str) -> None:
    value = {"local_steps": 2, "seed": 1, "timeout": 3.0, "mixing": {}}[key]
    strategy = {"name": "sync_gossip", "params": {key: value}}
    check_strategy("sync_gossip", strategy["params"], "simulate")  # the simulator's knob
    with pytest.raises(ConfigError, match=rf"\[strategy\]\.params\.{key}: a node sets this from {where}"):
        load_node_config(_node_toml(tmp_path, IDS[0], 0, {"kind": "ring"}, strategy))


@pytest.mark.parametrize("name", sorted(n for n, e in STRATEGIES.items() if e.kind == "collective"))
def test_a_node_refuses_collective_strategies_before_writing_anything(tmp_path: Path, name: str) -> None:
    strategy = {"name": "async_gossip"}
    node_toml = _node_toml(tmp_path, IDS[0], 0, {"kind": "ring"}, strategy)
    cfg = load_node_config(node_toml)
    cfg.common.strategy.name = name  # a config built in code skips the load-time check
    msg = rf"^{re.escape(str(node_toml))}: \[strategy\]\.name: '{name}' is a collective strategy \(privfl simulate"
    with pytest.raises(ConfigError, match=msg):
        Node(cfg)
    assert not cfg.output_dir.exists()
    with pytest.raises(ConfigError, match=msg.split(": ", 1)[1]):
        load_node_config(_node_toml(tmp_path, IDS[0], 0, {"kind": "ring"}, {"name": name}))
    check_strategy(name, {}, "simulate")


def test_drivers_read_what_nodestrategy_declares() -> None:
    """A strategy that declares nothing still has every attribute a driver reads, with its default."""

    class Minimal(NodeStrategy):
        def step(self) -> StepReport:
            return StepReport()

    s = Minimal(object(), _Net("a", ["b"]), PARAMS)  # type: ignore[arg-type]
    assert (s.synchronous, s.mixing, s.timeout, s.consensus_exchanges, s.exchanges, s.served) == \
        (False, None, math.inf, 0, 0, 0)
    assert math.isnan(s.last_loss)
    snap = s.snapshot()
    assert all(np.array_equal(x, y) and x is not y for x, y in zip(snap, s.params))
    assert s.consensus_round().local_steps == 0
    drivers = [ROOT / "privfl" / "sim" / "engine.py", ROOT / "privfl" / "node.py",
               ROOT / "privfl" / "sim" / "runner.py"]
    probes = r"(getattr|hasattr)\([^,]*strateg[^,]*, \"(synchronous|consensus_exchanges|mixing|timeout|snapshot|" \
             r"last_loss|exchanges|served)\""
    for path in drivers:
        assert not re.search(probes, path.read_text()), path
    assert not re.search(r"getattr\(s, \"", (ROOT / "privfl" / "sim" / "engine.py").read_text())
