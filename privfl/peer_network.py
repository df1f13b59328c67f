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
compressed ``sync_gossip`` as kind ``innovation``) travels as four named 1-D tensors
(``compressed.indices`` <i4, ``compressed.values`` <f4, ``compressed.codes`` |u1,
``compressed.scales`` <f4) plus the scalars ``compressed_kind`` and ``compressed_shared``.
Their lengths vary per message, so the receiver accepts them only up to the model's size
(d elements, 2·T scales) and rebuilds the message with its *own* model shapes; the
``Compressed`` constructor then validates lengths, index order and range and finiteness,
and a message that fails is refused and logged like any other bad message.

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
from strategies.compression.message import KINDS as COMPRESSED_KINDS

log = logging.getLogger("privfl.node")

CONTROL_KINDS = ("hello", "done", "bye")
REFUSED_KIND = "refused"
POLICY_KEYS = ("policy_sigma", "policy_epsilon", "policy_delta")
INBOX_KINDS = ("model", "innovation")  # one-way model messages of synchronous gossip
# a Compressed payload's arrays on the wire: tensor name -> (Compressed field, little-endian dtype)
COMPRESSED_TENSORS = {"compressed.indices": ("indices", "<i4"), "compressed.values": ("values", "<f4"),
                      "compressed.codes": ("codes", "|u1"), "compressed.scales": ("scales", "<f4")}
COMPRESSED_KIND_KEY = "compressed_kind"
COMPRESSED_SHARED_KEY = "compressed_shared"
COMPRESSED_KEYS = (COMPRESSED_KIND_KEY, COMPRESSED_SHARED_KEY)

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
    """The spec of a compressed update for a model of ``params``: 1-D arrays bounded by its size.

    No kind stores more than d indices, values or codes, or more than 2·T scales (quant8).
    """
    d = int(sum(int(np.asarray(p).size) for p in params))
    bounds = {"indices": d, "values": d, "codes": d, "scales": 2 * len(params)}
    return {name: TensorExpectation((bounds[field],), dtype, allow_sparse=False, bounded=True)
            for name, (field, dtype) in COMPRESSED_TENSORS.items()}


def compressed_to_tensors(payload: Compressed) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The named tensors and scalars that carry ``payload`` (all four arrays, empty ones too)."""
    tensors = {name: np.ascontiguousarray(getattr(payload, field), dtype=np.dtype(dtype))
               for name, (field, dtype) in COMPRESSED_TENSORS.items()}
    scalars = {COMPRESSED_KIND_KEY: float(COMPRESSED_KINDS.index(payload.kind)),
               COMPRESSED_SHARED_KEY: float(payload.shared_indices)}
    return tensors, scalars


def compressed_from_tensors(msg: DecodedMessage, shapes: Sequence[tuple[int, ...]]) -> Compressed:
    """Rebuild a received compressed update for the receiver's own model ``shapes``.

    TransportError with the reason if a tensor or scalar is missing or the message is
    inconsistent (the ``Compressed`` constructor checks lengths, indices and finiteness).
    """
    missing = [n for n in COMPRESSED_TENSORS if n not in msg.tensors]
    missing += [k for k in COMPRESSED_KEYS if k not in msg.scalars]
    if missing:
        raise TransportError(f"compressed message from {msg.sender} lacks {', '.join(missing)}")
    code, shared = msg.scalars[COMPRESSED_KIND_KEY], msg.scalars[COMPRESSED_SHARED_KEY]
    if code not in range(len(COMPRESSED_KINDS)):
        raise TransportError(f"compressed message from {msg.sender}: unknown {COMPRESSED_KIND_KEY} {code!r}")
    if shared not in (0.0, 1.0):
        raise TransportError(f"compressed message from {msg.sender}: {COMPRESSED_SHARED_KEY} must be 0 or 1, "
                             f"got {shared!r}")
    arrays = {}
    for name, (field, dtype) in COMPRESSED_TENSORS.items():
        t = msg.tensors[name]
        if isinstance(t, SparseTensor):
            raise TransportError(f"compressed message from {msg.sender}: {name} must be dense")
        arrays[field] = np.array(t, dtype=np.dtype(dtype).newbyteorder("="), copy=True)
    try:
        return Compressed(COMPRESSED_KINDS[int(code)], tuple(tuple(s) for s in shapes),
                          shared_indices=bool(shared), **arrays)
    except MalformedMessage as exc:
        raise TransportError(f"malformed compressed message from {msg.sender}: {exc}") from None


def to_transport(message: ModelMessage, names: Sequence[str], policy: AdvertisedPolicy | None = None,
                 sequence: int | None = None) -> Message:
    """A transport message with named tensors: the model's dense arrays, or a compressed payload's arrays.

    ValueError if the arrays do not match ``names`` or the payload is not a ``Compressed``.
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
        tensors, scalars = compressed_to_tensors(message.payload)
    clash = sorted(set(message.meta) & set(COMPRESSED_KEYS))
    if clash:
        raise ValueError(f"message meta may not use the reserved scalar(s) {', '.join(clash)}")
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
    if msg.tensors and any(n in COMPRESSED_TENSORS for n in msg.tensors):
        if shapes is None:
            raise TransportError(f"compressed message from {msg.sender}, but no model shapes to rebuild it")
        payload = compressed_from_tensors(msg, shapes)
    elif msg.tensors:
        missing = [n for n in names if n not in msg.tensors]
        if missing:
            raise TransportError(f"message from {msg.sender} lacks tensors {', '.join(missing[:5])}")
        params = []
        for n in names:
            t = msg.tensors[n]
            arr = t.to_dense() if isinstance(t, SparseTensor) else np.array(t, copy=True)
            params.append(arr)
    meta = {k: float(v) for k, v in msg.scalars.items() if k not in POLICY_KEYS + COMPRESSED_KEYS}
    return ModelMessage(sender=msg.sender, round=int(msg.round), kind=msg.kind, params=params, payload=payload,
                        meta=meta)


class GrpcPeerNetwork:
    """PeerNetwork over the mTLS gossip transport, plus the node's gossip server.

    ``neighbors``: the topology neighbours this node may talk to. ``names`` and
    ``template``: parameter names and arrays of the node's model (the expected spec: the
    dense model, or a compressed update bounded by the model's size).
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


__all__ = ["AdvertisedPolicy", "COMPRESSED_TENSORS", "CONTROL_KINDS", "GrpcPeerNetwork", "INBOX_KINDS",
           "REFUSED_KIND", "compressed_from_tensors", "compressed_spec_of", "compressed_to_tensors",
           "expected_spec_of", "from_transport", "policy_problem", "to_transport"]
