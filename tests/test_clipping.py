"""Clipping rules and the per-sample-weight DP optimizer against explicit per-sample loops and Opacus."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from privfl.clients import AutoSClipping, FlatClipping, PerSampleWeightDPOptimizer, PSACClipping, clipping_rule
from privfl.clients.clipping import CLIP_MARGIN
from privfl.clients.randomness import SeededRandom


@pytest.mark.parametrize("n,r,w", [(0.001, 0.01, 1.099), (0.1, 0.01, 5.238), (1.0, 0.01, 0.990),
                                   (10.0, 0.1, 0.0999), (0.1, 0.1, 1.667)])
def test_psac_weights_match_research_table(n, r, w):
    assert float(PSACClipping(r).weights(torch.tensor([n]), 1.0)) == pytest.approx(w, rel=2e-3)


@pytest.mark.parametrize("r", [0.01, 0.1])
def test_psac_peak(r):
    n_star = math.sqrt(r) - r
    w_max = 1 / (2 * math.sqrt(r) - r)
    ns = torch.linspace(1e-4, 2.0, 200001, dtype=torch.float64)
    w = PSACClipping(r).weights(ns, 1.0)
    assert float(w.max()) == pytest.approx(w_max, rel=1e-6)
    assert float(ns[w.argmax()]) == pytest.approx(n_star, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(norm=st.floats(0.0, 1e6), c=st.floats(1e-3, 1e3), r=st.floats(1e-4, 10.0),
       rule=st.sampled_from(["flat", "psac", "autos"]))
def test_every_clipped_norm_is_below_c(norm, c, r, rule):
    n = torch.tensor([norm], dtype=torch.float64)
    w = clipping_rule(rule, psac_r=r, autos_gamma=r).weights(n, c)
    assert float(n * w) <= c * (1 + 1e-12)
    if rule != "flat" and norm <= 1e3:
        # mathematically n·w(n) < C for every n; above ~1e5 the gap falls below float64
        # resolution and the product can round to exactly C, still within the bound above
        assert float(n * w) < c


def _setup(rule, noise=0.0, seed=0, n=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(n, 5) * 3, torch.randint(0, 3, (n,))
    return model, x, y


@pytest.mark.parametrize("rule", [FlatClipping(), PSACClipping(0.1), AutoSClipping(0.01)])
def test_summed_clipped_gradient_equals_per_sample_loop(rule):
    model, x, y = _setup(rule)
    ref = [torch.zeros_like(p) for p in model.parameters()]
    C = 0.5
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        w = rule.weights(norm.reshape(1), C)[0]
        assert float(norm * w) <= C + 1e-6
        for r_, gi in zip(ref, g):
            r_ += w * gi
    gsm = GradSampleModule(model)
    opt = PerSampleWeightDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                                     max_grad_norm=C, expected_batch_size=len(y), clipping=rule)
    opt.zero_grad()
    nn.functional.cross_entropy(gsm(x), y).backward()
    opt.pre_step()
    for p, r_ in zip(gsm.parameters(), ref):
        torch.testing.assert_close(p.grad, r_ / len(y), rtol=1e-5, atol=1e-7)


def test_flat_equals_opacus_stock_optimizer_for_same_seed():
    """Same noise draws as Opacus's own DPOptimizer; the weights differ only by the strict-bound
    margin (C·(1 − CLIP_MARGIN)/n for clipped samples), so the models agree to ~CLIP_MARGIN."""
    results = []
    for cls, kw in ((DPOptimizer, {"generator": torch.Generator().manual_seed(42)}),
                    (PerSampleWeightDPOptimizer, {"clipping": FlatClipping(), "random_source": SeededRandom(42)})):
        model, x, y = _setup(None, seed=3)
        gsm = GradSampleModule(model)
        opt = cls(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.7,
                  expected_batch_size=len(y), **kw)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(gsm(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in gsm.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2 * CLIP_MARGIN, atol=1e-7)


@pytest.mark.parametrize("rule", ["flat", "psac", "autos"])
def test_noise_std_is_sigma_times_c(rule):
    """The noise actually added has std σ·C (so the σ given to the accountant is the σ used)."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    gsm = GradSampleModule(model)
    sigma, C, B = 1.7, 0.3, 8
    opt = PerSampleWeightDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=sigma,
                                     max_grad_norm=C, expected_batch_size=B, clipping=clipping_rule(rule),
                                     random_source=SeededRandom(1))
    x, y = torch.randn(B, 200), torch.randint(0, 100, (B,))
    opt.zero_grad()
    nn.functional.cross_entropy(gsm(x), y).backward()
    opt.pre_step()
    noise = torch.cat([(p.grad * B - p.summed_grad).flatten() for p in gsm.parameters()])
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.02)
    assert opt.noise_multiplier == sigma


@pytest.mark.parametrize("rule", ["flat", "psac", "autos"])
def test_clipped_norm_is_strictly_below_c_in_float32_for_huge_gradients(rule):
    """DP-PSAC's n·w(n) reached 1.0000007·C in float32 once n ≳ 1e4: the bound must be strict."""
    torch.manual_seed(0)
    c = 1.0
    g = torch.randn(64, 5000) * torch.logspace(0, 8, 64).unsqueeze(1)  # norms from ~70 to ~7e9
    norms = g.norm(dim=1)
    w = clipping_rule(rule).weights(norms, c)
    clipped = (g * w.unsqueeze(1)).double().norm(dim=1)
    assert bool(torch.all(clipped < c)), float(clipped.max())
    assert float(clipped.max()) > 0.999 * c  # and still clips to (almost) C


@pytest.mark.parametrize("kw", [{"r": float("inf")}, {"r": float("nan")}])
def test_psac_refuses_non_finite_r(kw):
    with pytest.raises(ValueError, match="finite"):
        clipping_rule("psac", psac_r=kw["r"])
