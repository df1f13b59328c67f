"""privfl.PrivacyEngine on a user's own PyTorch loop: same update as DPClient, ε as dp-accounting,
fail-closed budget, public sampling rate, layer validation, engine choice, secure noise by default."""

from __future__ import annotations

import copy
import logging
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import privfl
from privfl.accounting import BudgetExhausted, PrivacyAccountant
from privfl.clients import DPClient, DPConfig
from privfl.errors import ConfigError

N, D, K = 300, 12, 3
BATCH = 32
Q = BATCH / N  # the test declares q: a public number, as a site's config does
SIGMA, C, LR, MOMENTUM = 1.1, 1.0, 0.5, 0.5


class UserNet(nn.Module):
    """A user's own model (not one of privfl's)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(D, 16)
        self.out = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype("float32")
    y = (np.argmax(x[:, :K], axis=1)).astype("int64")
    return x, y


def _user_setup(model: nn.Module | None = None) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    x, y = _data()
    torch.manual_seed(0)
    model = model if model is not None else UserNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=BATCH, shuffle=True)
    return model, opt, loader


def _user_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The user's own loss function."""
    return F.nll_loss(F.log_softmax(out, dim=1), y)


def _user_train(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, steps: int) -> int:
    """A plain PyTorch loop, as a user writes it; returns the steps it took."""
    done = 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            _user_loss(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return done


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _ in range(steps):
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return float(acc.get_epsilon(delta))


# ---- the same update as DPClient -------------------------------------------------------------
@pytest.mark.parametrize("engine", ["opacus", "fast"])
def test_user_loop_gives_the_same_update_as_dpclient(engine: str) -> None:
    x, y = _data()
    torch.manual_seed(0)
    start = UserNet()
    steps = 12  # past the end of one Poisson "epoch" (round(1/q) = 9 batches)

    cfg = DPConfig(noise_multiplier=SIGMA, max_grad_norm=C, clipping="psac", batch_size=BATCH, sample_rate=Q,
                   lr=LR, momentum=MOMENTUM, target_epsilon=50.0, engine=engine)
    events: list[dict] = []
    client = DPClient(copy.deepcopy(start), (x, y), None, cfg, seed=3, device="cpu", on_dp_event=events.append)
    client.train_steps(steps)

    model, opt, loader = _user_setup(copy.deepcopy(start))
    mine: list[dict] = []
    pe = privfl.PrivacyEngine(seed=3, on_dp_event=mine.append)
    dp_model, dp_opt, dp_loader = pe.make_private(module=model, optimizer=opt, data_loader=loader,
                                                  noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=Q,
                                                  engine=engine, target_epsilon=50.0, delta=1e-5)
    assert pe.engine_kind == engine and pe.random_kind == "seeded"
    assert _user_train(dp_model, dp_opt, dp_loader, steps) == steps

    for (name, a), b in zip(model.state_dict().items(), client.get_parameters({})):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(), start.parameters()))  # it trained
    # the same accounting: one event per step here, one reservation there; the same fields
    assert pe.accountant.events == client.accountant.events
    assert pe.get_epsilon(1e-5) == pytest.approx(client.epsilon, rel=1e-12)
    assert [e["steps"] for e in mine] == [1] * steps and sum(e["steps"] for e in events) == steps
    assert set(mine[0]) == set(events[0])
    for key in ("purpose", "mechanism", "noise_multiplier", "sample_rate", "neighboring_relation", "accountant",
                "delta", "randomness", "local_mechanism", "clipping", "max_grad_norm", "sensitivity"):
        assert mine[0][key] == events[0][key], key


# ---- ε as dp-accounting ------------------------------------------------------------------------
def test_epsilon_equals_dp_accounting_computed_independently() -> None:
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(seed=0)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q)
    _user_train(m, o, dl, 20)
    assert pe.steps == pe.accountant.steps == 20
    for delta in (1e-5, 1e-3):
        assert pe.get_epsilon(delta) == pytest.approx(_rdp_epsilon(Q, SIGMA, 20, delta), rel=1e-9)


def test_pld_epsilon_equals_dp_accounting_pld() -> None:
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine("pld", seed=0)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q)
    _user_train(m, o, dl, 10)
    acc = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                        value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), 10)
    assert pe.accountant.method == "pld"
    assert pe.get_epsilon(1e-5) == pytest.approx(float(acc.get_epsilon(1e-5)), rel=1e-3)


