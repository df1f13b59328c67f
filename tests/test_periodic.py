"""All-reduce, periodic and adaptive-period averaging (communication-algorithms.md §1.5)."""

from __future__ import annotations

import flwr
import numpy as np
import pytest

from privfl.accounting import BudgetExhausted
from privfl.errors import ConfigError
from privfl.strategies.periodic import AdaptivePeriod, AllReduce, PeriodicAveraging, average_models, model_variance
from tests.helpers import dp_clients

pytestmark = pytest.mark.timeout(60)


class QuadraticClient(flwr.client.NumPyClient):
    """Plain gradient steps on f(x) = ½·a·‖x − b‖² (optionally with Gaussian gradient noise)."""

    def __init__(self, a: float, b: np.ndarray, lr: float, noise: float = 0.0, seed: int = 0) -> None:
        self.a, self.b, self.lr, self.noise = a, np.asarray(b, np.float64), lr, noise
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def get_parameters(self, config):
        return [np.zeros_like(self.b)]

    def fit(self, parameters, config):
        x = np.array(parameters[0], dtype=np.float64)
        k = int(config["local_steps"])
        for _ in range(k):
            g = self.a * (x - self.b)
            if self.noise:
                g = g + self.noise * self.rng.standard_normal(x.shape)
            x = x - self.lr * g
        self.steps += k
        return [x], 1, {"steps": k}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def quad_clients(curvatures, lr, dim=5, seed=0, noise=0.0) -> dict[str, QuadraticClient]:
    rng = np.random.default_rng(seed)
    return {f"n{i}": QuadraticClient(a, rng.normal(size=dim), lr, noise, seed=i) for i, a in enumerate(curvatures)}


def run(strategy, clients, params, rounds):
    outs = []
    for r in range(1, rounds + 1):
        out = strategy.run_round(clients, params, r)
        params = out.params
        outs.append(out)
    return params, outs


def test_average_and_variance_helpers() -> None:
    m1 = [np.array([0.0, 2.0], np.float32)]
    m2 = [np.array([2.0, 0.0], np.float32)]
    avg = average_models([m1, m2])
    np.testing.assert_array_equal(avg[0], [1.0, 1.0])
    assert avg[0].dtype == np.float32
    assert model_variance([m1, m2]) == pytest.approx(2.0)  # each is at squared distance 2 from the mean
    assert model_variance([m1]) == 0.0


def test_periodic_averaging_converges_to_the_average_optimum() -> None:
    clients = quad_clients([1.0, 1.0, 1.0, 1.0], lr=0.1)
    target = np.mean([c.b for c in clients.values()], axis=0)
    start = {k: [np.full(5, 10.0)] for k in clients}
    params, outs = run(PeriodicAveraging(period=5), clients, start, 60)
    for k in clients:
        np.testing.assert_allclose(params[k][0], target, atol=1e-8)
        assert clients[k].steps == 300
    # each client's own optimum differs from the consensus: periodic averaging did not just train locally
    assert min(np.linalg.norm(c.b - target) for c in clients.values()) > 0.1
    assert all(o.local_steps[k] == 5 for o in outs for k in clients)


def test_allreduce_step_is_the_averaged_gradient_step() -> None:
    clients = quad_clients([0.5, 1.0, 3.0], lr=0.1)
    x = np.full(5, 2.0)
    out = AllReduce().run_round(clients, {k: [x.copy()] for k in clients}, 1)
    grad = np.mean([c.a * (x - c.b) for c in clients.values()], axis=0)
    for k in clients:
        np.testing.assert_allclose(out.params[k][0], x - 0.1 * grad, rtol=1e-12)
        assert out.local_steps[k] == 1
        assert out.bytes_up[k] == out.bytes_down[k] == 5 * 8  # "model" convention: one model each way


def test_ring_byte_convention() -> None:
    clients = quad_clients([1.0] * 4, lr=0.1, dim=10)
    out = PeriodicAveraging(period=2, bytes_convention="ring").run_round(
        clients, {k: [np.zeros(10)] for k in clients}, 1)
    assert all(out.bytes_up[k] == out.bytes_down[k] == int(np.ceil(2 * 3 / 4 * 80)) for k in clients)


