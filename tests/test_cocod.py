"""CoCoD-SGD (strategies.cocod): the merge rule, the overlap of compute and communication, privacy.

The merge is checked on integer-valued toys with power-of-two weights, so exact equality
holds; the simulator's round time is max(compute, communication) for cocod against
compute + communication for sync_gossip; and nothing a client computes inside ``fit``
(un-noised intermediate values) ever reaches the network — every released model is the
round-start model, rebuilt by a curious neighbour from released models and post-noise
outputs alone.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from flwr.client import NumPyClient

from privfl.accounting import BudgetExhausted
from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.sim import LinkSpec, SimSpec, StopCriteria, run_simulation
from privfl.strategies import CoCoDGossip, StrategyBuild, build_strategy, check_strategy, cocod_merge
from privfl.strategies.base import ModelMessage
from privfl.strategies.topology import build_topology
from tests.helpers import run_in_threads
from tests.test_gossip import Hub

pytestmark = pytest.mark.timeout(60)

NODES = ["a", "b", "c"]
# a row-stochastic, symmetric W with power-of-two weights: exact in binary floating point
W = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
MIXING = {nid: {p: float(W[i, j]) for j, p in enumerate(NODES) if j != i} for i, nid in enumerate(NODES)}


class ShiftClient(NumPyClient):
    """fit adds a fixed displacement ``d`` to every coordinate (``local_steps`` times); records its inputs."""

    def __init__(self, d: float, sleep: float = 0.0) -> None:
        self.d = d
        self.sleep = sleep
        self.inputs: list[list[np.ndarray]] = []

    def fit(self, parameters, config):  # type: ignore[override]
        self.inputs.append([np.array(p, copy=True) for p in parameters])
        if self.sleep:
            time.sleep(self.sleep)
        k = int(config["local_steps"])
        return [p + k * self.d for p in parameters], 1, {"steps": k, "epsilon": 0.5}


def _flat(params: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(p) for p in params])


def _nodes(hub: Hub, clients: list[NumPyClient], models: list[list[np.ndarray]], local_steps: int = 1,
           timeout: float = 5.0) -> list[CoCoDGossip]:
    out = []
    for nid, client, m in zip(NODES, clients, models):
        cfg = {"local_steps": local_steps, "mixing": MIXING[nid], "timeout": timeout}
        s = CoCoDGossip(client, hub.net(nid), m, cfg)
        hub.nodes[nid] = s
        out.append(s)
    return out


def _integer_models(seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(-64, 64, size=(2, 3)).astype(np.float64), rng.integers(-64, 64, size=4).astype(np.float64)]
            for _ in NODES]


def _run_rounds(nodes: list[CoCoDGossip], rounds: int, threaded: bool) -> None:
    for _ in range(rounds):
        if threaded:  # the real node's path: step() overlaps the exchange with fit in a background thread
            run_in_threads(n.step for n in nodes)
        else:  # the simulator's path: every node's first half, then every second half
            for n in nodes:
                n.begin_round()
            for n in nodes:
                n.finish_round(n.network.receive(n.round, list(n.mixing), 1.0))


@pytest.mark.parametrize("threaded", [False, True])
def test_merge_is_mix_of_round_start_models_plus_own_displacement_exactly(threaded: bool) -> None:
    models = _integer_models(3)
    d = np.array([1.0, -2.0, 4.0])
    hub = Hub(build_topology("complete", NODES))
    nodes = _nodes(hub, [ShiftClient(float(x)) for x in d], models, local_steps=2)
    x = np.stack([_flat(m) for m in models])
    for r in range(3):
        _run_rounds(nodes, 1, threaded)
        x = W @ x + 2 * d[:, None]  # x_{t+1} = W x_t + (x_{t+1/2} - x_t), k = 2 steps of +d
        got = np.stack([_flat(n.params) for n in nodes])
        np.testing.assert_array_equal(got, x)  # exact: integers, power-of-two weights
        assert all(n.round == r + 1 for n in nodes)
    # what left each node at round t is its round-start model x_t (3 rounds x 2 neighbours each)
    assert sorted(hub.sent) == sorted((s, p, r) for r in range(3) for s in NODES for p in NODES if p != s)


def test_mean_evolves_by_the_mean_displacement_and_one_node_is_plain_sgd() -> None:
    rng = np.random.default_rng(0)
    models = [[rng.normal(size=(3, 3))] for _ in NODES]
    d = np.array([0.3, -0.1, 0.7])
    hub = Hub(build_topology("complete", NODES))
    nodes = _nodes(hub, [ShiftClient(float(x)) for x in d], models)
    mean0 = np.mean([_flat(m) for m in models], axis=0)
    _run_rounds(nodes, 4, threaded=False)
    mean4 = np.mean([_flat(n.params) for n in nodes], axis=0)
    np.testing.assert_allclose(mean4, mean0 + 4 * d.mean(), rtol=1e-12, atol=1e-12)
    # N = 1 (no neighbours): CoCoD is local SGD
    solo = CoCoDGossip(ShiftClient(0.5), Hub(build_topology("complete", ["z"])).net("z"), [np.zeros(3)],
                       {"local_steps": 3, "mixing": {}})
    for _ in range(2):
        solo.step()
    np.testing.assert_array_equal(solo.params[0], np.full(3, 3.0))


def test_missing_neighbour_weight_goes_to_own_round_start_model() -> None:
    models = _integer_models(5)
    hub = Hub(build_topology("complete", NODES))
    nodes = _nodes(hub, [ShiftClient(1.0) for _ in NODES], models)
    for n in nodes:
        n.begin_round()
    a = nodes[0]
    got = a.network.receive(0, list(a.mixing), 1.0)
    got.pop("b")
    got["c"] = ModelMessage(sender="c", round=7, kind="model", params=got["c"].params)  # wrong round: dropped
    a.finish_round(got)
    np.testing.assert_array_equal(_flat(a.params), _flat(models[0]) + 1.0)
    assert a.missing == 2


@pytest.mark.parametrize("threaded", [False, True])
def test_consensus_rounds_after_training_mix_exactly_without_training(threaded: bool) -> None:
    models = _integer_models(4)
    d = np.array([4.0, -8.0, 12.0])
    hub = Hub(build_topology("complete", NODES))
    clients = [ShiftClient(float(x)) for x in d]
    nodes = _nodes(hub, clients, models)
    _run_rounds(nodes, 2, threaded)
    x = np.stack([_flat(n.params) for n in nodes])
    for _ in range(2):  # x <- W x: every site's last displacement is shared; no fit, no new DP step
        if threaded:  # the real node's path: blocking consensus_round in each node's thread
            run_in_threads(n.consensus_round for n in nodes)
        else:  # the simulator's path: every first half, then every second half
            for n in nodes:
                n.begin_consensus_round()
            for n in nodes:
                n.finish_consensus_round(n.network.receive(n.round, list(n.mixing), 1.0))
        x = W @ x
        np.testing.assert_array_equal(np.stack([_flat(n.params) for n in nodes]), x)
    assert [len(c.inputs) for c in clients] == [2, 2, 2]
    assert all(n.round == 4 for n in nodes) and len(hub.sent) == 4 * 6


def test_a_node_consensus_round_stops_waiting_for_a_silent_neighbour() -> None:
    hub = Hub(build_topology("complete", NODES))
    a = _nodes(hub, [ShiftClient(1.0) for _ in NODES], _integer_models(6), timeout=0.3)[0]
    start = _flat(a.params)
    t0 = time.monotonic()
    a.consensus_round()  # b and c send nothing: waited for once (the timeout) ...
    t1 = time.monotonic()
    a.consensus_round()  # ... then no longer
    t2 = time.monotonic()
    assert t1 - t0 >= 0.3 and t2 - t1 < 0.2
    np.testing.assert_array_equal(_flat(a.params), start)  # nothing arrived: the weight stays on itself
    assert a.missing == 4 and a.round == 2


def test_cocod_overlaps_compute_and_communication_in_the_simulator() -> None:
    dp = DPConfig(noise_multiplier=1.0, batch_size=16, sample_rate=0.14, lr=0.5, target_epsilon=8.0)
    compute = 2 * 0.01  # local_steps x step_cost
    header = LinkSpec().header_bytes
    msg = (30 * 2 + 2) * 4  # logreg on breast_cancer, float32
    bw = 1e6
    for latency in (0.05, 0.004):  # communication slower, then faster, than the compute
        comm = latency + (msg + header) / bw
        out = {}
        for name in ("sync_gossip", "cocod"):
            out[name] = run_simulation(SimSpec(num_nodes=4, local_steps=2, dp=dp, strategy=name, step_cost=0.01,
                                               links=LinkSpec(latency=latency, bandwidth=bw),
                                               stop=StopCriteria(max_rounds=5)))
        assert out["sync_gossip"].summary["virtual_time"] == pytest.approx(5 * (compute + comm), rel=1e-9)
        assert out["cocod"].summary["virtual_time"] == pytest.approx(5 * max(compute, comm), rel=1e-9)
        # same DP work and the same privacy cost per node; the same bytes on the wire
        for key in ("steps", "epsilon", "bytes_sent", "messages_sent"):
            assert out["cocod"].summary[key] == out["sync_gossip"].summary[key], key
    # two pure mixing rounds after training: one message time each, no compute, no DP step
    mixed = run_simulation(SimSpec(num_nodes=4, local_steps=2, dp=dp, strategy="cocod", step_cost=0.01,
                                   strategy_params={"consensus_exchanges": 2},
                                   links=LinkSpec(latency=latency, bandwidth=bw), stop=StopCriteria(max_rounds=5)))
    assert mixed.summary["virtual_time"] == pytest.approx(5 * max(compute, comm) + 2 * comm, rel=1e-9)
    assert mixed.summary["steps"] == out["cocod"].summary["steps"]
    assert mixed.summary["epsilon"] == out["cocod"].summary["epsilon"]
    assert mixed.summary["final_consensus_max"] < out["cocod"].summary["final_consensus_max"]


class LeakyClient(NumPyClient):
    """A client that leaves an un-noised model in the very arrays it is given while it computes
    (as an in-place training loop would), waits, and only then adds its noise.

    Records what it was given, the un-noised intermediates and the post-noise outputs.
    """

    def __init__(self, seed: int, sleep: float = 0.02) -> None:
        self.rng = np.random.default_rng(seed)
        self.sleep = sleep
        self.inputs: list[list[np.ndarray]] = []
        self.clean: list[list[np.ndarray]] = []
        self.outputs: list[list[np.ndarray]] = []

    def fit(self, parameters, config):  # type: ignore[override]
        self.inputs.append([np.array(p, copy=True) for p in parameters])
        for p in parameters:
            p -= 0.1 * np.sign(p)  # the un-noised step, written in place
        self.clean.append([np.array(p, copy=True) for p in parameters])
        time.sleep(self.sleep)  # the background exchange runs meanwhile
        out = [p + self.rng.normal(0.0, 1.0, size=p.shape) for p in parameters]
        self.outputs.append([np.array(p, copy=True) for p in out])
        return out, 1, {"steps": 1, "epsilon": 1.0}


class RecordingHub(Hub):
    """Keeps what each sent message held when it was sent, and the message itself (to catch aliasing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire: list[tuple[str, str, int, np.ndarray, ModelMessage]] = []

    def net(self, node_id: str) -> Any:
        net = super().net(node_id)
        inner = net.send

        def send(peer: str, message: ModelMessage) -> bool:
            assert message.params is not None
            self.wire.append((node_id, peer, message.round, _flat(message.params), message))
            return inner(peer, message)

        net.send = send  # type: ignore[method-assign]
        return net


def test_nothing_un_noised_is_ever_sent_and_a_neighbour_sees_only_post_noise_history() -> None:
    rng = np.random.default_rng(1)
    init = [rng.normal(size=(2, 3)), rng.normal(size=3)]  # the public initial model, shared
    hub = RecordingHub(build_topology("complete", NODES))
    clients = [LeakyClient(i) for i in range(len(NODES))]
    nodes = _nodes(hub, clients, [init] * 3)
    rounds = 4
    _run_rounds(nodes, rounds, threaded=True)
    assert len(hub.wire) == rounds * 3 * 2
    clean = [_flat(c) for cl in clients for c in cl.clean]
    for sender, _peer, r, at_send, msg in hub.wire:
        for value in (at_send, _flat(msg.params or [])):  # when it left, and the object afterwards
            assert not any(np.allclose(value, c) for c in clean), (sender, r)
        # it is the round-start model: exactly what fit was given in that round
        np.testing.assert_array_equal(at_send, _flat(clients[NODES.index(sender)].inputs[r]))
    # a curious neighbour rebuilds each node's next release from released models and the
    # node's post-noise outputs only: the public init, then W x_t + (noised out_t - x_t)
    sent = {(s, r): v for s, _p, r, v, _m in hub.wire}
    for i, nid in enumerate(NODES):
        np.testing.assert_array_equal(sent[(nid, 0)], _flat(init))
        for r in range(rounds - 1):
            mix = sum(W[i, j] * sent[(NODES[j], r)] for j in range(3))
            expect = mix + (_flat(clients[i].outputs[r]) - sent[(nid, r)])
            np.testing.assert_allclose(sent[(nid, r + 1)], expect, rtol=1e-12, atol=1e-12)


class BudgetClient(ShiftClient):
    """Refuses (BudgetExhausted) from its ``limit``-th fit on."""

    def __init__(self, limit: int) -> None:
        super().__init__(1.0)
        self.limit = limit

    def fit(self, parameters, config):  # type: ignore[override]
        if len(self.inputs) >= self.limit:
            self.inputs.append([])
            raise BudgetExhausted(1.0, 1.0, 1e-5, self.limit)
        return super().fit(parameters, config)


def test_budget_exhaustion_stops_the_node_fail_closed() -> None:
    hub = Hub(build_topology("complete", NODES))
    models = _integer_models(2)
    nodes = _nodes(hub, [BudgetClient(2), ShiftClient(1.0), ShiftClient(1.0)], models, timeout=0.2)
    _run_rounds(nodes, 4, threaded=True)
    a = nodes[0]
    assert a.stopped and "budget" in a.stop_reason.lower()
    assert len(a.client.inputs) == 3  # type: ignore[attr-defined]  # two fits and the refused third: no fit after
    # a sends its round-start models of rounds 0..2 (already noised or public), nothing after it stopped
    assert sorted(r for s, _p, r in hub.sent if s == "a") == [0, 0, 1, 1, 2, 2]
    assert not nodes[1].stopped and nodes[1].round == 4


def test_registry_builds_cocod_for_both_drivers_and_a_node_takes_no_params() -> None:
    topo = build_topology("ring", ["n0", "n1", "n2", "n3"])
    hub = Hub(topo)
    for driver in ("node", "simulate"):
        s = build_strategy(StrategyBuild("cocod", driver, {}, 3, node_id="n0", topology=topo,  # type: ignore[arg-type]
                                         client=ShiftClient(0.0), network=hub.net("n0"), initial=[np.zeros(2)]))
        assert isinstance(s, CoCoDGossip) and s.overlaps_communication and s.synchronous
        assert s.mixing == topo.mixing_row("n0") and s.local_steps == 3
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.local_steps: .*\[strategy\]\.local_steps"):
        check_strategy("cocod", {"local_steps": 2}, "node")
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.compressor: cocod does not take"):
        check_strategy("cocod", {"compressor": "topk"}, "simulate")


def test_cocod_merge_keeps_non_float_arrays_from_training() -> None:
    start = [np.array([1.0, 2.0]), np.array([3], dtype=np.int64)]
    trained = [np.array([2.0, 2.0]), np.array([4], dtype=np.int64)]
    out = cocod_merge(start, trained, 0.5, [(0.5, [np.array([3.0, 4.0]), np.array([9], dtype=np.int64)])])
    np.testing.assert_array_equal(out[0], [3.0, 3.0])
    np.testing.assert_array_equal(out[1], [4])
