"""The real node's :class:`strategies.base.PeerNetwork`: mutual-TLS gRPC via the gossip transport.

Why: a strategy never opens a socket. This class turns a strategy's
:class:`~strategies.base.ModelMessage` into a transport :class:`~privfl.transport.Message`
with *named* tensors (the model's parameter names), refuses replies and requests whose
names, shapes or dtypes differ from the node's own model (the transport checks them
against the expected spec before any body byte is accepted), and routes incoming calls:
``exchange_request`` to ``strategy.handle_exchange``, ``model`` to the inbox that
:meth:`receive` reads (synchronous gossip), control messages (``hello``, ``done``,
``bye``) to the node's bookkeeping.

A compressed update (a :class:`~strategies.compression.Compressed` payload, sent by
compressed ``sync_gossip`` as kind ``innovation``) travels as ONE 1-D ``|u1`` tensor,
``compressed.frame``, holding ``Compressed.to_bytes()`` — the same framing FedAvg's
update transfer uses, so there is one byte encoding of a compressed message. Its length
varies per message, so the transport accepts it only up to the largest valid frame for
the model (``max_frame_bytes``) before any body byte is read; the receiver rebuilds it
with ``Compressed.from_bytes(frame, own_shapes)``, which checks the framing against the
receiver's own model and then validates lengths, index order and range and
finiteness. A frame that fails is refused and logged like any other bad message.

Every model a node releases is reported to ``on_release`` *before* it leaves (the
ledger's write-ahead "message" entry: peer, sequence, round, digest, bytes — never
values). Each message also advertises the sender's privacy settings as scalars
(``policy_sigma``, ``policy_epsilon``, ``policy_delta``); a message from a peer whose
advertised settings are weaker than the roster's ``[policy]`` is refused and logged.
"""

from __future__ import annotations

import dataclasses

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from privfl.pki import NodeIdentity, Policy, Roster
from privfl.transport import (
    DecodedMessage,
    ExpectedSpec,
    GossipClient,
    GossipServer,
    Message,
    PeerBackoff,
    PeerUnavailable,
    SparseTensor,
    SpecChoice,
    TensorExpectation,
    TrafficCounters,
    TransportError,
    model_digest,
)
from strategies.base import ModelMessage, NodeStrategy
from strategies.compression import Compressed, MalformedMessage
from strategies.compression.message import max_frame_bytes

log = logging.getLogger("privfl.node")

CONTROL_KINDS = ("hello", "done", "bye")
REFUSED_KIND = "refused"
POLICY_KEYS = ("policy_sigma", "policy_epsilon", "policy_delta")
INBOX_KINDS = ("model", "innovation")  # one-way model messages of synchronous gossip
# a Compressed payload on the wire: one 1-D uint8 tensor holding Compressed.to_bytes()
COMPRESSED_FRAME = "compressed.frame"

ReleaseHook = Callable[[str, int, int, str, int], None]  # peer, seq, round, digest hex, bytes


@dataclass(frozen=True)
class AdvertisedPolicy:
    """The privacy settings a node advertises in every message it sends."""

    noise_multiplier: float
    target_epsilon: float
    delta: float

    def scalars(self) -> dict[str, float]:
        """The message scalars carrying this policy."""
        return {"policy_sigma": float(self.noise_multiplier), "policy_epsilon": float(self.target_epsilon),
                "policy_delta": float(self.delta)}


def policy_problem(scalars: Mapping[str, float], minimum: Policy) -> str | None:
    """Why a peer's advertised settings are weaker than the roster's minimum (None if they are not)."""
    if minimum.min_noise_multiplier is None and minimum.max_epsilon is None and minimum.delta is None:
        return None
    missing = [k for k in POLICY_KEYS if k not in scalars]
    if missing:
        return f"no advertised privacy policy ({', '.join(missing)} missing)"
    sigma, eps, delta = (float(scalars[k]) for k in POLICY_KEYS)
    if minimum.min_noise_multiplier is not None and sigma < minimum.min_noise_multiplier:
        return f"advertised noise multiplier {sigma:g} < roster minimum {minimum.min_noise_multiplier:g}"
    if minimum.max_epsilon is not None and eps > minimum.max_epsilon:
        return f"advertised target ε {eps:g} > roster maximum {minimum.max_epsilon:g}"
    if minimum.delta is not None and delta > minimum.delta:
        return f"advertised δ {delta:g} > roster δ {minimum.delta:g}"
    return None


