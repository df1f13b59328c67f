"""AsyncGossip ``overlap``: a step's exchanges on a communication thread beside the next step's
training (AD-PSGD). The simulator charges max(compute, communication) per step; the DP events are
those of the run without overlap; a node's exchanges really run while it trains, are joined at
stop, and their errors surface."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.client import NumPyClient

from privfl.data import load_builtin, split_sites
from privfl.errors import ConfigError
from privfl.preprocessing import PreprocessingSpec, preprocess_site
from privfl.sim import LinkSpec, StopCriteria
from privfl.sim.engine import Engine
from privfl.sim.network import SimWorld
from privfl.strategies.base import ModelMessage
from privfl.strategies.gossip import AsyncGossip
from tests.helpers import dp_clients

pytestmark = pytest.mark.timeout(60)


class ClockedClient(NumPyClient):
    """lr 0: fit returns the model unchanged; records the node's clock at every fit (its step's start)."""

    def __init__(self) -> None:
        self.network = None
        self.times: list[float] = []

    def fit(self, parameters, config):  # type: ignore[override]
        assert self.network is not None
        self.times.append(self.network.now())
        return [np.array(p, copy=True) for p in parameters], 1, {"steps": int(config["local_steps"])}


def _simulate(clients: list[NumPyClient], params: list[np.ndarray], overlap: bool, step_cost: float,
              latency: float, steps: int, step_time: str = "fixed") -> tuple[float, Engine, list[AsyncGossip]]:
    """The engine's async driver on a complete graph, one exchange per step (bandwidth ~infinite:
    an exchange's round trip is 2 × latency)."""
    ids = [f"n{i}" for i in range(len(clients))]
    world = SimWorld(ids, {a: [b for b in ids if b != a] for a in ids},
                     LinkSpec(latency=latency, bandwidth=1e15, header_bytes=0))
    strategies = []
    for i, nid in enumerate(ids):
        net = world.network(nid)
        if isinstance(clients[i], ClockedClient):
            clients[i].network = net  # type: ignore[attr-defined]
        s = AsyncGossip(clients[i], net, params, {"seed": i, "overlap": overlap, "consensus_exchanges": 1})
        world.strategies[nid] = s
        strategies.append(s)
    engine = Engine(ids, dict(zip(ids, clients)), world, [1.0] * len(ids), step_cost, 1,
                    StopCriteria(max_steps=steps), lambda p: (0.0, 0.0), eval_every=None, step_time=step_time)
    return engine.run_async(strategies), engine, strategies


@pytest.mark.parametrize(("step_cost", "latency"), [(0.05, 0.01), (0.01, 0.025)])
def test_overlapped_step_costs_max_of_compute_and_communication(step_cost: float, latency: float) -> None:
    rtt, k = 2 * latency, 6
    for overlap, per_step in ((True, max(step_cost, rtt)), (False, step_cost + rtt)):
        clients = [ClockedClient(), ClockedClient()]
        t_end, _engine, nodes = _simulate(clients, [np.zeros(3), np.ones((2, 2))], overlap, step_cost, latency, k)  # type: ignore[arg-type]
        for c in clients:  # every step starts one step's virtual time after the one before
            assert np.diff(c.times) == pytest.approx([per_step] * (k - 1)), (overlap, c.times)
            assert c.times[0] == pytest.approx(step_cost)
        # the last step's exchange ends the training, then one consensus exchange (each node its own)
        assert t_end == pytest.approx(step_cost + (k - 1) * per_step + 2 * rtt if overlap else k * per_step + rtt)
        assert all(n.exchanges == k + 1 and n._inflight is None for n in nodes)


def test_overlap_spends_the_same_dp_events_and_epsilon() -> None:
    data = load_builtin("breast_cancer")
    sites = [preprocess_site(PreprocessingSpec(), s, dataset_name="breast_cancer")[0]
             for s in split_sites(data, 3, seed=0)]
    runs = {}
    for overlap in (False, True):
        clients = list(dp_clients(sites).values())
        t_end, engine, nodes = _simulate(clients, clients[0].get_parameters({}), overlap, 0.05, 0.02, 5,
                                         step_time="exponential")  # type: ignore[arg-type]
        runs[overlap] = (t_end, [c.accountant.events for c in clients], [c.epsilon for c in clients],
                         engine.steps, [n.exchanges for n in nodes])
    (t0, ev0, eps0, st0, ex0), (t1, ev1, eps1, st1, ex1) = runs[False], runs[True]
    assert ev1 == ev0 and all(sum(e.values()) == 5 for e in ev1)  # the same Poisson-Gaussian steps
    assert eps1 == pytest.approx(eps0) and st1 == st0 == [5, 5, 5] and ex1 == ex0
    assert t1 < t0  # the same protocol, sooner


