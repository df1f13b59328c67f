"""Iterate averaging of DP iterates: an exponential moving average (EMA) of a node's model.

De et al. 2022 ("Unlocking high-accuracy differentially private image classification
through scale") evaluate an EMA of the DP-SGD iterates: the last iterate carries the last
steps' noise in full, the EMA averages it out over the recent steps. Here one
:class:`IterateAverage` per node tracks the node's model after every local step (and, in
gossip, after the averages with peers made up to then), with the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=t)``: the decay of the t-th update (t = 1, 2, ...)
is ``min(decay, (1 + t) / (10 + t))``, so a short run is not dominated by its first iterate.

Privacy: every input is the node's model after an accounted DP step (or a mix of such models
with models peers released), so the EMA is post-processing: no DP event, no ε.

Used by :class:`~strategies.gossip.AsyncGossip` and :class:`~strategies.periodic.PeriodicAveraging`
(so :class:`~strategies.periodic.AllReduce`) through ``[strategy].params.ema_decay``: absent or
None is off (today's behaviour bit for bit); a number in [0, 1) turns it on. The EMA is the model
the node evaluates and ends with; the training iterate is what trains and what peers receive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privfl.accounting.errors import ConfigError
from privfl.strategies.base import Params

__all__ = ["IterateAverage", "ema_decay_setting"]

#: the key in [strategy].params
KEY = "ema_decay"


def ema_decay_setting(params: Mapping[str, Any], where: str = "[strategy].params") -> float | None:
    """``params["ema_decay"]`` checked: None (absent: off) or a number in [0, 1); ConfigError naming
    ``<where>.ema_decay`` otherwise."""
    d = params.get(KEY)
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, (int, float, np.integer, np.floating)) or not 0 <= float(d) < 1 \
            or math.isnan(float(d)):
        raise ConfigError(f"{where}.{KEY}: must be a number in [0, 1) (the decay of the moving average of the "
                          f"node's DP iterates; absent: off), got {d!r}")
    return float(d)


class IterateAverage:
    """EMA of one node's models: ``avg ← β_t · avg + (1 − β_t) · model``, β_t = min(decay, (1+t)/(10+t)).

    Accumulated in float64; :meth:`view` casts float arrays back to the model's dtypes (non-float
    arrays are the last model's). Before the first :meth:`update` there is no average (None)."""

    def __init__(self, decay: float) -> None:
        checked = ema_decay_setting({KEY: decay})  # the one check of the value (None is "off": no average)
        if checked is None:
            raise ConfigError(f"[strategy].params.{KEY}: an iterate average needs a decay in [0, 1), got None")
        self.decay = checked
        self.updates = 0
        self._avg: list[np.ndarray] | None = None  # float arrays: the float64 average; others: the last model's
        self._dtypes: list[np.dtype] = []

    def beta(self, t: int) -> float:
        """The decay of the t-th update (t >= 1): the warm-up ``(1 + t) / (10 + t)`` capped at ``decay``."""
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def update(self, model: Sequence[np.ndarray]) -> None:
        """Fold ``model`` (the node's current model) into the average."""
        self.updates += 1
        arrays = [np.asarray(a) for a in model]
        if self._avg is None:
            self._dtypes = [a.dtype for a in arrays]
            self._avg = [a.astype(np.float64) if _is_float(a.dtype) else a.copy() for a in arrays]
            return
        b = self.beta(self.updates)
        self._avg = [b * m + (1.0 - b) * a.astype(np.float64) if _is_float(a.dtype) else a.copy()
                     for m, a in zip(self._avg, arrays)]

    def view(self) -> Params | None:
        """The average in the model's dtypes (a fresh copy), or None before any update."""
        if self._avg is None:
            return None
        return [m.astype(dt) if _is_float(dt) else m.copy() for m, dt in zip(self._avg, self._dtypes)]


def _is_float(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating))