def expected_spec_of(names: Sequence[str], params: Sequence[np.ndarray]) -> dict[str, TensorExpectation]:
    """The spec every received model must match: the node's own parameter names, shapes, dtypes (dense)."""
    if len(names) != len(params):
        raise ValueError(f"{len(names)} names for {len(params)} arrays")
    return {n: TensorExpectation(tuple(int(s) for s in np.shape(p)),
                                 np.asarray(p).dtype.newbyteorder("<").str, allow_sparse=False)
            for n, p in zip(names, params)}


def compressed_spec_of(params: Sequence[np.ndarray]) -> dict[str, TensorExpectation]:
    """The spec of a compressed update for a model of ``params``: one 1-D uint8 frame of bounded length."""
    return {COMPRESSED_FRAME: TensorExpectation((max_frame_bytes([np.shape(p) for p in params]),), "|u1", allow_sparse=False,
                                                bounded=True)}


def compressed_from_frame(msg: DecodedMessage, shapes: Sequence[tuple[int, ...]]) -> Compressed:
    """Rebuild a received compressed update from its frame, for the receiver's own model ``shapes``.

    TransportError with the reason if the frame is missing, not a dense uint8 vector, or
    malformed (``Compressed.from_bytes`` checks the framing, then the message in full).
    """
    frame = msg.tensors.get(COMPRESSED_FRAME)
    if frame is None:
        raise TransportError(f"compressed message from {msg.sender} lacks {COMPRESSED_FRAME}")
    if isinstance(frame, SparseTensor):
        raise TransportError(f"compressed message from {msg.sender}: {COMPRESSED_FRAME} must be dense")
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 1:
        raise TransportError(f"compressed message from {msg.sender}: {COMPRESSED_FRAME} must be 1-D uint8, "
                             f"got {frame.ndim}-D {frame.dtype}")
    try:
        return Compressed.from_bytes(np.ascontiguousarray(frame).tobytes(), tuple(tuple(s) for s in shapes))
    except MalformedMessage as exc:
        raise TransportError(f"malformed compressed message from {msg.sender}: {exc}") from None


def to_transport(message: ModelMessage, names: Sequence[str], policy: AdvertisedPolicy | None = None,
                 sequence: int | None = None) -> Message:
    """A transport message with named tensors: the model's dense arrays, or a compressed payload's frame.

    ValueError if the arrays do not match ``names``, the payload is not a ``Compressed``,
    or it is a shared-index (CLT-k) message, which has no frame of its own.
    """
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, float] = {}
    if message.params is not None:
        if len(message.params) != len(names):
            raise ValueError(f"message has {len(message.params)} arrays, the model has {len(names)}")
        tensors = {n: np.asarray(p) for n, p in zip(names, message.params)}
    elif message.payload is not None:
        if not isinstance(message.payload, Compressed):
            raise ValueError(f"only Compressed payloads travel over gRPC, got {type(message.payload).__name__}")
        if message.payload.shared_indices:
            raise ValueError("a shared-index (CLT-k) compressed message cannot travel over gRPC: it carries no "
                             "indices of its own (only the leader's broadcast does), so it has no frame")
        tensors = {COMPRESSED_FRAME: np.frombuffer(message.payload.to_bytes(), dtype=np.uint8)}
    scalars.update({k: float(v) for k, v in message.meta.items()})
    if policy is not None:
        scalars.update(policy.scalars())
    return Message(kind=message.kind, round=int(message.round), tensors=tensors, scalars=scalars,
                   sequence=sequence)


def from_transport(msg: DecodedMessage, names: Sequence[str],
                   shapes: Sequence[tuple[int, ...]] | None = None) -> ModelMessage:
    """A strategy message from a decoded one: tensors in the model's parameter order.

    A message with no tensors has ``params=None``; a compressed one has ``payload`` (a
    ``Compressed`` rebuilt for ``shapes``, the receiver's own model shapes); otherwise
    every name must be present (the transport already refused unknown names, shapes and dtypes).
    """
    params = None
    payload = None
    if COMPRESSED_FRAME in msg.tensors:
        if shapes is None:
            raise TransportError(f"compressed message from {msg.sender}, but no model shapes to rebuild it")
        payload = compressed_from_frame(msg, shapes)
    elif msg.tensors:
        missing = [n for n in names if n not in msg.tensors]
        if missing:
            raise TransportError(f"message from {msg.sender} lacks tensors {', '.join(missing[:5])}")
        params = []
        for n in names:
            t = msg.tensors[n]
            arr = t.to_dense() if isinstance(t, SparseTensor) else np.array(t, copy=True)
            params.append(arr)
    meta = {k: float(v) for k, v in msg.scalars.items() if k not in POLICY_KEYS}
    return ModelMessage(sender=msg.sender, round=int(msg.round), kind=msg.kind, params=params, payload=payload,
                        meta=meta)