# ---- the budget guard fails closed ------------------------------------------------------------
def test_budget_guard_stops_the_loop_before_the_step_that_would_exceed() -> None:
    model, opt, loader = _user_setup()
    events: list[dict] = []
    pe = privfl.PrivacyEngine(seed=1, on_dp_event=events.append)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q, target_epsilon=4.0, delta=1e-5)
    taken = 0
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        for _ in range(100):
            for xb, yb in dl:
                o.zero_grad()
                _user_loss(m(xb), yb).backward()
                before = [p.detach().clone() for p in model.parameters()]
                o.step()
                taken += 1
    # the refused step did not run: the model is as before it, and nothing was accounted for it
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert 0 < taken == pe.steps == pe.accountant.steps == len(events)
    assert pe.get_epsilon(1e-5) <= 4.0 < _rdp_epsilon(Q, SIGMA, taken + 1, 1e-5)
    assert pe.get_epsilon(1e-5) == pytest.approx(_rdp_epsilon(Q, SIGMA, taken, 1e-5), rel=1e-9)


def test_a_refusing_event_hook_stops_the_step_write_ahead() -> None:
    """The hook (a node's ledger) sees each step before it runs; if it raises, the step never runs."""
    def refuse(event: dict) -> None:
        raise OSError("ledger is read-only")

    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(seed=0, on_dp_event=refuse)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q)
    xb, yb = next(iter(dl))
    _user_loss(m(xb), yb).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OSError, match="read-only"):
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert pe.accountant.steps == 1  # accounted before it would have run: over-counted, never under


def test_reserve_accounts_several_steps_in_one_event() -> None:
    model, opt, loader = _user_setup()
    events: list[dict] = []
    pe = privfl.PrivacyEngine(seed=0, on_dp_event=events.append)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q, target_epsilon=5.0, delta=1e-5)
    pe.reserve(5)
    _user_train(m, o, dl, 6)
    assert [e["steps"] for e in events] == [5, 1] and pe.accountant.steps == pe.steps == 6
    assert events[0]["epsilon"] == pytest.approx(_rdp_epsilon(Q, SIGMA, 5, 1e-5), rel=1e-9)
    with pytest.raises(BudgetExhausted):
        pe.reserve(10**6)
    assert pe.accountant.steps == 6


# ---- refusals ----------------------------------------------------------------------------------
def test_make_private_refuses_a_missing_sample_rate() -> None:
    for kwargs in ({}, {"expected_batch_size": 32}, {"declared_size": 300}):
        model, opt, loader = _user_setup()
        with pytest.raises(ConfigError, match="sample_rate.*never derives it from the private"):
            privfl.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                noise_multiplier=SIGMA, max_grad_norm=C, **kwargs)


def test_expected_batch_size_with_declared_size_gives_the_public_rate() -> None:
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(seed=0)
    pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C,
                    expected_batch_size=20, declared_size=400)  # the site holds 300 records: never used
    assert pe.sample_rate == 20 / 400 and pe.expected_batch_size == 20


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _Block()
        self.fc = nn.Linear(4, 2)


def test_make_private_refuses_batchnorm_naming_the_layer() -> None:
    model = _BNNet()
    _, _, loader = _user_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"BatchNorm2d at layer1\.bn.*GroupNorm.*ModuleValidator\.fix"):
        privfl.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=Q)


