"""Iterate averaging (``[strategy].params.ema_decay``): an EMA of each node's DP iterates, for both
AsyncGossip and the all-reduce strategies — off by default, post-processing (no ε), never sent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from privfl.errors import ConfigError
from privfl.strategies.base import ModelMessage
from privfl.strategies.gossip import AsyncGossip
from privfl.strategies.iterate_average import IterateAverage, ema_decay_setting
from privfl.strategies.periodic import AllReduce, PeriodicAveraging
from privfl.strategies.registry import check_strategy
from privfl.strategies.topology import build_topology
from tests.test_gossip import CountingClient, Hub, LocalNet, ShiftClient, _dp_clients, ids
from tests.test_periodic import quad_clients, run

pytestmark = pytest.mark.timeout(60)


def test_ema_math_on_a_tiny_example() -> None:
    """avg_1 = x_1; avg_t = β_t avg_{t−1} + (1 − β_t) x_t with β_t = min(decay, (1 + t) / (10 + t))."""
    e = IterateAverage(0.5)
    assert e.view() is None
    xs = [np.array([0.0, 2.0], np.float32), np.array([4.0, 2.0], np.float32), np.array([8.0, -2.0], np.float32)]
    e.update([xs[0], np.array([7])])
    np.testing.assert_array_equal(e.view()[0], xs[0])
    assert e.beta(2) == pytest.approx(3 / 12) and e.beta(3) == pytest.approx(4 / 13)  # warm-up below 0.5
    e.update([xs[1], np.array([8])])
    want = 0.25 * xs[0].astype(np.float64) + 0.75 * xs[1]
    e.update([xs[2], np.array([9])])
    want = 4 / 13 * want + 9 / 13 * xs[2].astype(np.float64)
    view = e.view()
    assert view[0].dtype == np.float32 and view[1].tolist() == [9]  # non-float arrays: the last model's
    np.testing.assert_allclose(view[0], want, rtol=1e-6)
    late = IterateAverage(0.9)
    assert late.beta(100) == 0.9  # capped at decay once the warm-up passes it


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.9", float("nan")])
def test_bad_values_are_refused_naming_the_key(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.ema_decay"):
        ema_decay_setting({"ema_decay": bad})
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.ema_decay"):
        check_strategy("async_gossip", {"ema_decay": bad}, "simulate")
    for cls in (AllReduce, PeriodicAveraging):
        with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.ema_decay"):
            cls(ema_decay=bad)


def test_ema_decay_is_a_registered_key_of_both_strategies() -> None:
    for name in ("async_gossip", "allreduce", "periodic", "adaptive_period"):
        check_strategy(name, {"ema_decay": 0.9}, "simulate")
    assert ema_decay_setting({}) is None and ema_decay_setting({"ema_decay": 0}) == 0.0


def test_allreduce_ema_off_reproduces_todays_params_exactly_and_on_is_the_ema_of_the_iterates() -> None:
    clients = quad_clients([1.0, 2.0, 3.0], lr=0.1, noise=0.5)
    init = {n: [np.zeros(5)] for n in clients}
    base, _ = run(AllReduce(), clients, init, 6)
    off, _ = run(AllReduce(ema_decay=None), quad_clients([1.0, 2.0, 3.0], lr=0.1, noise=0.5), init, 6)
    for n in base:
        np.testing.assert_array_equal(base[n][0], off[n][0])
    # on: training follows the very same iterates (kept inside), the returned params are their EMA
    strategy, ema, iterates = AllReduce(ema_decay=0.8), IterateAverage(0.8), []
    params: dict[str, Any] = init
    fresh = quad_clients([1.0, 2.0, 3.0], lr=0.1, noise=0.5)
    for r in range(1, 7):
        params = strategy.run_round(fresh, params, r).params
        iterates.append(strategy._iterate["n0"])
        ema.update(iterates[-1])
    np.testing.assert_array_equal(iterates[-1][0], base["n0"][0])  # the training path is unchanged
    for n in params:
        np.testing.assert_array_equal(params[n][0], ema.view()[0])
    assert not np.array_equal(params["n0"][0], base["n0"][0])
    # params that are not the returned EMA (a resumed model) are trained from as given
    restart = {n: [np.ones(5)] for n in fresh}
    strategy.run_round(fresh, restart, 7)
    assert strategy._ema["n0"].updates == 1


class Recording(LocalNet):
    """Records what the node sends in each exchange, beside its training iterate and its EMA then."""

    def __init__(self, hub: Hub, node_id: str, log: list[tuple[Any, Any, Any]]) -> None:
        super().__init__(hub, node_id)
        self.log = log

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        me = self.hub.nodes[self.node_id]  # the caller holds its lock: its params are the iterate
        view = me.ema.view() if me.ema is not None else None
        self.log.append(([np.array(p) for p in message.params], [np.array(p) for p in me.params], view))
        return super().exchange(peer, message)


def _async_pair(ema: float | None, clients: list[Any], log: list[tuple[Any, Any, Any]]) -> list[AsyncGossip]:
    topo = build_topology("complete", ids(2))
    hub = Hub(topo)
    nodes = []
    for i, nid in enumerate(topo.nodes):
        cfg: dict[str, Any] = {"seed": i, "consensus_exchanges": 2, **AsyncGossip.roles(topo, nid)}
        if ema is not None:
            cfg["ema_decay"] = ema
        hub.nodes[nid] = AsyncGossip(clients[i], Recording(hub, nid, log), [np.zeros(3, np.float32)], cfg)
        nodes.append(hub.nodes[nid])
    return nodes


def test_async_ema_is_never_sent_during_training_and_off_is_bit_for_bit() -> None:
    runs: dict[Any, tuple[list[AsyncGossip], list[tuple[Any, Any, Any]]]] = {}
    for ema in (None, 0.9):
        log: list[tuple[Any, Any, Any]] = []
        nodes = _async_pair(ema, [ShiftClient(1.0), ShiftClient(-0.5)], log)
        for _ in range(6):
            for node in nodes:
                node.step()
        runs[ema] = (nodes, log)
    (plain, log0), (averaged, log1) = runs[None], runs[0.9]
    assert len(log0) == len(log1) == 6  # two nodes: n0 active, n1 passive
    for (sent0, _, _), (sent1, iterate, _view) in zip(log0, log1):
        np.testing.assert_array_equal(sent0[0], sent1[0])  # the same training path, the same frames
        np.testing.assert_array_equal(sent1[0], iterate[0])  # what is sent is the training iterate ...
    assert any(not np.array_equal(s[0], v[0]) for s, _, v in log1[2:])  # ... which is not the EMA
    for p, a in zip(plain, averaged):
        np.testing.assert_array_equal(p.params[0], a.params[0])
        np.testing.assert_array_equal(p.snapshot()[0], p.params[0])  # off: evaluated = the model
        np.testing.assert_array_equal(a.snapshot()[0], a.ema.view()[0])  # on: evaluated = its EMA
        assert not np.array_equal(a.snapshot()[0], a.params[0])
    # training over (both stopped): the consensus exchanges average the nodes' EMAs (sent: post-processing)
    views = [a.ema.view()[0].astype(np.float64) for a in averaged]
    for a in averaged:
        a._stop("test: training over")
    for a in averaged:
        a.consensus_round()
    np.testing.assert_array_equal(log1[6][0][0], views[0].astype(np.float32))
    for a in averaged:
        np.testing.assert_allclose(a.snapshot()[0], (views[0] + views[1]) / 2, rtol=1e-6)
        np.testing.assert_array_equal(a.snapshot()[0], a.params[0])


def test_no_epsilon_is_charged_for_the_average() -> None:
    """The EMA is post-processing: the same fits, the same accountant steps and ε with it as without."""
    out = {}
    for ema in (None, 0.95):
        clients, _, _, init = _dp_clients(2, [50.0, 50.0])
        counting = [CountingClient(c) for c in clients]
        topo = build_topology("complete", ids(2))
        hub = Hub(topo)
        nodes = []
        for i, nid in enumerate(topo.nodes):
            cfg: dict[str, Any] = {"seed": i, **AsyncGossip.roles(topo, nid)}
            if ema is not None:
                cfg["ema_decay"] = ema
            hub.nodes[nid] = AsyncGossip(counting[i], hub.net(nid), init, cfg)
            nodes.append(hub.nodes[nid])
        for _ in range(4):
            for node in nodes:
                node.step()
        out[ema] = ([c.calls for c in counting], [c.accountant.steps for c in clients],
                    [c.epsilon for c in clients], [n.epsilon for n in nodes])
    assert out[None][0] == out[0.95][0] == [4, 4] and out[None][1] == out[0.95][1] == [4, 4]
    assert out[None][2] == pytest.approx(out[0.95][2]) and out[None][3] == pytest.approx(out[0.95][3])
    # all-reduce: the same fits and accountant steps with the EMA on
    steps = {}
    for ema in (None, 0.95):
        clients, _, _, init = _dp_clients(2, [50.0, 50.0])
        named = {f"n{i}": c for i, c in enumerate(clients)}
        run(AllReduce(ema_decay=ema), named, {n: init for n in named}, 3)
        steps[ema] = ([c.accountant.steps for c in clients], [c.epsilon for c in clients])
    assert steps[None][0] == steps[0.95][0] == [3, 3] and steps[None][1] == pytest.approx(steps[0.95][1])
