"""FedAvg baseline through Flower's Message-API FedAvg: public weighting, release filter, bytes, ε, budget stop.

The FixedClients' ``n`` plays a site's *declared* (public) size; the curious-server
attack against real DPClients is in tests/privacy/test_curious_server.py.
"""

from __future__ import annotations

import random

import flwr
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from privfl.accounting import BudgetExhausted
from privfl.accounting.releases import PUBLIC_FIT_METRICS as CLIENT_PUBLIC_FIT_METRICS
from privfl.clients import DPClient, DPConfig
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.strategies.federated import (
    PUBLIC_FIT_METRICS,
    FedAvgConfig,
    FederatedAveraging,
    InProcessGrid,
    NodeEndpoint,
    node_client_app,
)

pytestmark = pytest.mark.timeout(60)


def dp_clients(sites, target_eps=(50.0, 50.0, 50.0), declared=(None, None, None), **kw) -> dict[str, DPClient]:
    """One logreg DPClient per site (σ = 1, public q = 0.2, batch 32), named h0, h1, …"""
    out = {}
    for i, (s, eps, size) in enumerate(zip(sites, target_eps, declared)):
        cfg = DPConfig(noise_multiplier=1.0, batch_size=32, sample_rate=0.2, lr=0.5, target_epsilon=eps,
                       declared_size=size, **kw)
        model = build_model("logreg", s.train.x.shape[1:], 2, seed=0)
        out[f"h{i}"] = DPClient(model, (s.train.x, s.train.y), (s.test.x, s.test.y), cfg, seed=i)
    return out


class FixedClient(flwr.client.NumPyClient):
    """Returns fixed arrays with a fixed (declared, public) weight; records what it was sent.

    Its evaluation is marked as a DP release (``dp`` = 1) over the public denominator ``n``.
    """

    def __init__(self, arrays: list[np.ndarray], n: int, acc: float = 0.0) -> None:
        self.arrays, self.n, self.acc = arrays, n, acc
        self.received: list[list[np.ndarray]] = []
        self.configs: list[dict] = []

    def get_parameters(self, config):
        return [a.copy() for a in self.arrays]

    def fit(self, parameters, config):
        self.received.append([p.copy() for p in parameters])
        self.configs.append(dict(config))
        return [a.copy() for a in self.arrays], self.n, {"steps": int(config["local_steps"])}

    def evaluate(self, parameters, config):
        return 1.0 - self.acc, self.n, {"accuracy": self.acc, "dp": 1}


class Recording(FedAvg):
    """Flower's Message-API FedAvg that keeps every reply reaching ``aggregate_train`` / ``aggregate_evaluate``.

    ``fit_in`` / ``eval_in`` hold, per round, each reply's node id and everything its records carry
    (arrays, metrics, configs): what a server would see.
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.fit_in: list[list] = []
        self.eval_in: list[list] = []

    @staticmethod
    def _seen(replies):
        out = []
        for msg in replies:
            if msg.has_error():
                continue
            c = msg.content
            out.append((msg.metadata.src_node_id,
                        {k: dict(r) for k, r in c.metric_records.items()},
                        {k: r.to_numpy_ndarrays() for k, r in c.array_records.items()},
                        {k: dict(r) for k, r in c.config_records.items()}))
        return out

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.fit_in.append(self._seen(replies))
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self.eval_in.append(self._seen(replies))
        return super().aggregate_evaluate(server_round, replies)


def fit_seen(strat: FederatedAveraging, rec: Recording, rnd: int = 0) -> dict[str, tuple[int, dict, list]]:
    """Per node name: (weight, metrics without the weight, arrays) as Flower's strategy received them."""
    names = {i: n for n, i in strat.node_ids.items()}
    out = {}
    for nid, mrecs, arecs, crecs in rec.fit_in[rnd]:
        assert len(mrecs) == 1 and len(arecs) == 1 and not crecs
        (m,) = mrecs.values()
        (arrays,) = arecs.values()
        m = dict(m)
        out[names[nid]] = (m.pop("num-examples"), m, arrays)
    return out


