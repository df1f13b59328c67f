"""DPClient: accounting across rounds, budget fail-closed, learning, σ handed to the accountant."""

from __future__ import annotations

import flwr
import numpy as np
import pytest

from privfl.accounting import BudgetExhausted, DpEventKey
from privfl.accounting.releases import PUBLIC_FIT_METRICS
from privfl.clients import DPClient, DPConfig
from privfl.data import load_builtin, split_sites
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site


@pytest.fixture(scope="module")
def site():
    raw = split_sites(load_builtin("breast_cancer"), 1, "iid", seed=0)[0]
    return preprocess_site(PreprocessingSpec(), raw, dataset_name="breast_cancer")[0]  # published ranges


def make_client(site, events=None, **kw):
    # the test declares q (a public number); a deployed site declares it in its config
    q = min(1.0, kw.get("batch_size", 32) / len(site.train))
    cfg = DPConfig(**{"noise_multiplier": 1.0, "batch_size": 32, "sample_rate": q, "lr": 0.5,
                      "target_epsilon": 50.0, **kw})
    model = build_model("mlp", site.train.x.shape[1:], 2, seed=0)
    return DPClient(model, (site.train.x, site.train.y), (site.test.x, site.test.y), cfg, seed=0,
                    on_dp_event=None if events is None else events.append)


def test_is_a_flower_numpy_client(site):
    c = make_client(site)
    assert isinstance(c, flwr.client.NumPyClient)
    params = c.get_parameters({})
    assert all(isinstance(p, np.ndarray) for p in params)
    assert len(params) == len(c.parameter_names())


def test_epsilon_grows_monotonically_across_fit_calls(site):
    events: list[dict] = []
    c = make_client(site, events)
    p = c.get_parameters({})
    eps = []
    for _ in range(4):
        p, n, m = c.fit(p, {"local_steps": 5})
        eps.append(m["epsilon"])
        assert m["steps"] == 5 and n == 1  # the public weight (no declared size): never the record count
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert c.accountant.steps == 20
    # the σ handed to the accountant is the σ the optimizer used
    assert c.accountant.events == {DpEventKey(c.optimizer.noise_multiplier, c.sample_rate): 20}
    assert [e["steps"] for e in events] == [5, 5, 5, 5]
    assert events[-1]["noise_multiplier"] == c.optimizer.noise_multiplier


def test_budget_fails_closed(site):
    events: list[dict] = []
    c = make_client(site, events, target_epsilon=3.0)
    p = c.get_parameters({})
    p, _, m = c.fit(p, {"local_steps": 10_000})
    assert m["budget_exhausted"] == 1
    assert 0 < m["steps"] < 10_000
    assert m["epsilon"] <= 3.0
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        c.fit(p, {"local_steps": 1})
    assert c.epsilon <= 3.0
    assert sum(e["steps"] for e in events) == c.accountant.steps


def test_calibrated_noise_spends_at_most_target(site):
    c = make_client(site, noise_multiplier=None, target_epsilon=2.0, planned_steps=60)
    p = c.get_parameters({})
    p, _, m = c.fit(p, {"local_steps": 60})
    assert m["steps"] == 60 and m["epsilon"] <= 2.0 and m["epsilon"] > 1.9


def test_a_few_dp_epochs_beat_chance_widely(site):
    c = make_client(site, noise_multiplier=1.0, clipping="psac", lr=1.0)
    p = c.get_parameters({})
    p, _, m = c.fit(p, {"local_epochs": 5})
    _, acc = c.evaluate_local(p)
    majority = max(np.mean(site.test.y), 1 - np.mean(site.test.y))
    assert acc > 0.85 and acc > majority + 0.15


def test_restore_state_keeps_spent_budget(site):
    c = make_client(site)
    p = c.get_parameters({})
    c.fit(p, {"local_steps": 7})
    state = c.state_dict()
    d = make_client(site)
    d.load_state_dict(state)
    assert d.accountant.steps == 7 and d.epsilon == pytest.approx(c.epsilon)


def test_non_private_client_reports_no_guarantee(site):
    c = make_client(site, enabled=False)
    p = c.get_parameters({})
    p, _, m = c.fit(p, {"local_steps": 3})
    assert m["dp"] == 0 and m["epsilon"] < 0


def test_restored_client_continues_noise_stream_instead_of_replaying_it(site):
    """A client restored from state_dict must not reuse noise it already used."""
    a = make_client(site)
    p0 = a.get_parameters({})
    a.fit(p0, {"local_steps": 3})
    state = a.state_dict()
    cont, _, _ = a.fit(p0, {"local_steps": 1})
    b = make_client(site)  # same seed: a fresh client would replay step 1's noise
    b.load_state_dict(state)
    restored, _, _ = b.fit(p0, {"local_steps": 1})
    fresh, _, _ = make_client(site).fit(p0, {"local_steps": 1})
    for x, y in zip(cont, restored):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(x, y) for x, y in zip(restored, fresh))


