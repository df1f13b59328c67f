"""The fast (ghost-norm) DP engine against Opacus and against explicit per-sample gradients."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import privfl
import privfl.clients.ghost as ghost
from privfl.clients import DPClient, DPConfig, PerSampleWeightDPOptimizer, clipping_rule
from privfl.clients.ghost import GhostDPOptimizer, GhostGradModule, make_ghost_private
from privfl.clients.randomness import SeededRandom
from privfl.errors import ConfigError
from privfl.models import build_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Full backward hook")]

RULES = ("flat", "psac", "autos")


class SeqNet(nn.Module):
    """Linear layers on (B, T, d) inputs with LayerNorm: exercises the sequence paths."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.ln(self.inp(x)))).mean(1)


class OddConv(nn.Module):
    """Strided / dilated / rectangular / bias-free convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
        self.c2 = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
    torch.manual_seed(seed)
    if name == "mlp":
        return build_model("mlp", (30,), 2, seed=seed), (30,), 2
    if name == "logreg":
        return build_model("logreg", (30,), 2, seed=seed), (30,), 2
    if name == "cnn":
        return build_model("cnn", (1, 8, 8), 10, seed=seed), (1, 8, 8), 10
    if name == "seq":
        return SeqNet(), (5, 6), 3
    if name == "oddconv":
        return OddConv(), (2, 9, 7), 3
    raise AssertionError(name)


def _batch(shape: tuple[int, ...], classes: int, n: int = 24, seed: int = 1, scale: float = 3.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * scale, torch.randint(0, classes, (n,), generator=g)


def _opacus_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gsm = GradSampleModule(copy.deepcopy(model))
    nn.functional.cross_entropy(gsm(x), y).backward()
    per = [p.grad_sample.reshape(len(y), -1).norm(dim=1) for p in gsm.parameters()]
    return torch.stack(per, 1).norm(dim=1)


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the per-sample loss, via torch.func (no Opacus, no hooks)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _fast_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gm = GhostGradModule(model)
    nn.functional.cross_entropy(gm(x), y).backward()
    with torch.no_grad():
        return gm.per_sample_norms()


# ---- per-sample norms ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "logreg", "cnn", "seq", "oddconv"])
def test_norms_equal_opacus_grad_sample_norms(name):
    model, shape, k = _model(name)
    x, y = _batch(shape, k)
    ref = _opacus_norms(model, x, y)
    got = _fast_norms(model, x, y)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-5, atol=0), (got - ref).abs().max()


@pytest.mark.parametrize("name", ["cnn", "seq", "oddconv"])
def test_gram_path_equals_materialised_path(name, monkeypatch):
    """With the materialise limit at 0 every conv/sequence layer uses the Gram trick."""
    model, shape, k = _model(name)
    x, y = _batch(shape, k)
    ref = _opacus_norms(model, x, y)
    monkeypatch.setattr(ghost, "MATERIALISE_LIMIT_BYTES", 0)
    gm = GhostGradModule(model)
    nn.functional.cross_entropy(gm(x), y).backward()
    with torch.no_grad():
        got = gm.per_sample_norms()
    assert all(la.record.cache.g_w is None for la in gm.layers if isinstance(la.record.cache, ghost._SeqCache))
    assert torch.allclose(got, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["cnn", "oddconv"])
@pytest.mark.parametrize("method", ["unfold", "grouped"])
def test_conv_materialisation_methods_equal_opacus(name, method, monkeypatch):
    model, shape, k = _model(name)
    x, y = _batch(shape, k)
    ref = _opacus_norms(model, x, y)
    monkeypatch.setattr(ghost, "CONV_METHOD", method)
    assert torch.allclose(_fast_norms(model, x, y), ref, rtol=1e-5, atol=0)
    ps = _per_sample_grads(model, x, y)
    w = clipping_rule("psac").weights(ref, 0.5)
    got, _ = _fast_step_grads(model, x, y, "psac", 0.5, 10)
    for key, g in ps.items():
        assert torch.allclose(got[key], torch.einsum("i,i...->...", w, g) / 10, rtol=1e-4, atol=1e-7), key


# ---- clipped sum against an explicit per-sample computation ------------------------------
def _fast_step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule: str, c: float,
                     expected: int) -> tuple[dict[str, torch.Tensor], GhostDPOptimizer]:
    gm, opt = make_ghost_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=c, expected_batch_size=expected, clipping=clipping_rule(rule))
    opt.zero_grad()
    nn.functional.cross_entropy(gm(x), y).backward()
    opt.step()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}, opt


@pytest.mark.parametrize("name", ["mlp", "logreg", "cnn", "seq", "oddconv"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("gram", [False, True])
def test_clipped_sum_equals_per_sample_loop(name, rule, gram, monkeypatch):
    if gram:
        if name in ("mlp", "logreg"):
            pytest.skip("no conv / sequence layer")
        monkeypatch.setattr(ghost, "MATERIALISE_LIMIT_BYTES", 0)
    model, shape, k = _model(name)
    x, y = _batch(shape, k)
    c, expected = 0.7, 20
    ps = _per_sample_grads(model, x, y)
    norms = torch.stack([g.reshape(len(y), -1).norm(dim=1) for g in ps.values()], 1).norm(dim=1)
    w = clipping_rule(rule).weights(norms, c)
    ref = {key: torch.einsum("i,i...->...", w, g) / expected for key, g in ps.items()}
    got, opt = _fast_step_grads(model, x, y, rule, c, expected)
    assert torch.allclose(opt.last_per_sample_norms, norms, rtol=1e-5)
    for key in ref:
        assert torch.allclose(got[key], ref[key], rtol=1e-4, atol=1e-7), key


@pytest.mark.parametrize("rule", RULES)
def test_clipped_norm_bound_holds(rule):
    model, shape, k = _model("cnn")
    x, y = _batch(shape, k, scale=50.0)  # large inputs: most gradients far above C
    c = 0.3
    _, opt = _fast_step_grads(model, x, y, rule, c, 24)
    n, w = opt.last_per_sample_norms, opt.last_weights
    assert n is not None and w is not None and len(n) == len(y)
    assert float(n.max()) > c  # the bound is actually exercised
    assert bool(torch.all(n.double() * w.double() < c))  # strictly below C, in floating point too


# ---- noise and the whole step against Opacus ---------------------------------------------
def _opacus_pair(model: nn.Module, rule: str, sigma: float, c: float, expected: int, seed: int, lr: float):
    gsm = GradSampleModule(model)
    opt = PerSampleWeightDPOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                     noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected,
                                     random_source=SeededRandom(seed), clipping=clipping_rule(rule))
    return gsm, opt


def _fast_pair(model: nn.Module, rule: str, sigma: float, c: float, expected: int, seed: int, lr: float):
    return make_ghost_private(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                              noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected,
                              clipping=clipping_rule(rule), random_source=SeededRandom(seed))


@pytest.mark.parametrize("name", ["mlp", "logreg", "cnn"])
@pytest.mark.parametrize("rule", RULES)
def test_noisy_updates_equal_opacus_with_same_generator(name, rule):
    model, shape, k = _model(name)
    m_op, m_fast = copy.deepcopy(model), copy.deepcopy(model)
    mod_op, opt_op = _opacus_pair(m_op, rule, 1.3, 0.8, 16, seed=5, lr=0.1)
    mod_fast, opt_fast = _fast_pair(m_fast, rule, 1.3, 0.8, 16, seed=5, lr=0.1)
    for step in range(3):
        x, y = _batch(shape, k, n=12 + 3 * step, seed=10 + step)  # Poisson-like varying batch size
        for mod, opt in ((mod_op, opt_op), (mod_fast, opt_fast)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(mod(x), y).backward()
            opt.step()
        for (key, p), q in zip(m_op.named_parameters(), m_fast.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (step, key, (p - q).abs().max())
    assert not torch.allclose(next(model.parameters()), next(m_fast.parameters()))  # it did train


def test_both_engines_draw_secure_noise_by_default_and_equal_noise_from_one_seeded_source():
    model, shape, k = _model("mlp")
    m_op, m_fast = copy.deepcopy(model), copy.deepcopy(model)
    gsm = GradSampleModule(m_op)
    opt_op = PerSampleWeightDPOptimizer(torch.optim.SGD(m_op.parameters(), lr=0.1), noise_multiplier=0.9,
                                        max_grad_norm=1.0, expected_batch_size=16, clipping=clipping_rule("flat"))
    gm = GhostGradModule(m_fast)
    opt_fast = GhostDPOptimizer(torch.optim.SGD(m_fast.parameters(), lr=0.1), gm, noise_multiplier=0.9,
                                max_grad_norm=1.0, expected_batch_size=16, clipping=clipping_rule("flat"))
    assert opt_op.random_source.kind == opt_fast.random_source.kind == "secure"
    x, y = _batch(shape, k, n=16)
    for mod, opt in ((gsm, opt_op), (gm, opt_fast)):
        opt.zero_grad()
        nn.functional.cross_entropy(mod(x), y).backward()
        opt.step()
    # two independent secure streams: the updates differ by about the noise, not by rounding
    diff = max(float((p - q).abs().max()) for p, q in zip(m_op.parameters(), m_fast.parameters()))
    assert diff > 1e-3
    with pytest.raises(ValueError, match="random_source"):
        PerSampleWeightDPOptimizer(torch.optim.SGD(m_op.parameters(), lr=0.1), noise_multiplier=0.9,
                                   max_grad_norm=1.0, expected_batch_size=16, generator=torch.Generator())


class _Boom(nn.Module):
    """Fails on demand after the first layer has recorded its activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise ValueError("boom")
        return x