def test_adaptive_period_keeps_ratio_within_grow_factor_of_r_star() -> None:
    # heterogeneous curvatures and optima: the drift between syncs shrinks as x̄ approaches the optimum,
    # so the controller must lengthen the period to keep V_k / p_k near r*
    clients = quad_clients([0.5, 1.0, 1.5, 2.0], lr=0.005)
    g = 2.0
    strat = AdaptivePeriod(p_init=1, warmup_syncs=5, p_max=64, grow_factor=g)
    params, outs = run(strat, clients, {k: [np.full(5, 10.0)] for k in clients}, 200)
    r_star = strat.r_star
    assert r_star is not None and r_star > 0
    hist = strat.history[5:]
    in_band = [r_star / g <= h["ratio"] <= r_star * g for h in hist]
    for i, (h, ok) in enumerate(zip(hist, in_band)):
        if not ok:  # every excursion is corrected at once, in the right direction, and the next sync is back in band
            if h["ratio"] < r_star / g:
                assert h["next_period"] > h["period"] or h["period"] == strat.p_max
            else:
                assert h["next_period"] < h["period"] or h["period"] == 1
            if i + 1 < len(hist):
                assert in_band[i + 1], f"sync {int(h['sync']) + 1} still out of band"
    assert sum(in_band) / len(in_band) >= 0.9
    assert strat.period >= 8  # the period grew: later syncs are rarer
    assert strat.syncs == 200 and strat.steps_done > 4 * strat.syncs
    # V_k and p_k are reported to every node
    last = outs[-1].metrics["n0"]
    assert last["variance"] == pytest.approx(hist[-1]["variance"]) and last["period"] == hist[-1]["period"]
    assert last["r_star"] == pytest.approx(r_star)


def test_adaptive_period_respects_sync_budget() -> None:
    clients = quad_clients([0.5, 1.0, 1.5, 2.0], lr=0.005)
    strat = AdaptivePeriod(p_init=1, warmup_syncs=3, p_max=4, budget=20, total_steps=500)
    params = {k: [np.full(5, 10.0)] for k in clients}
    syncs_seen = 0
    for r in range(1, 100):
        out = strat.run_round(clients, params, r)
        params = out.params
        if any(out.bytes_up.values()):
            syncs_seen += 1
        if out.stopped:
            assert out.stopped == set(clients)
            reason = out.metrics["n0"]["stop_reason"]
            assert "sync budget" in reason or "total_steps" in reason
            break
    else:
        pytest.fail("the schedule never finished")
    assert syncs_seen == strat.syncs <= 20
    assert strat.steps_done == 500 and all(c.steps == 500 for c in clients.values())
    # budget without total_steps: exactly `budget` syncs, then stop
    strat2 = AdaptivePeriod(p_init=2, warmup_syncs=2, budget=7)
    _, outs = run(strat2, quad_clients([1.0, 2.0], lr=0.01), {k: [np.zeros(5)] for k in ("n0", "n1")}, 9)
    assert strat2.syncs == 7 and outs[7].stopped == {"n0", "n1"} and not any(outs[8].bytes_up.values())


def test_bad_adaptive_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="grow_factor"):
        AdaptivePeriod(grow_factor=1.0)
    with pytest.raises(ConfigError, match="p_max"):
        AdaptivePeriod(p_init=8, p_max=4)
    with pytest.raises(ConfigError, match="period"):
        PeriodicAveraging(period=0)
    with pytest.raises(ConfigError, match="bytes_convention"):
        PeriodicAveraging(bytes_convention="tree")  # type: ignore[arg-type]


# ---- with real DPClients ----------------------------------------------------------------



def test_adaptive_period_with_p_fixed_at_1_equals_allreduce_bit_for_bit(sites) -> None:
    a, b = dp_clients(sites), dp_clients(sites)
    init = a["h0"].get_parameters({})
    pa, outs_a = run(AllReduce(), a, {k: init for k in a}, 12)
    pb, outs_b = run(AdaptivePeriod(p_init=1, warmup_syncs=2, p_max=1), b, {k: init for k in b}, 12)
    for k in a:
        for x, y in zip(pa[k], pb[k]):
            np.testing.assert_array_equal(x, y)
        assert a[k].accountant.steps == b[k].accountant.steps == 12
        assert a[k].epsilon == b[k].epsilon
    assert all(o.local_steps == p.local_steps for o, p in zip(outs_a, outs_b))
    # the noise really moved the models (not a trivially equal no-op)
    assert any(np.abs(x - y).max() > 0 for x, y in zip(pa["h0"], init))


def test_budget_exhausted_node_is_left_out_of_the_average(sites) -> None:
    clients = dp_clients(sites, target_eps=(50.0, 50.0, 0.6))
    init = clients["h0"].get_parameters({})
    strat = PeriodicAveraging(period=5)
    params = {k: init for k in clients}
    stopped_at = None
    for r in range(1, 10):
        out = strat.run_round(clients, params, r)
        if "h2" in out.stopped:
            stopped_at = r
        if stopped_at is not None and r > stopped_at:
            assert out.bytes_up["h2"] == 0 and out.local_steps["h2"] == 0
        params = out.params
    assert stopped_at is not None and strat.stopped == {"h2"}
    assert clients["h2"].epsilon <= 0.6
    assert clients["h0"].accountant.steps == 45
    with pytest.raises(BudgetExhausted):
        clients["h2"].fit(init, {"local_steps": 1})
