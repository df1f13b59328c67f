"""Decentralized gossip strategies: AD-PSGD / A(DP)²SGD (asynchronous) and D-PSGD (synchronous).

Both drive any Flower ``NumPyClient``: local training is ``client.fit(params,
{"local_steps": k})``. With a ``clients.DPClient`` every local step is a noised,
accounted DP-SGD step, so everything these strategies release is post-processing of
the node's own noised gradients (A(DP)²SGD: the noise is in the gradient, the gossip
only mixes models). With a plain client there is no guarantee and the strategies say so
(``epsilon = inf``, ``private = False``).

Fail closed: when the client's budget guard raises :class:`accounting.BudgetExhausted`
the strategy stops for good — no further ``fit`` and no exchange or send it initiates.
An ``AsyncGossip`` node whose budget is spent still *answers* passive exchanges with its
current model: that model is a mix of its own already-accounted noised updates and
models its peers released, i.e. post-processing, so serving it costs no privacy, and it
keeps the peers' averaging graph connected.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from privfl.accounting import BudgetExhausted
from privfl.accounting.errors import ConfigError
from privfl.accounting.log_limit import LogLimiter, warn_limited
from privfl.strategies.background import Background
from privfl.strategies.base import ModelMessage, NodeStrategy, Params, PeerNetwork, StepReport
from privfl.strategies.iterate_average import IterateAverage, ema_decay_setting

__all__ = ["AsyncGossip", "ErrorFeedbackGossip", "SyncGossip", "async_settings", "average_pair", "params_compatible"]

log = logging.getLogger("privfl.gossip")


# ---- array helpers ---------------------------------------------------------------------
def params_compatible(own: Sequence[np.ndarray], other: Sequence[np.ndarray] | None) -> bool:
    """Whether ``other`` has the same number of arrays, shapes, and only finite values."""
    if other is None or len(own) != len(other):
        return False
    for a, b in zip(own, other):
        b = np.asarray(b)
        if a.shape != b.shape:
            return False
        if np.issubdtype(b.dtype, np.floating) and not np.isfinite(b).all():
            return False
    return True


def average_pair(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Params:
    """(a + b) / 2 per array, computed in float64 and cast back; non-float arrays keep ``a``."""
    out: Params = []
    for x, y in zip(a, b):
        if np.issubdtype(x.dtype, np.floating):
            out.append(((x.astype(np.float64) + np.asarray(y, dtype=np.float64)) / 2.0).astype(x.dtype))
        else:
            out.append(np.array(x, copy=True))
    return out


def _copy(params: Sequence[np.ndarray]) -> Params:
    return [np.array(p, copy=True) for p in params]


def _local_steps(config: Mapping[str, Any]) -> int:
    k = config.get("local_steps", 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"strategy.local_steps must be a positive integer, got {k!r}")
    return int(k)


def async_settings(params: Mapping[str, Any], where: str = "[strategy].params"
                   ) -> tuple[int, float | None, bool, int]:
    """AsyncGossip's ``exchanges_per_step``, ``train_seconds``, ``overlap`` and ``gradient_peers``, checked (the
    registry checks a config with it when it is read, the class when it is built); ConfigError naming
    ``<where>.<key>``."""
    k = params.get("exchanges_per_step", 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{where}.exchanges_per_step: must be an integer >= 1 (pairwise averages after each "
                          f"local step), got {k!r}")
    d = params.get("train_seconds")
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < math.inf):
        raise ConfigError(f"{where}.train_seconds: must be a positive number of seconds (the training deadline), "
                          f"got {d!r}")
    overlap = params.get("overlap", False)
    if not isinstance(overlap, bool):
        raise ConfigError(f"{where}.overlap: must be true or false, got {overlap!r}")
    g = params.get("gradient_peers", 0)
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 0:
        raise ConfigError(f"{where}.gradient_peers: must be an integer >= 0 (peer models averaged into each step's "
                          f"gradient point), got {g!r}")
    return int(k), None if d is None else float(d), overlap, int(g)


class _GossipBase(NodeStrategy):
    """Shared local training with budget handling and privacy status."""

    def __init__(self, client: NumPyClient, network: PeerNetwork, params: Params,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__(client, network, params, config)
        self._refusals = LogLimiter()  # refusals a peer can trigger: a few log lines, not one per call
        self.node_id = network.node_id
        self.local_steps = _local_steps(self.config)
        self.total_steps = 0
        self.epsilon = math.nan
        self.private: bool | None = None  # unknown until the first fit
        self.last_loss = math.nan
        self.bytes_sent = 0
        self.bytes_received = 0
        self.fit_calls = 0
        self._lock = threading.Lock()

    # ---- privacy status -------------------------------------------------------------
    def privacy_status(self) -> dict[str, Any]:
        """ε spent so far and whether this node's releases carry a DP guarantee at all."""
        return {
            "node": self.node_id,
            "private": bool(self.private),
            "epsilon": self.epsilon,
            "steps": self.total_steps,
            "stopped": self.stopped,
            "reason": self.stop_reason,
            "note": "" if self.private or self.private is None
            else "client gives no differential-privacy guarantee (no DP in its fit metrics)",
        }

    def _update_privacy(self, metrics: Mapping[str, Any]) -> None:
        eps = metrics.get("epsilon")
        dp = metrics.get("dp")
        if eps is None or (dp is not None and int(dp) == 0) or float(eps) < 0:
            if self.private is not False:
                log.warning("node %s: client reports no DP; its models carry no privacy guarantee", self.node_id)
            self.private = False
            self.epsilon = math.inf
        else:
            self.private = True
            self.epsilon = float(eps)

    def _stop(self, reason: str) -> None:
        if not self.stopped:
            self.stopped = True
            self.stop_reason = reason
            log.info("node %s: stopped after %d local steps: %s", self.node_id, self.total_steps, reason)

    def _train(self, start: Params) -> tuple[Params | None, int, bool]:
        """Run ``local_steps`` on a copy of ``start``: (new params or None, steps done, exhausted).

        Fail closed: BudgetExhausted stops the node and returns no model.
        """
        self.fit_calls += 1
        try:
            new, _n, metrics = self.client.fit(_copy(start), {"local_steps": self.local_steps})
        except BudgetExhausted as e:
            self._stop(str(e))
            return None, 0, True
        metrics = dict(metrics or {})
        self._update_privacy(metrics)
        steps = int(metrics.get("steps", self.local_steps))
        self.total_steps += steps
        # the training loss is local to the site (a DPClient keeps it, never releases it)
        loss = getattr(self.client, "last_loss", metrics.get("loss"))
        if loss is not None:
            self.last_loss = float(loss)
        new = [np.asarray(p) for p in new]
        if not params_compatible(self.params, new):
            raise RuntimeError(f"node {self.node_id}: client.fit returned arrays of the wrong shape "
                               "or non-finite values")
        exhausted = bool(int(metrics.get("budget_exhausted", 0)))
        return new, steps, exhausted

    def _report(self, steps: int, peers: list[str], sent: int, received: int) -> StepReport:
        return StepReport(local_steps=steps, peers=peers, bytes_sent=sent, bytes_received=received,
                          loss=self.last_loss, epsilon=self.epsilon, stopped=self.stopped,
                          reason=self.stop_reason)


