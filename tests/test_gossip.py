"""AsyncGossip (AD-PSGD / A(DP)²SGD) and SyncGossip (D-PSGD) over in-process peer networks."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import pytest
from flwr.client import NumPyClient

from privfl.accounting import BudgetExhausted
from privfl.clients import DPClient, DPConfig, evaluate_model
from privfl.data import load_builtin, split_sites
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site
from privfl.strategies.base import ModelMessage, PeerNetwork
from privfl.strategies.gossip import AsyncGossip, SyncGossip, average_pair
from privfl.strategies.topology import Topology, build_topology
from tests.helpers import run_in_threads

pytestmark = pytest.mark.timeout(60)


# ---- in-test peer network and clients --------------------------------------------------
class LocalNet:
    """Thread-safe in-process PeerNetwork: exchanges call the peer's handler directly."""

    def __init__(self, hub: Hub, node_id: str) -> None:
        self.hub = hub
        self.node_id = node_id

    def neighbors(self) -> list[str]:
        return self.hub.topology.neighbors(self.node_id)

    def now(self) -> float:
        return time.monotonic()

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        with self.hub.log_lock:
            self.hub.exchanges.append((self.node_id, peer))
        if self.hub.delay:
            time.sleep(self.hub.delay)
        reply = self.hub.nodes[peer].handle_exchange(self.node_id, message)
        with self.hub.log_lock:
            self.hub.replies.append((self.node_id, peer, reply is not None))
        return reply

    def send(self, peer: str, message: ModelMessage) -> bool:
        with self.hub.cond:
            self.hub.sent.append((self.node_id, peer, message.round))
            self.hub.boxes.setdefault((peer, message.round), {})[self.node_id] = message
            self.hub.cond.notify_all()
        return True

    def receive(self, round: int, peers: list[str], timeout: float) -> dict[str, ModelMessage]:
        deadline = time.monotonic() + timeout
        with self.hub.cond:
            while True:
                box = self.hub.boxes.get((self.node_id, round), {})
                if all(p in box for p in peers) or time.monotonic() >= deadline:
                    return {p: box[p] for p in peers if p in box}
                self.hub.cond.wait(max(0.0, deadline - time.monotonic()))


class Hub:
    def __init__(self, topology: Topology, delay: float = 0.0) -> None:
        self.topology = topology
        self.delay = delay
        self.nodes: dict[str, Any] = {}
        self.exchanges: list[tuple[str, str]] = []
        self.replies: list[tuple[str, str, bool]] = []
        self.sent: list[tuple[str, str, int]] = []
        self.boxes: dict[tuple[str, int], dict[str, ModelMessage]] = {}
        self.log_lock = threading.Lock()
        self.cond = threading.Condition()

    def net(self, node_id: str) -> PeerNetwork:
        return LocalNet(self, node_id)


