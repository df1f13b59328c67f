"""A hospital's own Flower client ([client].app) under privfl: the site session binds the user's
privfl.PrivacyEngine() to the site's accountant, [dp], randomness and ledger hook; AppClient
releases only DP output and public metrics, and refuses a client that trains without DP."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import privfl
from privfl.accounting import BudgetExhausted, PrivacyAccountant
from privfl.accounting.releases import PUBLIC_FIT_METRICS
from privfl.clients import AppClient, ClientAppError, DPConfig, load_client_app, site_session
from privfl.clients.session import SEED_STRIDE, current_session
from privfl.errors import ConfigError

N, D, K = 200, 6, 3
SIGMA, C, Q, DELTA = 0.8, 1.0, 0.1, 1e-5
STEPS = 3


def dp_config(**kw: Any) -> DPConfig:
    base = dict(noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=Q, batch_size=20, target_epsilon=50.0,
                delta=DELTA)
    base.update(kw)
    return DPConfig(**base)  # type: ignore[arg-type]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 8)
        self.fc2 = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def site_data(partition: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + partition)
    x = torch.randn(N, D, generator=g)
    return TensorDataset(x, x[:, :K].argmax(1))


def new_net() -> Net:
    torch.manual_seed(0)
    return Net()


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, params: list[np.ndarray]) -> None:
    net.load_state_dict(OrderedDict((k, torch.tensor(v)) for k, v in zip(net.state_dict(), params)), strict=True)


def dp_train(net: nn.Module, loader: DataLoader, steps: int, private: bool = True, **make_private: Any) -> float:
    """The Flower quickstart's train(): a fresh optimizer and, here, privfl.PrivacyEngine() every call."""
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    model: nn.Module = net
    if private:
        model, opt, loader = privfl.PrivacyEngine().make_private(module=net, optimizer=opt, data_loader=loader,
                                                                 **make_private)
    losses, batches = [], iter(loader)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) if len(y) else model(x).sum() * 0.0
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


class QuickstartClient(NumPyClient):
    """A user's NumPyClient in the Flower quickstart style (its own model, data, train and test)."""

    def __init__(self, partition: int = 0, private: bool = True, report_steps: Any = None,
                 **make_private: Any) -> None:
        self.net = new_net()
        self.data = site_data(partition)
        self.loader = DataLoader(self.data, batch_size=20, shuffle=True)
        self.private, self.report_steps, self.make_private = private, report_steps, make_private

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_weights(self.net)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        set_weights(self.net, parameters)
        loss = dp_train(self.net, self.loader, int(config["local_steps"]), self.private, **self.make_private)
        metrics: dict[str, Any] = {"loss": loss, "accuracy": 0.5, "num_records": len(self.data)}
        if self.report_steps is not None:
            metrics["steps"] = self.report_steps
        return get_weights(self.net), len(self.data), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        set_weights(self.net, parameters)
        with torch.no_grad():
            x, y = self.data.tensors
            out = self.net(x)
        return float(F.cross_entropy(out, y)), len(y), {"accuracy": float((out.argmax(1) == y).float().mean())}


def client_fn(context: Context) -> NumPyClient:
    return QuickstartClient(int(context.node_config["partition-id"]))


def rdp_epsilon(steps: int, sigma: float = SIGMA, q: float = Q) -> float:
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(DELTA)


def app_client(app: Any = client_fn, config: DPConfig | None = None, **kw: Any) -> AppClient:
    kw.setdefault("local_steps", STEPS)
    return AppClient(app, config or dp_config(), where="tests.test_client_app:client_fn", **kw)


# ---- the session binds the user's engine ------------------------------------------------------
def test_two_quickstart_fits_accumulate_epsilon_in_the_site_accountant_with_the_sites_dp() -> None:
    accountant = PrivacyAccountant("rdp")
    events: list[dict[str, Any]] = []
    client = app_client(accountant=accountant, on_dp_event=events.append)
    params = client.get_parameters({})
    p1, w1, m1 = client.fit(params, {"local_steps": STEPS})
    p2, w2, m2 = client.fit(p1, {"local_steps": STEPS})
    assert client.accountant is accountant and accountant.steps == 2 * STEPS
    assert m1["steps"] == m2["steps"] == STEPS and m2["total_steps"] == 2 * STEPS
    assert m2["epsilon"] == pytest.approx(rdp_epsilon(2 * STEPS), rel=1e-9)
    assert m1["epsilon"] == pytest.approx(rdp_epsilon(STEPS), rel=1e-9) and m2["epsilon"] > m1["epsilon"]
    assert len(events) == 2 * STEPS  # one write-ahead event per optimizer step, each the site's mechanism
    assert {(e["noise_multiplier"], e["sample_rate"], e["max_grad_norm"], e["clipping"]) for e in events} \
        == {(SIGMA, Q, C, "psac")}
    assert client.session.engines_made == 2 and client.random_kind == "secure"