# ---- a real node's path: the exchanges run on a thread while the next step trains ----------------
class GatedNet:
    """In-memory PeerNetwork of n0, whose peer n1 is a real AsyncGossip. Exchange k (after step k)
    waits until fit k + 1 has started, so it completes only if it runs beside that fit; the last one
    takes ``slow`` seconds. ``fail`` makes the next exchange raise."""

    node_id = "n0"

    def __init__(self, last: int) -> None:
        self.peer: AsyncGossip | None = None
        self.last = last
        self.fit_started = {k: threading.Event() for k in range(1, last + 4)}
        self.exchange_started = {k: threading.Event() for k in range(1, last + 4)}
        self.beside: list[bool] = []  # exchange k saw fit k + 1 running
        self.count = 0
        self.slow = 0.3
        self.fail = False

    def neighbors(self) -> list[str]:
        return ["n1"]

    def now(self) -> float:
        return time.monotonic()

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        self.count += 1
        k = self.count
        self.exchange_started[k].set()
        if self.fail:
            raise ConnectionError("link down")
        if k < self.last:
            self.beside.append(self.fit_started[k + 1].wait(5))
        else:
            time.sleep(self.slow)
        assert self.peer is not None
        return self.peer.handle_exchange("n0", message)

    def send(self, peer: str, message: ModelMessage) -> bool:
        return False

    def receive(self, round: int, peers: list[str], timeout: float) -> dict[str, ModelMessage]:
        return {}


class GatedClient(NumPyClient):
    """Fit k (k ≥ 2) marks itself started and waits for exchange k − 1 to be in flight."""

    def __init__(self, net: GatedNet) -> None:
        self.net = net
        self.calls = 0

    def fit(self, parameters, config):  # type: ignore[override]
        self.calls += 1
        k = self.calls
        self.net.fit_started[k].set()
        if k >= 2:
            assert self.net.exchange_started[k - 1].wait(5)
        return [np.array(p, copy=True) + 1.0 for p in parameters], 1, {"steps": 1}


class PassiveNet:
    node_id = "n1"

    def neighbors(self) -> list[str]:
        return ["n0"]

    def now(self) -> float:
        return time.monotonic()


def test_node_exchanges_run_beside_training_are_joined_at_stop_and_raise() -> None:
    k = 4
    net = GatedNet(last=k)
    node = AsyncGossip(GatedClient(net), net, [np.zeros(3)], {"overlap": True})  # type: ignore[arg-type]
    net.peer = AsyncGossip(GatedClient(net), PassiveNet(), [np.zeros(3)], {})  # type: ignore[arg-type]
    for _ in range(k):
        node.step()
    assert net.beside == [True] * (k - 1)  # exchanges 1..k-1 each ran while the next step trained
    assert node._inflight is not None and node._inflight.running and node.exchanges == k - 1
    report = node.settle()  # what the node does at stop and before a checkpoint
    assert node._inflight is None and node.exchanges == k and report.peers == ["n1"]
    assert report.bytes_sent == report.bytes_received == 24 and node.round == k
    # each step's +1 is merged as a delta over the averages that landed meanwhile: nothing lost
    assert node.snapshot()[0] + net.peer.snapshot()[0] == pytest.approx(np.full(3, float(k)))
    # an exchange's error surfaces in the next step, after that step's training is merged
    net.fail = True
    node.step()  # trains; its exchange fails on the thread
    before = node.snapshot()[0].copy()
    with pytest.raises(ConnectionError, match="link down"):
        node.step()
    assert node._inflight is None and node.snapshot()[0] == pytest.approx(before + 1.0)


def test_overlap_is_checked() -> None:
    from privfl.strategies.registry import check_strategy

    check_strategy("async_gossip", {"overlap": True}, "node")
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.overlap: must be true or false"):
            check_strategy("async_gossip", {"overlap": bad}, "simulate")
        with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.overlap: must be true or false"):
            AsyncGossip(ClockedClient(), PassiveNet(), [np.zeros(1)], {"overlap": bad})  # type: ignore[arg-type]