def fixed_clients() -> dict[str, FixedClient]:
    return {
        "a": FixedClient([np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)], 1, acc=0.5),
        "b": FixedClient([np.array([3.0, 0.0], np.float32), np.array([[6.0]], np.float32)], 2, acc=0.8),
        "c": FixedClient([np.array([-1.0, 4.0], np.float32), np.array([[2.0]], np.float32)], 7, acc=1.0),
    }


def test_flower_fedavg_matches_hand_computed_declared_size_weighted_average() -> None:
    clients = fixed_clients()
    init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    rec = Recording(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    strat = FederatedAveraging(FedAvgConfig(local_steps=3, min_fit_clients=3, min_available_clients=3),
                               strategy=rec)
    assert isinstance(strat.strategy, FedAvg)  # Flower's own (Message-API) object does the aggregation
    out = strat.run_round(clients, {k: init for k in clients}, round=1)
    # what Flower's strategy averaged: each node's returned model with its declared weight, nothing else
    seen = fit_seen(strat, rec)
    assert {k: w for k, (w, _, _) in seen.items()} == {"a": 1, "b": 2, "c": 7}
    for k, (_, m, arrays) in seen.items():
        assert m == {"steps": 3}
        for got, sent in zip(arrays, clients[k].arrays):
            np.testing.assert_array_equal(got, sent)
    # declared weights 1, 2, 7 (num_examples) -> (1·a + 2·b + 7·c) / 10
    want0 = (1 * np.array([1, 2]) + 2 * np.array([3, 0]) + 7 * np.array([-1, 4])) / 10
    want1 = (1 * 0 + 2 * 6 + 7 * 2) / 10
    for node in clients:
        np.testing.assert_allclose(out.params[node][0], want0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.params[node][1], [[want1]], rtol=1e-6)
        assert out.bytes_down[node] == 2 * 12  # fit: 12-byte model down; evaluate: the new model down again
        assert out.bytes_up[node] == 12
        assert out.local_steps[node] == 3
        assert clients[node].configs[0]["local_steps"] == 3
        np.testing.assert_array_equal(clients[node].received[0][0], init[0])
        assert out.metrics[node]["weight"] == clients[node].n
    # distributed (DP-released) accuracy: weighted by the public denominators (1·0.5 + 2·0.8 + 7·1.0) / 10
    assert out.metrics["a"]["global_accuracy"] == pytest.approx((0.5 + 1.6 + 7.0) / 10)
    assert out.metrics["b"]["released_accuracy"] == 0.8
    assert strat.history[-1]["loss"] == pytest.approx((0.5 + 2 * 0.2 + 0.0) / 10)
    # round 2 starts from the aggregate
    strat.run_round(clients, out.params, round=2)
    np.testing.assert_allclose(clients["a"].received[1][0], want0, rtol=1e-6, atol=1e-6)


def test_the_grid_is_a_flower_grid_and_the_node_a_flower_clientapp() -> None:
    c = fixed_clients()["b"]
    grid = InProcessGrid(node_client_app({7: NodeEndpoint(c)}),
                         {7: Context(run_id=0, node_id=7, node_config={}, state=RecordDict(), run_config={})})
    assert isinstance(grid, Grid) and list(grid.get_node_ids()) == [7]
    content = RecordDict({"arrays": ArrayRecord(c.arrays), "config": ConfigRecord({"local_steps": 1})})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=7, message_type=MessageType.TRAIN)])
    assert not reply.has_error() and reply.metadata.src_node_id == 7
    assert dict(reply.content["metrics"]) == {"num-examples": 2, "steps": 1}
    np.testing.assert_array_equal(reply.content["arrays"].to_numpy_ndarrays()[0], c.arrays[0])
    # a node that is not there gets Flower's error reply, not an exception
    (missing,) = grid.send_and_receive([Message(content, dst_node_id=8, message_type=MessageType.TRAIN)])
    assert missing.has_error()


def test_a_legacy_strategy_is_refused_with_the_reason() -> None:
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    with pytest.raises(ConfigError, match="Message API"):
        FederatedAveraging(strategy=LegacyFedAvg())  # type: ignore[arg-type]