def test_engine_under_a_session_takes_the_sites_dp_and_a_conflicting_value_is_refused() -> None:
    cfg = dp_config(declared_size=1000, sample_rate=None, batch_size=50, clipping="flat")
    net = new_net()
    loader = DataLoader(site_data(), batch_size=7)
    with site_session(cfg, PrivacyAccountant(), seed=None) as session:
        engine = privfl.PrivacyEngine()
        engine.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data_loader=loader,
                            max_grad_norm=C)  # the site's value: accepted
        assert engine.accountant is session.accountant and engine.guard is session.guard
        assert (engine.noise_multiplier, engine.max_grad_norm, engine.sample_rate, engine.expected_batch_size) \
            == (SIGMA, C, 0.05, 50.0)
        assert engine.mechanism_description()["clipping"] == "flat" and engine.target_epsilon == 50.0
        other = new_net()
        with pytest.raises(ConfigError) as exc:
            privfl.PrivacyEngine().make_private(module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                                                data_loader=loader, noise_multiplier=1.1, max_grad_norm=C)
    msg = str(exc.value)
    assert msg == ("make_private: noise_multiplier=1.1 differs from the site's [dp].noise_multiplier (σ=0.8); "
                   "under privfl the site's [dp] decides")
    assert "\n" not in msg
    with site_session(cfg, PrivacyAccountant()):
        with pytest.raises(ConfigError, match=r"clipping='psac' differs from the site's \[dp\].clipping"):
            privfl.PrivacyEngine().make_private(module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                                                data_loader=loader, clipping="psac")
    assert current_session() is None


def test_outside_a_session_the_engine_still_needs_sigma_and_c() -> None:
    net = new_net()
    with pytest.raises(ConfigError, match="make_private: noise_multiplier: required"):
        privfl.PrivacyEngine().make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                            data_loader=DataLoader(site_data(), batch_size=20), max_grad_norm=C)


@pytest.mark.parametrize("engine", ["opacus", "fast"])
def test_a_new_engine_per_fit_on_the_same_model_removes_the_old_hooks(engine: str) -> None:
    """The second fit's update equals a fresh, never-wrapped copy's under the same streams: nothing doubled."""
    cfg = dp_config(engine=engine)
    net, seed = new_net(), 7
    loader = DataLoader(site_data(), batch_size=20)
    with site_session(cfg, PrivacyAccountant(), seed=seed):
        dp_train(net, loader, 2)
        start = copy.deepcopy(net.state_dict())
        dp_train(net, loader, 2)
    reference = new_net()
    reference.load_state_dict(start)
    opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    ref_engine = privfl.PrivacyEngine(seed=seed + SEED_STRIDE)  # the streams of the session's 2nd engine
    model, opt, ref_loader = ref_engine.make_private(module=reference, optimizer=opt, data_loader=loader,
                                                     noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=Q,
                                                     expected_batch_size=cfg.expected_batch_size(), engine=engine)
    batches = iter(ref_loader)
    for _ in range(2):
        x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for a, b in zip(net.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hooks = {name: (len(m._forward_hooks), len(m._backward_hooks)) for name, m in net.named_modules()}
    assert hooks == {name: (len(m._forward_hooks), len(m._backward_hooks)) for name, m in reference.named_modules()}
    assert sum(f for f, _ in hooks.values()) > 0  # one engine's hooks: the first one's are gone


def test_the_older_engine_of_a_model_made_private_again_refuses_to_step() -> None:
    net = new_net()
    loader = DataLoader(site_data(), batch_size=20)
    with site_session(dp_config(), PrivacyAccountant()) as session:
        first = privfl.PrivacyEngine()
        model1, opt1, _ = first.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                             data_loader=loader)
        second = privfl.PrivacyEngine()
        model2, _, _ = second.make_private(module=model1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                           data_loader=loader)  # the wrapper is accepted as the model
        assert session.modules == [net] and session.first_names == list(net.state_dict())
        x, y = site_data().tensors
        F.cross_entropy(model2(x[:8]), y[:8]).backward()
        with pytest.raises(ConfigError, match="a newer PrivacyEngine made this model private"):
            opt1.step()
    assert session.training_steps == 0


