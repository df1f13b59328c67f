"""The public coordinate mask of subspace DP-SGD, shared by the DP side and the wire side.

A mask is a function of public values only — ``(seed, index, d, fraction)`` — so the DP
optimizer (``clients.subspace``) and the compressor that sends its k values
(``strategies.compression.subspace``) derive the same coordinates on every node. It lives
here, in the layer both may import, because it is part of the mechanism's public
description (what the ledger records as ``mechanism_params``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privfl.accounting.errors import ConfigError

__all__ = ["SUBSPACE_KEYS", "check_subspace_params", "subspace_indices", "subspace_k", "subspace_mask"]

SUBSPACE_KEYS = frozenset({"fraction", "seed", "period", "whole"})


def check_subspace_params(params: Mapping[str, Any], where: str = "dp.subspace") -> dict[str, Any]:
    """``{fraction, seed, period, whole}`` validated (``period`` defaults to 1, ``whole`` to 0); ConfigError
    names the key. ``whole`` > 0 makes the mask structured (:func:`subspace_mask`)."""
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
    whole = params.get("whole", 0)
    if isinstance(whole, bool) or not isinstance(whole, (int, np.integer)) or whole < 0:
        raise ConfigError(f"{where}.whole: must be an integer >= 0 (tensors of at most this many coordinates are "
                          f"kept whole; 0: none), got {whole!r}")
    return {"fraction": float(fraction), "seed": int(seed), "period": int(period), "whole": int(whole)}


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


def subspace_mask(seed: int, index: int, shapes: Sequence[Sequence[int]], fraction: float,
                  whole: int = 0) -> np.ndarray:
    """Mask number ``index`` over the concatenated tensors of ``shapes`` (the model's public architecture).

    ``whole`` = 0: :func:`subspace_indices` (k uniform coordinates). ``whole`` > 0, a *structured*
    mask: every tensor of at most ``whole`` coordinates (biases, norms, small kernels) is kept
    whole, and the rest of the budget k = round(fraction·d) is drawn uniformly without
    replacement from the other tensors' coordinates by PCG64 seeded with ``[seed, index]``.
    A function of (seed, index, shapes, fraction, whole) only — never of data. ConfigError
    naming ``whole`` if the whole tensors alone exceed k.
    """
    sizes = [int(math.prod(s)) for s in shapes]
    d = int(sum(sizes))
    if whole <= 0:
        return subspace_indices(seed, index, d, fraction)
    k = subspace_k(d, fraction)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    small = [np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(sizes) if n <= whole]
    kept = np.concatenate(small) if small else np.zeros(0, np.int64)
    if kept.size > k:
        raise ConfigError(f"subspace.whole: the tensors of at most {whole} coordinates hold {kept.size}, more than "
                          f"the mask's k = {k} (fraction {fraction:g} of {d}); lower whole or raise fraction")
    rest = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(sizes) if n > whole]
                          or [np.zeros(0, np.int64)])
    rng = np.random.default_rng([int(seed), int(index)])
    drawn = rest[rng.choice(rest.size, size=min(rest.size, k - kept.size), replace=False)]
    return np.sort(np.concatenate([kept, drawn])).astype(np.int64)
