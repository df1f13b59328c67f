"""Async gossip (AD-PSGD) on a fixed public subspace mask: pairwise averages of the k mask values only.

With ``[dp].subspace`` every DP step moves only the coordinates of a public mask; with a
mask *fixed for the whole run* (``period`` ≥ the planned steps) every node's model differs
from the shared public initial model on those k coordinates only, at every step count.
So two nodes at different step counts still share the support, and their pairwise
average ``x_i = x_j = (x_i + x_j)/2`` needs only the k mask values: the active side sends
its k values (the request), the passive side replies with its pre-average k values (the
reply), both set the mask to the average, and every other coordinate stays at the public
initial model at both. A mask that changes during the run would leave the nodes with
different supports, so it is refused (:class:`SubspaceExchange` needs ``period`` ≥ the
planned steps), and :meth:`SubspaceExchange.encode` checks that the model is still at the
initial model off the mask before anything leaves.

A frame is the same :class:`Compressed` as sync subspace gossip's over the mask's
per-tensor counts ((k_0,), (k_1,), …): float32 values (4k bytes, the model's own values,
exact), or with ``bits`` the values' offsets from the public initial model, quantised per
tensor by :class:`Quantize8` (its range is then the training drift, not the weights').
Everything sent is a function of the node's released (post-noise) model and public values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privfl.accounting.errors import ConfigError
from privfl.strategies.compression.compressors import CompressionError, Quantize8
from privfl.strategies.compression.message import Compressed, MalformedMessage, split_flat
from privfl.strategies.compression.release import _derive
from privfl.strategies.compression.subspace import SubspaceK, decode_values, segment_shapes

__all__ = ["ASYNC_SUBSPACE_KEYS", "SubspaceExchange", "async_subspace_params"]

Shapes = tuple[tuple[int, ...], ...]


def _flat(params: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in params]) if params else np.zeros(0)


class SubspaceExchange:
    """One node's encoder/averager for async subspace gossip (see the module docstring).

    ``initial`` is the shared public initial model (every node starts from it);
    ``planned_steps`` the most DP steps a node is planned to take. ConfigError naming
    ``<where>.period`` unless the compressor's mask is fixed for all of them.
    """

    def __init__(self, node_id: str, compressor: SubspaceK, initial: Sequence[np.ndarray],
                 planned_steps: int | None, where: str = "[strategy].params") -> None:
        if not isinstance(compressor, SubspaceK):
            raise ConfigError(f"{where}.compressor: async_gossip compresses only with 'subspace' (pairwise averages "
                              f"of a fixed public mask's values), got {compressor!r}")
        if planned_steps is None or isinstance(planned_steps, bool) or int(planned_steps) < 1:
            raise ConfigError(f"{where}.period: async_gossip with compressor 'subspace' needs one mask for the whole "
                              "run, so the run's planned steps must be known ([dp].planned_steps or [stop].max_steps)")
        if compressor.period < int(planned_steps):
            raise ConfigError(f"{where}.period: async_gossip with compressor 'subspace' averages nodes at different "
                              f"step counts, so the mask must be fixed for the whole run: period must be >= the "
                              f"planned steps ({int(planned_steps)}), got {compressor.period}")
        self.node_id = node_id
        self._shapes: Shapes = tuple(tuple(int(s) for s in np.shape(p)) for p in initial)
        self._dtypes = [np.asarray(p).dtype for p in initial]
        self._indices = compressor.indices_for(0, self._shapes)
        self._segments = segment_shapes(self._indices, self._shapes)
        self._init = _flat(initial)
        self._off = np.ones(self._init.size, dtype=bool)
        self._off[self._indices] = False
        self._quant = None if compressor.bits is None else Quantize8(bits=compressor.bits)

    @property
    def indices(self) -> np.ndarray:
        """The fixed mask's flat coordinates (public: derived by every node)."""
        return self._indices

    def frame_shapes(self) -> Shapes:
        """The shapes every frame is rebuilt with: the mask's per-tensor counts (any round)."""
        return self._segments

    def off_mask_at_init(self, params: Sequence[np.ndarray]) -> bool:
        """Whether ``params`` equal the public initial model on every coordinate off the mask."""
        return bool(np.array_equal(_flat(params)[self._off], self._init[self._off]))

    def encode(self, params: Sequence[np.ndarray]) -> Compressed:
        """The frame carrying ``params``' k mask values (RuntimeError if the model moved off the mask)."""
        flat = _flat(params)
        if not np.array_equal(flat[self._off], self._init[self._off]):
            raise RuntimeError(f"node {self.node_id}: async subspace gossip: the model moved off the public mask "
                               "(the DP steps' mask must be [dp].subspace with the same fraction, seed, whole and "
                               "a period of at least the planned steps)")
        values = flat[self._indices]
        if self._quant is None:
            return Compressed("dense", self._segments, values=values.astype(np.float32))
        self._quant.reset()
        return self._quant.compress(_derive(values - self._init[self._indices], self._segments))

    def decode(self, msg: object) -> np.ndarray:
        """A peer's k mask values (float64); MalformedMessage if ``msg`` is not a frame on this mask."""
        if not isinstance(msg, Compressed):
            raise MalformedMessage(f"node {self.node_id}: expected a subspace frame, got {type(msg).__name__}")
        values = decode_values(msg, self._indices, self._shapes)
        if msg.kind.startswith("quant") != (self._quant is not None):
            raise MalformedMessage(f"node {self.node_id}: subspace frame of kind {msg.kind!r}, expected "
                                   f"{'quantised' if self._quant is not None else 'float32'} values")
        return values + self._init[self._indices] if self._quant is not None else values

    def model(self, msg: object) -> list[np.ndarray]:
        """The peer's model a frame carries: its k values on the mask, the public initial model off it."""
        flat = self._init.copy()
        flat[self._indices] = self.decode(msg)
        return [a.astype(dt) for a, dt in zip(split_flat(flat, self._shapes, np.float64), self._dtypes)]

    def average(self, own: Sequence[np.ndarray], msg: object) -> list[np.ndarray] | None:
        """``own`` with its mask set to the mean of its and the peer's k values (None if ``msg`` is malformed
        or ``own`` has another shape); off the mask ``own`` is returned unchanged."""
        if tuple(tuple(int(s) for s in np.shape(p)) for p in own) != self._shapes:
            return None
        try:
            theirs = self.decode(msg)
        except MalformedMessage:
            return None
        flat = _flat(own)
        flat[self._indices] = (flat[self._indices] + theirs) / 2.0
        return [a.astype(dt) for a, dt in zip(split_flat(flat, self._shapes, np.float64), self._dtypes)]