def test_a_seeded_session_is_reproducible_and_a_secure_one_refuses_a_user_seed() -> None:
    def run() -> list[np.ndarray]:
        client = app_client(seed=11)
        p = client.fit(client.get_parameters({}), {"local_steps": STEPS})[0]
        return client.fit(p, {"local_steps": STEPS})[0]

    a, b = run(), run()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert app_client(seed=11).random_kind == "seeded"
    with site_session(dp_config(), PrivacyAccountant(), seed=None):
        with pytest.raises(ConfigError, match=r"^PrivacyEngine: seed=3: under privfl this site's noise and batches "
                                              r"are secure .*; remove seed$"):
            privfl.PrivacyEngine(seed=3)
        with pytest.raises(ConfigError, match="accountant"):
            privfl.PrivacyEngine(PrivacyAccountant())


def test_the_event_hook_sees_each_training_event_before_its_step_runs() -> None:
    client = app_client()
    params = client.get_parameters({})
    seen: list[list[np.ndarray]] = []
    client.on_dp_event = lambda event: seen.append(get_weights(client._backend.client.numpy_client.net))
    new, _, metrics = client.fit(params, {"local_steps": STEPS})
    assert len(seen) == STEPS == metrics["steps"]
    assert all(np.array_equal(x, y) for x, y in zip(seen[0], params))  # the first event: the model is untouched

    def refuse(event: dict[str, Any]) -> None:
        raise RuntimeError("ledger full")

    client.on_dp_event = refuse
    steps_before = client.accountant.steps
    with pytest.raises(RuntimeError, match="ledger full"):
        client.fit(new, {"local_steps": STEPS})
    assert all(np.array_equal(x, y) for x, y in zip(client.get_parameters({}), new))  # nothing released
    assert client.accountant.steps == steps_before + 1  # accounted (write-ahead), never run


# ---- what AppClient releases ------------------------------------------------------------------
def test_user_metrics_and_record_counts_never_reach_the_fit_result() -> None:
    client = app_client(config=dp_config(declared_size=1000, sample_rate=None))
    new, weight, metrics = client.fit(client.get_parameters({}), {"local_steps": 2})
    assert set(metrics) == PUBLIC_FIT_METRICS and metrics["dp"] == 1 and metrics["budget_exhausted"] == 0
    assert weight == 1000  # the declared size, never the client's len(dataset) = 200
    assert client.last_loss == client.last_loss and "loss" not in metrics  # kept on the site only
    assert client.evaluate(new, {}) == (0.0, 0, {})
    loss, acc = client.evaluate_local(new)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


def test_a_client_training_without_the_engine_is_refused_and_nothing_is_released() -> None:
    client = app_client(lambda context: QuickstartClient(private=False))
    params = client.get_parameters({})
    with pytest.raises(ClientAppError) as exc:
        client.fit(params, {"local_steps": STEPS})
    msg = str(exc.value)
    assert msg.startswith("[client].app: tests.test_client_app:client_fn trained without privfl.PrivacyEngine")
    assert "privfl.PrivacyEngine().make_private(...)" in msg and "[dp].enabled = false" in msg and "\n" not in msg
    assert all(np.array_equal(x, y) for x, y in zip(client.get_parameters({}), params))
    assert client.training_steps == 0 and client.accountant.steps == 0


def test_reported_steps_that_disagree_with_the_accounted_ones_are_refused() -> None:
    client = app_client(lambda context: QuickstartClient(report_steps=STEPS + 1))
    with pytest.raises(ClientAppError, match=rf"reported steps={STEPS + 1} but privfl accounted {STEPS} DP step"):
        client.fit(client.get_parameters({}), {"local_steps": STEPS})
    honest = app_client(lambda context: QuickstartClient(report_steps=STEPS))
    assert honest.fit(honest.get_parameters({}), {"local_steps": STEPS})[2]["steps"] == STEPS


def test_a_model_other_than_the_privately_trained_one_is_refused() -> None:
    class Swapping(QuickstartClient):
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            shadow = new_net()
            set_weights(shadow, parameters)
            super().fit(parameters, config)  # DP steps on self.net ...
            dp_train(shadow, self.loader, 2, private=False)  # ... but an un-noised model is returned
            return get_weights(shadow), 1, {}

    client = app_client(lambda context: Swapping())
    with pytest.raises(ClientAppError, match="not the state of the model privfl.PrivacyEngine trained"):
        client.fit(client.get_parameters({}), {"local_steps": STEPS})


