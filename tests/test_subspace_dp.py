"""Subspace DP-SGD: compression chosen before the noise, on a public random coordinate mask.

Each DP step is restricted to a mask drawn from a public seed and the step index; per-sample
gradients are clipped to C inside it, N(0, σ²C²) is added on its k coordinates only, and the
wire carries only those k values. Checked: zero outside the mask, the noise std on kept
coordinates (σ·C/E[B], as dense), sensitivity C (the same accountant event as dense), the
mask is a function of public values only, and ~4k bytes on the wire.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfl.accounting.subspace import subspace_indices, subspace_k, subspace_mask
from privfl.clients.engine import PrivacyEngine
from privfl.clients.subspace import SubspaceDPOptimizer
from privfl.config import DPSection
from privfl.errors import ConfigError
from privfl.strategies.compression import released
from privfl.strategies.compression.params import build_compressor, sync_compression_params
from privfl.strategies.compression.subspace import SubspaceK, round_indices
from privfl.strategies.gossip import SyncGossip

pytestmark = pytest.mark.timeout(60)

SUB = {"fraction": 0.1, "seed": 3}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def _private(mechanism: str = "subspace", params: dict[str, Any] | None = None, data_seed: int = 0,
             sigma: float = 1.0, c: float = 1.0, q: float = 0.2, n: int = 200, seed: int = 1,
             scale: float = 1.0) -> tuple[PrivacyEngine, nn.Module, Any, DataLoader, list[dict[str, Any]]]:
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(n, 20, generator=g) * scale, torch.randint(0, 3, (n,), generator=g)
    m = _model()
    eng = PrivacyEngine(seed=seed)
    events: list[dict[str, Any]] = []
    eng.on_dp_event = events.append
    dm, opt, dl = eng.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                   data_loader=DataLoader(TensorDataset(x, y), batch_size=20),
                                   noise_multiplier=sigma, max_grad_norm=c, sample_rate=q, clipping="flat",
                                   engine="auto", mechanism=mechanism,
                                   mechanism_params=dict(SUB if params is None else params))
    return eng, dm, opt, dl, events


def _step(dm: nn.Module, opt: Any, dl: DataLoader, zero_loss: bool = False) -> None:
    xb, yb = next(iter(dl))
    opt.zero_grad(set_to_none=True)
    out = dm(xb)
    loss = out.sum() * 0.0 if zero_loss or not len(yb) else nn.functional.cross_entropy(out, yb)
    loss.backward()
    opt.step()


def _flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_update_is_zero_outside_the_mask() -> None:
    eng, dm, opt, dl, _ = _private()
    assert isinstance(opt, SubspaceDPOptimizer) and eng.engine_kind == "opacus"
    eng.reserve(3)
    params = list(dm.parameters())
    for step in range(3):
        before = _flat(params).clone()
        idx = subspace_indices(3, step, opt.dimension, 0.1)
        _step(dm, opt, dl)
        moved = (_flat(params) - before).numpy()
        outside = np.ones(opt.dimension, dtype=bool)
        outside[idx] = False
        assert np.all(moved[outside] == 0.0)
        assert np.count_nonzero(moved[idx]) == len(idx) == subspace_k(opt.dimension, 0.1)


def test_noise_std_on_kept_coordinates_is_sigma_c_over_expected_batch() -> None:
    sigma, c, q, n = 1.3, 0.7, 0.2, 200
    eng, dm, opt, dl, _ = _private(sigma=sigma, c=c, q=q, n=n, params={"fraction": 0.5, "seed": 5})
    steps = 80
    eng.reserve(steps)
    kept, outside = [], []
    for step in range(steps):
        _step(dm, opt, dl, zero_loss=True)  # zero gradients: p.grad is the noise / E[B]
        g = _flat(p.grad for p in dm.parameters()).numpy()
        idx = subspace_indices(5, step, opt.dimension, 0.5)
        mask = np.zeros(opt.dimension, dtype=bool)
        mask[idx] = True
        kept.append(g[mask])
        outside.append(g[~mask])
    values = np.concatenate(kept)
    assert eng.expected_batch_size == 20  # the public divisor E[B]: the loader's batch size here
    expected = sigma * c / eng.expected_batch_size
    assert len(values) > 10_000
    assert abs(values.std() / expected - 1) < 0.03
    assert abs(values.mean()) < 4 * expected / np.sqrt(len(values))
    assert np.all(np.concatenate(outside) == 0.0)


def test_clipped_contribution_inside_the_subspace_has_norm_at_most_c_and_the_dp_event_matches_dense() -> None:
    c = 0.5
    eng, dm, opt, dl, events = _private(c=c, sigma=1.0, scale=50.0)  # large inputs: every gradient is clipped
    eng.reserve(1)
    xb, yb = next(iter(dl))
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(dm(xb), yb).backward()
    # what clip_and_accumulate sees: per-sample gradients restricted to the mask, norms inside it
    full = [p.grad_sample.detach().reshape(len(yb), -1).clone() for p in opt.params]
    opt.clip_and_accumulate()
    restricted = torch.cat([p.grad_sample.reshape(len(yb), -1) for p in opt.params], dim=1)
    idx = torch.from_numpy(subspace_indices(3, 0, opt.dimension, 0.1))
    full_flat = torch.cat(full, dim=1)
    assert torch.allclose(restricted[:, idx], full_flat[:, idx])
    outside = torch.ones(opt.dimension, dtype=torch.bool)
    outside[idx] = False
    assert torch.all(restricted[:, outside] == 0)
    norms = restricted.norm(dim=1)
    assert torch.allclose(opt.last_per_sample_norms, norms, rtol=1e-5)
    contributions = (opt.last_weights[:, None] * restricted).norm(dim=1)
    assert torch.all(contributions <= c * (1 + 1e-5))
    assert (contributions > c * (1 - 1e-4)).float().mean() > 0.5  # most are clipped: exactly C inside the mask
    # the accountant event is the dense Gaussian one (sensitivity C, same σ and q)
    eng_d, _, _, _, events_d = _private(mechanism="gaussian", params={}, c=c, sigma=1.0)
    eng_d.reserve(1)
    sub, dense = events[-1], events_d[-1]
    for key in ("purpose", "mechanism", "noise_multiplier", "sample_rate", "steps", "neighboring_relation",
                "accountant", "clipping", "max_grad_norm", "sensitivity"):
        assert sub[key] == dense[key], key
    assert sub["sensitivity"] == c and sub["mechanism"] == "poisson_gaussian"
    assert sub["local_mechanism"] == "gaussian_subspace"
    assert sub["mechanism_params"] == {"fraction": 0.1, "period": 1, "seed": 3}
    assert eng.accountant.get_epsilon(1e-5) == eng_d.accountant.get_epsilon(1e-5)


def _released_sum(x: torch.Tensor, y: torch.Tensor, fraction: float, step: int, c: float,
                  whole: int = 0) -> tuple[np.ndarray, Any]:
    """One subspace DP step on the batch (x, y) at mask ``step``: the noised sum Σ clip(g_i|M) + N (times E[B]);
    ``whole`` > 0: the structured mask (tensors of at most ``whole`` coordinates kept whole)."""
    eng, dm, opt, _, _ = _private(params={"fraction": fraction, "seed": 3, "whole": whole}, c=c, sigma=1.0, seed=11)
    eng.reserve(1)
    opt.steps_taken = step
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(dm(x), y).backward()  # mean: Opacus rescales per-sample gradients by the batch
    opt.pre_step()
    return _flat(p.grad for p in dm.parameters()).numpy() * eng.expected_batch_size, opt


@settings(max_examples=12, deadline=None)
@given(data_seed=st.integers(0, 2**16), n=st.integers(2, 10), drop=st.integers(0, 9),
       fraction=st.sampled_from([0.02, 0.1, 0.5, 1.0]), step=st.integers(0, 1000),
       scale=st.floats(0.01, 100.0), c=st.floats(0.05, 5.0), whole=st.sampled_from([0, 3, 20]))
def test_one_record_changes_the_noised_subspace_sum_by_at_most_c(data_seed: int, n: int, drop: int, fraction: float,
                                                                  step: int, scale: float, c: float,
                                                                  whole: int) -> None:
    """Sensitivity C inside the subspace: neighbouring batches (one record removed), the same noise draw; for the
    random mask and the structured one (whole = 3: the last bias whole; 20: both biases whole)."""
    shapes = [tuple(p.shape) for p in _model().parameters()]
    assume(sum(int(np.prod(t)) for t in shapes if int(np.prod(t)) <= whole) <= subspace_k(387, fraction))
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(n, 20, generator=g) * scale, torch.randint(0, 3, (n,), generator=g)
    keep = [i for i in range(n) if i != drop % n]
    full, opt = _released_sum(x, y, fraction, step, c, whole)
    less, _ = _released_sum(x[keep], y[keep], fraction, step, c, whole)
    diff = full - less
    outside = np.ones(len(diff), dtype=bool)
    outside[subspace_mask(3, step, shapes, fraction, whole)] = False
    if whole == 20:  # both biases are inside the mask
        assert not outside[320:336].any() and not outside[384:387].any()
    assert np.all(full[outside] == 0.0) and np.all(less[outside] == 0.0)  # the same public mask either way
    assert np.linalg.norm(diff) <= c * (1 + 1e-4) + 1e-6


def test_mask_depends_on_the_public_seed_and_step_only() -> None:
    # two nodes with different data (and different noise streams) draw the same masks
    a = _private(data_seed=0, seed=1)
    b = _private(data_seed=99, seed=2, scale=10.0)
    for eng, *_ in (a, b):
        eng.reserve(4)
    for step in range(4):
        ia, ib = a[2].flat_indices(), b[2].flat_indices()
        assert np.array_equal(ia, ib)
        assert np.array_equal(ia, subspace_indices(3, step, a[2].dimension, 0.1))
        _step(*a[1:4])
        _step(*b[1:4])
    assert a[2].steps_taken == b[2].steps_taken == 4
    # it changes with the step and with the seed; period repeats a mask for that many steps
    d = a[2].dimension
    assert not np.array_equal(subspace_indices(3, 0, d, 0.1), subspace_indices(3, 1, d, 0.1))
    assert not np.array_equal(subspace_indices(3, 0, d, 0.1), subspace_indices(4, 0, d, 0.1))
    assert np.array_equal(round_indices(3, 1, d, 0.1, local_steps=2, period=2), subspace_indices(3, 1, d, 0.1))
    # the wire side derives the DP side's mask for each round (local_steps = period = 1)
    comp = SubspaceK(fraction=0.1, public_seed=3)
    for r in range(3):
        assert np.array_equal(comp.indices_for(r, d), subspace_indices(3, r, d, 0.1))


def test_wire_carries_only_the_k_values_of_the_shared_mask() -> None:
    key, kwargs = sync_compression_params({"compressor": "subspace", "fraction": 0.01, "public_seed": 7,
                                           "gamma": 1.0, "shared_init": True})
    assert key == "subspace"
    comps = [build_compressor(key, kwargs, seed=s) for s in (11, 12)]  # per-node seeds do not change the mask
    d = 38_378
    rng = np.random.default_rng(0)
    k = subspace_k(d, 0.01)
    for r in range(3):
        x = rng.normal(size=(d,))
        msgs = [cm.compress(released([x], "dp-sgd model")) for cm in comps]
        assert msgs[0].nbytes == msgs[1].nbytes == 4 * k  # float32 values only: the indices are derived
        assert len(msgs[0].indices) == 0 and msgs[0].kind == "dense" and msgs[0].shapes == ((k,),)
        for msg in msgs:  # both nodes' receivers put the values on the same derived coordinates
            full = comps[1].expand(msg, r, ((d,),))
            assert np.array_equal(full.indices, subspace_indices(7, r, d, 0.01))
            np.testing.assert_array_equal(full.values, x[full.indices].astype(np.float32))
    assert 4 * d / msgs[0].nbytes == pytest.approx(100, rel=0.01)


def test_config_turns_it_on_and_refuses_the_fast_engine_naming_the_field() -> None:
    sec = DPSection(subspace={"fraction": 0.05, "seed": 1}, engine="opacus", sample_rate=0.1)
    sec.validate("dp")
    cfg = sec.to_dp_config()
    assert cfg.mechanism == "subspace" and cfg.mechanism_params == {"fraction": 0.05, "seed": 1}
    with pytest.raises(ConfigError, match=r"^dp\.engine: .*dp\.subspace"):
        DPSection(subspace={"fraction": 0.05, "seed": 1}, engine="fast", sample_rate=0.1).validate("dp")
    with pytest.raises(ConfigError, match=r"dp\.subspace\.seed"):
        DPSection(subspace={"fraction": 0.05}, sample_rate=0.1).validate("dp")
    with pytest.raises(ConfigError, match=r"dp\.subspace\.fraction"):
        DPSection(subspace={"fraction": 2.0, "seed": 1}, sample_rate=0.1).validate("dp")
    with pytest.raises(ConfigError, match="engine: the 'fast' engine does not implement mechanism 'subspace'"):
        _private_fast()


def _private_fast() -> None:
    m = _model()
    PrivacyEngine(seed=0).make_private(
        module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.zeros(10, 20), torch.zeros(10, dtype=torch.long))),
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, engine="fast", mechanism="subspace",
        mechanism_params=SUB)


class _FixedPoint:
    """A client that returns its input unchanged: only the gossip moves models."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        return [np.array(p, copy=True) for p in parameters], 1, {"epsilon": 0.0, "steps": 1, "dp": 1}


