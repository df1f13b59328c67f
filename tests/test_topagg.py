"""TopAgg as a record-level DP mechanism: sensitivity √k, noise std z·√k, sparse ternary release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from torch import nn

from privfl.accounting import DpEventKey
from privfl.clients import (
    DPClient,
    DPConfig,
    TopAggDPOptimizer,
    TopAggParams,
    per_sample_votes,
    sum_votes,
    votes_to_dense,
)
from privfl.clients.randomness import SeededRandom
from privfl.data import load_builtin, split_sites
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site
from privfl.strategies.compression import Compressed, decompress

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Full backward hook")]


# ---- the per-sample vote map and its sensitivity ---------------------------------------
@st.composite
def grads_and_k(draw: st.DrawFn) -> tuple[torch.Tensor, int, float | None, int]:
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 40))
    k = draw(st.integers(1, d))
    vals = draw(st.lists(st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, width=32)),
                         min_size=n * d, max_size=n * d))
    bound = draw(st.one_of(st.none(), st.floats(1e-6, 1e3)))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.tensor(vals, dtype=torch.float32).reshape(n, d), k, bound, seed


@settings(max_examples=150, deadline=None)
@given(case=grads_and_k())
def test_votes_are_k_sparse_ternary_and_removing_a_sample_moves_the_sum_by_at_most_sqrt_k(case):
    flat, k, bound, seed = case
    n, d = flat.shape
    idx, signs = per_sample_votes(flat, k, bound, SeededRandom(seed))
    v = votes_to_dense(idx, signs, d)
    assert set(v.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert ((v != 0).sum(dim=1) == k).all()  # exactly k votes, each ±1
    assert (v.norm(dim=1) <= math.sqrt(k) + 1e-6).all()
    # the kept coordinates are a top-k by magnitude
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    mag = flat.abs()
    if k < d:
        assert (mag.masked_fill(~kept, math.inf).min(1).values >= mag.masked_fill(kept, -1.0).max(1).values).all()
    # coordinates at or beyond the sample's bound b_i saturate to a deterministic sign(g)
    b = mag.max(1, keepdim=True).values
    if bound is not None:
        b = b.clamp(max=bound)
    sat = kept & (mag >= b) & (flat != 0)
    assert (v[sat] == torch.sign(flat[sat])).all()
    # add/remove one sample: the summed votes change by at most √k in L2
    total = sum_votes(idx, signs, d)
    torch.testing.assert_close(total, v.sum(0))
    for i in range(n):
        without = sum_votes(torch.cat([idx[:i], idx[i + 1:]]), torch.cat([signs[:i], signs[i + 1:]]), d)
        assert float((total - without).norm()) <= math.sqrt(k) + 1e-5


def test_stochastic_sign_is_unbiased_for_the_clipped_value():
    g = torch.tensor([0.5, -0.25, 2.0, -3.0, 0.0, 0.1])
    n, bound = 40_000, 1.0
    idx, signs = per_sample_votes(g.repeat(n, 1), k=6, bound=bound, source=SeededRandom(0))
    mean = votes_to_dense(idx, signs, 6).mean(0)
    torch.testing.assert_close(mean, g.clamp(-bound, bound) / bound, atol=0.02, rtol=0)


# ---- the optimizer: votes, noise std, threshold, sparse release -----------------------
def _layer_step(k: int, z: float, threshold: float = 0.0, scale: float = 1.0, B: int = 8, seed: int = 1,
                bound: float | None = None):
    torch.manual_seed(0)
    gsm = GradSampleModule(nn.Linear(200, 100))
    opt = TopAggDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=z, expected_batch_size=B,
                            k=k, threshold=threshold, bound=bound, scale=scale,
                            random_source=SeededRandom(seed))
    x, y = torch.randn(B, 200), torch.randint(0, 100, (B,))
    opt.zero_grad()
    nn.functional.cross_entropy(gsm(x), y).backward()
    return gsm, opt


def test_summed_votes_are_the_per_sample_votes_of_the_grad_samples():
    gsm, opt = _layer_step(k=30, z=0.5, bound=1e-3)
    flat = torch.cat([p.grad_sample.reshape(8, -1) for p in gsm.parameters()], dim=1)
    expected = sum_votes(*per_sample_votes(flat, 30, 1e-3, SeededRandom(1)), flat.shape[1])
    opt.pre_step()
    got = torch.cat([p.summed_grad.flatten() for p in gsm.parameters()])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.abs().sum() <= 8 * 30 and opt.last_batch_size == 8


@pytest.mark.parametrize("k,z", [(1, 1.7), (50, 1.3), (400, 0.6)])
def test_noise_std_is_z_sqrt_k_and_the_optimizer_reports_z(k, z):
    """The noise actually added has std z·√k: the accountant's z is (std used)/√k."""
    gsm, opt = _layer_step(k=k, z=z)
    opt.pre_step()
    noise = torch.cat([(nv - p.summed_grad).flatten() for nv, p in zip(opt.last_noisy_votes, gsm.parameters())])
    assert noise.numel() == 20_100  # every coordinate is noised, not only the voted ones
    assert float(noise.std()) == pytest.approx(z * math.sqrt(k), rel=0.03)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.05 * z * math.sqrt(k))
    assert opt.noise_multiplier == z
    assert opt.noise_std == pytest.approx(z * math.sqrt(k)) and opt.sensitivity == pytest.approx(math.sqrt(k))


