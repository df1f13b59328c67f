"""Compute-speed and link profiles of simulated nodes (what makes a straggler cost virtual time)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privfl.errors import ConfigError

__all__ = ["PROFILES", "DEFAULT_STEP_COST", "STEP_TIMES", "LinkSpec", "StepTimes", "compute_speeds",
           "default_step_cost"]

PROFILES = ("homogeneous", "straggler", "lognormal", "explicit")
#: how long one local step takes: always its mean, or exponentially distributed around it
STEP_TIMES = ("fixed", "exponential")

# Nominal virtual seconds per local DP step at speed 1.0, by model (a site's modest GPU
# or CPU); used when the spec gives no step_cost, so runs stay deterministic.
DEFAULT_STEP_COST: dict[str, float] = {"logreg": 0.005, "mlp": 0.01, "cnn": 0.05}


def default_step_cost(model: str) -> float:
    """The nominal step cost of ``model`` (0.01 s for an unknown name)."""
    return DEFAULT_STEP_COST.get(model, 0.01)


def _pos(name: str, value: Any) -> float:
    v = _number(name, value)
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")
    return v


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be a number, got {value!r}") from None


def compute_speeds(profile: str, n: int, seed: int = 0, params: Mapping[str, Any] | None = None) -> list[float]:
    """Relative compute speed of each of ``n`` nodes (1.0 = nominal; a step takes cost / speed).

    ``homogeneous``: all 1. ``straggler``: node ``index`` (default the last) is ``factor``
    (default 4) times slower. ``lognormal``: speeds exp(N(0, ``sigma``²)), seeded.
    ``explicit``: ``speeds``, one per node.

    A refusal names the experiment config's field (``[simulation].compute_profile``,
    ``straggler_factor``, ``straggler_index``, ``lognormal_sigma``, ``speeds``).
    """
    p = dict(params or {})
    allowed = {"homogeneous": set(), "straggler": {"factor", "index"}, "lognormal": {"sigma"},
               "explicit": {"speeds"}}
    if profile not in allowed:
        raise ConfigError(f"[simulation].compute_profile: unknown profile {profile!r}; choose one of "
                          f"{', '.join(PROFILES)}")
    unknown = sorted(set(p) - allowed[profile])
    if unknown:  # only through the Python API: the config builds these parameters itself
        raise ConfigError(f"SimSpec.compute_params: profile {profile!r} does not take {', '.join(unknown)}")
    if profile == "homogeneous":
        return [1.0] * n
    if profile == "straggler":
        factor = _pos("[simulation].straggler_factor", p.get("factor", 4.0))
        idx = p.get("index", n - 1)
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= idx < n:
            raise ConfigError(f"[simulation].straggler_index: must be a node index in 0..{n - 1} (-1: the last), "
                              f"got {idx!r}")
        speeds = [1.0] * n
        speeds[int(idx)] = 1.0 / factor
        return speeds
    if profile == "lognormal":
        sigma = _number("[simulation].lognormal_sigma", p.get("sigma", 0.5))
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError(f"[simulation].lognormal_sigma: must be a finite number >= 0, got {sigma!r}")
        rng = np.random.default_rng(seed + 104729)
        return [float(s) for s in np.exp(rng.normal(0.0, sigma, size=n))]
    speeds_in = p.get("speeds")
    if not isinstance(speeds_in, Sequence) or isinstance(speeds_in, str) or len(speeds_in) != n:
        raise ConfigError(f"[simulation].speeds: must list one speed per node ({n}, [data].num_sites), "
                          f"got {speeds_in!r}")
    return [_pos(f"[simulation].speeds[{i}]", s) for i, s in enumerate(speeds_in)]


class StepTimes:
    """Virtual seconds of ``steps`` local steps on node i: a node's compute-time model.

    ``fixed``: ``steps · step_cost / speed_i``. ``exponential``: each step an independent
    exponential draw with that mean (memoryless compute, the model behind the harmonic-number
    speed-up of asynchrony), so ``steps`` of them are one Gamma(steps, step_cost / speed_i)
    draw. Every node draws from its own stream, seeded by (``seed``, node index), so a node's
    times do not depend on the order in which the driver asks for other nodes' times.
    """

    def __init__(self, kind: str, step_cost: float, speeds: Sequence[float], seed: int = 0,
                 where: str = "SimSpec.step_time") -> None:
        if kind not in STEP_TIMES:
            raise ConfigError(f"{where}: unknown step-time model {kind!r}; choose one of {', '.join(STEP_TIMES)}")
        self.kind = kind
        self.step_cost = float(step_cost)
        self.speeds = [float(v) for v in speeds]
        self._rngs = [np.random.default_rng(np.random.SeedSequence([int(seed), i, 0x5EED7])) for i in
                      range(len(self.speeds))] if kind == "exponential" else []

    def mean(self, i: int, steps: int) -> float:
        """The expected time of ``steps`` steps on node i (the fixed model's time)."""
        return steps * self.step_cost / self.speeds[i]

    def __call__(self, i: int, steps: int) -> float:
        if self.kind == "fixed" or steps <= 0:
            return self.mean(i, steps)
        return float(self._rngs[i].gamma(float(steps), self.step_cost / self.speeds[i]))


@dataclass
class LinkSpec:
    """Each node's access link: one-way latency (s) and bandwidth (bytes/s), plus per-message header.

    A transfer between nodes i and j of b bytes takes ``max(lat_i, lat_j) + (b + header)
    / min(bw_i, bw_j)``. ``latencies``/``bandwidths`` override the defaults per node.
    Defaults: 5 ms and 12.5 MB/s (100 Mbit/s between hospitals), 64-byte header.
    ``latency``/``bandwidth`` are the experiment config's ``[simulation].latency`` /
    ``bandwidth`` (refusals name them); the others exist in the Python API only.
    """

    latency: float = 0.005
    bandwidth: float = 12.5e6
    header_bytes: int = 64
    latencies: list[float] | None = None
    bandwidths: list[float] | None = None
    _lat: list[float] = field(default_factory=list, init=False, repr=False)
    _bw: list[float] = field(default_factory=list, init=False, repr=False)

    def bind(self, n: int) -> LinkSpec:
        """Validate against ``n`` nodes and resolve the per-node values."""
        lat = _number("[simulation].latency", self.latency)
        if not (lat >= 0 and math.isfinite(lat)):
            raise ConfigError(f"[simulation].latency: must be a finite number >= 0 seconds, got {self.latency!r}")
        bw = _pos("[simulation].bandwidth", self.bandwidth)
        if isinstance(self.header_bytes, bool) or not isinstance(self.header_bytes, int) or self.header_bytes < 0:
            raise ConfigError(f"LinkSpec.header_bytes: must be an integer >= 0, got {self.header_bytes!r}")
        self._lat = [lat] * n
        self._bw = [bw] * n
        if self.latencies is not None:
            if len(self.latencies) != n:
                raise ConfigError(f"LinkSpec.latencies: must list one latency per node ({n}), "
                                  f"got {len(self.latencies)}")
            self._lat = [_number(f"LinkSpec.latencies[{i}]", v) for i, v in enumerate(self.latencies)]
            if any(not (v >= 0 and math.isfinite(v)) for v in self._lat):
                raise ConfigError(f"LinkSpec.latencies: must all be finite numbers >= 0, got {self.latencies}")
        if self.bandwidths is not None:
            if len(self.bandwidths) != n:
                raise ConfigError(f"LinkSpec.bandwidths: must list one bandwidth per node ({n}), "
                                  f"got {len(self.bandwidths)}")
            self._bw = [_pos(f"LinkSpec.bandwidths[{i}]", v) for i, v in enumerate(self.bandwidths)]
        return self

    def transfer_time(self, i: int, j: int | None, nbytes: int) -> float:
        """Seconds for one message of ``nbytes`` payload from node i to j (j=None: i's own link)."""
        lat = self._lat[i] if j is None else max(self._lat[i], self._lat[j])
        bw = self._bw[i] if j is None else min(self._bw[i], self._bw[j])
        return lat + (nbytes + self.header_bytes) / bw