def test_sync_gossip_mixes_only_the_shared_mask_and_sends_4k_bytes() -> None:
    import math

    from flwr.client import NumPyClient

    from privfl.sim import LinkSpec, SimWorld
    from privfl.strategies.topology import build_topology

    class Client(_FixedPoint, NumPyClient):
        pass

    ids = [f"n{i}" for i in range(4)]
    topo = build_topology("ring", ids)
    world = SimWorld(ids, {i: topo.neighbors(i) for i in ids}, LinkSpec())
    rng = np.random.default_rng(0)
    models = [[rng.normal(size=(10, 30)).astype(np.float32), rng.normal(size=30).astype(np.float32)] for _ in ids]
    nodes = []
    for i, nid in enumerate(ids):
        s = SyncGossip(Client(), world.network(nid), models[i],
                       {"local_steps": 1, "topology": topo, "compressor": SubspaceK(fraction=0.1, public_seed=7),
                        "gamma": 1.0, "timeout": math.inf})
        world.strategies[nid] = s
        nodes.append(s)
    d, k = 330, subspace_k(330, 0.1)
    for r in range(2):
        before = [np.concatenate([p.ravel() for p in s.params]) for s in nodes]
        sent = [s.begin_round().bytes_sent for s in nodes]
        assert sent == [2 * 4 * k] * 4  # two neighbours, k float32 values each
        for nid, s in zip(ids, nodes):
            s.finish_round(world.network(nid).receive(r, list(s.mixing), math.inf))
        after = [np.concatenate([p.ravel() for p in s.params]) for s in nodes]
        idx = subspace_indices(7, r, d, 0.1)
        off = np.setdiff1d(np.arange(d), idx)
        for i, nid in enumerate(ids):
            assert np.array_equal(after[i][off], before[i][off])  # nothing moves off the mask
            row = topo.mixing_row(nid)
            want = (1 - sum(row.values())) * before[i][idx] + sum(
                w * before[ids.index(j)][idx] for j, w in row.items())
            np.testing.assert_allclose(after[i][idx], want, rtol=1e-5, atol=1e-6)  # D-PSGD on the mask
        total = np.sum(before, axis=0)
        np.testing.assert_allclose(np.sum(after, axis=0), total, rtol=1e-4, atol=1e-4)  # the sum is preserved
        # what a node's transport rebuilds this round's frames with: the mask's per-tensor counts
        shapes = ((10, 30), (30,))
        counts = tuple((int(c),) for c in np.diff(np.searchsorted(idx, [0, 300, 330])))
        assert nodes[0].frame_shapes(r, shapes) == counts and sum(c for (c,) in counts) == k