def test_sampling_is_seeded_without_touching_the_global_random_stream() -> None:
    random.seed(123)
    want = random.random()
    random.seed(123)
    clients = fixed_clients()
    strat = FederatedAveraging(FedAvgConfig(fraction_fit=0.34, evaluate=False, seed=1))
    strat.run_round(clients, {k: c.arrays for k, c in clients.items()}, 1)
    assert random.random() == want


def test_the_public_metric_set_is_the_clients_one() -> None:
    # strategies may not import clients, so the set is written twice: they must agree
    assert PUBLIC_FIT_METRICS == frozenset(CLIENT_PUBLIC_FIT_METRICS)


def test_equal_weighting_ignores_the_reported_weights() -> None:
    clients = fixed_clients()
    init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    rec = Recording(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    strat = FederatedAveraging(FedAvgConfig(weighting="equal", min_fit_clients=3, min_available_clients=3,
                                            evaluate=False, local_steps=1), strategy=rec)
    out = strat.run_round(clients, {k: init for k in clients}, 1)
    assert sorted(w for w, _, _ in fit_seen(strat, rec).values()) == [1, 1, 1]
    np.testing.assert_allclose(out.params["a"][0], (np.array([1, 2]) + np.array([3, 0]) + np.array([-1, 4])) / 3,
                               rtol=1e-6)
    np.testing.assert_allclose(out.params["a"][1], [[(0 + 6 + 2) / 3]], rtol=1e-6)


def test_private_metrics_of_a_leaky_client_never_reach_the_strategy() -> None:
    class Leaky(FixedClient):
        def fit(self, parameters, config):
            params, n, m = super().fit(parameters, config)
            return params, n, {**m, "loss": 0.123, "n_train": 151, "accuracy": 0.9, "epsilon": 1.5}

    for upload in ("model", "update"):
        clients = {k: Leaky(c.arrays, c.n) for k, c in fixed_clients().items()}
        rec = Recording(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
        strat = FederatedAveraging(FedAvgConfig(min_fit_clients=3, min_available_clients=3, evaluate=False,
                                                upload=upload, local_steps=2), strategy=rec)
        init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
        out = strat.run_round(clients, {k: init for k in clients}, 1)
        seen = fit_seen(strat, rec)
        assert sorted(seen) == ["a", "b", "c"]
        for k, (weight, metrics, _) in seen.items():
            assert metrics == {"steps": 2, "epsilon": 1.5}  # everything else stayed on the node
            assert weight == clients[k].n
        for node in clients:
            assert not {"loss", "n_train", "accuracy"} & set(out.metrics[node])
        assert not {"loss", "n_train", "accuracy"} & set(strat.history[-1]["fit"])


def test_evaluation_that_releases_nothing_gives_no_result() -> None:
    class Silent(FixedClient):
        def evaluate(self, parameters, config):
            return 0.0, 0, {}  # DPClient's default: evaluation stays on the site

    class Raw(FixedClient):
        def evaluate(self, parameters, config):
            return 0.4, 38, {"accuracy": 0.6}  # a raw (non-DP) accuracy: must not reach the server

    for cls in (Silent, Raw):
        clients = {k: cls(c.arrays, c.n) for k, c in fixed_clients().items()}
        rec = Recording(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
        strat = FederatedAveraging(FedAvgConfig(min_fit_clients=3, min_available_clients=3, local_steps=1),
                                   strategy=rec)
        init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
        out = strat.run_round(clients, {k: init for k in clients}, 1)  # Flower's weighted mean would divide by 0
        assert rec.eval_in == [[]]  # asked, nothing released
        assert strat.history[-1]["loss"] is None
        for node in clients:
            assert not {"global_accuracy", "global_loss", "released_accuracy"} & set(out.metrics[node])


def test_bad_weighting_names_the_field() -> None:
    with pytest.raises(ConfigError, match="fedavg.weighting"):
        FederatedAveraging(FedAvgConfig(weighting="num_examples"))


def test_fraction_fit_sampling_is_seeded_and_only_selected_pay_bytes() -> None:
    def run(seed: int) -> list[tuple[str, ...]]:
        clients = fixed_clients()
        strat = FederatedAveraging(FedAvgConfig(fraction_fit=0.34, min_fit_clients=1, evaluate=False, seed=seed))
        init = clients["a"].get_parameters({})
        picks = []
        params = {k: init for k in clients}
        for r in range(1, 7):
            out = strat.run_round(clients, params, r)
            sel = tuple(k for k in sorted(clients) if out.metrics[k]["selected"])
            assert len(sel) == 1
            for k in clients:
                assert out.bytes_up[k] == (12 if k in sel else 0)
                assert out.bytes_down[k] == (12 if k in sel else 0)
            picks.append(sel)
            params = out.params
        return picks

    assert run(3) == run(3)
    assert len({p for s in (3, 4, 5) for p in run(s)}) > 1


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fraction_fit"):
        FederatedAveraging(FedAvgConfig(fraction_fit=0.0))
    with pytest.raises(ConfigError, match="local_steps"):
        FederatedAveraging(FedAvgConfig(local_steps=0))
    strat = FederatedAveraging(FedAvgConfig(min_fit_clients=4, min_available_clients=4))
    clients = fixed_clients()
    with pytest.raises(ConfigError, match="min_available_clients"):
        strat.run_round(clients, {k: c.arrays for k, c in clients.items()}, 1)


# ---- with real DPClients ----------------------------------------------------------------



def test_epsilon_per_node_grows_across_rounds_with_dpclients(sites) -> None:
    clients = dp_clients(sites)
    init = clients["h0"].get_parameters({})
    strat = FederatedAveraging(FedAvgConfig(local_steps=4, min_fit_clients=3, min_available_clients=3))
    params = {k: init for k in clients}
    eps: dict[str, list[float]] = {k: [] for k in clients}
    for r in range(1, 4):
        out = strat.run_round(clients, params, r)
        params = out.params
        for k in clients:
            eps[k].append(out.metrics[k]["epsilon"])
            assert out.local_steps[k] == 4
            assert out.bytes_up[k] == sum(a.nbytes for a in init)
            assert out.metrics[k]["weight"] == 1  # equal public weights, not the sites' record counts
            # evaluation stays on the sites: nothing of it in the round's results
            assert not {"global_accuracy", "global_loss", "loss"} & set(out.metrics[k])
        # everyone holds the same global model
        for k in clients:
            for a, b in zip(params[k], params["h0"]):
                np.testing.assert_array_equal(a, b)
        assert not out.stopped
        assert strat.history[-1]["loss"] is None
    for k in clients:
        assert eps[k][0] < eps[k][1] < eps[k][2]
        assert clients[k].accountant.steps == 12
    # the researcher may still measure the global model locally (never released)
    loss, acc = clients["h0"].evaluate_local(params["h0"])
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("declared", [(None, None, None), (100, 300, 600)])
def test_dpclient_global_model_is_the_public_weight_average(sites, declared) -> None:
    clients = dp_clients(sites, declared=declared)
    init = clients["h0"].get_parameters({})
    rec = Recording(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    strat = FederatedAveraging(FedAvgConfig(min_fit_clients=3, min_available_clients=3, evaluate=False,
                                            local_steps=2), strategy=rec)
    out = strat.run_round(clients, {k: init for k in clients}, 1)
    seen = fit_seen(strat, rec)
    for _, metrics, _ in seen.values():
        assert set(metrics) <= PUBLIC_FIT_METRICS  # a real DPClient's release: public values only
    got = {cid: (n, arrays) for cid, (n, _, arrays) in seen.items()}
    weights = {k: (1 if d is None else d) for k, d in zip(sorted(clients), declared)}
    assert {k: n for k, (n, _) in got.items()} == weights
    total = sum(weights.values())
    for i, a in enumerate(out.params["h0"]):
        want = sum(weights[k] * got[k][1][i].astype(np.float64) for k in got) / total
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)


def test_budget_exhausted_client_is_stopped_and_left_out(sites) -> None:
    clients = dp_clients(sites, target_eps=(50.0, 50.0, 0.6))
    init = clients["h0"].get_parameters({})
    strat = FederatedAveraging(FedAvgConfig(local_steps=5, min_fit_clients=1, evaluate=False))
    params = {k: init for k in clients}
    stopped_at: dict[str, int] = {}
    for r in range(1, 8):
        before = clients["h2"].accountant.steps
        out = strat.run_round(clients, params, r)
        for k in out.stopped:
            stopped_at.setdefault(k, r)
        if "h2" in stopped_at and stopped_at["h2"] < r:
            # never selected again, never trains again
            assert not out.metrics["h2"]["selected"]
            assert out.bytes_down["h2"] == 0 and out.bytes_up["h2"] == 0
            assert clients["h2"].accountant.steps == before
        params = out.params
    assert set(stopped_at) == {"h2"}
    assert clients["h2"].epsilon <= 0.6
    with pytest.raises(BudgetExhausted):
        clients["h2"].fit(init, {"local_steps": 1})
    assert clients["h0"].accountant.steps == 35


def test_raising_client_is_a_failure_not_in_the_aggregate() -> None:
    class Exhausted(FixedClient):
        def fit(self, parameters, config):
            raise BudgetExhausted(1.0, 1.0, 1e-5, 10)

    clients = fixed_clients()
    clients["c"] = Exhausted(clients["c"].arrays, 7)
    strat = FederatedAveraging(FedAvgConfig(min_fit_clients=2, min_available_clients=2, evaluate=False))
    init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    out = strat.run_round(clients, {k: init for k in clients}, 1)
    assert out.stopped == {"c"}
    want0 = (1 * np.array([1, 2]) + 2 * np.array([3, 0])) / 3  # c left out
    np.testing.assert_allclose(out.params["a"][0], want0, rtol=1e-6)
    assert "budget exhausted" in out.metrics["c"]["stop_reason"]
    assert strat.history[-1]["failures"] == 1
    # next round: c is no longer sampled; only 2 remain, which still meets min_available_clients=2
    out2 = strat.run_round(clients, out.params, 2)
    assert not out2.metrics["c"]["selected"] and out2.metrics["a"]["selected"] and out2.metrics["b"]["selected"]
    assert not out2.stopped
    # when "b" is gone too, fewer than min_available_clients remain: the federation stops everyone left
    del clients["b"]
    out3 = strat.run_round(clients, out2.params, 3)
    assert out3.stopped == {"a"} and "too few clients" in out3.metrics["a"]["stop_reason"]
    assert out3.bytes_down["a"] == 0


def test_a_client_bug_is_raised_not_swallowed_as_a_failure() -> None:
    class Broken(FixedClient):
        def fit(self, parameters, config):
            raise ValueError("a bug in the site's code")

    clients = fixed_clients()
    clients["b"] = Broken(clients["b"].arrays, 2)
    strat = FederatedAveraging(FedAvgConfig(min_fit_clients=3, min_available_clients=3, evaluate=False))
    with pytest.raises(ValueError, match="a bug"):
        strat.run_round(clients, {k: c.arrays for k, c in clients.items()}, 1)


def test_update_transfer_bytes_are_the_frames_and_the_model_is_flowers_average() -> None:
    clients = fixed_clients()
    init = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    rec = Recording(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    strat = FederatedAveraging(FedAvgConfig(min_fit_clients=3, min_available_clients=3, evaluate=False,
                                            upload="update", local_steps=1), strategy=rec)
    out = strat.run_round(clients, {k: init for k in clients}, 1)
    want0 = (1 * np.array([1, 2]) + 2 * np.array([3, 0]) + 7 * np.array([-1, 4])) / 10
    np.testing.assert_allclose(out.params["a"][0], want0, rtol=1e-6, atol=1e-6)
    for k, (_, _, arrays) in fit_seen(strat, rec).items():  # Flower averaged whole models rebuilt from changes
        np.testing.assert_array_equal(arrays[0], clients[k].arrays[0])
    for k in clients:
        assert out.bytes_down[k] == 12  # round 1: the whole model
        assert 0 < out.bytes_up[k] != 12  # a framed change, counted by its length