def test_failed_forward_leaves_nothing_recorded():
    boom = _Boom()
    model = nn.Sequential(nn.Linear(3, 4), boom, nn.Linear(4, 2))
    gm, opt = _fast_pair(model, "flat", 1.0, 1.0, 8, 0, 0.1)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="boom"):
        gm(x)
    assert all(la.record.activation is None for la in gm.layers)
    assert all(p.requires_grad for p in model.parameters())
    boom.fail = False
    nn.functional.cross_entropy(gm(x), y).backward()  # no "ran twice" error
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_noise_std_is_sigma_c_over_expected_batch():
    """An empty step's gradient is pure noise: std σ·C/E[B], mean 0."""
    model = nn.Linear(200, 100)
    sigma, c, expected = 1.7, 0.9, 8
    gm, opt = make_ghost_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma,
                                 max_grad_norm=c, expected_batch_size=expected,
                                 random_source=SeededRandom(3))
    opt.zero_grad()
    opt.step()  # no forward: an empty Poisson batch
    g = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    target = sigma * c / expected
    n = g.numel()
    assert abs(float(g.std()) / target - 1) < 5 / math.sqrt(2 * n)  # 5 standard errors of a std estimate
    assert abs(float(g.mean())) < 5 * target / math.sqrt(n)


