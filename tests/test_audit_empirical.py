"""One-run empirical audit (Steinke, Nasr & Jagielski 2023): the paper's printed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import binom

from privfl.accounting.audit_empirical import (
    audit_one_run,
    count_correct,
    draw_inclusion_signs,
    epsilon_lower_bound,
    epsilon_lower_bound_from_counts,
    guesses_from_scores,
    p_value,
    scores_from_losses,
)

pytestmark = pytest.mark.timeout(60)


def _printed_forms(x: float) -> set[float]:
    """3-digit forms of x: the paper rounds some values (0.673) and truncates others (2.675)."""
    return {round(x, 3), math.floor(x * 1000) / 1000}


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "printed"),
    [
        (100, 100, 75, 0.0, 0.702),  # App. D example
        (100, 100, 75, 1e-4, 0.699),  # App. D example
        (1000, 100, 75, 1e-4, 0.673),  # App. D, p. 46
        (100_000, 1510, 1439, 1e-5, 2.675),  # §7, Fig. 11
    ],
)
def test_paper_values(m: int, r: int, v: int, delta: float, printed: float) -> None:
    eps = epsilon_lower_bound_from_counts(m, r, v, delta, beta=0.05)
    assert printed in _printed_forms(eps)
    assert abs(eps - printed) < 1e-3
    assert p_value(eps, m, r, v, delta) < 0.05  # the lower end is still rejected
    assert p_value(eps + 1e-6, m, r, v, delta) >= 0.05 - 1e-9


def test_p_value_at_ln3() -> None:
    assert p_value(math.log(3), 100, 100, 75, 0.0) == pytest.approx(0.553, abs=1e-3)


def test_saturation_values() -> None:
    assert epsilon_lower_bound_from_counts(1000, 100, 100, 1e-5) == pytest.approx(3.465, abs=1e-3)
    assert epsilon_lower_bound_from_counts(1000, 1000, 1000, 1e-5) == pytest.approx(5.782, abs=1e-3)
    assert epsilon_lower_bound_from_counts(10_000, 1000, 1000, 1e-5) == pytest.approx(5.529, abs=1e-3)


def test_p_value_matches_a_direct_loop() -> None:
    """The vectorised δ-term equals the paper's loop over i."""
    m, r, v, delta, eps = 1000, 200, 130, 1e-3, 0.8
    q = math.exp(eps) / (1 + math.exp(eps))
    best = 0.0
    for i in range(1, v + 1):
        mass = binom.cdf(v - 1, r, q) - binom.cdf(v - i - 1, r, q)
        best = max(best, mass / i)
    direct = binom.sf(v - 1, r, q) + 2 * m * delta * best
    assert p_value(eps, m, r, v, delta) == pytest.approx(direct, rel=1e-9)


def test_monotone_and_edge_cases() -> None:
    ps = [p_value(e, 100, 100, 75, 1e-4) for e in np.linspace(0, 3, 16)]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:]))
    # chance-level guessing certifies nothing
    assert epsilon_lower_bound_from_counts(100, 100, 50, 0.0) == 0.0
    assert epsilon_lower_bound_from_counts(100, 0, 0, 0.0) == 0.0
    for bad in [(10, 5, 6, 0.0), (10, 11, 5, 0.0), (10, 5, 3, 2.0)]:
        with pytest.raises(ValueError):
            epsilon_lower_bound_from_counts(*bad)


def test_large_m_is_fast() -> None:
    t = time.perf_counter()
    epsilon_lower_bound_from_counts(100_000, 5000, 4000, 1e-5)
    assert time.perf_counter() - t < 5.0


def test_guesses_and_counting() -> None:
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0, -1.0])
    t = guesses_from_scores(scores, k_pos=2, k_neg=2)
    assert t.tolist() == [0, 1, -1, 1, 0, -1]
    s = np.array([1, 1, -1, -1, 1, 1])
    assert count_correct(s, t) == 2  # idx1 (+1 ok), idx2 (-1 ok); idx3 wrong, idx5 wrong
    assert count_correct(s.astype(bool) | (s > 0), t) == count_correct(np.where(s > 0, 1, -1), t)
    assert guesses_from_scores(scores, 0, 0).tolist() == [0] * 6
    with pytest.raises(ValueError):
        guesses_from_scores(scores, 4, 3)
    with pytest.raises(ValueError):
        count_correct([1, 2], [1, 1])


def test_end_to_end_bounds() -> None:
    rng = np.random.default_rng(7)
    m = 1000
    s = draw_inclusion_signs(m, rng)
    assert set(np.unique(s).tolist()) == {-1, 1}
    assert 400 < int(np.sum(s > 0)) < 600
    # scores unrelated to inclusion: the bound stays near 0 (never large)
    noise = rng.normal(size=m)
    assert epsilon_lower_bound(noise, s, 100, 100, 1e-5) < 0.5
    # perfectly separating scores: saturation at r = 200
    res = audit_one_run(s.astype(float), s, 100, 100, 1e-5, epsilon_upper=2.0)
    assert res.v == res.r == 200
    assert res.epsilon_lb == pytest.approx(epsilon_lower_bound_from_counts(m, 200, 200, 1e-5))
    assert res.exceeds_upper_bound and res.to_dict()["exceeds_upper_bound"]
    # black-box loss scores: included canaries have lower loss
    losses = np.where(s > 0, 0.2, 1.0) + 0.3 * rng.normal(size=m)
    res = audit_one_run(scores_from_losses(losses), s, 50, 50, 1e-5, epsilon_upper=10.0)
    assert res.accuracy > 0.9 and 1.0 < res.epsilon_lb < 10.0
    assert not res.exceeds_upper_bound
    with pytest.raises(ValueError):
        audit_one_run(noise, np.zeros(m), 10, 10, 1e-5)
