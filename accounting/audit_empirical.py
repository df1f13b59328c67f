"""One-run empirical privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each included in training independently with probability ½
(S_i = ±1); after one training run each canary gets a score (higher = "looks
included", e.g. the negative loss). The auditor guesses +1 for the k₊ highest
scores, −1 for the k₋ lowest and abstains on the rest; with r guesses of which v
are correct, if training is (ε, δ)-DP for each canary then

    P[#correct ≥ v] ≤ p(ε) = P[Bin(r, q_ε) ≥ v]
                             + 2·m·δ·max_{1≤i≤v} (1/i)·P[v−i ≤ Bin(r, q_ε) ≤ v−1],
    q_ε = e^ε / (1 + e^ε),

and ε_lb = sup{ε : p(ε) < β} is a lower bound on ε at confidence 1 − β. Choose
k₊, k₋ before looking at the scores. The canary training run itself lives in the
runtime; this module is the math: pass it the scores and the inclusion signs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

DEFAULT_BETA = 0.05
BISECTION_STEPS = 30


def _check_counts(m: int, r: int, v: int, delta: float) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def p_value(epsilon: float, m: int, r: int, v: int, delta: float = 0.0) -> float:
    """p(ε): bound on P[≥ v of r guesses correct] under (ε, δ)-DP with m canaries (≤ 1)."""
    _check_counts(m, r, v, delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # = e^ε/(1+e^ε), overflow-safe
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    slack = 0.0
    if delta > 0 and v > 0:
        # P[v-i <= Bin <= v-1] for i = 1..v is the running sum of pmf(v-1), pmf(v-2), ...
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)
        slack = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slack)


def epsilon_lower_bound_from_counts(
    m: int, r: int, v: int, delta: float = 0.0, beta: float = DEFAULT_BETA
) -> float:
    """ε_lb = sup{ε : p(ε) < β} by the paper's bisection (grow [0, 1] by +1, 30 halvings).

    Returns the lower end of the final bracket (so p(ε_lb) < β, or 0 when even ε = 0
    is not rejected).
    """
    _check_counts(m, r, v, delta)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    lo, hi = 0.0, 1.0
    while p_value(hi, m, r, v, delta) < beta:
        hi += 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(mid, m, r, v, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: Sequence[float] | np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """Guesses T ∈ {+1, −1, 0}: +1 for the k₊ highest scores, −1 for the k₋ lowest.

    Ties are broken by position (stable sort), never by the true inclusion.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = s.size
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={m}, got {k_pos}, {k_neg}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    order = np.argsort(s, kind="stable")
    t = np.zeros(m, dtype=np.int8)
    if k_neg:
        t[order[:k_neg]] = -1
    if k_pos:
        t[order[m - k_pos :]] = 1
    return t


def _signs(x: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x).ravel()
    if a.dtype == bool:
        return np.where(a, 1, -1).astype(np.int8)
    if not np.all(np.isin(a, (-1, 0, 1))):
        raise ValueError(f"{what} must hold only -1, 0 and +1 (or booleans)")
    return a.astype(np.int8)


def count_correct(inclusion_signs: Sequence[int] | np.ndarray, guesses: Sequence[int] | np.ndarray) -> int:
    """v: how many non-abstaining guesses T_i equal the true S_i (booleans mean ±1)."""
    s = _signs(inclusion_signs, "inclusion_signs")
    t = _signs(guesses, "guesses")
    if s.shape != t.shape:
        raise ValueError(f"inclusion_signs and guesses differ in length: {s.size} vs {t.size}")
    return int(np.sum((t != 0) & (t == s)))


@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit: the bound, the counts it came from, and the context."""

    epsilon_lb: float
    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    delta: float
    beta: float
    epsilon_upper: float | None = None

    @property
    def accuracy(self) -> float:
        """Fraction of guesses that were correct (nan with no guesses)."""
        return self.v / self.r if self.r else math.nan

    @property
    def exceeds_upper_bound(self) -> bool:
        """A lower bound above the accountant's ε means a bug in DP or in accounting."""
        return self.epsilon_upper is not None and self.epsilon_lb > self.epsilon_upper

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with accuracy and the upper-bound comparison."""
        d = asdict(self)
        d["accuracy"] = self.accuracy
        d["exceeds_upper_bound"] = self.exceeds_upper_bound
        return d


def audit_one_run(
    scores: Sequence[float] | np.ndarray,
    inclusion_signs: Sequence[int] | np.ndarray,
    k_pos: int,
    k_neg: int,
    delta: float,
    beta: float = DEFAULT_BETA,
    epsilon_upper: float | None = None,
) -> OneRunAudit:
    """The full one-run audit from canary scores and the true inclusion signs.

    ``scores[i]`` is higher when canary i looks included (e.g. minus its loss);
    ``inclusion_signs[i]`` is +1 if it was trained on, −1 if not (or booleans);
    m = len(scores). ``epsilon_upper``: the accountant's ε at the same δ, to compare.
    """
    s = _signs(inclusion_signs, "inclusion_signs")
    if np.any(s == 0):
        raise ValueError("inclusion_signs must be +1 or -1 for every canary")
    sc = np.asarray(scores, dtype=np.float64).ravel()
    if sc.shape != s.shape:
        raise ValueError(f"scores and inclusion_signs differ in length: {sc.size} vs {s.size}")
    t = guesses_from_scores(sc, k_pos, k_neg)
    m, r, v = int(sc.size), int(k_pos + k_neg), count_correct(s, t)
    eps = epsilon_lower_bound_from_counts(m, r, v, delta, beta)
    return OneRunAudit(eps, m, r, v, int(k_pos), int(k_neg), float(delta), float(beta), epsilon_upper)


def epsilon_lower_bound(
    scores: Sequence[float] | np.ndarray,
    inclusion_signs: Sequence[int] | np.ndarray,
    k_pos: int,
    k_neg: int,
    delta: float,
    beta: float = DEFAULT_BETA,
) -> float:
    """ε_lb at confidence 1 − β from canary scores and inclusion signs (see :func:`audit_one_run`)."""
    return audit_one_run(scores, inclusion_signs, k_pos, k_neg, delta, beta).epsilon_lb


def draw_inclusion_signs(m: int, rng: np.random.Generator) -> np.ndarray:
    """S ∈ {−1, +1}^m, each independently +1 with probability ½ (include the canary)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    return np.where(rng.random(m) < 0.5, 1, -1).astype(np.int8)


def scores_from_losses(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """Black-box membership scores: minus the per-canary loss (lower loss → "included")."""
    return -np.asarray(losses, dtype=np.float64).ravel()