class AsyncGossip(_GossipBase):
    """AD-PSGD (Lian et al. 2018) with A(DP)²SGD's noise: train locally, then average pairwise.

    Config keys: ``local_steps`` (int, default 1); ``active`` (bool, default True): only
    active nodes initiate exchanges; ``bipartite`` (bool, default False): the topology's
    two-colouring is in force, so passive nodes wait for their lock and active nodes
    refuse requests; otherwise every node is active and requests meet a non-blocking
    try-lock (refused when busy), which cannot deadlock because an active node never
    waits for its own lock while a peer waits on it; ``peers`` (list of node ids the node
    may initiate with; default: every neighbour); ``seed`` (int) for the peer choice;
    ``compressor``: absent, ``"none"``, or a ``SubspaceK`` with a mask fixed for the whole run
    (``planned_steps``: the most DP steps a node takes; ``public_initial``: the shared initial
    model when ``params`` is a resumed one; see :meth:`_outgoing`);
    ``consensus_exchanges`` (int, default 0): after training ends, how many pure averaging
    exchanges an active node makes (:meth:`consensus_round`; post-processing of already
    noised models, so free of privacy cost) — the real node and the simulator both run
    them, so the two measure the same protocol; ``exchanges_per_step`` (int, default 1):
    pairwise averages an active node makes after each local step, each with a random peer
    (distinct peers while there are enough) — more mixing of already-noised models, which
    costs wire bytes and round trips but no privacy (no extra fit, no extra DP event);
    ``train_seconds`` (float, default none): a training deadline on the node's own clock,
    counted from the strategy's start — the first step that would begin past it, or whose
    expected end (its beginning plus the node's mean step time so far, measured on its own
    clock) is past it, trains nothing and stops the node; a step that began is trained,
    however long it takes (a public schedule, like a budget that ends early: a slow node then
    takes fewer steps and spends less ε, and the end-of-training consensus follows without
    waiting on a step that was not expected to end in time);
    ``overlap`` (bool, default False): AD-PSGD's communication thread — a step's exchanges
    run on a background thread (:class:`~privfl.strategies.background.Background`) while
    the *next* step trains, on a snapshot taken before those exchanges start, merged as a
    delta (below). At most one step's exchanges are in flight: the next step joins them
    before it starts its own, and :meth:`settle` (the node calls it at stop and before a
    checkpoint; the simulator after every step, charging max(compute, communication))
    joins them and raises their error. The exchanges carry the same already-noised models
    as without overlap (post-processing, no extra DP event); a step's report counts the
    exchanges it joined; ``gradient_peers`` (int, default 0): each local step takes its gradient at the
    mean of the model it trains from and the last ``gradient_peers`` peer models this node received
    in exchanges (the requests it served and the replies it got, as their frames decode) and adds
    that step's update (trained − point) to its own model — a point nearer the network's mean than
    its own model, which carries its own not yet averaged DP noise. Every input is a released
    (noised) model, so the point is post-processing: no extra DP event, the same ε per step.
    0: the node's own model (AD-PSGD); ``ema_decay`` (number in [0, 1), default none: off): an
    exponential moving average of the node's model after each step's merge
    (:class:`~strategies.iterate_average.IterateAverage`, post-processing, no ε) is what
    :meth:`snapshot` returns (what the node evaluates); exchanges during training carry the
    training iterate, never the average. When the node's training ends (it stops: budget or
    deadline) its model is replaced by its average, so what it serves from then on and the
    consensus exchanges average are the nodes' EMAs (every iterate in it is already accounted:
    sending it is post-processing; the node trains from it no more, though a peer still training
    may average with it).
    :meth:`roles` builds the role keys from a topology.

    Exchange (atomic pairwise averaging, ``x_i = x_j = (x_i + x_j)/2``): the active side
    holds its own lock, sends its model; the passive side, under its lock, replies with
    its *pre-average* model and sets its own to the average; the active side then sets
    the same average. Training runs outside the lock on a snapshot and is merged as a
    delta, ``x ← x + (trained − snapshot)``, so exchanges served meanwhile are kept.
    """

    def __init__(self, client: NumPyClient, network: PeerNetwork, params: Params,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__(client, network, params, config)
        self.active = bool(self.config.get("active", True))
        self.bipartite = bool(self.config.get("bipartite", False))
        peers = self.config.get("peers")
        self.peers: list[str] = list(peers) if peers is not None else list(network.neighbors())
        self._rng = random.Random(int(self.config.get("seed", 0)))
        self.subspace: Any = None  # async subspace gossip: pairwise averages of a fixed public mask's k values
        comp = self.config.get("compressor")
        if comp not in (None, "none"):
            from privfl.strategies.compression.subspace_exchange import SubspaceExchange

            public = self.config.get("public_initial")  # the shared initial model (resumed: not params)
            if public is None:
                public = self.params
            self.subspace = SubspaceExchange(self.node_id, comp, public, self.config.get("planned_steps"))
        self.consensus_exchanges = int(self.config.get("consensus_exchanges", 0))
        if self.consensus_exchanges < 0:
            raise ConfigError(f"async_gossip: consensus_exchanges must be >= 0, got {self.consensus_exchanges}")
        self.exchanges_per_step, self.train_seconds, self.overlaps_communication, gradient_peers = \
            async_settings(self.config)
        # the last gradient_peers peer models received (released values), for the gradient point
        self._peer_models: collections.deque[Params] = collections.deque(maxlen=gradient_peers)
        self._peer_lock = threading.Lock()  # not self._lock: the step reads them while exchanges hold that
        decay = ema_decay_setting(self.config)
        self.ema: IterateAverage | None = None if decay is None else IterateAverage(decay)
        self._ema_in_consensus = False  # the model was replaced by its EMA for the consensus phase
        self._start = network.now() if self.train_seconds is not None else 0.0
        self._admitted: bool | None = None  # begin_compute's answer for the step the simulator charged
        self._began: float | None = None  # when the step the simulator charged began (begin_compute's t)
        self._step_total, self._step_count = 0.0, 0  # this node's measured step durations (its own clock)
        self._inflight: Background[tuple[int, int, list[str]]] | None = None  # the last step's exchanges
        self._next_start: tuple[Params, int] | None = None  # (snapshot, version) the next step trains from
        self._version = 0  # bumped by every change to self.params made by an exchange
        self.exchanges = 0
        self.served = 0
        self.refused = 0
        self._pending_sent = 0  # bytes moved while serving, reported with the next step
        self._pending_received = 0

    @staticmethod
    def roles(topology: Any, node_id: str) -> dict[str, Any]:
        """Role config for ``node_id`` from a ``strategies.topology.Topology``.

        Bipartite graph: active nodes initiate with their (passive) neighbours only.
        Otherwise every node is active, with the try-lock rule.
        """
        split = topology.two_coloring()
        nbrs = list(topology.neighbors(node_id))
        if split is None or topology.n < 2:
            return {"active": True, "bipartite": False, "peers": nbrs}
        active = node_id in split.active
        passive = set(split.passive)
        return {"active": active, "bipartite": True, "peers": [p for p in nbrs if p in passive] if active else []}

    # ---- the node's loop body --------------------------------------------------------
    def step(self) -> StepReport:
        """Train ``local_steps`` DP steps, then (active nodes) average with ``exchanges_per_step``
        random passive peers, one after another — with ``overlap``, on a background thread
        while the next step trains (this step joins the previous step's exchanges first)."""
        # the simulator asked begin_compute when this step's compute began; a real node begins it now
        admitted, self._admitted = self._admitted, None
        began, self._began = self._began, None
        if admitted is None:
            began = self.network.now()
            admitted = not self._past_deadline(began)
        if not self.stopped and not admitted:
            self._stop(f"training deadline: {self.train_seconds:g} s since the start")
        if self.stopped:
            joined = self.settle()  # the last step's exchanges, if still in flight
            self._ema_into_consensus()
            sent, received = self._drain_served()
            return self._report(0, joined.peers, sent + joined.bytes_sent, received + joined.bytes_received)
        # nothing here takes the lock while the last step's exchanges (which hold it) may be in flight
        start, self._next_start = self._next_start, None
        if start is None:
            with self._lock:
                start = (_copy(self.params), self._version)
        snapshot, version = start
        point = self._gradient_point(snapshot)
        try:
            trained, steps, exhausted = self._train(point)
        except BaseException:
            self._join_quietly()
            raise
        if began is not None and self.train_seconds is not None:
            self._measured(self.network.now() - began)
        if trained is not None and point is not snapshot:  # the step's update, on the model it trains from
            trained = [s + (t - m) if np.issubdtype(s.dtype, np.floating) else s
                       for s, t, m in zip(snapshot, trained, point)]
        joined, failed = StepReport(), None
        try:  # the previous step's exchanges ran while this one trained
            joined = self.settle()
        except BaseException as exc:  # raised once this step's accounted training is merged: nothing lost
            failed = exc
        sent, received = self._drain_served()
        sent, received, peers = sent + joined.bytes_sent, received + joined.bytes_received, list(joined.peers)
        if trained is None:  # budget spent before any step: nothing new to release
            if failed is not None:
                raise failed
            return self._report(0, peers, sent, received)
        with self._lock:
            if self.overlaps_communication:
                # the next step trains beside this step's exchanges, from the model as the previous
                # step's exchanges left it: this step's own noised update reaches a gradient only once
                # it has been averaged, as without overlap (a gradient one step stale: delayed SGD).
                # The merge below changes the model after this snapshot, so the next merge is a delta (-1).
                self._next_start = (_copy(self.params), -1)
            if self._version == version:
                self.params = trained
            else:  # exchanges happened while training: keep them, add our delta
                self.params = [p + (t - s) if np.issubdtype(p.dtype, np.floating) else p
                               for p, t, s in zip(self.params, trained, snapshot)]
            if self.ema is not None:  # the node's model after this step and the exchanges so far
                self.ema.update(self.params)
        if failed is not None:
            raise failed
        if self.active and self.peers:
            chosen = self._pick_peers(self.exchanges_per_step)
            if self.overlaps_communication and not exhausted:  # nothing stays in flight once stopped
                self._inflight = Background(functools.partial(self._exchange_round, chosen),
                                            f"gossip-{self.node_id}-{self.round}")
            else:
                s, r, done = self._exchange_round(chosen)
                sent, received, peers = sent + s, received + r, peers + done
                self.round += 1
        else:
            self.round += 1
        if exhausted:
            self._stop("privacy budget exhausted: the last local step that fits has been taken")
            self._ema_into_consensus()  # nothing is in flight once exhausted
        return self._report(steps, peers, sent, received)

    def _measured(self, seconds: float) -> None:
        """Count one step's duration, from its beginning to its training's end, into the mean."""
        self._step_total += max(0.0, seconds)
        self._step_count += 1

    def _past_deadline(self, t: float) -> bool:
        """Whether a step beginning at ``t`` would end past the training deadline (``train_seconds``): it
        begins past it, or its expected end -- ``t`` plus this node's mean measured step time -- is past it."""
        if self.train_seconds is None:
            return False
        expected = self._step_total / self._step_count if self._step_count else 0.0
        return t - self._start >= self.train_seconds or t + expected - self._start > self.train_seconds

    def begin_compute(self, t: float) -> bool:
        """The simulator charges a step's compute before :meth:`step`: the step whose compute begins at
        ``t`` trains unless it would end past the deadline (:meth:`_past_deadline`) — as on a real node,
        which checks when it begins a step and then trains it, however long it takes (so the simulator
        neither charges a step that is not begun nor drops one that began and ends after the deadline)."""
        self._admitted = not self.stopped and not self._past_deadline(t)
        self._began = t
        return self._admitted

    def _gradient_point(self, snapshot: Params) -> Params:
        """The mean of ``snapshot`` and the peer models kept for ``gradient_peers`` (``snapshot`` itself when
        none are kept), float arrays averaged in float64; other arrays are ``snapshot``'s."""
        with self._peer_lock:
            seen = list(self._peer_models)
        if not seen:
            return snapshot
        return [np.mean([np.asarray(m[k], np.float64) for m in (snapshot, *seen)], axis=0).astype(p.dtype)
                if np.issubdtype(p.dtype, np.floating) else p for k, p in enumerate(snapshot)]

    def _keep_peer_model(self, message: ModelMessage) -> None:
        """Keep the model a peer's accepted request or reply carries (``gradient_peers`` > 0 only)."""
        if not self._peer_models.maxlen:
            return
        if self.subspace is not None:
            model = self.subspace.model(message.payload)
        elif message.params is not None:  # a whole model (params_compatible checked it)
            model = _copy(message.params)
        else:
            return
        with self._peer_lock:
            self._peer_models.append(model)

    def _exchange_round(self, peers: list[str]) -> tuple[int, int, list[str]]:
        """One step's exchanges with ``peers``, one after another: (bytes sent, received, peers averaged with)."""
        sent = received = 0
        done: list[str] = []
        for peer in peers:
            s, r, ok = self._exchange_with(peer)
            sent, received = sent + s, received + r
            if ok:
                done.append(peer)
        return sent, received, done

    def _join_quietly(self) -> None:
        """Join exchanges in flight while another error is already being raised (theirs is logged)."""
        try:
            self.settle()
        except Exception as exc:
            log.error("node %s: background exchange failed too: %s", self.node_id, exc)

    def settle(self) -> StepReport:
        """Join the exchanges a step left in flight (``overlap``) and raise their error; the step's
        round ends here. What they moved, and with whom."""
        job, self._inflight = self._inflight, None
        if job is None:
            return self._report(0, [], 0, 0)
        try:
            sent, received, peers = job.join()
        finally:
            self.round += 1
        return self._report(0, peers, sent, received)

    def _pick_peers(self, k: int) -> list[str]:
        """``k`` random peers: one uniform choice when k = 1, else distinct ones while there are
        enough (then uniform choices) — public randomness from the node's own seed."""
        if k == 1:
            return [self._rng.choice(self.peers)]
        picked = self._rng.sample(self.peers, min(k, len(self.peers)))
        return picked + [self._rng.choice(self.peers) for _ in range(k - len(picked))]

    def _outgoing(self, kind: str, params: Params) -> ModelMessage:
        """The message carrying ``params``: the whole model, or (subspace) the k values of the fixed
        public mask — off it every node's model is the shared initial model, so the pair's average
        needs only those (``strategies.compression.subspace_exchange``)."""
        if self.subspace is not None:
            return ModelMessage(sender=self.node_id, round=self.round, kind=kind, payload=self.subspace.encode(params))
        return ModelMessage(sender=self.node_id, round=self.round, kind=kind, params=params)

    def frame_shapes(self, round: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Subspace frames (request and reply) are rebuilt with the fixed mask's counts; else ``shapes``."""
        return shapes if self.subspace is None else self.subspace.frame_shapes()

    def average_with(self, peer: str) -> bool:
        """One pure pairwise average with ``peer``, no training (post-processing: no privacy cost)."""
        self.settle()
        return self._exchange_with(peer)[2]

    def consensus_round(self) -> StepReport:
        """After training: one pure averaging exchange with a random peer (active nodes only)."""
        self.settle()
        self._ema_into_consensus()
        if not (self.active and self.peers):
            return self._report(0, [], 0, 0)
        peer = self._rng.choice(self.peers)
        s, r, ok = self._exchange_with(peer)
        return self._report(0, [peer] if ok else [], s, r)

    def _ema_into_consensus(self) -> None:
        """Once this node's training is over (``ema_decay``): its model becomes its EMA, so what it serves
        and the consensus exchanges average are the nodes' EMAs. Post-processing of accounted DP
        iterates (and released peer models); this node trains from it no more."""
        if self.ema is None or self._ema_in_consensus:
            return
        with self._lock:
            self._ema_in_consensus_locked()

    def _ema_in_consensus_locked(self) -> None:
        """:meth:`_ema_into_consensus` with ``self._lock`` held."""
        if self.ema is None or self._ema_in_consensus:
            return
        view = self.ema.view()
        self._ema_in_consensus = True
        if view is not None:
            self.params = view
            self._version += 1

    def _exchange_with(self, peer: str) -> tuple[int, int, bool]:
        """Atomic pairwise average with ``peer``: (bytes sent, bytes received, success)."""
        with self._lock:
            request = self._outgoing("exchange_request", _copy(self.params))
            reply = self.network.exchange(peer, request)
            sent = request.nbytes
            mixed = None
            if reply is not None and reply.kind == "exchange_reply":
                if self.subspace is not None:  # None unless a frame on the fixed mask
                    mixed = self.subspace.average(self.params, reply.payload)
                elif params_compatible(self.params, reply.params):
                    mixed = average_pair(self.params, reply.params)  # type: ignore[arg-type]
            if reply is None or mixed is None:
                self.refused += 1
                log.debug("node %s: exchange with %s refused or invalid", self.node_id, peer)
                self.bytes_sent += sent
                return sent, 0, False
            self.params = mixed
            self._version += 1
            self.exchanges += 1
            self._keep_peer_model(reply)
            self.bytes_sent += sent
            self.bytes_received += reply.nbytes
            return sent, reply.nbytes, True

    def handle_exchange(self, sender: str, message: ModelMessage) -> ModelMessage | None:
        """Passive side: average with the sender and reply with our pre-average model."""
        if message.kind != "exchange_request":
            return None
        if self.bipartite and self.active:
            warn_limited(log, self._refusals, ("active", sender),
                         "node %s: refused exchange from %s: active nodes do not serve", self.node_id, sender)
            return None
        if sender not in self.network.neighbors():
            warn_limited(log, self._refusals, ("non-neighbour", sender),
                         "node %s: refused exchange from non-neighbour %s", self.node_id, sender)
            return None
        acquired = self._lock.acquire(blocking=self.bipartite)
        if not acquired:
            self.refused += 1
            return None
        try:
            if self.stopped:  # training over: serve (and average) the EMA (``ema_decay``)
                self._ema_in_consensus_locked()
            if self.subspace is not None:  # None unless a frame on the fixed mask
                mixed = self.subspace.average(self.params, message.payload)
            else:
                mixed = (average_pair(self.params, message.params)  # type: ignore[arg-type]
                         if params_compatible(self.params, message.params) else None)
            if mixed is None:
                warn_limited(log, self._refusals, ("incompatible", sender),
                             "node %s: refused exchange from %s: incompatible or non-finite model",
                             self.node_id, sender)
                return None
            before = self.params
            self.params = mixed
            self._version += 1
            self.served += 1
            self._keep_peer_model(message)
            reply = self._outgoing("exchange_reply", before)
            self._pending_received += message.nbytes
            self._pending_sent += reply.nbytes
            self.bytes_received += message.nbytes
            self.bytes_sent += reply.nbytes
            return reply
        finally:
            self._lock.release()

    def _drain_served(self) -> tuple[int, int]:
        with self._lock:
            s, r = self._pending_sent, self._pending_received
            self._pending_sent = self._pending_received = 0
        return s, r

    def snapshot(self) -> Params:
        """A consistent copy of the current model (for evaluation): with ``ema_decay``, its EMA during
        training (the model itself once the consensus phase took the EMA in, or before any step)."""
        if self.ema is not None and not self._ema_in_consensus:
            view = self.ema.view()
            if view is not None:
                return view
        with self._lock:
            return _copy(self.params)


class ErrorFeedbackGossip:
    """Compressed gossip for compressors that keep their own error memory (TopK/RandomK with
    error feedback, AdaComp's residue): the CHOCO estimate pattern with the residual held
    by the compressor instead of the estimate.

    Node i sends q_i = C(x_i − x_i⁻), the change of its post-noise model since its last
    send (a difference of two released models, so post-processing); the compressor adds
    its memory m and keeps what it did not send, so x̂_i + m = x_i after every send when
    the estimates start at the shared public model (or at zero). Every neighbour of i adds
    q_i to its x̂_i exactly as i does, and the mix is x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i),
    as in ``strategies.compression.InnovationGossip`` (same interface).
    """

    def __init__(self, node_id: str, neighbor_weights: Mapping[str, float], compressor: Any, gamma: Any,
                 initial: Any = None) -> None:
        from privfl.strategies.compression import CompressionError, Compressor, check_gamma

        if not isinstance(compressor, Compressor) or not compressor.error_feedback:
            raise CompressionError("error-feedback gossip: compressor must be a Compressor with error feedback")
        gamma = check_gamma(gamma, "sync_gossip")
        self._node_id = node_id
        self._weights = {str(j): float(w) for j, w in neighbor_weights.items()}
        self._compressor = compressor
        self._gamma = float(gamma)
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._estimates: dict[str, np.ndarray] = {}
        self._last: np.ndarray | None = None  # the model at the last send (x_i⁻)
        if initial is not None:
            self._init(tuple(initial.shapes), initial.flat())
        log.info("node %s: error-feedback gossip with %d neighbours, %s, gamma=%g", node_id, len(self._weights),
                 compressor.describe(), self._gamma)

    def _init(self, shapes: tuple[tuple[int, ...], ...], start: np.ndarray) -> None:
        self._shapes = shapes
        self._last = start.astype(np.float64, copy=True)
        for j in [self._node_id, *self._weights]:
            self._estimates[j] = start.astype(np.float64, copy=True)

    def _check(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        from privfl.strategies.compression import MalformedMessage

        if self._shapes is None:
            self._init(tuple(shapes), np.zeros(int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))))
        elif tuple(shapes) != self._shapes:
            raise MalformedMessage(f"node {self._node_id}: shapes {list(shapes)} differ from the model's "
                                   f"{list(self._shapes)}")

    def make_message(self, x: Any) -> Any:
        """q_i = C(x_i − x_i⁻) of the released model ``x``; x̂_i ← x̂_i + q_i."""
        from privfl.strategies.compression import Released, released
        from privfl.strategies.compression.message import decode_flat, split_flat

        if type(x) is not Released:
            raise TypeError(f"error-feedback gossip accepts only Released models, got {type(x).__name__}")
        self._check(x.shapes)
        assert self._shapes is not None and self._last is not None
        flat = x.flat()
        change = released(split_flat(flat - self._last, self._shapes, np.float64),
                          "post-processing: change of the released model since the last send")
        msg = self._compressor.compress(change)
        self._last = flat
        self._estimates[self._node_id] = self._estimates[self._node_id] + decode_flat(msg)
        return msg

    def receive(self, sender: str, msg: Any) -> None:
        """x̂_j ← x̂_j + q_j for neighbour ``sender``."""
        from privfl.strategies.compression import Compressed, MalformedMessage
        from privfl.strategies.compression.message import decode_flat

        if sender not in self._weights:
            raise MalformedMessage(f"node {self._node_id}: message from non-neighbour {sender!r}")
        if not isinstance(msg, Compressed):
            raise MalformedMessage(f"node {self._node_id}: expected a Compressed message from {sender!r}")
        self._check(msg.shapes)
        self._estimates[sender] = self._estimates[sender] + decode_flat(msg)

    def consensus_step(self, x: Any) -> Any:
        """x + γ Σ_j w_ij (x̂_j − x̂_i) (post-processing of released values)."""
        from privfl.strategies.compression import Released, released
        from privfl.strategies.compression.message import split_flat

        if type(x) is not Released:
            raise TypeError(f"error-feedback gossip accepts only Released models, got {type(x).__name__}")
        self._check(x.shapes)
        assert self._shapes is not None
        own = self._estimates[self._node_id]
        pull = np.zeros_like(own)
        for j, w in self._weights.items():
            pull += w * (self._estimates[j] - own)
        out = x.flat() + self._gamma * pull
        # the mix moves the model; the next message carries that move too (x_i⁻ stays the sent model)
        return released(split_flat(out, self._shapes, np.float64), "post-processing: error-feedback gossip")


class SyncGossip(_GossipBase):
    """D-PSGD rounds: train, send the model to every neighbour, mix with Metropolis–Hastings weights.

    Config keys: ``local_steps``; ``mixing`` (this node's row of W over its neighbours,
    ``{peer: w_ij}``) or ``topology`` (a ``Topology``; its MH row is used);
    ``timeout`` (seconds to wait for neighbours in :meth:`step`, default 30);
    ``compressor`` (optional ``strategies.compression.Compressor``, one instance per node;
    without error feedback: CHOCO innovation gossip; with it (TopK/RandomK with
    ``error_feedback``, AdaComp): :class:`ErrorFeedbackGossip`; CLT-k is refused),
    ``gamma`` (consensus step, default 0.5) and ``shared_init`` (all nodes start from the
    same public model, default False).

    Dense: ``x_i ← W_ii x_i + Σ_j W_ij x_j``. A neighbour whose message is missing
    (timeout, stopped, invalid) has its weight put back on the node itself, so the row
    still sums to one (the global mean is then no longer exactly preserved that round).

    Compressed (CHOCO-style innovation gossip, ``strategies.compression.InnovationGossip``):
    each node sends ``C(x_i − x̂_i)`` of its post-noise model (a ``released`` value, so
    compression is post-processing) and mixes ``x_i ← x_i + γ Σ_j W_ij (x̂_j − x̂_i)``.
    It needs every message of a live neighbour delivered exactly once; a stopped node
    sends nothing and moves neither its own nor others' copies of its estimate, so the
    estimates stay in step.
    """

    synchronous = True

    def __init__(self, client: NumPyClient, network: PeerNetwork, params: Params,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__(client, network, params, config)
        mixing = self.config.get("mixing")
        if mixing is None and self.config.get("topology") is not None:
            mixing = self.config["topology"].mixing_row(self.node_id)
        if mixing is None:
            raise ConfigError("sync_gossip needs strategy.mixing (the node's MH row) or a topology")
        self.mixing: dict[str, float] = {str(k): float(v) for k, v in dict(mixing).items()}
        total = sum(self.mixing.values())
        if any(w < 0 for w in self.mixing.values()) or total > 1 + 1e-9:
            raise ConfigError(f"sync_gossip: mixing weights must be >= 0 and sum to <= 1, got {self.mixing}")
        self.timeout = float(self.config.get("timeout", 30.0))
        self.missing = 0
        self.innovation: Any = None
        comp = self.config.get("compressor")
        if comp is not None and comp != "none":
            from privfl.strategies.compression import CLTk, Compressor, InnovationGossip, released

            if not isinstance(comp, Compressor):
                raise ConfigError(f"sync_gossip: compressor must be a strategies.compression.Compressor, got {comp!r}")
            if isinstance(comp, CLTk):
                raise ConfigError("sync_gossip: compressor 'cltk' is not supported: CLT-k needs one leader's index "
                                  "set broadcast to every node before each round, which neighbour-only gossip "
                                  "does not have; use topk/adacomp (error feedback) or topk/randomk without it")
            gamma = self.config.get("gamma", 0.5)
            initial = released(self.params, "public initial model") if self.config.get("shared_init") else None
            from privfl.strategies.compression.subspace import SubspaceGossip, SubspaceK

            if isinstance(comp, SubspaceK):  # subspace DP-SGD: mix the k values of the shared public mask
                self.innovation = SubspaceGossip(self.node_id, self.mixing, comp, gamma, initial)
            elif comp.error_feedback:  # the compressor keeps the residual: send compressed model changes
                self.innovation = ErrorFeedbackGossip(self.node_id, self.mixing, comp, gamma, initial)
            else:  # the public estimate keeps the residual (CHOCO)
                self.innovation = InnovationGossip(self.node_id, self.mixing, comp, gamma, initial)

    def begin_round(self) -> StepReport:
        """Train ``local_steps`` and send the new model to every neighbour (nothing once stopped)."""
        if self.stopped:
            return self._report(0, [], 0, 0)
        trained, steps, exhausted = self._train(self.params)
        if trained is None:
            return self._report(0, [], 0, 0)
        self.params = trained
        sent, peers = 0, []
        payload = None
        if self.innovation is not None:
            from privfl.strategies.compression import released

            # the model was updated only by noised gradients (or is a mix of released models)
            payload = self.innovation.make_message(released(self.params, "dp-sgd model"))
        for peer in self.mixing:
            if payload is not None:
                msg = ModelMessage(sender=self.node_id, round=self.round, kind="innovation", payload=payload)
            else:
                msg = ModelMessage(sender=self.node_id, round=self.round, kind="model", params=_copy(self.params))
            if self.network.send(peer, msg):
                sent += msg.nbytes
                peers.append(peer)
        self.bytes_sent += sent
        if exhausted:
            self._stop("privacy budget exhausted: the last local step that fits has been taken")
        return self._report(steps, peers, sent, 0)

    def finish_round(self, received: dict[str, ModelMessage]) -> StepReport:
        """Mix: ``x_i ← W_ii x_i + Σ_j W_ij x_j``; missing neighbours' weight stays on self."""
        if self.innovation is not None:
            return self._finish_compressed(received)
        got: dict[str, Params] = {}
        nbytes = 0
        for peer in self.mixing:
            msg = received.get(peer)
            if (msg is None or msg.kind != "model" or msg.round != self.round
                    or not params_compatible(self.params, msg.params)):
                self.missing += 1
                continue
            assert msg.params is not None
            got[peer] = [np.asarray(p) for p in msg.params]
            nbytes += msg.nbytes
        self_w = 1.0 - sum(self.mixing[p] for p in got)
        mixed: Params = []
        for k, own in enumerate(self.params):
            if not np.issubdtype(own.dtype, np.floating):
                mixed.append(own)
                continue
            acc = self_w * own.astype(np.float64)
            for peer in self.mixing:  # fixed order: deterministic sums
                if peer in got:
                    acc = acc + self.mixing[peer] * got[peer][k].astype(np.float64)
            mixed.append(acc.astype(own.dtype))
        self.params = mixed
        self.bytes_received += nbytes
        self.round += 1
        return self._report(0, sorted(got), 0, nbytes)

    def _finish_compressed(self, received: dict[str, ModelMessage]) -> StepReport:
        from privfl.strategies.compression import MalformedMessage, released

        nbytes, peers = 0, []
        for peer in self.mixing:
            msg = received.get(peer)
            if msg is None or msg.kind != "innovation" or msg.round != self.round:
                self.missing += 1
                continue
            try:
                self.innovation.receive(peer, msg.payload)
            except MalformedMessage as e:
                warn_limited(log, self._refusals, ("innovation", peer),
                             "node %s: dropped malformed innovation from %s: %s", self.node_id, peer, e)
                self.missing += 1
                continue
            nbytes += msg.nbytes
            peers.append(peer)
        mixed = self.innovation.consensus_step(released(self.params, "dp-sgd model"))
        self.params = [np.asarray(m).astype(p.dtype) for m, p in zip(mixed.arrays, self.params)]
        self.bytes_received += nbytes
        self.round += 1
        return self._report(0, peers, 0, nbytes)

    def frame_shapes(self, round: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Subspace gossip frames on the round's public mask counts; every other gossip on ``shapes``."""
        from privfl.strategies.compression.subspace import SubspaceGossip

        if isinstance(self.innovation, SubspaceGossip):
            return tuple(self.innovation.frame_shapes(round, shapes))
        return shapes

    def step(self) -> StepReport:
        """One whole round for a real node: train and send, wait for neighbours, mix."""
        r = self.round
        first = self.begin_round()
        received = self.network.receive(r, list(self.mixing), self.timeout)
        second = self.finish_round(received)
        return StepReport(local_steps=first.local_steps, peers=second.peers, bytes_sent=first.bytes_sent,
                          bytes_received=second.bytes_received, loss=self.last_loss, epsilon=self.epsilon,
                          stopped=self.stopped, reason=self.stop_reason)

    def snapshot(self) -> Params:
        """A copy of the current model (for evaluation)."""
        return _copy(self.params)
