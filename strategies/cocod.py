"""CoCoD-SGD (Shen et al., IJCAI 2019): computation and communication decoupled gossip.

Why: over slow links between hospitals, D-PSGD (:class:`~privfl.strategies.gossip.SyncGossip`)
waits for its neighbours' models after every local computation, so a round costs
compute + communication. CoCoD starts the exchange of the round-start model ``x_t`` and
computes the local DP steps from that same ``x_t`` at the same time, then merges

    x_{t+1} = Σ_j W_ij x_j^t + (x_i^{t+½} − x_i^t)

(the Metropolis–Hastings mix of the round-start models, plus the node's own local
displacement), so a round costs max(compute, communication).

Privacy is the same as D-PSGD's: the model sent at round t is ``x_t``, which is the public
initial model (t = 0) or a mix of released models plus displacements made only by noised,
accounted DP steps — post-processing. Local training always runs on a private copy of
``x_t``, and the message carries another copy made before training starts, so nothing
the client computes during a round (it may hold un-noised intermediate values) can leak
into a message. A stopped node sends nothing more.

What a site holds between rounds is ``x_{t+1}``: the mix plus its *own* last, unmixed
displacement, so a site's model is further from the consortium average than D-PSGD's
(whose own update is mixed before it is kept); the average itself evolves exactly as in
D-PSGD (x̄_{t+1} = x̄_t + mean displacement). ``benchmarks/cocod.py`` measures both.

Drivers: a real node calls :meth:`CoCoDGossip.step`, which runs the sends and the wait for
the neighbours' round-t models in a background thread while ``client.fit`` runs (the
``PeerNetwork`` calls block); the simulator calls :meth:`begin_round` with its clock at the
round start (``overlaps_communication``), so messages leave at t and the round ends at
max(t + compute, last arrival).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from privfl.accounting.errors import ConfigError
from privfl.strategies.background import Background
from privfl.strategies.base import ModelMessage, Params, PeerNetwork, StepReport
from privfl.strategies.gossip import SyncGossip, params_compatible

__all__ = ["CoCoDGossip", "cocod_merge"]


def _copy(params: list[np.ndarray]) -> Params:
    return [np.array(p, copy=True) for p in params]


def cocod_merge(start: Params, trained: Params, self_weight: float, neighbours: list[tuple[float, Params]]) -> Params:
    """``self_weight·start + Σ w_j x_j + (trained − start)`` per float array (float64 sums, fixed order).

    Non-float arrays keep ``trained``'s values (the client's own counters, if any).
    """
    out: Params = []
    for k, (x0, x1) in enumerate(zip(start, trained)):
        if not np.issubdtype(x0.dtype, np.floating):
            out.append(np.array(x1, copy=True))
            continue
        s = x0.astype(np.float64)
        acc = self_weight * s
        for w, other in neighbours:
            acc = acc + w * np.asarray(other[k], dtype=np.float64)
        out.append((acc + (np.asarray(x1, dtype=np.float64) - s)).astype(x0.dtype))
    return out


class CoCoDGossip(SyncGossip):
    """CoCoD-SGD over a gossip topology: send ``x_t`` while training from it, then merge.

    Config keys: as :class:`SyncGossip` (``local_steps``, ``mixing`` or ``topology``,
    ``timeout``), without compression (``compressor`` must be absent or ``"none"``: the
    innovation estimates of compressed gossip are defined for D-PSGD's order of train then
    send); ``consensus_exchanges`` (int, default 0): pure mixing rounds ``x ← W x`` after
    training (post-processing of released models: no privacy cost), which share every
    site's last displacement — both drivers run them (the simulator in two halves,
    :meth:`begin_consensus_round` / :meth:`finish_consensus_round`; a real node calls
    :meth:`consensus_round` ``[node].consensus_exchanges`` times). A neighbour whose
    round-t model is missing has its weight put on ``x_i^t``; in a node's consensus rounds it
    is then no longer waited for.
    """

    synchronous = True
    overlaps_communication = True

    def __init__(self, client: NumPyClient, network: PeerNetwork, params: Params,
                 config: Mapping[str, Any] | None = None) -> None:
        comp = dict(config or {}).get("compressor")
        if comp is not None and comp != "none":
            raise ConfigError("[strategy].params.compressor: cocod does not compress; use [strategy].name = "
                              "\"sync_gossip\" with a compressor")
        super().__init__(client, network, params, config)
        k = self.config.get("consensus_exchanges", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"[strategy].params.consensus_exchanges: must be an integer >= 0, got {k!r}")
        self.consensus_exchanges = k
        self._waited = list(self.mixing)  # the neighbours a node's consensus round still waits for
        self._start: Params | None = None  # x_t, the round-start model (what was sent)
        self._trained: Params | None = None  # x_{t+½}, after this round's local DP steps
        self._exhausted = False

    # ---- the two halves, run one after the other (simulator) or overlapped (step) -----------
    def _send_start(self) -> tuple[int, list[str]]:
        """Send the round-start model ``x_t`` to every neighbour; (bytes sent, peers reached)."""
        assert self._start is not None
        sent, peers = 0, []
        for peer in self.mixing:
            msg = ModelMessage(sender=self.node_id, round=self.round, kind="model", params=_copy(self._start))
            if self.network.send(peer, msg):
                sent += msg.nbytes
                peers.append(peer)
        return sent, peers

    def _train_from_start(self) -> int:
        """Local DP steps from a copy of ``x_t``; the number of steps taken (0 if the budget refused)."""
        assert self._start is not None
        trained, steps, exhausted = self._train(self._start)
        self._trained = trained
        self._exhausted = exhausted
        return steps

    def _open_round(self) -> bool:
        """Fix ``x_t`` for this round; False when the node is stopped (it sends and trains no more)."""
        self._trained = None
        self._exhausted = False
        if self.stopped:
            self._start = None
            return False
        self._start = _copy(self.params)
        return True

    def begin_round(self) -> StepReport:
        """Send ``x_t`` to every neighbour, then train from it (the simulator charges max(compute, comm))."""
        if not self._open_round():
            return self._report(0, [], 0, 0)
        sent, peers = self._send_start()
        self.bytes_sent += sent
        steps = self._train_from_start()
        return self._report(steps, peers, sent, 0)

    def finish_round(self, received: dict[str, ModelMessage]) -> StepReport:
        """Merge: ``x_{t+1} = W_ii x_i^t + Σ_j W_ij x_j^t + (x_i^{t+½} − x_i^t)``."""
        start = self._start if self._start is not None else self.params
        trained = self._trained if self._trained is not None else start
        got: list[tuple[float, Params]] = []
        peers, nbytes = [], 0
        for peer in self.mixing:  # fixed order: deterministic sums
            msg = received.get(peer)
            if (msg is None or msg.kind != "model" or msg.round != self.round
                    or not params_compatible(start, msg.params)):
                self.missing += 1
                continue
            assert msg.params is not None
            got.append((self.mixing[peer], [np.asarray(p) for p in msg.params]))
            peers.append(peer)
            nbytes += msg.nbytes
        self_w = 1.0 - sum(w for w, _ in got)
        self.params = cocod_merge(start, trained, self_w, got)
        self.bytes_received += nbytes
        self.round += 1
        self._start = self._trained = None
        if self._exhausted:
            self._stop("privacy budget exhausted: the last local step that fits has been taken")
        return self._report(0, sorted(peers), 0, nbytes)

    # ---- pure mixing after training -----------------------------------------------------------
    def begin_consensus_round(self) -> StepReport:
        """Send the current model to every neighbour; no local steps (nothing once stopped: fail closed)."""
        self._trained = None
        self._exhausted = False
        if self.stopped:
            self._start = None
            return self._report(0, [], 0, 0)
        self._start = _copy(self.params)
        sent, peers = self._send_start()
        self.bytes_sent += sent
        return self._report(0, peers, sent, 0)

    def finish_consensus_round(self, received: dict[str, ModelMessage]) -> StepReport:
        """Mix ``x ← W x`` (the merge with no displacement)."""
        return self.finish_round(received)

    def consensus_round(self) -> StepReport:
        """One pure mixing round for a real node: send, wait for the neighbours still answering, mix."""
        r = self.round
        first = self.begin_consensus_round()
        received = self.network.receive(r, self._waited, self.timeout) if self._waited else {}
        self._waited = [p for p in self._waited if p in received]
        second = self.finish_consensus_round(received)
        return StepReport(peers=second.peers, bytes_sent=first.bytes_sent, bytes_received=second.bytes_received,
                          loss=self.last_loss, epsilon=self.epsilon, stopped=self.stopped, reason=self.stop_reason)

    def step(self) -> StepReport:
        """One round for a real node: the exchange of ``x_t`` runs in a background thread while
        ``client.fit`` runs here; then the merge. An error in the exchange is raised here."""
        r = self.round
        if not self._open_round():
            return self.finish_round({})

        def communicate() -> tuple[int, dict[str, ModelMessage]]:
            sent, _ = self._send_start()
            return sent, self.network.receive(r, list(self.mixing), self.timeout)

        comm = Background(communicate, f"cocod-{self.node_id}-{r}")
        try:
            steps = self._train_from_start()
        finally:
            sent, received = comm.join()  # an error in the exchange is raised here
        self.bytes_sent += sent
        second = self.finish_round(received)
        return StepReport(local_steps=steps, peers=second.peers, bytes_sent=sent,
                          bytes_received=second.bytes_received, loss=self.last_loss, epsilon=self.epsilon,
                          stopped=self.stopped, reason=self.stop_reason)