class _EmbedNet(nn.Module):
    """An Embedding layer: Opacus has per-sample gradients for it, the fast engine does not."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(dim=1))


def _embed_setup() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(0)
    model = _EmbedNet()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (200, 5), generator=g)
    y = (x[:, 0] > 4).long()
    return model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=20)


def test_fast_engine_refuses_an_unsupported_layer_naming_it() -> None:
    model, opt, loader = _embed_setup()
    with pytest.raises(ConfigError, match=r"engine='fast'.*'emb' \(Embedding\)"):
        privfl.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=0.1,
                                            engine="fast")


def test_auto_engine_falls_back_to_opacus_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    model, opt, loader = _embed_setup()
    pe = privfl.PrivacyEngine(seed=0)
    with caplog.at_level(logging.INFO, logger="privfl.clients"):
        m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                                   max_grad_norm=C, sample_rate=0.1)
    lines = [r.getMessage() for r in caplog.records if "falling back to Opacus" in r.getMessage()]
    assert len(lines) == 1 and "'emb' (Embedding)" in lines[0]
    assert pe.engine_kind == "opacus"
    before = copy.deepcopy(model.state_dict())
    for xb, yb in dl:
        o.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
        o.step()
    assert pe.steps == len(dl) == 10
    assert not torch.equal(before["emb.weight"], model.emb.weight)
    # a model the fast engine supports gets it
    model2, opt2, loader2 = _user_setup()
    pe2 = privfl.PrivacyEngine()
    pe2.make_private(module=model2, optimizer=opt2, data_loader=loader2, noise_multiplier=SIGMA,
                     max_grad_norm=C, sample_rate=Q)
    assert pe2.engine_kind == "fast"


def test_other_refusals_name_the_field() -> None:
    cases = [({"clipping": "abadi"}, "clipping"), ({"engine": "turbo"}, "engine"),
             ({"poisson_sampling": False}, "poisson_sampling"), ({"target_epsilon": 3.0}, "delta"),
             ({"noise_multiplier": 0.0}, "noise_multiplier"), ({"sample_rate": 1.5}, "sample_rate"),
             ({"delta": 0.01, "declared_size": 300, "sample_rate": None, "expected_batch_size": 32}, "delta")]
    for extra, field in cases:
        model, opt, loader = _user_setup()
        kwargs = {"noise_multiplier": SIGMA, "max_grad_norm": C, "sample_rate": Q, **extra}
        with pytest.raises(ConfigError, match=field):
            privfl.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, **kwargs)
    with pytest.raises(ConfigError, match="accountant"):
        privfl.PrivacyEngine("moments")


# ---- randomness --------------------------------------------------------------------------------
def test_secure_randomness_by_default_and_two_engines_draw_different_noise() -> None:
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model, opt, loader = _user_setup(UserNet())
        pe = privfl.PrivacyEngine()
        assert pe.random_kind == "secure"
        m, o, _ = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                                  max_grad_norm=C, sample_rate=Q)
        assert pe.noise_source is not None and pe.noise_source.kind == "secure"
        assert pe.state_dict()["noise_rng"] == {} and pe.state_dict()["sampling_rng"] == {}
        x, y = _data()
        o.zero_grad()  # one step on the same fixed batch: only the noise can differ
        _user_loss(m(torch.from_numpy(x[:32])), torch.from_numpy(y[:32])).backward()
        o.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    noise_std = LR * SIGMA * C / BATCH
    assert float((finals[0] - finals[1]).std()) > 0.5 * noise_std  # about √2 × the noise, not rounding


def test_two_seeded_engines_agree_and_state_dict_continues_the_stream() -> None:
    def run(seed: int, steps: int, state: dict | None = None) -> tuple[privfl.PrivacyEngine, list[torch.Tensor]]:
        torch.manual_seed(0)
        model, opt, loader = _user_setup(UserNet())
        pe = privfl.PrivacyEngine(seed=seed)
        m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                                   max_grad_norm=C, sample_rate=Q)
        if state is not None:
            pe.load_state_dict(state)
        _user_train(m, o, dl, steps)
        return pe, [p.detach().clone() for p in model.parameters()]

    a, pa = run(5, 4)
    _, pb = run(5, 4)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    restored, _ = run(5, 0, a.state_dict())
    assert restored.accountant.steps == 4 and restored.steps == 4
    assert restored.get_epsilon(1e-5) == pytest.approx(a.get_epsilon(1e-5))


# ---- calibration -------------------------------------------------------------------------------
def test_make_private_with_epsilon_reaches_the_target_after_its_planned_steps() -> None:
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(seed=0)
    m, o, dl = pe.make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader, target_epsilon=2.0,
                                            target_delta=1e-5, epochs=3, max_grad_norm=C, sample_rate=0.05)
    assert pe.planned_steps == 60 and pe.noise_multiplier is not None
    assert len(dl) == 20  # an epoch is 1/q Poisson batches
    _user_train(m, o, dl, 60)
    eps = pe.get_epsilon(1e-5)
    assert 0.98 * 2.0 < eps <= 2.0
    assert eps == pytest.approx(_rdp_epsilon(0.05, pe.noise_multiplier, 60, 1e-5), rel=1e-9)
    with pytest.raises(BudgetExhausted):  # the plan is spent: the next step fails closed
        _user_train(m, o, dl, 1)
    assert pe.accountant.steps == 60


def test_make_private_with_epsilon_counts_what_the_accountant_already_spent() -> None:
    acc = PrivacyAccountant("rdp")
    acc.step(5.0, 1.0, 1)  # e.g. a DP preprocessing estimate already in the ledger
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(acc, seed=0)
    m, o, dl = pe.make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader, target_epsilon=2.0,
                                            target_delta=1e-5, steps=30, max_grad_norm=C, sample_rate=0.05)
    _user_train(m, o, dl, 30)
    assert pe.get_epsilon(1e-5) <= 2.0 and pe.accountant is acc and acc.steps == 31
    with pytest.raises(ConfigError, match="epochs or steps"):
        privfl.PrivacyEngine().make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader,
                                                         target_epsilon=2.0, target_delta=1e-5, max_grad_norm=C,
                                                         sample_rate=0.05)


def test_empty_poisson_batches_are_noise_only_steps_in_a_user_loop() -> None:
    model, opt, loader = _user_setup()
    pe = privfl.PrivacyEngine(seed=0)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=1 / N, engine="opacus")  # about 1/e of batches empty
    sizes = []
    for i, (xb, yb) in enumerate(dl):
        if i == 12:
            break
        sizes.append(len(yb))
        o.zero_grad()
        F.cross_entropy(m(xb), yb, reduction="sum").backward()
        o.step()
    assert 0 in sizes and pe.steps == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_privfl_exports_the_engine_lazily() -> None:
    from privfl.clients import PrivacyEngine
    from privfl.clients.engine import PrivacyEngine as Direct

    assert privfl.PrivacyEngine is PrivacyEngine is Direct
    assert "PrivacyEngine" in dir(privfl)
    assert math.isfinite(privfl.PrivacyEngine().get_epsilon(1e-5))


# ---- DPClient on the engine, with torch Datasets ------------------------------------------------
class _FromDisk(torch.utils.data.Dataset):
    """A user's Dataset (as a data factory reading files would give): (input, label) per record."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.x[i]), int(self.y[i])