def test_with_dp_disabled_the_client_runs_as_written_and_says_dp_0() -> None:
    client = app_client(config=dp_config(enabled=False, sample_rate=None, noise_multiplier=None))
    params = client.get_parameters({})
    new, weight, metrics = client.fit(params, {"local_steps": 4})
    assert metrics == {"steps": 4, "total_steps": 4, "epsilon": -1.0, "delta": DELTA, "dp": 0,
                       "budget_exhausted": 0}
    assert weight == 1 and any(not np.array_equal(x, y) for x, y in zip(new, params))
    assert client.accountant.steps == 0 and client.epsilon == float("inf") and client.noise_multiplier == 0.0


class WatchedClient(QuickstartClient):
    """The quickstart client, noting every exception that passes through its own fit."""

    seen: list[BaseException] = []
    asked: list[int] = []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        WatchedClient.asked.append(int(config["local_steps"]))
        try:
            return super().fit(parameters, config)
        except BaseException as exc:
            WatchedClient.seen.append(exc)
            raise


def test_the_last_fit_asks_for_the_steps_that_fit_and_exhaustion_comes_outside_the_users_loop() -> None:
    WatchedClient.seen, WatchedClient.asked = [], []
    budget = rdp_epsilon(STEPS + 1)  # room for STEPS + 1 steps: the second fit gets one
    client = app_client(lambda context: WatchedClient(), config=dp_config(target_epsilon=budget))
    p1, _, m1 = client.fit(client.get_parameters({}), {"local_steps": STEPS})
    assert m1["budget_exhausted"] == 0
    p2, _, m2 = client.fit(p1, {"local_steps": STEPS})
    assert WatchedClient.asked == [STEPS, 1] and m2["steps"] == 1  # the loop ran the one step that fit
    assert any(not np.array_equal(x, y) for x, y in zip(p1, p2))  # and its model is released
    assert client.accountant.steps == STEPS + 1 and client.training_steps == STEPS + 1
    with pytest.raises(BudgetExhausted):  # the next fit: refused by privfl before the user's code runs
        client.fit(p2, {"local_steps": STEPS})
    assert client.exhausted and WatchedClient.asked == [STEPS, 1] and WatchedClient.seen == []
    with pytest.raises(BudgetExhausted):  # and it stays closed
        client.fit(p2, {"local_steps": 1})


def test_context_names_state_and_parameter_names() -> None:
    seen: dict[str, Any] = {}

    def fn(context: Context) -> NumPyClient:
        seen.update(node=dict(context.node_config), run=dict(context.run_config))
        return QuickstartClient()

    client = app_client(fn, site_index=2, num_sites=5, run_config={"lr": 0.2})
    assert seen == {"node": {"partition-id": 2, "num-partitions": 5}, "run": {"lr": 0.2, "local-steps": STEPS}}
    assert client.parameter_names() == ["param_0", "param_1", "param_2", "param_3"]
    fresh = app_client(fn)
    fresh.fit(fresh.get_parameters({}), {"local_steps": 1})
    assert fresh.parameter_names() == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    named = app_client(fn, parameter_names=["a", "b", "c", "d"])
    assert named.parameter_names() == ["a", "b", "c", "d"]
    state = fresh.state_dict()
    restored = app_client(fn)
    restored.load_state_dict(state)
    assert restored.accountant.steps == 1 and restored.training_steps == 1 and restored.session.engines_made == 1


# ---- Flower ClientApps, through real Flower messages --------------------------------------------
def test_a_legacy_client_app_is_driven_through_flower_messages() -> None:
    built: list[int] = []

    def legacy_fn(context: Context):
        built.append(1)
        return QuickstartClient(int(context.node_config["partition-id"])).to_client()

    app = ClientApp(client_fn=legacy_fn)
    assert load_client_app(app, "x:app").kind == "client_app"
    client = app_client(app)
    params = client.get_parameters({})
    p1, w1, m1 = client.fit(params, {"local_steps": STEPS})
    p2, w2, m2 = client.fit(p1, {"local_steps": STEPS})
    assert len(built) == 3  # Flower calls client_fn per message; the session outlives every client
    assert m2["epsilon"] == pytest.approx(rdp_epsilon(2 * STEPS), rel=1e-9)
    assert set(m2) == PUBLIC_FIT_METRICS and w2 == 1
    assert np.isfinite(client.evaluate_local(p2)[0])
    tight = app_client(app, config=dp_config(target_epsilon=rdp_epsilon(STEPS + 1)))
    tight.fit(params, {"local_steps": STEPS})
    assert tight.fit(params, {"local_steps": STEPS})[2]["steps"] == 1  # the one step that still fits
    with pytest.raises(BudgetExhausted):  # through Flower's message handler, to the strategy
        tight.fit(params, {"local_steps": STEPS})
    unprivate = app_client(ClientApp(client_fn=lambda context: QuickstartClient(private=False).to_client()))
    with pytest.raises(ClientAppError, match="trained without privfl.PrivacyEngine"):
        unprivate.fit(unprivate.get_parameters({}), {"local_steps": 1})


