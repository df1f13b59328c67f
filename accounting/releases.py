"""What a site may release besides noised models: the public vocabulary of its reports.

One definition for the layers above (``clients`` builds the reports, ``strategies``
filters what reaches a server), kept here because both may import ``accounting``.
"""

from __future__ import annotations

#: the metrics a fit result may carry: public values only (ε, δ, step counts, flags) —
#: never a training loss, an accuracy or a record count
PUBLIC_FIT_METRICS: frozenset[str] = frozenset(
    {"steps", "total_steps", "epsilon", "delta", "dp", "budget_exhausted"})

#: the metrics of an evaluation a site released through DP (a noisy accuracy over a
#: public denominator, flagged ``dp = 1``)
DP_EVALUATE_METRICS: frozenset[str] = frozenset({"accuracy", "dp"})

__all__ = ["DP_EVALUATE_METRICS", "PUBLIC_FIT_METRICS", "build_public_fit_metrics"]


def build_public_fit_metrics(steps: int, total_steps: int, epsilon: float, delta: float, dp: bool,
                       exhausted: bool) -> dict[str, int | float]:
    """The metrics a fit result carries (exactly :data:`PUBLIC_FIT_METRICS`); ε is −1 without DP."""
    return {"steps": int(steps), "total_steps": int(total_steps), "epsilon": float(epsilon) if dp else -1.0,
            "delta": float(delta), "dp": int(dp), "budget_exhausted": int(exhausted)}
