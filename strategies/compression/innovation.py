"""Compressed-innovation gossip (CHOCO-Gossip / COLD's estimate pattern), one per node.

Every node i keeps public estimates x̂_j of itself and of each neighbour j; all
neighbours of j hold the same x̂_j, because each changes x̂_j only by adding the messages
j sent. Per round, node i:

1. sends q_i = C(x_i − x̂_i) to all neighbours and sets x̂_i ← x̂_i + q_i  (:meth:`make_message`);
2. applies each neighbour's q_j: x̂_j ← x̂_j + q_j                          (:meth:`receive`);
3. mixes: x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i)                              (:meth:`consensus_step`).

The estimate already carries what was not sent, so the compressor must not use error
feedback of its own. Symmetric weights keep Σ_i x_i unchanged. Every message must be
applied exactly once and in order: a lost message leaves x̂_j out of step with j.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from privfl.strategies.compression.compressors import CompressionError, Compressor, _require_released, check_gamma
from privfl.strategies.compression.message import (
    Compressed,
    MalformedMessage,
    check_neighbour_message,
    decode_flat,
    split_flat,
)
from privfl.strategies.compression.release import Released, _derive
from privfl.strategies.topology import Topology

__all__ = ["InnovationGossip"]

log = logging.getLogger("privfl.compression")


class InnovationGossip:
    """One node's side of compressed-innovation gossip (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        neighbor_weights: Mapping[str, float],
        compressor: Compressor,
        gamma: float,
        initial: Released | None = None,
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise CompressionError("innovation gossip: compressor must be a Compressor, "
                                   f"got {type(compressor).__name__}")
        if compressor.error_feedback:
            raise CompressionError(
                f"innovation gossip: compressor {compressor.describe()} keeps its own error memory; "
                "the public estimate already carries what was not sent, so use one without error feedback"
            )
        gamma = check_gamma(gamma, "innovation gossip")
        weights = {str(j): float(w) for j, w in neighbor_weights.items()}
        if node_id in weights:
            raise CompressionError(f"innovation gossip: neighbor_weights of {node_id!r} must not include itself")
        if any(not 0 < w <= 1 for w in weights.values()) or sum(weights.values()) > 1 + 1e-12:
            raise CompressionError(
                f"innovation gossip: neighbour weights of {node_id!r} must be in (0, 1] and sum to ≤ 1, got {weights}"
            )
        self._node_id = node_id
        self._weights = weights
        self._compressor = compressor
        self._gamma = float(gamma)
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._estimates: dict[str, np.ndarray] = {}
        if initial is not None:
            initial = _require_released(initial, "innovation gossip initial estimate")
            self._init_estimates(initial.shapes, initial.flat())
        log.info(
            "node %s: innovation gossip with %d neighbours, %s, gamma=%g",
            node_id, len(weights), compressor.describe(), self._gamma,
        )

    @classmethod
    def from_topology(
        cls,
        topology: Topology,
        node_id: str,
        compressor: Compressor,
        gamma: float,
        initial: Released | None = None,
    ) -> InnovationGossip:
        """Use ``node_id``'s Metropolis–Hastings row of the topology's mixing matrix."""
        return cls(node_id, topology.mixing_row(node_id), compressor, gamma, initial)

    @property
    def node_id(self) -> str:
        """This node."""
        return self._node_id

    @property
    def neighbors(self) -> list[str]:
        """The neighbours whose estimates this node keeps."""
        return list(self._weights)

    def make_message(self, x: Released) -> Compressed:
        """q = C(x − x̂_self), to send to every neighbour; x̂_self moves by q."""
        x = _require_released(x, "innovation gossip make_message()")
        flat = self._check(x.shapes, x.flat())
        own = self._estimates[self._node_id]
        msg = self._compressor.compress(_derive(flat - own, x.shapes))
        self._estimates[self._node_id] = own + decode_flat(msg)
        return msg

    def receive(self, sender: str, msg: Compressed) -> None:
        """Apply neighbour ``sender``'s message to its estimate."""
        check_neighbour_message(self._node_id, self._weights, sender, msg)
        self._check(msg.shapes, None)
        self._estimates[sender] = self._estimates[sender] + decode_flat(msg)

    def consensus_step(self, x: Released) -> Released:
        """x + γ Σ_j w_ij (x̂_j − x̂_i): post-processing of released values, so released too."""
        x = _require_released(x, "innovation gossip consensus_step()")
        flat = self._check(x.shapes, x.flat())
        own = self._estimates[self._node_id]
        pull = np.zeros_like(own)
        for j, w in self._weights.items():
            pull += w * (self._estimates[j] - own)
        return _derive(flat + self._gamma * pull, x.shapes, "post-processing: innovation gossip")

    def estimate(self, node_id: str) -> list[np.ndarray]:
        """The public estimate x̂ of ``node_id`` (this node or a neighbour), as float32 arrays."""
        if node_id not in self._estimates:
            raise KeyError(f"node {self._node_id} keeps no estimate of {node_id!r}")
        assert self._shapes is not None
        return split_flat(self._estimates[node_id], self._shapes)

    def _init_estimates(self, shapes: tuple[tuple[int, ...], ...], start: np.ndarray) -> None:
        self._shapes = tuple(shapes)
        for j in [self._node_id, *self._weights]:
            self._estimates[j] = start.astype(np.float64, copy=True)

    def _check(self, shapes: tuple[tuple[int, ...], ...], flat: np.ndarray | None) -> np.ndarray:
        if self._shapes is None:
            size = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
            self._init_estimates(shapes, np.zeros(size))
        elif tuple(shapes) != self._shapes:
            raise MalformedMessage(
                f"node {self._node_id}: shapes {list(shapes)} differ from the model's {list(self._shapes)}"
            )
        return flat if flat is not None else np.zeros(0)
