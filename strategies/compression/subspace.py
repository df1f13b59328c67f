"""``SubspaceK``: the wire side of subspace DP-SGD — only the k values of the shared public mask.

With ``[dp].subspace = { fraction, seed, period }`` every DP step of every node touches only
the coordinates of a mask drawn from the public seed and the step index
(:func:`privfl.accounting.subspace.subspace_indices`). This compressor sends, per round, the
values of its released input on the union of the masks of that round's steps and nothing
else: the receiver derives the same indices from the same public seed and round, so they
are not counted (a ``sparse`` message with ``shared_indices``: 4 bytes a kept value).

The selection depends only on (public seed, round, fraction, local_steps, period) — never
on the values — so it is post-processing of a released input, as every compressor here.
Rounds are counted by the compressor's own calls: one ``compress`` a round (sync gossip's
gossip), every node from round 0, so all nodes agree on the round. ``SyncGossip`` given
this compressor mixes with :class:`SubspaceGossip` (D-PSGD on the mask's coordinates).
Use ``shared_init = true`` and the same ``fraction``, ``seed`` (``public_seed`` here) and
``period`` as ``[dp].subspace``, and ``local_steps`` = the strategy's local steps.

Limitation: a shared-index message is not framed for the real network
(``Compressed.to_bytes`` refuses it); it is counted and exchanged in the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privfl.accounting.subspace import check_subspace_params, subspace_indices
from privfl.strategies.compression.compressors import (
    COMPRESSORS,
    CompressionError,
    Compressor,
    Shapes,
    _require_released,
)
from privfl.strategies.compression.message import Compressed, MalformedMessage
from privfl.strategies.compression.release import Released, _derive

__all__ = ["SubspaceGossip", "SubspaceK", "round_indices"]


def round_indices(public_seed: int, round_index: int, d: int, fraction: float, local_steps: int = 1,
                  period: int = 1) -> np.ndarray:
    """Sorted union of the masks of round ``round_index``'s steps (a function of public values only)."""
    steps = range(round_index * local_steps, (round_index + 1) * local_steps)
    masks = sorted({s // period for s in steps})
    parts = [subspace_indices(public_seed, m, d, fraction) for m in masks]
    return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


class SubspaceK(Compressor):
    """Send the released input's values on this round's public mask only (no rescaling, no memory)."""

    name = "subspace"

    def __init__(self, fraction: float = 0.01, public_seed: int | None = None, period: int = 1,
                 local_steps: int = 1) -> None:
        try:
            checked = check_subspace_params({"fraction": fraction, "seed": public_seed, "period": period},
                                            "subspace")
        except Exception as exc:  # ConfigError: re-raise as the compressors' error type
            raise CompressionError(str(exc).replace("subspace.seed", "subspace.public_seed")) from None
        if isinstance(local_steps, bool) or not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
            raise CompressionError(f"subspace: local_steps must be an integer >= 1, got {local_steps!r}")
        super().__init__(error_feedback=False)
        self._fraction, self._seed, self._period = checked["fraction"], checked["seed"], checked["period"]
        self._local_steps = int(local_steps)
        self.rounds = 0  # compress calls so far: the round whose mask the next message uses

    def indices_for(self, round_index: int, d: int) -> np.ndarray:
        """The flat coordinates round ``round_index`` sends (both ends derive them)."""
        return round_indices(self._seed, round_index, d, self._fraction, self._local_steps, self._period)

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        idx = self.indices_for(self.rounds, len(p)).astype(np.int32)
        self.rounds += 1
        return Compressed("sparse", shapes, indices=idx, values=p[idx].astype(np.float32), shared_indices=True)

    def describe(self) -> str:
        return (f"subspace(fraction={self._fraction:g}, public_seed={self._seed}, period={self._period}, "
                f"local_steps={self._local_steps})")


def _register() -> None:
    COMPRESSORS.setdefault("subspace", SubspaceK)


_register()



class SubspaceGossip:
    """Sync gossip on the shared mask: x_i[M] ← x_i[M] + γ Σ_j w_ij (x_j[M] − x_i[M]); nothing moves off M.

    Same interface as :class:`~strategies.compression.InnovationGossip` (``make_message``,
    ``receive``, ``consensus_step``), used by ``SyncGossip`` when its compressor is
    :class:`SubspaceK`. Every node's DP steps this round touched only the round's mask M,
    so (from a shared initial model) averaging the k values of M is D-PSGD on the
    coordinates that moved; the others are left as they are. A missing neighbour's weight
    stays on the node itself. Every input is released (post-noise), every output derived.
    """

    def __init__(self, node_id: str, neighbor_weights: Mapping[str, float], compressor: SubspaceK,
                 gamma: float) -> None:
        if not isinstance(compressor, SubspaceK):
            raise CompressionError(f"subspace gossip: compressor must be SubspaceK, got {type(compressor).__name__}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise CompressionError(f"subspace gossip: gamma must be in (0, 1], got {gamma!r}")
        self._node_id = node_id
        self._weights = {str(j): float(w) for j, w in neighbor_weights.items()}
        self._compressor = compressor
        self._gamma = float(gamma)
        self._indices: np.ndarray | None = None
        self._shapes: Shapes | None = None
        self._got: dict[str, np.ndarray] = {}

    def make_message(self, x: Released) -> Compressed:
        """The k values of this round's mask (the indices are derived by every neighbour)."""
        x = _require_released(x, "subspace gossip make_message()")
        msg = self._compressor.compress(x)
        self._indices, self._shapes, self._got = msg.indices.copy(), msg.shapes, {}
        return msg

    def receive(self, sender: str, msg: Compressed) -> None:
        """Keep neighbour ``sender``'s values, after checking they are on this round's mask."""
        if sender not in self._weights:
            raise MalformedMessage(f"node {self._node_id}: message from {sender!r}, which is not a neighbour")
        if not isinstance(msg, Compressed) or msg.kind != "sparse":
            raise MalformedMessage(f"node {self._node_id}: expected a sparse subspace message from {sender!r}")
        if self._indices is None or msg.shapes != self._shapes or not np.array_equal(msg.indices, self._indices):
            raise MalformedMessage(f"node {self._node_id}: {sender!r}'s message is not on this round's shared mask")
        if not np.all(np.isfinite(msg.values)):
            raise MalformedMessage(f"node {self._node_id}: non-finite values from {sender!r}")
        self._got[sender] = msg.values.astype(np.float64)

    def consensus_step(self, x: Released) -> Released:
        """Mix the mask's coordinates with the neighbours' values; post-processing, so derived."""
        x = _require_released(x, "subspace gossip consensus_step()")
        flat = x.flat()
        if self._indices is not None:
            own = flat[self._indices]
            pull = np.zeros_like(own)
            for j, w in self._weights.items():  # fixed order: deterministic sums
                if j in self._got:
                    pull += w * (self._got[j] - own)
            flat[self._indices] = own + self._gamma * pull
        self._got = {}
        return _derive(flat, x.shapes, "post-processing: subspace gossip")