#: what async_gossip's ``[strategy].params`` may set for its subspace compressor (beside ``compressor``,
#: or in a ``compression_params`` table); the mask's local steps do not matter, it is fixed
ASYNC_SUBSPACE_KEYS = frozenset({"fraction", "public_seed", "period", "bits", "whole"})


def async_subspace_params(params: Mapping[str, Any], where: str = "[strategy].params") -> dict[str, Any] | None:
    """The ``SubspaceK`` settings async_gossip's ``params`` ask for (None: no compressor); values checked.

    ConfigError naming ``<where>.<key>`` for another compressor, a setting without
    ``compressor = "subspace"``, or a bad value. The fixed-mask rule needs the run's
    planned steps, so :class:`SubspaceExchange` checks it when the strategy is built.
    """
    comp = params.get("compressor")
    nested = params.get("compression_params", {}) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"{where}.compression_params: must be a table")
    flat = {k: v for k, v in params.items() if k in ASYNC_SUBSPACE_KEYS}
    if comp in (None, "none"):
        given = sorted({*flat, *nested})
        if given:
            raise ConfigError(f"{where}.{given[0]}: a compressor setting needs {where}.compressor = \"subspace\"")
        return None
    if comp != "subspace":
        raise ConfigError(f"{where}.compressor: async_gossip cannot compress ({comp!r}): its pairwise averaging "
                          "exchanges whole models with a random peer each time, and CHOCO-style estimates would "
                          "need every message to every neighbour delivered in order; use [strategy].name = "
                          "\"sync_gossip\" with a compressor, or compressor = \"subspace\" with [dp].subspace and "
                          "a mask fixed for the whole run (the k values of a public mask)")
    both = sorted(set(flat) & set(nested))
    if both:
        raise ConfigError(f"{where}.{both[0]}: given both beside compressor and in {where}.compression_params")
    bad = sorted(set(nested) - ASYNC_SUBSPACE_KEYS)
    if bad:
        raise ConfigError(f"{where}.compression_params.{bad[0]}: async_gossip's subspace compressor takes "
                          f"{', '.join(sorted(ASYNC_SUBSPACE_KEYS))}")
    kwargs = {**nested, **flat}
    try:  # build once so that bad values fail when the config is read, naming the field
        SubspaceK(**kwargs)
    except CompressionError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return kwargs