def test_a_message_api_client_app_is_driven_with_arrays_and_config_records() -> None:
    app = ClientApp()
    data = site_data()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        net = Net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = dp_train(net, DataLoader(data, batch_size=20), int(msg.content["config"]["local_steps"]))
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(data)})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        net = Net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        with torch.no_grad():
            out = net(data.tensors[0])
        acc = float((out.argmax(1) == data.tensors[1]).float().mean())
        return Message(RecordDict({"metrics": MetricRecord({"eval_loss": 1.0, "eval_acc": acc})}), reply_to=msg)

    net = new_net()
    assert load_client_app(app, "x:app").kind == "message_app"
    client = app_client(app, parameter_names=list(net.state_dict()), initial_parameters=get_weights(net))
    p1, weight, m1 = client.fit(client.get_parameters({}), {"local_steps": STEPS})
    p2, _, m2 = client.fit(p1, {"local_steps": STEPS})
    assert m2["epsilon"] == pytest.approx(rdp_epsilon(2 * STEPS), rel=1e-9) and set(m2) == PUBLIC_FIT_METRICS
    assert weight == 1 and client.last_loss == client.last_loss
    assert client.evaluate_local(p2)[0] == 1.0
    with pytest.raises(ClientAppError, match="no get_parameters"):
        app_client(app).get_parameters({})


def test_load_client_app_refuses_what_it_cannot_drive_in_one_line() -> None:
    with pytest.raises(ClientAppError, match=r"^\[client\]\.app: pkg:x: names the class QuickstartClient"):
        load_client_app(QuickstartClient, "pkg:x")
    with pytest.raises(ClientAppError, match="neither a client_fn nor an @app.train"):
        load_client_app(ClientApp(), "pkg:x")
    with pytest.raises(ClientAppError, match="must take one argument"):
        load_client_app(lambda: None, "pkg:x")
    with pytest.raises(ClientAppError, match="cannot import no_such_module_here"):
        load_client_app("no_such_module_here:fn", "no_such_module_here:fn")
    assert load_client_app("tests.test_client_app:client_fn", "t").kind == "client_fn"
    with pytest.raises(ClientAppError, match="client_fn returned int"):
        app_client(lambda context: 3)


def test_a_nodes_client_app_error_names_the_field_once() -> None:
    from privfl.clients.app_client import ClientAppError, load_client_app

    with pytest.raises(ClientAppError) as exc:
        load_client_app("nowhere_pkg_xyz:client_fn", "site.toml: [client].app: nowhere_pkg_xyz:client_fn")
    assert str(exc.value).count("[client].app") == 1 and str(exc.value).startswith("site.toml: [client].app:")
    with pytest.raises(ClientAppError) as exc:
        load_client_app("nowhere_pkg_xyz:client_fn", "nowhere_pkg_xyz:client_fn")
    assert str(exc.value).startswith("[client].app: nowhere_pkg_xyz:client_fn:")


class GreedyClient(QuickstartClient):
    """A newcomer's fit that ignores config["local_steps"] and trains until something stops it."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        set_weights(self.net, parameters)
        dp_train(self.net, self.loader, 10_000, True)
        return get_weights(self.net), len(self.data), {}


def test_a_loop_that_ignores_local_steps_is_stopped_at_its_first_extra_step() -> None:
    """Before: it ran until the budget was gone inside one fit, nothing was released, and the
    run looked finished. Now its first step beyond local_steps is refused before it is
    accounted: the budget keeps all but the steps it was asked for."""
    client = app_client(lambda context: GreedyClient(), config=dp_config(target_epsilon=rdp_epsilon(50)))
    with pytest.raises(ConfigError) as exc:
        client.fit(client.get_parameters({}), {"local_steps": STEPS})
    msg = str(exc.value)
    assert "[client].app" in msg and f"config['local_steps'] = {STEPS}" in msg and f"step {STEPS + 1}" in msg
    assert client.accountant.steps == STEPS and not client.exhausted
    assert client.epsilon == pytest.approx(rdp_epsilon(STEPS), rel=1e-9)