def test_four_bit_values_reuse_the_quantiser_and_cost_half_a_byte_each() -> None:
    from privfl.strategies.compression.subspace import decode_values, segment_shapes

    shapes = ((100, 30), (30,), (30, 10), (10,))
    d = 3340
    comp = SubspaceK(fraction=0.1, public_seed=7, bits=4)
    x = np.random.default_rng(1).normal(size=d)
    arrays = [x[:3000].reshape(100, 30), x[3000:3030], x[3030:3330].reshape(30, 10), x[3330:]]
    msg = comp.compress(released(arrays, "dp-sgd model"))
    idx = subspace_indices(7, 0, d, 0.1)
    k = len(idx)
    assert msg.kind == "quant4" and msg.nbytes == (4 * k + 7) // 8 + 8 * len(shapes)  # codes + (low, step) each
    assert msg.shapes == segment_shapes(idx, shapes) and sum(s[0] for s in msg.shapes) == k
    got = decode_values(msg, idx, shapes)
    step = (x[idx].max() - x[idx].min()) / 15
    assert np.max(np.abs(got - x[idx])) <= step / 2 + 1e-6
    assert 4 * d / msg.nbytes > 60  # 10% at 4 bits: ≈ 80× fewer bytes than float32, less 8 bytes a tensor


