"""Noise calibration: the smallest σ that keeps a planned run within a target (ε, δ)."""

from __future__ import annotations

from collections.abc import Mapping

from privfl.accounting.accountant import DpEventKey, Method, epsilon_of


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: Method = "rdp",
    tol: float = 1e-4,
    prior: Mapping[DpEventKey, int] | None = None,
) -> float:
    """Noise multiplier σ such that ``steps`` Poisson-sampled Gaussian steps cost ≤ ε.

    ``prior``: DP events already spent (e.g. a DP preprocessing estimate), composed with
    the planned steps. Uses dp-accounting's bracketed calibration; the returned σ is on
    the safe side (its ε does not exceed the target). Every input is public, so σ is too.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    base = dict(prior or {})
    if base and epsilon_of(base, delta, method) >= target_epsilon:
        raise ValueError(f"the prior DP events already spend ε >= {target_epsilon} at δ={delta}")

    def eps(sigma: float) -> float:
        events = dict(base)
        key = DpEventKey(sigma, sample_rate)
        events[key] = events.get(key, 0) + steps
        return epsilon_of(events, delta, method)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(
                f"no noise multiplier below 1e5 reaches ε={target_epsilon} at δ={delta}"
            )
    if eps(lo) <= target_epsilon:
        return lo
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


__all__ = ["calibrate_noise"]