# ---- empty Poisson batches ------------------------------------------------------------------
@pytest.mark.parametrize("forward", [False, True])
def test_empty_batch_is_a_noise_only_step_like_opacus(forward):
    model, shape, k = _model("cnn")
    m_op, m_fast = copy.deepcopy(model), copy.deepcopy(model)
    mod_op, opt_op = _opacus_pair(m_op, "psac", 1.0, 1.0, 8, seed=9, lr=0.5)
    mod_fast, opt_fast = _fast_pair(m_fast, "psac", 1.0, 1.0, 8, seed=9, lr=0.5)
    x, y = torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long)
    # Opacus needs the (empty) forward/backward to build its zero-size grad samples
    opt_op.zero_grad()
    nn.functional.cross_entropy(mod_op(x), y, reduction="sum").backward()
    opt_op.step()
    opt_fast.zero_grad()
    if forward:
        nn.functional.cross_entropy(mod_fast(x), y, reduction="sum").backward()
    opt_fast.step()
    assert opt_fast.last_weights is not None and opt_fast.last_weights.numel() == 0
    for p, q, p0 in zip(m_op.parameters(), m_fast.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(q, p0)  # noise moved it


def test_dpclient_fast_engine_equals_opacus_engine():
    """Same seeds → same Poisson batches and noise → the same model after 6 DP steps."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 30)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    out = {}
    for engine in ("opacus", "fast"):
        cfg = DPConfig(noise_multiplier=1.1, batch_size=32, sample_rate=32 / 300, clipping="autos", engine=engine,
                       momentum=0.5)
        client = DPClient(build_model("mlp", (30,), 2, seed=4), (x, y), None, cfg, seed=2, device="cpu")
        client.train_steps(6)
        out[engine] = client.get_parameters({})
    for a, b in zip(out["opacus"], out["fast"]):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dpclient_fast_engine_survives_empty_poisson_batches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 30)).astype("float32")
    y = (x[:, 1] > 0).astype("int64")
    cfg = DPConfig(noise_multiplier=1.0, batch_size=1, sample_rate=1 / 200, engine="fast")  # most batches empty
    client = DPClient(build_model("mlp", (30,), 2, seed=0), (x, y), None, cfg, seed=0, device="cpu")
    before = client.get_parameters({})
    stats = client.train_steps(50)
    assert stats["steps"] == 50
    assert any(not np.array_equal(a, b) for a, b in zip(before, client.get_parameters({})))


def test_dpconfig_rejects_unknown_engine():
    x = np.zeros((10, 30), "float32")
    y = np.zeros(10, "int64")
    with pytest.raises(ConfigError, match="engine"):
        DPClient(build_model("mlp", (30,), 2), (x, y), None,
                 DPConfig(noise_multiplier=1.0, sample_rate=0.1, engine="turbo"))


# ---- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,what", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), "BatchNorm2d"),
    (nn.Sequential(nn.Conv1d(2, 4, 3)), "Conv1d"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "grouped"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding="same")), "padding"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")), "padding"),
    (nn.Sequential(nn.Embedding(10, 3)), "Embedding"),
])
def test_unsupported_layers_are_refused_at_construction(model, what):
    with pytest.raises(ConfigError, match=what):
        GhostGradModule(model)


def test_root_parameter_is_refused():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.s = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.s

    with pytest.raises(ConfigError, match="<root>"):
        GhostGradModule(Scale())


def test_frozen_layers_are_ignored_but_optimizer_must_match():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    gm = GhostGradModule(model)  # frozen BatchNorm holds no trainable parameter: accepted
    assert len(gm.trainable) == 2
    with pytest.raises(ConfigError, match="exactly the model's trainable"):
        GhostDPOptimizer(torch.optim.SGD([model[1].weight], lr=0.1), gm,
                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_reused_layer_and_double_forward_raise():
    lin = nn.Linear(3, 3)
    gm = GhostGradModule(nn.Sequential(lin, nn.Tanh(), lin))
    with pytest.raises(RuntimeError, match="ran twice"):
        gm(torch.randn(4, 3))
    model, shape, k = _model("mlp")
    gm, opt = _fast_pair(model, "flat", 1.0, 1.0, 8, 0, 0.1)
    x, y = _batch(shape, k)
    gm(x)
    with pytest.raises(RuntimeError, match="second forward"):
        gm(x)
    opt.zero_grad()
    gm(x)
    with pytest.raises(RuntimeError, match="no loss.backward"):
        opt.step()


def test_model_is_untouched_outside_the_wrapper():
    model, shape, k = _model("cnn")
    gm, opt = _fast_pair(model, "flat", 1.0, 1.0, 8, 0, 0.1)
    x, y = _batch(shape, k)
    with torch.no_grad():
        gm(x)
    model(x)  # direct use (e.g. evaluation) records nothing
    assert gm.batch_size is None and all(la.record.activation is None for la in gm.layers)
    opt.zero_grad()
    nn.functional.cross_entropy(gm(x), y).backward()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # autograd skipped the non-private grads
    opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert all(la.record.activation is None for la in gm.layers)  # step frees what it recorded


# ---- the default engine ("auto") against Opacus on every supported model --------------------
class _GNBlock(nn.Module):
    """A GroupNorm ResNet basic block with a projection shortcut (as benchmarks/dp_step.py's resnet)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(2, cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x))))) + self.short(x))


class TinyResNetGN(nn.Module):
    """A small GroupNorm ResNet on 3×8×8 inputs: stem, two blocks (stride 1 and 2), pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.GroupNorm(2, 4), nn.ReLU())
        self.blocks = nn.Sequential(_GNBlock(4, 4, 1), _GNBlock(4, 8, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _supported_model(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "resnet":
        torch.manual_seed(0)
        return TinyResNetGN(), (3, 8, 8), 3
    return _model(name)


@pytest.mark.parametrize("name", ["mlp", "logreg", "cnn", "seq", "oddconv", "resnet"])
def test_default_engine_updates_equal_opacus_for_the_same_noise_stream(name):
    """privfl.PrivacyEngine with nothing but σ, C, q (engine "auto") picks the fast engine, and with the
    same seeds (Poisson batches and noise) its model equals Opacus's after three steps, on every model
    the fast engine supports."""
    model, shape, k = _supported_model(name)
    x, y = _batch(shape, k, n=48, seed=2)
    out: dict[str, list[torch.Tensor]] = {}
    for engine in ("default", "opacus"):
        m = copy.deepcopy(model)
        pe = privfl.PrivacyEngine(seed=11)
        kwargs = {} if engine == "default" else {"engine": "opacus"}
        dm, dopt, loader = pe.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.2),
                                           data_loader=DataLoader(TensorDataset(x, y), batch_size=12),
                                           noise_multiplier=1.2, max_grad_norm=0.7, sample_rate=0.25, **kwargs)
        assert pe.engine_kind == ("fast" if engine == "default" else "opacus")
        for step, (xb, yb) in enumerate(loader):
            if step == 3:
                break
            dopt.zero_grad()
            nn.functional.cross_entropy(dm(xb), yb).backward()
            dopt.step()
        out[engine] = [p.detach().clone() for p in m.parameters()]
    for (key, _), a, b in zip(model.named_parameters(), out["default"], out["opacus"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, key, (a - b).abs().max())
    assert any(not torch.allclose(a, p0) for a, p0 in zip(out["default"], model.parameters()))  # it trained