@pytest.mark.parametrize("engine", ["opacus", "fast"])
def test_empty_poisson_batches_take_noise_only_steps(site, engine):
    """With an expected batch of 1, about a third of Poisson batches are empty; each is
    still a step (noise only), never a crash and never a skipped release."""
    c = make_client(site, batch_size=1, engine=engine)
    p0 = c.get_parameters({})
    p, _, m = c.fit(p0, {"local_steps": 12})
    assert m["steps"] == 12 and c.accountant.steps == 12
    assert all(np.isfinite(x).all() for x in p)
    assert any(not np.allclose(a, b) for a, b in zip(p, p0))


def test_fast_engine_refuses_topagg(site):
    from privfl.errors import ConfigError
    with pytest.raises(ConfigError, match="fast"):
        make_client(site, engine="fast", mechanism="topagg", mechanism_params={"k": 5})


def test_the_default_engine_is_auto_fast_where_supported_and_opacus_for_topagg(site, caplog):
    from privfl.config import DPSection, from_table
    from privfl.errors import ConfigError
    assert DPConfig().engine == "auto" and DPSection().engine == "auto"
    c = make_client(site)  # no engine given: every layer of the MLP is supported
    assert c.privacy_engine is not None and c.privacy_engine.engine_kind == "fast"
    _, _, m = c.fit(c.get_parameters({}), {"local_steps": 2})
    assert m["steps"] == 2 and c.accountant.steps == 2
    t = make_client(site, mechanism="topagg", mechanism_params={"k": 5, "threshold": 0.5})  # auto + topagg
    assert t.privacy_engine is not None and t.privacy_engine.engine_kind == "opacus"
    for engine in ("opacus", "fast"):  # an explicit engine is kept
        e = make_client(site, engine=engine).privacy_engine
        assert e is not None and e.engine_kind == engine
    section = from_table(DPSection, {"sample_rate": 0.1, "mechanism": "topagg", "topagg_k": 5}, "node.toml: [dp]")
    assert section.engine == "auto" and section.to_dp_config().engine == "auto"
    with pytest.raises(ConfigError, match=r"\[dp\]\.engine: must be auto, opacus or fast"):
        from_table(DPSection, {"sample_rate": 0.1, "engine": "turbo"}, "node.toml: [dp]")


def test_fit_releases_public_weight_and_public_metrics_only(site):
    c = make_client(site, declared_size=400, sample_rate=None)
    _, n, m = c.fit(c.get_parameters({}), {"local_steps": 2})
    assert n == 400  # the declared size, not len(site.train)
    assert n != len(site.train)
    assert set(m) == set(PUBLIC_FIT_METRICS) and "loss" not in m
    assert c.sample_rate == 32 / 400 and c._expected_batch() == pytest.approx(32.0)
    assert np.isfinite(c.last_loss)  # the loss is kept on the site


def test_evaluate_releases_nothing_by_default_and_a_dp_accuracy_when_asked(site):
    c = make_client(site)
    p = c.get_parameters({})
    assert c.evaluate(p, {}) == (0.0, 0, {})
    assert c.accountant.steps == 0
    events: list[dict] = []
    d = make_client(site, events, eval_noise_multiplier=2.0, eval_denominator=100)
    eps0 = d.epsilon
    loss, n, m = d.evaluate(p, {})
    assert n == 100 and 0.0 <= m["accuracy"] <= 1.0 and loss == pytest.approx(1 - m["accuracy"])
    assert events[-1]["purpose"] == "evaluation" and events[-1]["sensitivity"] == 1.0
    assert events[-1]["sample_rate"] == 1.0 and events[-1]["noise_multiplier"] == 2.0
    assert d.epsilon > eps0 and d.training_steps == 0


def test_dp_config_refuses_missing_sample_rate_and_bad_values(site):
    from privfl.errors import ConfigError
    with pytest.raises(ConfigError, match="sample_rate"):
        DPConfig(noise_multiplier=1.0).validate()
    for field, value in (("psac_r", float("inf")), ("max_grad_norm", float("inf")), ("autos_gamma", float("nan")),
                         ("noise_multiplier", float("inf")), ("sample_rate", 1.5)):
        with pytest.raises(ConfigError, match=field):
            DPConfig(**{"sample_rate": 0.1, field: value}).validate()
    with pytest.raises(ConfigError, match="delta"):
        DPConfig(declared_size=1000, delta=1e-2).validate()
    with pytest.raises(ConfigError, match="delta"):  # δ ≥ 1/n for the site's own records (a local check)
        make_client(site, delta=0.5)