class GrpcPeerNetwork:
    """PeerNetwork over the mTLS gossip transport, plus the node's gossip server.

    ``neighbors``: the topology neighbours this node may talk to. ``names`` and
    ``template``: parameter names and arrays of the node's model (the expected spec: the
    dense model, or a compressed update's frame bounded by the model's size).
    ``policy``: what this node advertises; ``roster.policy`` is the minimum it requires.
    ``on_release(peer, seq, round, digest_hex, nbytes)`` is called before every model leaves.
    Call :meth:`attach` with the strategy before :meth:`start`.
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes, neighbors: Sequence[str],
                 names: Sequence[str], template: Sequence[np.ndarray], policy: AdvertisedPolicy | None = None,
                 listen: str | None = None, timeout: float = 10.0, on_release: ReleaseHook | None = None,
                 backoff: PeerBackoff | None = None) -> None:
        self.node_id = identity.node_id
        self.roster = roster
        self.names = list(names)
        self.shapes = tuple(tuple(int(s) for s in np.shape(p)) for p in template)
        self.spec: ExpectedSpec = SpecChoice((expected_spec_of(self.names, list(template)),
                                              compressed_spec_of(list(template))))
        self.policy = policy
        self.timeout = timeout
        self.on_release = on_release
        self.counters = TrafficCounters()
        self._neighbors = [n for n in neighbors if n != self.node_id]
        self.client = GossipClient(identity, roster, crl, expected_spec=self.spec, default_timeout=timeout,
                                   counters=self.counters,
                                   backoff=backoff or PeerBackoff(base=0.25, factor=2.0, max_delay=4.0))
        self.server = GossipServer(identity, roster, crl, self._handle, address=listen,
                                   expected_spec=self.spec, counters=self.counters)
        self.strategy: NodeStrategy | None = None
        self.serving_models = True  # False once the node must not release anything more
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, str], ModelMessage] = {}
        self.control: dict[str, set[str]] = {k: set() for k in CONTROL_KINDS}
        self.refused_policy: set[str] = set()
        self._t0 = time.monotonic()

    # ---- lifecycle ------------------------------------------------------------------
    def attach(self, strategy: NodeStrategy) -> None:
        """The strategy whose ``handle_exchange`` / ``handle_message`` serve incoming calls."""
        self.strategy = strategy

    def start(self) -> int:
        """Start the gossip server; returns its port."""
        return self.server.start()

    def close(self) -> None:
        """Stop the server and close every channel."""
        self.server.stop(grace=1.0)
        self.client.close()

    # ---- PeerNetwork ----------------------------------------------------------------
    def neighbors(self) -> list[str]:
        """The topology neighbours of this node."""
        return list(self._neighbors)

    def now(self) -> float:
        """Seconds since this network was made (wall clock)."""
        return time.monotonic() - self._t0

    def _release(self, peer: str, message: ModelMessage) -> Message:
        """Encode ``message`` for ``peer`` with a reserved sequence number and report it first."""
        seq = self.client.next_sequence()
        msg = to_transport(message, self.names, self.policy, sequence=seq)
        if msg.tensors and self.on_release is not None:
            nbytes = int(sum(np.asarray(t).nbytes for t in msg.tensors.values()))
            digest = model_digest(msg.tensors)  # for the ledger; the transport sends it, not hashing again
            self.on_release(peer, seq, int(message.round), digest.hex(), nbytes)
            msg = dataclasses.replace(msg, digest=digest)
        return msg

    def _accept_policy(self, peer: str, scalars: Mapping[str, float]) -> bool:
        problem = policy_problem(scalars, self.roster.policy)
        if problem is None:
            return True
        if peer not in self.refused_policy:
            log.warning("node %s: refused peer %s: %s", self.node_id, peer, problem)
        self.refused_policy.add(peer)
        return False

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        """Send ``message`` and return the peer's reply; None if unreachable, refused or invalid."""
        if not self.serving_models:
            return None
        if not self.client.available(peer):
            return None
        try:
            reply = self.client.exchange(peer, self._release(peer, message), timeout=self.timeout)
        except PeerUnavailable as exc:
            log.debug("node %s: exchange with %s skipped: %s", self.node_id, peer, exc)
            return None
        except TransportError as exc:
            log.info("node %s: exchange with %s failed: %s", self.node_id, peer, exc)
            return None
        if reply.kind == REFUSED_KIND or not reply.tensors:
            return None  # busy, stopped or refused: nothing to check, nothing to apply
        if not self._accept_policy(peer, reply.scalars):
            return None
        try:
            return from_transport(reply, self.names, self.shapes)
        except TransportError as exc:
            log.warning("node %s: invalid reply from %s: %s", self.node_id, peer, exc)
            return None

    def send(self, peer: str, message: ModelMessage) -> bool:
        """Deliver ``message`` one-way (waits for the peer's ack); False if it could not be delivered."""
        if (message.params is not None or message.payload is not None) and not self.serving_models:
            return False
        if not self.client.available(peer):
            return False
        try:
            self.client.send(peer, self._release(peer, message), timeout=self.timeout)
        except TransportError as exc:
            log.debug("node %s: send %s to %s failed: %s", self.node_id, message.kind, peer, exc)
            return False
        return True

    def receive(self, round: int, peers: list[str], timeout: float) -> dict[str, ModelMessage]:
        """Messages of ``round`` from ``peers`` that arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {p: self._inbox[(round, p)] for p in peers if (round, p) in self._inbox}
                left = deadline - time.monotonic()
                if len(got) == len(peers) or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            for key in [k for k in self._inbox if k[0] <= round]:
                del self._inbox[key]
        return got

    # ---- control messages -------------------------------------------------------------
    def notify(self, kind: str, peers: Sequence[str] | None = None, timeout: float | None = None) -> set[str]:
        """Send a control message (no model) to ``peers`` (default: neighbours); returns who got it."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}")
        ok = set()
        for peer in peers if peers is not None else self._neighbors:
            msg = Message(kind=kind, scalars=self.policy.scalars() if self.policy else {})
            try:
                self.client.send(peer, msg, timeout=timeout or self.timeout)
                ok.add(peer)
            except TransportError as exc:
                log.debug("node %s: %s to %s failed: %s", self.node_id, kind, peer, exc)
        return ok

    def heard(self, kind: str) -> set[str]:
        """Peers that have sent us control message ``kind``."""
        with self._cond:
            return set(self.control[kind])

    # ---- server side ------------------------------------------------------------------
    def _refused(self) -> Message:
        """The reply to a request we do not serve (it carries no model, only our policy)."""
        return Message(kind=REFUSED_KIND, scalars=self.policy.scalars() if self.policy else {})

    def _handle(self, sender: str, msg: DecodedMessage) -> Message | None:
        """Route one authenticated, validated incoming message."""
        if not self._accept_policy(sender, msg.scalars):
            return self._refused()
        if msg.kind in CONTROL_KINDS:
            with self._cond:
                self.control[msg.kind].add(sender)
                self._cond.notify_all()
            log.debug("node %s: %s from %s", self.node_id, msg.kind, sender)
            return None
        try:
            incoming = from_transport(msg, self.names, self.shapes)
        except TransportError as exc:
            log.warning("node %s: refused %s from %s: %s", self.node_id, msg.kind, sender, exc)
            return self._refused()
        if msg.kind in INBOX_KINDS:
            with self._cond:
                self._inbox[(incoming.round, sender)] = incoming
                self._cond.notify_all()
            return None
        strategy = self.strategy
        if strategy is None or not self.serving_models:
            return self._refused()
        if msg.kind == "exchange_request":
            reply = strategy.handle_exchange(sender, incoming)
            if reply is None:
                return self._refused()
            # recorded under the request's sequence number: the reply's own is set by the server
            out = to_transport(reply, self.names, self.policy)
            if out.tensors and self.on_release is not None:
                nbytes = int(sum(np.asarray(t).nbytes for t in out.tensors.values()))
                digest = model_digest(out.tensors)
                self.on_release(sender, int(msg.sequence), int(reply.round), digest.hex(), nbytes)
                out = dataclasses.replace(out, digest=digest)
            return out
        strategy.handle_message(sender, incoming)
        return None


__all__ = ["AdvertisedPolicy", "COMPRESSED_FRAME", "CONTROL_KINDS", "GrpcPeerNetwork", "INBOX_KINDS",
           "REFUSED_KIND", "compressed_from_frame", "compressed_spec_of", "expected_spec_of", "from_transport",
           "policy_problem", "to_transport"]