def test_update_is_scaled_sign_of_noisy_votes_above_beta_times_expected_batch():
    B, beta, scale = 8, 0.5, 0.25
    gsm, opt = _layer_step(k=200, z=0.2, threshold=beta, scale=scale, B=B)
    before = [p.detach().clone() for p in gsm.parameters()]
    opt.step()
    assert opt.vote_threshold == beta * B
    n_surv = 0
    for p, p0, nv in zip(gsm.parameters(), before, opt.last_noisy_votes):
        tern = torch.where(nv.abs() >= beta * B, torch.sign(nv), torch.zeros_like(nv))
        torch.testing.assert_close(p.grad, scale * tern, rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), p0 - 0.1 * scale * tern)  # x ← x − lr·scale·ternary
        n_surv += int((tern != 0).sum())
    assert 0 < n_surv < 20_100  # the threshold really sparsifies, and something survives


def test_sparse_release_round_trips_survivors_only_and_as_a_ternary_message():
    gsm, opt = _layer_step(k=200, z=0.2, threshold=0.25, scale=0.5)
    with pytest.raises(RuntimeError, match="no TopAgg step"):
        opt.last_update_sparse()
    opt.step()
    parts = opt.last_update_sparse()
    params = list(gsm.parameters())
    assert [s.shape for s in parts] == [tuple(p.shape) for p in params]
    for s, p in zip(parts, params):
        assert s.indices.dtype == np.int64 and s.values.dtype == np.float32
        assert (np.diff(s.indices) > 0).all() and set(np.unique(s.values)) <= {-1.0, 1.0}
        dense = np.zeros(int(np.prod(s.shape)), dtype=np.float32)
        dense[s.indices] = s.values
        np.testing.assert_array_equal(0.5 * dense.reshape(s.shape), p.grad.numpy())
        assert len(s.indices) == int((p.grad != 0).sum())  # survivors only
    idx, vals, shapes = opt.last_update_flat()
    msg = Compressed("ternary", shapes, indices=idx, codes=np.packbits(vals > 0),
                     scales=np.full(len(shapes), 0.5, dtype=np.float32))
    assert msg.nbytes < msg.dense_nbytes
    for arr, p in zip(decompress(msg), params):
        np.testing.assert_array_equal(arr, p.grad.numpy())


@pytest.mark.parametrize("backward", [True, False])
def test_empty_poisson_batch_gives_a_thresholded_noise_only_update(backward):
    torch.manual_seed(0)
    gsm = GradSampleModule(nn.Linear(50, 40))
    opt = TopAggDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=1.0, expected_batch_size=4,
                            k=10, threshold=1.0, random_source=SeededRandom(3))
    calls: list[float] = []
    opt.attach_step_hook(lambda o: calls.append(o.noise_multiplier))  # Opacus's accountant hook still fires
    before = [p.detach().clone() for p in gsm.parameters()]
    opt.zero_grad(set_to_none=True)
    if backward:
        nn.functional.cross_entropy(gsm(torch.zeros(0, 50)), torch.zeros(0, dtype=torch.long)).backward()
    opt.step()
    assert calls == [1.0] and opt.last_batch_size == 0
    noise = torch.cat([nv.flatten() for nv in opt.last_noisy_votes])
    assert all(float(p.summed_grad.abs().sum()) == 0 for p in gsm.parameters())  # no votes at all
    assert float(noise.std()) == pytest.approx(math.sqrt(10), rel=0.1)
    for p, p0, nv in zip(gsm.parameters(), before, opt.last_noisy_votes):
        tern = torch.where(nv.abs() >= 4.0, torch.sign(nv), torch.zeros_like(nv))
        torch.testing.assert_close(p.detach(), p0 - tern)
    assert sum(len(s.indices) for s in opt.last_update_sparse()) == int((noise.abs() >= 4.0).sum()) > 0


# ---- inside a DPClient ----------------------------------------------------------------
@pytest.fixture(scope="module")
def site():
    raw = split_sites(load_builtin("breast_cancer"), 1, "iid", seed=0)[0]
    return preprocess_site(PreprocessingSpec(), raw, dataset_name="breast_cancer")[0]  # published ranges