@pytest.mark.parametrize("engine", ["opacus", "fast"])
def test_dpclient_takes_torch_datasets_and_trains_as_with_arrays(engine: str) -> None:
    x, y = _data()
    torch.manual_seed(0)
    start = UserNet()
    cfg = DPConfig(noise_multiplier=SIGMA, batch_size=BATCH, sample_rate=Q, lr=LR, target_epsilon=50.0,
                   engine=engine)
    arrays = DPClient(copy.deepcopy(start), (x, y), (x[:50], y[:50]), cfg, seed=4, device="cpu")
    ds = DPClient(copy.deepcopy(start), _FromDisk(x, y), _FromDisk(x[:50], y[:50]), cfg, seed=4, device="cpu")
    assert isinstance(ds.privacy_engine, privfl.PrivacyEngine) and ds.privacy_engine.accountant is ds.accountant
    p0 = arrays.get_parameters({})
    pa, _, ma = arrays.fit(p0, {"local_steps": 7})
    pd, _, md = ds.fit(p0, {"local_steps": 7})
    for a, b in zip(pa, pd):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert ma == md
    la, aa = arrays.evaluate_local()
    ld, ad = ds.evaluate_local()
    assert la == pytest.approx(ld, rel=1e-6) and aa == ad
    # non-private training takes a Dataset too
    off = DPClient(copy.deepcopy(start), _FromDisk(x, y), None, DPConfig(enabled=False, batch_size=BATCH), seed=0,
                   device="cpu")
    assert off.fit(p0, {"local_steps": 2})[2]["dp"] == 0


def test_dpclient_refuses_batchnorm_naming_the_layer_and_the_config_field() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Linear(8, K))
    cfg = DPConfig(noise_multiplier=SIGMA, batch_size=BATCH, sample_rate=Q)
    with pytest.raises(ConfigError, match=r"^model: BatchNorm1d at 1 is not DP-compatible: replace with GroupNorm"):
        DPClient(model, (x, y), None, cfg, device="cpu")
    with pytest.raises(ConfigError, match=r"^dp.clipping: unknown rule 'abadi'"):
        DPClient(UserNet(), (x, y), None, DPConfig(noise_multiplier=SIGMA, sample_rate=Q, clipping="abadi"),
                 device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_user_loop_on_cuda_gives_the_same_update_as_dpclient_on_cuda() -> None:
    x, y = _data()
    torch.manual_seed(0)
    start = UserNet()
    cfg = DPConfig(noise_multiplier=SIGMA, batch_size=BATCH, sample_rate=Q, lr=LR, momentum=MOMENTUM,
                   target_epsilon=50.0, engine="fast")
    client = DPClient(copy.deepcopy(start), (x, y), None, cfg, seed=3, device="cuda")
    client.train_steps(6)
    model, opt, loader = _user_setup(copy.deepcopy(start).cuda())
    pe = privfl.PrivacyEngine(seed=3)
    m, o, dl = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                               max_grad_norm=C, sample_rate=Q, engine="fast")
    assert pe.noise_source is not None and pe.noise_source.device.type == "cuda"  # type: ignore[attr-defined]
    done = 0
    for xb, yb in dl:
        o.zero_grad()
        _user_loss(m(xb.cuda()), yb.cuda()).backward()
        o.step()
        done += 1
        if done == 6:
            break
    for a, b in zip(model.state_dict().values(), client.get_parameters({})):
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-4, atol=1e-5)
