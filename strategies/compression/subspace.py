"""``SubspaceK``: the wire side of subspace DP-SGD — only the k values of the shared public mask.

With ``[dp].subspace = { fraction, seed, period }`` every DP step of every node touches only
the coordinates of a mask drawn from the public seed and the step index
(:func:`privfl.accounting.subspace.subspace_indices`). This compressor sends, per round, the
values of its released input on the union of the masks of that round's steps and nothing
else: the receiver derives the same indices from the same public seed and round, so they
are not sent.

A message is a ``dense`` (float32 values) or ``quantB`` (``bits``) :class:`Compressed` over
the round's *segment shapes* ``((k_0,), (k_1,), …)`` — how many kept coordinates fall in
each model tensor, derived from public values at both ends (:meth:`SubspaceK.frame_shapes`).
So it frames with ``Compressed.to_bytes`` like any other message (20-byte header, then 4k
bytes of values, or ⌈kB/8⌉ + 8T), and a receiver rebuilds it with
``Compressed.from_bytes(frame, frame_shapes(round, model_shapes))``: a frame for another
round's mask fails there. :meth:`SubspaceK.expand` turns it into an in-memory ``sparse``
message over the model's shapes (the derived indices), which every decoder takes.

``whole`` > 0 makes the mask structured (small tensors whole, a random share of the big ones:
:func:`privfl.accounting.subspace.subspace_mask`, over the model's public shapes). Async gossip
uses the same frames on a mask fixed for the whole run (``subspace_exchange``).
The selection depends only on (public seed, round, fraction, local_steps, period, whole) — never
on the values — so it is post-processing of a released input, as every compressor here.
Rounds are counted by the compressor's own calls: one ``compress`` a round (sync gossip's
gossip), every node from round 0, so all nodes agree on the round (a driver may set
:attr:`SubspaceK.rounds`, e.g. FedAvg to the global model's version). ``SyncGossip`` given
this compressor mixes with :class:`SubspaceGossip` (D-PSGD on the mask's coordinates).
Use ``shared_init = true`` and the same ``fraction``, ``seed`` (``public_seed`` here) and
``period`` as ``[dp].subspace``, and ``local_steps`` = the strategy's local steps. A
``period`` at least the run's planned steps keeps one mask for the whole run (a random
fixed sub-network trained with all the steps: what holds accuracy at small fractions).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privfl.accounting.subspace import check_subspace_params, subspace_indices, subspace_mask
from privfl.strategies.compression.compressors import (
    COMPRESSORS,
    CompressionError,
    Compressor,
    Quantize8,
    Shapes,
    _require_released,
    check_gamma,
)
from privfl.strategies.compression.message import (
    Compressed,
    MalformedMessage,
    _offsets,
    check_neighbour_message,
    decode_flat,
)
from privfl.strategies.compression.release import Released, _derive

__all__ = ["SubspaceGossip", "SubspaceK", "decode_values", "round_indices", "segment_shapes"]


def round_indices(public_seed: int, round_index: int, d: int | Shapes, fraction: float, local_steps: int = 1,
                  period: int = 1, whole: int = 0) -> np.ndarray:
    """Sorted union of the masks of round ``round_index``'s steps (a function of public values only).

    ``d``: the model's size, or its tensor shapes (needed for a structured mask, ``whole`` > 0).
    """
    steps = range(round_index * local_steps, (round_index + 1) * local_steps)
    masks = sorted({s // period for s in steps})
    if isinstance(d, (int, np.integer)):
        if whole:
            raise CompressionError("subspace: a structured mask (whole > 0) needs the model's shapes, not its size")
        parts = [subspace_indices(public_seed, m, int(d), fraction) for m in masks]
    else:
        parts = [subspace_mask(public_seed, m, d, fraction, whole) for m in masks]
    return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


class SubspaceK(Compressor):
    """Send the released input's values on this round's public mask only (no rescaling, no memory)."""

    name = "subspace"

    def __init__(self, fraction: float = 0.01, public_seed: int | None = None, period: int = 1,
                 local_steps: int = 1, bits: int | None = None, whole: int = 0) -> None:
        try:
            checked = check_subspace_params({"fraction": fraction, "seed": public_seed, "period": period,
                                             "whole": whole}, "subspace")
        except Exception as exc:  # ConfigError: re-raise as the compressors' error type
            raise CompressionError(str(exc).replace("subspace.seed", "subspace.public_seed")) from None
        if isinstance(local_steps, bool) or not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
            raise CompressionError(f"subspace: local_steps must be an integer >= 1, got {local_steps!r}")
        if bits is not None and (isinstance(bits, bool) or bits not in (8, 4, 2, 1)):
            raise CompressionError(f"subspace: bits must be 8, 4, 2 or 1 (or absent: float32 values), got {bits!r}")
        super().__init__(error_feedback=False)
        self._bits = None if bits is None else int(bits)
        self._quant = None if bits is None else Quantize8(bits=int(bits))
        self._fraction, self._seed, self._period = checked["fraction"], checked["seed"], checked["period"]
        self._whole = checked["whole"]
        self._local_steps = int(local_steps)
        self.rounds = 0  # compress calls so far: the round whose mask the next message uses

    @property
    def local_steps(self) -> int:
        """DP steps per round (the round's mask is the union of theirs)."""
        return self._local_steps

    @property
    def bits(self) -> int | None:
        """Bits per quantised value, or None (float32 values)."""
        return self._bits

    @property
    def period(self) -> int:
        """DP steps per mask (a mask fixed for the whole run: at least the planned steps)."""
        return self._period

    def indices_for(self, round_index: int, d: int | Shapes) -> np.ndarray:
        """The flat coordinates round ``round_index`` sends (both ends derive them); ``d``: the model's
        shapes (or, for an unstructured mask, its size)."""
        return round_indices(self._seed, round_index, d, self._fraction, self._local_steps, self._period,
                             self._whole)

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        idx = self.indices_for(self.rounds, shapes)
        self.rounds += 1
        segments = segment_shapes(idx, shapes)  # ((k_0,), (k_1,), …): the receiver derives them too
        if self._quant is None:
            return Compressed("dense", segments, values=p[idx].astype(np.float32))
        # the k values quantised per model tensor (one (low, step) pair each)
        self._quant.reset()
        return self._quant.compress(_derive(p[idx].astype(np.float64), segments))

    def frame_shapes(self, round_index: int, shapes: Shapes) -> Shapes:
        """The shapes a receiver rebuilds round ``round_index``'s frame with (``Compressed.from_bytes``)."""
        return segment_shapes(self.indices_for(round_index, shapes), shapes)

    def expand(self, msg: Compressed, round_index: int, shapes: Shapes) -> Compressed:
        """Round ``round_index``'s message as a ``sparse`` one over the model's ``shapes`` (in memory only).

        The indices are the derived mask's; MalformedMessage if ``msg`` is not on that mask.
        """
        idx = self.indices_for(round_index, shapes)
        values = decode_values(msg, idx, shapes)
        return Compressed("sparse", tuple(shapes), indices=idx.astype(np.int32), values=values.astype(np.float32))

    def describe(self) -> str:
        return (f"subspace(fraction={self._fraction:g}, public_seed={self._seed}, period={self._period}, "
                f"whole={self._whole}, "
                f"local_steps={self._local_steps}, values={'float32' if self._bits is None else f'{self._bits}-bit'})")


def segment_shapes(indices: np.ndarray, shapes: Shapes) -> Shapes:
    """((k_0,), (k_1,), …): how many of the sorted flat ``indices`` fall in each tensor of ``shapes``."""
    counts = np.diff(np.searchsorted(indices, _offsets(shapes)))
    return tuple((int(c),) for c in counts)


def decode_values(msg: Compressed, indices: np.ndarray, shapes: Shapes) -> np.ndarray:
    """The k values a subspace message carries for ``indices`` (float32 or quantised); validated."""
    if not isinstance(msg, Compressed):
        raise MalformedMessage(f"subspace message: expected a Compressed message, got {type(msg).__name__}")
    if msg.kind == "dense" or msg.kind.startswith("quant"):
        if msg.shapes != segment_shapes(indices, shapes):
            raise MalformedMessage("subspace message: its values do not match this round's shared mask")
        values = decode_flat(msg)
    else:
        raise MalformedMessage(f"subspace message: unexpected kind {msg.kind!r}")
    if not np.all(np.isfinite(values)):
        raise MalformedMessage("subspace message: non-finite values")
    return values


def _register() -> None:
    COMPRESSORS.setdefault("subspace", SubspaceK)


_register()



class SubspaceGossip:
    """Sync gossip on the shared mask M of the round (CHOCO estimates, consensus on M only).

    Same interface as :class:`~strategies.compression.InnovationGossip` (``make_message``,
    ``receive``, ``consensus_step``), used by ``SyncGossip`` when its compressor is
    :class:`SubspaceK`. Every node keeps public estimates x̂_j of itself and its neighbours
    (all start at the shared initial model). Per round: send q = C((x_i − x̂_i)[M]) and set
    x̂_i[M] += q; apply each neighbour's q_j to x̂_j[M]; mix only M:
    x_i[M] += γ Σ_j w_ij (x̂_j[M] − x̂_i[M]). With float32 values q is exact, so x̂[M] = x[M]
    and this is D-PSGD on the coordinates the round's DP steps moved; with ``bits`` the
    estimates absorb the rounding. Nothing moves off M. A missing neighbour's weight stays on
    the node itself. Every input is released (post-noise), every output derived.
    """

    def __init__(self, node_id: str, neighbor_weights: Mapping[str, float], compressor: SubspaceK,
                 gamma: float, initial: Released | None = None) -> None:
        if not isinstance(compressor, SubspaceK):
            raise CompressionError(f"subspace gossip: compressor must be SubspaceK, got {type(compressor).__name__}")
        gamma = check_gamma(gamma, "subspace gossip")
        self._node_id = node_id
        self._weights = {str(j): float(w) for j, w in neighbor_weights.items()}
        self._compressor = compressor
        self._gamma = float(gamma)
        self._indices: np.ndarray | None = None
        self._shapes: Shapes | None = None
        self._estimates: dict[str, np.ndarray] = {}
        self._got: set[str] = set()
        if initial is not None:
            initial = _require_released(initial, "subspace gossip initial estimate")
            self._init(initial.shapes, initial.flat())

    def _init(self, shapes: Shapes, start: np.ndarray) -> None:
        self._shapes = tuple(shapes)
        for j in [self._node_id, *self._weights]:
            self._estimates[j] = start.astype(np.float64, copy=True)

    def frame_shapes(self, round_index: int, shapes: Shapes) -> Shapes:
        """The shapes round ``round_index``'s frames are rebuilt with (a node's transport asks by message round)."""
        return self._compressor.frame_shapes(round_index, shapes)

    def make_message(self, x: Released) -> Compressed:
        """C((x − x̂_self) on this round's mask); x̂_self moves by what was sent."""
        x = _require_released(x, "subspace gossip make_message()")
        if self._shapes is None:
            self._init(x.shapes, np.zeros(x.size))
        if tuple(x.shapes) != self._shapes:
            raise MalformedMessage(f"node {self._node_id}: model shapes changed")
        own = self._estimates[self._node_id]
        msg = self._compressor.compress(_derive(x.flat() - own, x.shapes))
        self._indices = self._compressor.indices_for(self._compressor.rounds - 1, x.shapes).astype(np.int32)
        own[self._indices] += decode_values(msg, self._indices, self._shapes)
        self._got = set()
        return msg

    def receive(self, sender: str, msg: Compressed) -> None:
        """Apply neighbour ``sender``'s values to its estimate, after checking they are on this round's mask."""
        check_neighbour_message(self._node_id, self._weights, sender, msg)
        if self._indices is None or self._shapes is None:
            raise MalformedMessage(f"node {self._node_id}: {sender!r}'s message came before this node's own")
        try:
            values = decode_values(msg, self._indices, self._shapes)
        except MalformedMessage as exc:
            raise MalformedMessage(f"node {self._node_id}: from {sender!r}: {exc}") from None
        self._estimates[sender][self._indices] += values
        self._got.add(sender)

    def consensus_step(self, x: Released) -> Released:
        """x[M] + γ Σ_j w_ij (x̂_j[M] − x̂_i[M]); post-processing, so derived."""
        x = _require_released(x, "subspace gossip consensus_step()")
        flat = x.flat()
        if self._indices is not None:
            idx = self._indices
            own = self._estimates[self._node_id][idx]
            pull = np.zeros_like(own)
            for j, w in self._weights.items():  # fixed order: deterministic sums
                if j in self._got:
                    pull += w * (self._estimates[j][idx] - own)
            flat[idx] = flat[idx] + self._gamma * pull
        self._got = set()
        return _derive(flat, x.shapes, "post-processing: subspace gossip")
