"""The public coordinate mask of subspace DP-SGD, shared by the DP side and the wire side.

A mask is a function of public values only — ``(seed, index, d, fraction)`` — so the DP
optimizer (``clients.subspace``) and the compressor that sends its k values
(``strategies.compression.subspace``) derive the same coordinates on every node. It lives
here, in the layer both may import, because it is part of the mechanism's public
description (what the ledger records as ``mechanism_params``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from privfl.accounting.errors import ConfigError

__all__ = ["SUBSPACE_KEYS", "check_subspace_params", "subspace_indices", "subspace_k"]

SUBSPACE_KEYS = frozenset({"fraction", "seed", "period"})


def check_subspace_params(params: Mapping[str, Any], where: str = "dp.subspace") -> dict[str, Any]:
    """``{fraction, seed, period}`` validated (``period`` defaults to 1); ConfigError names the key."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: must be a table {{ fraction = 0.01, seed = <public int> }}")
    unknown = sorted(set(params) - SUBSPACE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(SUBSPACE_KEYS))}")
    fraction = params.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{where}.fraction: must be a number in (0, 1], got {fraction!r}")
    seed = params.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{where}.seed: required: a public integer >= 0 shared by every node "
                          f"(it chooses the coordinate masks), got {seed!r}")
    period = params.get("period", 1)
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
        raise ConfigError(f"{where}.period: must be an integer >= 1 (steps per mask), got {period!r}")
    return {"fraction": float(fraction), "seed": int(seed), "period": int(period)}


def subspace_k(d: int, fraction: float) -> int:
    """k = max(1, round(fraction · d)) coordinates kept out of d."""
    return max(1, min(d, int(round(fraction * d))))


def subspace_indices(seed: int, index: int, d: int, fraction: float) -> np.ndarray:
    """The sorted flat coordinates of mask number ``index``: a function of (seed, index, d, fraction) only.

    Drawn uniformly without replacement by numpy's PCG64 seeded with ``[seed, index]``
    (deterministic across platforms), so every node derives the same mask.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    return np.sort(rng.choice(int(d), size=subspace_k(int(d), fraction), replace=False)).astype(np.int64)