class IdentityClient(NumPyClient):
    """A plain NumPyClient with learning rate 0: fit returns the model unchanged (no DP)."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.calls = 0

    def fit(self, parameters, config):  # type: ignore[override]
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        return [np.array(p, copy=True) for p in parameters], 1, {"steps": int(config["local_steps"]), "loss": 0.0}


class CountingClient(NumPyClient):
    """Wraps a DPClient and counts fit calls (to prove no fit after the budget)."""

    def __init__(self, inner: DPClient) -> None:
        self.inner = inner
        self.calls = 0
        self.raised = 0

    def fit(self, parameters, config):  # type: ignore[override]
        self.calls += 1
        try:
            return self.inner.fit(parameters, config)
        except BudgetExhausted:
            self.raised += 1
            raise


def ids(n: int) -> list[str]:
    return [f"n{i}" for i in range(n)]


def random_models(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=(3, 4)), rng.normal(size=5)] for _ in range(n)]


def build_async(topo: Topology, models: list[list[np.ndarray]], hub: Hub, clients: list[NumPyClient] | None = None,
                local_steps: int = 1) -> list[AsyncGossip]:
    nodes = []
    for i, nid in enumerate(topo.nodes):
        cfg = {"local_steps": local_steps, "seed": i, **AsyncGossip.roles(topo, nid)}
        client = clients[i] if clients else IdentityClient()
        s = AsyncGossip(client, hub.net(nid), models[i], cfg)
        hub.nodes[nid] = s
        nodes.append(s)
    return nodes


def max_dist(models: list[list[np.ndarray]]) -> float:
    flat = [np.concatenate([p.ravel() for p in m]) for m in models]
    return max(float(np.linalg.norm(a - b)) for a in flat for b in flat)


def total(models: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [sum(m[k] for m in models) for k in range(len(models[0]))]


# ---- AsyncGossip ---------------------------------------------------------------------
def test_average_pair_is_exact_mean_and_keeps_dtype() -> None:
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array([3], dtype=np.int64)]
    b = [np.array([3.0, 6.0], dtype=np.float32), np.array([9], dtype=np.int64)]
    out = average_pair(a, b)
    assert out[0].dtype == np.float32 and out[0].tolist() == [2.0, 4.0]
    assert out[1].tolist() == [3]  # non-float arrays are not averaged


def test_pure_pairwise_averaging_conserves_sum_and_reaches_consensus() -> None:
    topo = build_topology("ring", ids(4))
    models = random_models(4)
    hub = Hub(topo)
    nodes = build_async(topo, models, hub)
    start_sum = total([n.params for n in nodes])
    d0 = max_dist([n.params for n in nodes])
    for _ in range(150):
        for n in nodes:
            n.step()
        now_sum = total([n.params for n in nodes])
        for a, b in zip(start_sum, now_sum):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    d1 = max_dist([n.params for n in nodes])
    assert d1 < d0 * 1e-6, (d0, d1)
    mean = [a / 4 for a in start_sum]
    for n in nodes:
        for p, m in zip(n.params, mean):
            np.testing.assert_allclose(p, m, atol=1e-6)
    # every exchange updated both sides to the same model
    assert sum(n.exchanges for n in nodes) == sum(n.served for n in nodes) > 0


def test_active_passive_split_is_honoured() -> None:
    topo = build_topology("ring", ids(6))
    split = topo.two_coloring()
    assert split is not None
    hub = Hub(topo)
    nodes = build_async(topo, random_models(6), hub)
    for _ in range(20):
        for n in nodes:
            n.step()
    assert hub.exchanges, "active nodes must initiate exchanges"
    for initiator, target in hub.exchanges:
        assert initiator in split.active and target in split.passive
    for n in nodes:
        if n.node_id in split.passive:
            assert n.exchanges == 0 and n.served > 0
        else:
            assert n.served == 0 and n.exchanges == 20
    # an active node refuses to serve in the bipartite schedule
    active = hub.nodes[split.active[0]]
    peer = topo.neighbors(active.node_id)[0]
    msg = ModelMessage(sender=peer, round=0, kind="exchange_request", params=active.params)
    assert active.handle_exchange(peer, msg) is None


def test_handle_exchange_refuses_bad_requests() -> None:
    topo = build_topology("ring", ids(4))
    hub = Hub(topo)
    nodes = build_async(topo, random_models(4), hub)
    passive = nodes[1]
    before = [p.copy() for p in passive.params]
    good = [p.copy() for p in passive.params]
    nan = [p.copy() for p in good]
    nan[0][0, 0] = np.nan
    wrong_shape = [good[0][:2], good[1]]
    assert passive.handle_exchange("n0", ModelMessage("n0", 0, "exchange_request", params=nan)) is None
    assert passive.handle_exchange("n0", ModelMessage("n0", 0, "exchange_request", params=wrong_shape)) is None
    assert passive.handle_exchange("n3", ModelMessage("n3", 0, "model", params=good)) is None
    non_neighbour = "n3" if "n3" not in topo.neighbors("n1") else "n99"
    request = ModelMessage(non_neighbour, 0, "exchange_request", params=good)
    assert passive.handle_exchange(non_neighbour, request) is None
    for a, b in zip(before, passive.params):
        np.testing.assert_array_equal(a, b)
    reply = passive.handle_exchange("n0", ModelMessage("n0", 0, "exchange_request", params=good))
    assert reply is not None and reply.kind == "exchange_reply"
    for a, b in zip(before, reply.params):  # the reply is the pre-average model
        np.testing.assert_array_equal(a, b)


def test_non_bipartite_graph_does_not_deadlock_with_threads() -> None:
    topo = build_topology("complete", ids(5))  # odd cliques are not bipartite
    assert topo.two_coloring() is None
    hub = Hub(topo, delay=0.002)  # a slow link, so exchanges overlap and try-locks collide
    clients = [IdentityClient(sleep=0.001) for _ in range(5)]
    nodes = build_async(topo, random_models(5, seed=3), hub, clients)
    assert all(n.active and not n.bipartite for n in nodes)
    start_sum = total([n.params for n in nodes])
    d0 = max_dist([n.params for n in nodes])
    errors: list[BaseException] = []

    def loop(n: AsyncGossip) -> None:
        try:
            for _ in range(60):
                n.step()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in nodes]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "gossip threads deadlocked"
    assert not errors, errors
    assert time.monotonic() - t0 < 30
    done = sum(n.exchanges for n in nodes)
    assert done > 0 and done == sum(n.served for n in nodes)
    assert sum(n.refused for n in nodes) >= 0
    # atomic pairwise averaging under concurrency still conserves the sum
    for a, b in zip(start_sum, total([n.params for n in nodes])):
        np.testing.assert_allclose(b, a, atol=1e-9)
    assert max_dist([n.params for n in nodes]) < d0 * 1e-2


def test_training_delta_is_merged_with_exchanges_served_meanwhile() -> None:
    """A passive node that serves an exchange while it trains keeps both effects."""
    topo = build_topology("ring", ids(2))
    hub = Hub(topo)

    class ShiftClient(NumPyClient):
        def __init__(self) -> None:
            self.during: Any = None

        def fit(self, parameters, config):  # type: ignore[override]
            if self.during:
                self.during()
            return [p + 1.0 for p in parameters], 1, {"steps": 1, "epsilon": 0.5, "dp": 1}

    a_client, b_client = IdentityClient(), ShiftClient()
    nodes = build_async(topo, [[np.zeros(3)], [np.full(3, 4.0)]], hub, [a_client, b_client])
    active, passive = (nodes[0], nodes[1]) if nodes[0].active else (nodes[1], nodes[0])
    assert passive is nodes[1]
    b_client.during = lambda: active.step()  # the exchange lands mid-training
    passive.step()
    # passive: 4 → served average (0+4)/2 = 2, then its training delta +1 → 3
    np.testing.assert_allclose(passive.params[0], 3.0)
    np.testing.assert_allclose(active.params[0], 2.0)
    assert passive.privacy_status()["private"] and passive.epsilon == 0.5


def test_plain_numpy_client_is_reported_as_not_private() -> None:
    topo = build_topology("ring", ids(2))
    hub = Hub(topo)
    nodes = build_async(topo, random_models(2), hub)
    for n in nodes:
        n.step()
        status = n.privacy_status()
        assert status["private"] is False and math.isinf(status["epsilon"])
        assert "no differential-privacy guarantee" in status["note"]
    assert math.isinf(nodes[0].step().epsilon)


# ---- with real DPClients ---------------------------------------------------------------
def _dp_clients(n: int, target_eps: list[float], seed: int = 0) -> tuple[list[DPClient], Any, Any, list]:
    data = load_builtin("breast_cancer")
    sites = [preprocess_site(PreprocessingSpec(), s, dataset_name="breast_cancer")[0]  # published ranges
             for s in split_sites(data, n, seed=seed)]
    clients = []
    for i, s in enumerate(sites):
        model = build_model("logreg", s.train.x.shape[1:], 2, seed=seed)
        cfg = DPConfig(noise_multiplier=1.0, batch_size=16, sample_rate=16 / len(s.train), lr=1.0,
                       target_epsilon=target_eps[i])  # [0, 1] features
        clients.append(DPClient(model, (s.train.x, s.train.y), (s.test.x, s.test.y), cfg, seed=i, device="cpu"))
    tx = np.concatenate([s.test.x for s in sites])
    ty = np.concatenate([s.test.y for s in sites])
    init = build_model("logreg", sites[0].train.x.shape[1:], 2, seed=seed)
    init_params = [v.detach().numpy().copy() for v in init.state_dict().values()]
    return clients, tx, ty, init_params


def _accuracy(params: list[np.ndarray], tx: np.ndarray, ty: np.ndarray) -> float:
    import torch

    model = build_model("logreg", tx.shape[1:], 2)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(model.state_dict(), params)})
    return evaluate_model(model, torch.as_tensor(tx), torch.as_tensor(ty), torch.device("cpu"))[1]


def test_async_gossip_with_dp_clients_learns_breast_cancer() -> None:
    topo = build_topology("ring", ids(4))
    clients, tx, ty, init = _dp_clients(4, [8.0] * 4)
    hub = Hub(topo)
    nodes = build_async(topo, [init] * 4, hub, clients, local_steps=2)  # type: ignore[arg-type]
    chance = max(np.mean(ty), 1 - np.mean(ty))
    before = _accuracy(nodes[0].params, tx, ty)
    for _ in range(15):
        for n in nodes:
            n.step()
    accs = [_accuracy(n.params, tx, ty) for n in nodes]
    assert min(accs) > chance + 0.2, (chance, before, accs)
    for n, c in zip(nodes, clients):
        assert n.private and n.epsilon == pytest.approx(c.epsilon) and 0 < n.epsilon < 8.0
        assert n.total_steps == 30


def test_budget_exhaustion_stops_one_node_fail_closed_while_others_continue() -> None:
    topo = build_topology("ring", ids(4))
    dp, tx, ty, init = _dp_clients(4, [4.0, 50.0, 50.0, 50.0])  # node 0: 7 steps fit
    clients = [CountingClient(c) for c in dp]
    hub = Hub(topo)
    nodes = build_async(topo, [init] * 4, hub, clients, local_steps=2)  # type: ignore[arg-type]
    poor = nodes[0]
    assert poor.active  # the exhausted node is an initiator: it must stop initiating
    for _ in range(30):
        for n in nodes:
            n.step()
        if poor.stopped:
            break
    assert poor.stopped and "budget" in poor.stop_reason
    assert poor.total_steps == 7 and poor.exchanges >= 3  # it trained and gossiped until the budget ended
    calls, initiated = clients[0].calls, sum(1 for a, _ in hub.exchanges if a == "n0")
    steps_others = [n.total_steps for n in nodes[1:]]
    assert 3.0 < dp[0].epsilon <= 4.0 and dp[0].exhausted
    for _ in range(5):
        for n in nodes:
            rep = n.step()
            if n is poor:
                assert rep.local_steps == 0 and rep.stopped and rep.bytes_sent == 0
    assert clients[0].calls == calls, "a stopped node must not train again"
    assert sum(1 for a, _ in hub.exchanges if a == "n0") == initiated, "a stopped node must not initiate sends"
    assert [n.total_steps for n in nodes[1:]] == [s + 10 for s in steps_others]
    assert dp[0].epsilon <= 4.0 and dp[0].accountant.steps == 7


def test_sync_gossip_stopped_node_sends_nothing() -> None:
    topo = build_topology("ring", ids(3))
    dp, *_, init = _dp_clients(3, [3.0, 50.0, 50.0])  # node 0: 5 steps fit
    hub = Hub(topo)
    nodes = [SyncGossip(dp[i], hub.net(nid), init, {"local_steps": 2, "topology": topo, "timeout": 0.2})
             for i, nid in enumerate(topo.nodes)]
    for r in range(40):
        for n in nodes:
            n.begin_round()
        for n in nodes:
            n.finish_round(n.network.receive(r, list(n.mixing), 0.0))
        if nodes[0].stopped:
            break
    assert nodes[0].stopped and nodes[0].total_steps == 5
    last = max(r for s, _, r in hub.sent if s == "n0")
    for r2 in range(r + 1, r + 4):
        for n in nodes:
            n.begin_round()
        for n in nodes:
            n.finish_round(n.network.receive(r2, list(n.mixing), 0.0))
    assert max(r for s, _, r in hub.sent if s == "n0") == last
    assert max(r for s, _, r in hub.sent if s == "n1") == r + 3  # the others go on


# ---- SyncGossip ------------------------------------------------------------------------
def _sync_nodes(topo: Topology, models: list[list[np.ndarray]], hub: Hub) -> list[SyncGossip]:
    nodes = []
    for i, nid in enumerate(topo.nodes):
        s = SyncGossip(IdentityClient(), hub.net(nid), models[i], {"local_steps": 1, "topology": topo, "timeout": 1.0})
        hub.nodes[nid] = s
        nodes.append(s)
    return nodes


def test_sync_gossip_mixing_equals_w_times_x() -> None:
    topo = build_topology("random_regular", ids(8), degree=3, seed=2)
    w = topo.metropolis_hastings_weights()
    models = random_models(8, seed=5)
    hub = Hub(topo)
    nodes = _sync_nodes(topo, models, hub)
    for r in range(3):
        x = np.stack([np.concatenate([p.ravel() for p in n.params]) for n in nodes])
        for n in nodes:
            n.begin_round()
        for n in nodes:
            n.finish_round(n.network.receive(r, list(n.mixing), 1.0))
        y = np.stack([np.concatenate([p.ravel() for p in n.params]) for n in nodes])
        np.testing.assert_allclose(y, w @ x, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(y.sum(0), x.sum(0), atol=1e-12)  # doubly stochastic


def test_sync_gossip_missing_neighbour_weight_goes_to_self() -> None:
    topo = build_topology("ring", ids(4))
    w = topo.metropolis_hastings_weights()
    models = random_models(4, seed=9)
    hub = Hub(topo)
    nodes = _sync_nodes(topo, models, hub)
    x = [np.concatenate([p.ravel() for p in n.params]) for n in nodes]
    for n in nodes:
        n.begin_round()
    n0 = nodes[0]
    received = n0.network.receive(0, list(n0.mixing), 0.5)
    received.pop("n1")  # n1's model never arrived
    n0.finish_round(received)
    got = np.concatenate([p.ravel() for p in n0.params])
    expect = (w[0, 0] + w[0, 1]) * x[0] + w[0, 3] * x[3]
    np.testing.assert_allclose(got, expect, rtol=1e-13)
    assert n0.missing == 1 and n0.round == 1


def test_sync_gossip_step_runs_a_whole_round_in_threads() -> None:
    topo = build_topology("ring", ids(4))
    w = topo.metropolis_hastings_weights()
    models = random_models(4, seed=1)
    hub = Hub(topo)
    nodes = _sync_nodes(topo, models, hub)
    x = np.stack([np.concatenate([p.ravel() for p in m]) for m in models])
    run_in_threads(n.step for n in nodes)
    y = np.stack([np.concatenate([p.ravel() for p in n.params]) for n in nodes])
    np.testing.assert_allclose(y, w @ x, rtol=1e-13, atol=1e-13)


def test_sync_gossip_needs_mixing_and_valid_local_steps() -> None:
    topo = build_topology("ring", ids(3))
    hub = Hub(topo)
    with pytest.raises(ConfigError, match="mixing"):
        SyncGossip(IdentityClient(), hub.net("n0"), [np.zeros(2)], {})
    with pytest.raises(ConfigError, match="local_steps"):
        AsyncGossip(IdentityClient(), hub.net("n0"), [np.zeros(2)], {"local_steps": 0})
    with pytest.raises(ConfigError, match="mixing"):
        SyncGossip(IdentityClient(), hub.net("n0"), [np.zeros(2)], {"mixing": {"n1": 0.7, "n2": 0.7}})


def test_sync_gossip_compressed_innovation_conserves_sum_and_converges() -> None:
    from privfl.strategies.compression import compressor_from_config

    topo = build_topology("ring", ids(5))
    models = random_models(5, seed=4)
    hub = Hub(topo)
    nodes = []
    for i, nid in enumerate(topo.nodes):
        comp = compressor_from_config("topk", ratio=0.25, error_feedback=False)
        s = SyncGossip(IdentityClient(), hub.net(nid), models[i],
                       {"local_steps": 1, "topology": topo, "compressor": comp, "gamma": 0.5})
        hub.nodes[nid] = s
        nodes.append(s)
    start_sum = total([n.params for n in nodes])
    d0 = max_dist([n.params for n in nodes])
    dense = sum(p.nbytes for p in models[0])
    for r in range(150):
        sent = [n.begin_round().bytes_sent for n in nodes]
        assert all(0 < b < dense * 2 for b in sent)  # 2 neighbours, each far less than the dense model
        for n in nodes:
            n.finish_round(n.network.receive(r, list(n.mixing), 1.0))
    for a, b in zip(start_sum, total([n.params for n in nodes])):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert max_dist([n.params for n in nodes]) < d0 * 1e-3
    with pytest.raises(ConfigError, match="compression"):
        AsyncGossip(IdentityClient(), hub.net("n0"), models[0], {"compressor": comp})


# ---- exchanges_per_step ----------------------------------------------------------------
def test_exchanges_per_step_makes_more_exchanges_at_no_extra_dp_cost() -> None:
    """k pairwise averages after each local step (distinct peers), the same fits, DP steps and ε as k = 1."""
    topo = build_topology("complete", ids(4))
    runs = {}
    for k in (1, 3):
        clients, _tx, _ty, init = _dp_clients(1, [8.0])  # node 0 trains with DP; its peers only serve
        counting: list[NumPyClient] = [CountingClient(clients[0]), IdentityClient(), IdentityClient(),
                                       IdentityClient()]
        hub = Hub(topo)
        nodes = []
        for i, nid in enumerate(topo.nodes):
            cfg = {"seed": i, "exchanges_per_step": k, **AsyncGossip.roles(topo, nid)}
            hub.nodes[nid] = AsyncGossip(counting[i], hub.net(nid), init, cfg)
            nodes.append(hub.nodes[nid])
        reports = [nodes[0].step() for _ in range(5)]
        runs[k] = (nodes[0], clients[0], counting[0], hub, reports)  # type: ignore[assignment]
    (one, dp1, c1, hub1, rep1), (three, dp3, c3, hub3, rep3) = runs[1], runs[3]
    assert sum(1 for a, _ in hub1.exchanges if a == "n0") == 5
    initiated = [p for a, p in hub3.exchanges if a == "n0"]
    assert len(initiated) == 15 and three.exchanges == 15
    assert all(len(set(initiated[i:i + 3])) == 3 for i in range(0, 15, 3)), initiated  # distinct peers per step
    assert all(len(r.peers) == 3 for r in rep3) and all(len(r.peers) == 1 for r in rep1)
    assert sum(r.bytes_sent for r in rep3) == 3 * sum(r.bytes_sent for r in rep1)
    assert c3.calls == c1.calls == 5 and dp3.accountant.steps == dp1.accountant.steps == 5
    assert dp3.epsilon == pytest.approx(dp1.epsilon) and three.epsilon == pytest.approx(one.epsilon)


def test_exchanges_per_step_is_checked() -> None:
    from privfl.strategies.registry import check_strategy

    check_strategy("async_gossip", {"exchanges_per_step": 4, "train_seconds": 30.0}, "simulate")
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.train_seconds"):
        check_strategy("async_gossip", {"train_seconds": 0}, "simulate")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.exchanges_per_step"):
            check_strategy("async_gossip", {"exchanges_per_step": bad}, "simulate")
    topo = build_topology("complete", ids(2))
    with pytest.raises(ConfigError, match="exchanges_per_step"):
        AsyncGossip(IdentityClient(), Hub(topo).net("n0"), random_models(1)[0], {"exchanges_per_step": 0})


def test_gradient_peers_is_a_config_key_and_is_checked() -> None:
    from privfl.strategies.registry import check_strategy

    check_strategy("async_gossip", {"gradient_peers": 8, "overlap": True}, "simulate")
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.gradient_peers"):
            check_strategy("async_gossip", {"gradient_peers": bad}, "simulate")


def test_train_seconds_deadline_stops_training_but_not_serving() -> None:
    """Past its training deadline a node trains nothing more (no fit, no ε) and stops; it still serves."""

    class ClockNet(LocalNet):
        clock = 0.0

        def now(self) -> float:
            return ClockNet.clock

    topo = build_topology("complete", ids(2))
    hub = Hub(topo)
    client = IdentityClient()
    ClockNet.clock = 10.0  # the deadline counts from the strategy's start, not from clock zero
    node = AsyncGossip(client, ClockNet(hub, "n0"), random_models(1)[0], {"train_seconds": 0.5})
    peer = AsyncGossip(IdentityClient(), hub.net("n1"), random_models(1, seed=1)[0], {})
    hub.nodes.update(n0=node, n1=peer)
    assert node.step().local_steps == 1 and client.calls == 1
    ClockNet.clock = 10.5
    rep = node.step()
    assert rep.local_steps == 0 and rep.stopped and "deadline" in node.stop_reason and client.calls == 1
    assert peer.average_with("n0")  # a stopped node still answers exchanges (post-processing)
    for bad in (0, -1.0, math.inf, "5"):
        with pytest.raises(ConfigError, match="train_seconds"):
            AsyncGossip(IdentityClient(), hub.net("n0"), random_models(1)[0], {"train_seconds": bad})


def test_a_real_node_does_not_begin_a_step_expected_to_end_past_its_deadline() -> None:
    """A real node (no simulator) measures its own step times: once its next step's expected end -- now plus
    its mean step time -- is past ``train_seconds``, it begins no more steps (no fit, no ε), though that step
    would begin before the deadline; a step it began trains however long it takes."""

    class ClockNet(LocalNet):
        clock = 0.0

        def now(self) -> float:
            return ClockNet.clock

    class SlowClient(IdentityClient):  # each fit takes 0.2 s of the node's clock
        def fit(self, parameters, config):  # type: ignore[no-untyped-def,override]
            ClockNet.clock += 0.2
            return super().fit(parameters, config)

    topo = build_topology("complete", ids(2))
    hub = Hub(topo)
    client = SlowClient()
    ClockNet.clock = 10.0
    node = AsyncGossip(client, ClockNet(hub, "n0"), random_models(1)[0], {"train_seconds": 0.5})
    peer = AsyncGossip(IdentityClient(), hub.net("n1"), random_models(1, seed=1)[0], {})
    hub.nodes.update(n0=node, n1=peer)
    assert node.step().local_steps == 1 and client.calls == 1  # begins at 10.0: nothing measured yet
    assert node.step().local_steps == 1 and client.calls == 2  # at 10.2: expected end 10.4 <= 10.5
    assert ClockNet.clock == pytest.approx(10.4) and not node.stopped
    rep = node.step()  # at 10.4, before the deadline, but expected to end at 10.6
    assert rep.local_steps == 0 and rep.stopped and "deadline" in node.stop_reason and client.calls == 2


class ShiftClient(NumPyClient):
    """A plain client whose step adds a fixed shift to whatever point it is given; records the points."""

    def __init__(self, shift: float) -> None:
        self.shift = shift
        self.points: list[list[np.ndarray]] = []

    def fit(self, parameters, config):  # type: ignore[override]
        self.points.append([np.array(p, copy=True) for p in parameters])
        return [p + self.shift for p in parameters], 1, {"steps": int(config["local_steps"]), "loss": 0.0}


def test_gradient_peers_takes_the_step_at_the_mean_of_own_and_received_models() -> None:
    """The step's point is the mean of the node's model and the last ``gradient_peers`` peer models it received
    (a reply it got, a request it served); the step's update lands on its own model; 0 keeps none."""
    topo = build_topology("complete", ids(3))
    models = random_models(3, seed=4)
    hub = Hub(topo)
    client = ShiftClient(0.25)
    node = AsyncGossip(client, hub.net("n0"), models[0], {"seed": 0, "gradient_peers": 2, "peers": ["n1"]})
    peers = [AsyncGossip(IdentityClient(), hub.net(n), models[i], {"seed": i}) for i, n in ((1, "n1"), (2, "n2"))]
    hub.nodes.update(n0=node, n1=peers[0], n2=peers[1])
    node.step()  # nothing received yet: the point is its own model; then it averages with n1 (n1's reply kept)
    assert all(np.array_equal(a, b) for a, b in zip(client.points[0], models[0]))
    n2_before = [np.array(p, copy=True) for p in peers[1].params]
    assert peers[1].average_with("n0")  # n0 serves n2: n2's request (its model) kept
    own = [np.array(p, copy=True) for p in node.params]
    node.peers = []  # this step exchanges nothing, so its result is exact
    node.step()
    want = [(o + r + q) / 3 for o, r, q in zip(own, models[1], n2_before)]  # n1's reply: its pre-average model
    assert all(np.allclose(a, b) for a, b in zip(client.points[1], want))
    assert all(np.allclose(a, o + 0.25) for a, o in zip(node.params, own))  # the update on its own model
    n1_now = [np.array(p, copy=True) for p in peers[0].params]
    assert peers[0].average_with("n0")  # a third model: only the last two are kept
    kept = list(node._peer_models)
    assert len(kept) == 2 and all(np.array_equal(a, b) for a, b in zip(kept[0], n2_before))
    assert all(np.array_equal(a, b) for a, b in zip(kept[1], n1_now))
    plain = AsyncGossip(ShiftClient(0.0), hub.net("n0"), models[0], {"peers": ["n1"]})
    hub.nodes["n0"] = plain
    plain.step()
    assert plain._peer_models.maxlen == 0 and not plain._peer_models
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="gradient_peers"):
            AsyncGossip(IdentityClient(), hub.net("n0"), models[0], {"gradient_peers": bad})