def test_the_subspace_example_resolves_every_run_at_the_dense_runs_noise() -> None:
    from pathlib import Path

    from privfl.experiment import load_experiment, spec_for

    exp = load_experiment(Path(__file__).resolve().parents[1] / "examples" / "digits-compressed" / "subspace.toml")
    dense = spec_for(exp, "dense")
    mechs = set()
    for label in exp.strategies:
        s = spec_for(exp, label)
        s.validate()
        mechs.add(s.dp.mechanism)
        assert s.dp.noise_multiplier == dense.dp.noise_multiplier  # the same σ, q and steps: the same ε
        assert (s.dp.sample_rate, s.dp.planned_steps) == (dense.dp.sample_rate, dense.dp.planned_steps)
        if s.dp.mechanism == "subspace":
            if s.strategy == "fedavg":  # the same mask settings up and down
                kws = [s.strategy_params["compression_params"], s.strategy_params["downlink_params"]]
                assert s.strategy_params["compressor"] == s.strategy_params["downlink_compressor"] == "subspace"
            else:
                key, kw = sync_compression_params(s.strategy_params)
                assert key == "subspace"
                kws = [kw]
            for kw in kws:
                assert (kw["fraction"], kw["public_seed"], kw.get("period", 1)) == (
                    s.dp.mechanism_params["fraction"], s.dp.mechanism_params["seed"],
                    s.dp.mechanism_params.get("period", 1))
    assert mechs == {"gaussian", "subspace"}


def test_a_node_takes_the_subspace_compressor() -> None:
    """Subspace frames are ordinary Compressed frames now (tests/test_subspace_transfer.py sends one over mTLS)."""
    from privfl.strategies.registry import check_strategy

    params = {"compressor": "subspace", "fraction": 0.1, "public_seed": 1}
    for driver in ("simulate", "node"):
        assert check_strategy("sync_gossip", params, driver).name == "sync_gossip"