TOPAGG = {"k": 200, "threshold": 0.1}


def make_client(site, events=None, seed=0, **kw):
    q = min(1.0, kw.get("batch_size", 32) / len(site.train))  # declared by the test (public)
    cfg = DPConfig(**{"noise_multiplier": 1.0, "batch_size": 32, "sample_rate": q, "lr": 0.01,
                      "target_epsilon": 50.0, "mechanism": "topagg", "mechanism_params": TOPAGG, **kw})
    model = build_model("mlp", site.train.x.shape[1:], 2, seed=seed)
    return DPClient(model, (site.train.x, site.train.y), (site.test.x, site.test.y), cfg, seed=seed,
                    on_dp_event=None if events is None else events.append)


def test_client_accountant_gets_z_which_is_the_noise_std_used_over_sqrt_k(site):
    events: list[dict] = []
    c = make_client(site, events, noise_multiplier=0.8)
    assert isinstance(c.optimizer, TopAggDPOptimizer)
    p = c.get_parameters({})
    eps = []
    for _ in range(3):
        p, _, m = c.fit(p, {"local_steps": 4})
        eps.append(m["epsilon"])
    assert eps[0] < eps[1] < eps[2]
    # the std of the noise of the last step, measured, divided by √k, is the σ the accountant holds
    noise = torch.cat([(nv - q.summed_grad).flatten()
                       for nv, q in zip(c.optimizer.last_noisy_votes, c.train_module.parameters())])
    measured_z = float(noise.std()) / math.sqrt(TOPAGG["k"])
    assert measured_z == pytest.approx(0.8, rel=0.05)
    assert c.accountant.events == {DpEventKey(0.8, c.sample_rate): 12}
    assert [e["noise_multiplier"] for e in events] == [0.8] * 3
    # what the ledger gets: TopAgg's own k and sensitivity √k, not a clipping rule and C
    k = TOPAGG["k"]
    assert all(e["local_mechanism"] == "topagg" and e["clipping"] == "topagg" for e in events)
    assert all(e["sensitivity"] == e["max_grad_norm"] == pytest.approx(math.sqrt(k)) for e in events)
    assert all(e["mechanism_params"]["k"] == k and e["mechanism_params"]["threshold"] == 0.1 for e in events)


def test_topagg_client_learns_breast_cancer(site):
    # features in [−1, 1] (published ranges) give smaller gradients than the z-scores this test was
    # first tuned on. lr 0.04 and 8 epochs (ε 5.9) ended at 0.83–0.88 over seeds 0–5, so one CPU's
    # float path put seed 0 under 0.85 and another's over it; lr 0.03 and 16 epochs (ε 8.1) ends at
    # 0.86–0.94 over seeds 0–5 (seed 0: 0.94), clear of the bound
    c = make_client(site, lr=0.03)
    p = c.get_parameters({})
    p, _, m = c.fit(p, {"local_epochs": 16})
    _, acc = c.evaluate_local(p)
    majority = max(np.mean(site.test.y), 1 - np.mean(site.test.y))
    assert acc > 0.85 and acc > majority + 0.15
    assert m["epsilon"] < 8.5


def test_client_survives_empty_poisson_batches(site):
    c = make_client(site, batch_size=1, mechanism_params={"k": 20, "threshold": 2.0})  # q = 1/455: ~37% empty
    p = c.get_parameters({})
    sizes = []
    for _ in range(12):
        p, _, _ = c.fit(p, {"local_steps": 1})
        sizes.append(c.optimizer.last_batch_size)
    assert 0 in sizes and c.accountant.steps == 12
    assert all(np.isfinite(a).all() for a in p)


@pytest.mark.parametrize("params,field", [
    ({}, "mechanism_params.k"),
    ({"k": 0, "threshold": 0.0}, "mechanism_params.k"),  # the config file's default: unset
    ({"k": 10**6}, "mechanism_params.k"),  # more than the model's parameters
    ({"k": 5, "threshold": -1.0}, "mechanism_params.threshold"),
    ({"k": 5, "bound": -1.0}, "mechanism_params.bound"),
    ({"k": 5, "tresh": 0.1}, "tresh"),
])
def test_bad_topagg_settings_are_config_errors_naming_the_field(site, params, field):
    with pytest.raises(ConfigError, match=field):
        make_client(site, mechanism_params=params)


def test_unknown_mechanism_is_a_config_error(site):
    with pytest.raises(ConfigError, match="dp.mechanism"):
        make_client(site, mechanism="laplace")


def test_params_parse_bound_zero_as_no_cap():
    assert TopAggParams.from_mapping({"k": 3, "threshold": 0.2, "bound": 0}).bound is None
