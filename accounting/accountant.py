"""Privacy accountant for Poisson-subsampled Gaussian steps, on dp-accounting.

Identical (noise multiplier, sample rate) steps are merged into one counted event and
composed lazily: dp-accounting's ``compose`` costs ~55 ms per call whatever the count,
so it is called once per distinct event when ε is asked for, never once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_mod

Method = Literal["rdp", "pld"]


class _DropConvergenceNoise(logging.Filter):
    """dp-accounting logs (through absl) each fractional order it skips; that is
    expected for small σ and large q and says nothing an operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropConvergenceNoise())
NEIGHBORING_RELATION = "add_or_remove_one"
PLD_DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class DpEventKey:
    """One kind of DP step: a Poisson-sampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float


def _relation() -> Any:
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def sampled_gaussian_event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """The dp-accounting event of ``steps`` Poisson-sampled Gaussian steps."""
    inner = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        inner = dp_accounting.PoissonSampledDpEvent(sample_rate, inner)
    return dp_accounting.SelfComposedDpEvent(inner, int(steps))


@lru_cache(maxsize=4096)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at dp-accounting's default orders (one ``compose``, cached).

    RDP adds up under composition, so ``count`` steps cost ``count`` times this curve.
    """
    acc = RdpAccountant(neighboring_relation=_relation())
    acc.compose(sampled_gaussian_event(noise_multiplier, sample_rate, 1))
    return np.asarray(acc._rdp, dtype=float).copy()  # noqa: SLF001 - the curve is not public


def epsilon_of(events: dict[DpEventKey, int], delta: float, method: Method = "rdp") -> float:
    """ε at ``delta`` of the composition of counted events (0 when there are none)."""
    if not events or all(c == 0 for c in events.values()):
        return 0.0
    if method == "rdp":
        rdp = sum(c * _rdp_curve(k.noise_multiplier, k.sample_rate) for k, c in events.items() if c)
        eps, _ = _rdp_mod.compute_epsilon(_rdp_mod.DEFAULT_RDP_ORDERS, rdp, delta)
        return float(eps)
    if method == "pld":
        acc: Any = PLDAccountant(
            neighboring_relation=_relation(),
            value_discretization_interval=PLD_DISCRETIZATION,
        )
    else:
        raise ValueError(f"unknown accounting method {method!r}: use 'rdp' or 'pld'")
    for key, count in events.items():
        if count:
            acc.compose(sampled_gaussian_event(key.noise_multiplier, key.sample_rate, count))
    return float(acc.get_epsilon(delta))


class PrivacyAccountant:
    """Counts DP steps and reports (ε, δ) under add/remove-one neighbouring.

    ``step`` is cheap; ``get_epsilon`` composes once per distinct event and caches the
    result until the next step.
    """

    def __init__(self, method: Method = "rdp") -> None:
        if method not in ("rdp", "pld"):
            raise ValueError(f"unknown accounting method {method!r}: use 'rdp' or 'pld'")
        self.method: Method = method
        self._events: dict[DpEventKey, int] = {}
        self._cache: dict[tuple[float, Method], float] = {}

    @property
    def events(self) -> dict[DpEventKey, int]:
        """A copy of the counted events."""
        return dict(self._events)

    @property
    def steps(self) -> int:
        """Total number of DP steps recorded."""
        return sum(self._events.values())

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` Poisson-sampled Gaussian steps with these parameters."""
        validate_step(noise_multiplier, sample_rate, steps)
        key = DpEventKey(float(noise_multiplier), float(sample_rate))
        self._events[key] = self._events.get(key, 0) + int(steps)
        self._cache.clear()

    def get_epsilon(self, delta: float, method: Method | None = None) -> float:
        """ε spent so far at ``delta``, by this accountant's method unless one is given."""
        m = method or self.method
        key = (float(delta), m)
        if key not in self._cache:
            self._cache[key] = epsilon_of(self._events, delta, m)
        return self._cache[key]

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """ε that would be spent after ``steps`` more steps (the accountant is unchanged)."""
        validate_step(noise_multiplier, sample_rate, steps)
        events = dict(self._events)
        key = DpEventKey(float(noise_multiplier), float(sample_rate))
        events[key] = events.get(key, 0) + int(steps)
        return epsilon_of(events, delta, self.method)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the method and the counted events."""
        return {
            "method": self.method,
            "neighboring_relation": NEIGHBORING_RELATION,
            "events": [
                {"noise_multiplier": k.noise_multiplier, "sample_rate": k.sample_rate, "count": c}
                for k, c in sorted(
                    self._events.items(), key=lambda kv: (kv[0].noise_multiplier, kv[0].sample_rate)
                )
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the counted events with those of ``state``."""
        method = state.get("method", "rdp")
        if method not in ("rdp", "pld"):
            raise ValueError(f"unknown accounting method {method!r} in accountant state")
        events: dict[DpEventKey, int] = {}
        for e in state.get("events", []):
            validate_step(e["noise_multiplier"], e["sample_rate"], e["count"])
            key = DpEventKey(float(e["noise_multiplier"]), float(e["sample_rate"]))
            events[key] = events.get(key, 0) + int(e["count"])
        self.method = method
        self._events = events
        self._cache.clear()


def validate_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """Refuse step parameters no accountant can account for."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
