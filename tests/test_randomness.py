"""The secure noise source: the law of its Gaussians and coins, noise never served twice, prefetch, fork.

Draws are secure (unseeded), so every statistical bound is set at a false-alarm rate near
1e-6; a broken sampler (wrong scale, a lost summand, a reused vector) misses them by far.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch
from scipy import stats

import privfl.clients.gaussian as gaussian
import privfl.clients.randomness as randomness
from privfl.clients.randomness import SecureRandom
from tests.helpers import run_in_fork

pytestmark = pytest.mark.timeout(60)

#: a two-sided z bound with false-alarm rate ≈ 1e-6
Z = 4.9


def _fixed_key_sources(monkeypatch: pytest.MonkeyPatch, n: int) -> list[SecureRandom]:
    """``n`` secure sources on one and the same key and nonce (to compare two ways of reading one stream)."""
    monkeypatch.setattr(randomness.os, "urandom", lambda k: bytes(range(k)))
    return [SecureRandom(prefetch=False) for _ in range(n)]


def _check_standard_normal(z: np.ndarray) -> None:
    n = z.size
    assert abs(z.mean()) < Z / math.sqrt(n)
    assert abs(z.var() - 1.0) < Z * math.sqrt(2.0 / n)
    d_crit = math.sqrt(-math.log(1e-6 / 2) / (2 * n))  # Kolmogorov–Smirnov at α = 1e-6
    assert stats.kstest(z, "norm").statistic < d_crit
    for t in (2.0, 3.0, 4.0):  # the tails, where a float-precision bug would show first
        p = 2 * stats.norm.sf(t)
        assert abs((np.abs(z) > t).mean() - p) < Z * math.sqrt(p * (1 - p) / n) + 1.0 / n, t


def test_secure_gaussians_are_standard_normal_and_independent():
    z = SecureRandom(prefetch=False)._standard_normal(400_001).numpy()  # odd: the last pair is cut
    assert z.shape == (400_001,) and z.dtype == np.float64
    _check_standard_normal(z)
    # outputs j and h+j of a chunk share their four polar pairs (x parts vs y parts): still uncorrelated
    c = gaussian.CHUNK_VALUES
    assert z.size > 2 * c
    h = c // 2
    chunks = z[: (z.size // c) * c].reshape(-1, c)
    r = np.corrcoef(chunks[:, :h].reshape(-1), chunks[:, h:].reshape(-1))[0, 1]
    assert abs(r) < Z / math.sqrt(chunks[:, :h].size)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < Z / math.sqrt(z.size)
    # the same checks fail for a sampler 2 % off in scale, or one whose values stop at 3σ
    with pytest.raises(AssertionError):
        _check_standard_normal(z * 1.02)
    with pytest.raises(AssertionError):
        _check_standard_normal(z * (np.abs(z) <= 3.0))


def test_polar_pairs_are_the_textbook_formula_on_53_bit_uniforms(monkeypatch):
    """Bit for bit: u = (2k + 1)·2⁻⁵³ from each word's top 53 bits k (signed), s = u² + v² < 1 kept in order,
    x = u·√(−2 ln s / s) — the integer and power-of-two arithmetic of the sampler rounds exactly as this does."""
    a, b = _fixed_key_sources(monkeypatch, 2)
    pairs = 5000
    xs, ys = a._polar_pairs(pairs, gaussian.scratch())
    m = gaussian._candidates(pairs)
    t = (b._words(2 * m).view(np.int64) >> 10) | 1
    u = t.astype(np.float64) * 2.0**-53
    assert np.all(np.abs(u) < 1) and np.all(u != 0) and np.unique(np.abs(t) % 2).tolist() == [1]
    uu, vv = u[:m], u[m:]
    s = uu * uu + vv * vv
    keep = np.flatnonzero(s < 1)[:pairs]
    assert keep.size == pairs  # one batch sufficed for this key
    f = np.sqrt(-2.0 * np.log(s[keep]) / s[keep])
    assert np.array_equal(xs, uu[keep] * f) and np.array_equal(ys, vv[keep] * f)


def test_polar_top_up_draws_fresh_words_and_keeps_the_law(monkeypatch):
    """Batches far too small for their need: every chunk tops up several times, still N(0, 1)."""
    calls: list[int] = []

    def few(need: int) -> int:
        calls.append(need)
        return need // 3 + 1

    monkeypatch.setattr(gaussian, "_candidates", few)
    src = SecureRandom(prefetch=False)
    z = src._standard_normal(60_001).numpy()
    assert len(calls) > 3 * (60_001 // gaussian.CHUNK_VALUES + 1)  # topped up, chunk after chunk
    _check_standard_normal(z)
    assert np.unique(z).size == z.size  # no pair, so no value, reused


def test_rejection_depends_on_the_keystream_alone(monkeypatch):
    """Same key: σ only scales the values; the keystream used (so the rejections and timing) is the same."""
    a, b = _fixed_key_sources(monkeypatch, 2)
    n = 3 * gaussian.CHUNK_VALUES + 5
    za = a._standard_normal(n, 1.0)
    zb = b._standard_normal(n, 2.5)
    assert torch.allclose(zb, 2.5 * za, rtol=1e-15, atol=0)
    assert a._words(4).tobytes() == b._words(4).tobytes()  # both stopped at the same keystream position
    assert torch.equal(a._standard_normal(n, 1.0, torch.float32), b._standard_normal(n, 1.0).float())


@pytest.fixture
def spare_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where torch leaves a CPU free (the prefetch thread runs)."""
    monkeypatch.setattr(randomness, "_spare_cpu", lambda: True)


@pytest.mark.parametrize("prefetch", [False, True])
def test_normal_like_each_scales_and_never_serves_one_vector_twice(prefetch, spare_cpu):
    src = SecureRandom(prefetch=prefetch)
    refs = [torch.zeros(150, 200), torch.zeros(7), torch.zeros(3, 3)]  # 30,016 values: batches of 2 vectors
    assert sum(r.numel() for r in refs) < SecureRandom.PREFETCH_BATCH_VALUES <= 2 * sum(r.numel() for r in refs)
    std = 0.37
    draws = [torch.cat([t.reshape(-1) for t in src.normal_like_each(std, refs)]) for _ in range(6)]
    assert bool(src._ahead) == prefetch  # the next vectors are being drawn ahead
    for out in src.normal_like_each(std, refs):
        assert out.dtype == torch.float32
    flat = torch.stack(draws).double().numpy()
    _check_standard_normal(flat.reshape(-1) / std)
    m = flat.shape[1]
    for i in range(len(draws) - 1):  # consecutive (prefetched) vectors are fresh, not repeats
        assert abs(np.corrcoef(flat[i], flat[i + 1])[0, 1]) < Z / math.sqrt(m)
    # another σ (or size) than the one drawn ahead: a fresh draw with the asked-for σ
    other = torch.cat([t.reshape(-1) for t in src.normal_like_each(2.0, refs)]).double()
    assert abs(float(other.std()) / 2.0 - 1) < Z * math.sqrt(0.5 / other.numel())


def test_small_vectors_are_drawn_ahead_in_batches_and_none_without_a_spare_cpu(monkeypatch):
    src = SecureRandom()
    monkeypatch.setattr(randomness, "_spare_cpu", lambda: True)
    n = 1000
    src.normal_like_each(1.0, [torch.zeros(n)])
    count = -(-SecureRandom.PREFETCH_BATCH_VALUES // n)  # 33 vectors a batch
    assert [(b.key[0], b.count) for b in src._ahead] == [(n, count)] * 2  # the next batch drawn while one is served
    top = SecureRandom.PREFETCH_MAX_VALUES
    assert src.draws_ahead(top) and not src.draws_ahead(top + 1)
    assert not SecureRandom(prefetch=False).draws_ahead(1000)
    monkeypatch.setattr(randomness, "_spare_cpu", lambda: False)  # torch's threads take every CPU
    other = SecureRandom()
    other.normal_like_each(1.0, [torch.zeros(n)])
    assert other._ahead == []


def test_a_batch_drawn_ahead_serves_each_vector_once_and_a_new_size_drops_it(spare_cpu):
    """Across batch boundaries every served value is fresh, the law holds, and a size change draws afresh."""
    src = SecureRandom(prefetch=True)
    refs = [torch.zeros(30, 20, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)]  # 607: batches of 54
    count = -(-SecureRandom.PREFETCH_BATCH_VALUES // 607)
    draws = [torch.cat([t.reshape(-1) for t in src.normal_like_each(0.5, refs)]) for _ in range(2 * count + 5)]
    flat = torch.stack(draws).numpy()  # float64: no value repeats by chance
    assert np.unique(flat).size == flat.size  # no vector (nor value) served twice, within or across batches
    _check_standard_normal(flat.reshape(-1) / 0.5)
    assert [b.served for b in src._ahead] == [4, 0]  # 2·count + 5 = 1 fresh + 2 batches + 4, one more queued
    bigger = src.normal_like_each(0.5, [torch.zeros(608, dtype=torch.float64)])[0]  # another size: batch dropped
    assert [(b.key[0], b.served) for b in src._ahead] == [(608, 0)] * 2
    assert not np.isin(bigger.numpy(), flat).any()


def test_concurrent_callers_never_share_a_prefetched_vector(spare_cpu):
    src = SecureRandom(prefetch=True)
    refs = [torch.zeros(5000)]  # batches of 7 vectors, shared by the four callers
    got: list[torch.Tensor] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            v = src.normal_like_each(1.0, refs)[0].clone()
            with lock:
                got.append(v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 40
    assert len({tuple(v[:4].tolist()) for v in got}) == 40  # 40 distinct vectors


def test_bernoulli_mask_is_the_float_comparison_of_the_same_keystream(monkeypatch):
    a, b = _fixed_key_sources(monkeypatch, 2)
    for p in (0.3, 1 / 3, 0.01, 1.0, 2.0**-53 * 5):
        mask = a.bernoulli_mask(5000, p)
        assert mask.dtype == torch.bool
        assert torch.equal(mask, b.uniform((5000,), dtype=torch.float64) < p), p
    c = SecureRandom()
    q = 0.2
    frac = float(c.bernoulli_mask(200_000, q).double().mean())
    assert abs(frac - q) < Z * math.sqrt(q * (1 - q) / 200_000)


def test_secure_source_keeps_nothing_to_restore_and_says_what_it_is(spare_cpu):
    src = SecureRandom()
    src.normal_like_each(1.0, [torch.zeros(5000)])  # vectors drawn ahead now
    assert src.kind == "secure" and src.state_dict() == {}
    other = SecureRandom()
    assert not torch.equal(src.normal(1.0, (64,)), other.normal(1.0, (64,)))  # keys from the OS, not shared


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_rekeys_and_drops_what_was_drawn_ahead(spare_cpu):
    src = SecureRandom(prefetch=True)
    refs = [torch.zeros(5000)]
    src.normal_like_each(1.0, refs)  # the next vectors are drawn ahead in the parent
    assert src._ahead

    def in_child() -> bytes:  # its next words and noise must not be the parent's
        return src._words(8).tobytes() + src.normal_like_each(1.0, refs)[0][:8].numpy().tobytes()

    child = run_in_fork(in_child)
    assert len(child) == 96
    assert src._words(8).tobytes() != child[:64]
    assert src.normal_like_each(1.0, refs)[0][:8].numpy().tobytes() != child[64:]

