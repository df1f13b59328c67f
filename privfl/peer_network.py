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
finiteness (a subspace frame — k values of a public mask, sync gossip's one-way message or
async gossip's exchange request and reply — is rebuilt with the per-tensor mask counts the
strategy declares, ``NodeStrategy.frame_shapes``). A frame that fails is
refused and logged like any other bad message.

Every model a node releases is reported to ``on_release`` *before* it leaves (the
ledger's write-ahead "message" entry: peer, sequence, round, digest, bytes — never
values). Each message also advertises the sender's privacy settings as scalars
(``policy_sigma``, ``policy_epsilon``, ``policy_delta``); a message from a peer whose
advertised settings are weaker than the roster's ``[policy]`` is refused and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509

from privfl.accounting.heads import HEAD_SIGNATURE_BYTES, head_signed_by, receipt_signed_by, sign_receipt
from privfl.accounting.ledger import public_key_of_cert
from privfl.accounting.log_limit import LogLimiter, reason_code, warn_limited
from privfl.pki import NodeIdentity, Policy, Roster, load_certificate, load_private_key
from privfl.strategies.base import ModelMessage, NodeStrategy
from privfl.strategies.compression import Compressed, MalformedMessage, decompress
from privfl.strategies.compression.message import max_frame_bytes
from privfl.transport import (
    LEDGER_DIGEST,
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
    TrustState,
    model_digest,
)

log = logging.getLogger("privfl.node")

CONTROL_KINDS = ("hello", "done", "settled", "bye")  # settled: this node ends its consensus exchanges
REFUSED_KIND = "refused"
POLICY_KEYS = ("policy_sigma", "policy_epsilon", "policy_delta")
INBOX_KINDS = ("model", "innovation")  # one-way model messages of synchronous gossip
# a Compressed payload on the wire: one 1-D uint8 tensor holding Compressed.to_bytes()
COMPRESSED_FRAME = "compressed.frame"

HEAD_QUERY_KIND = "head_query"  # "what is the last ledger head of mine that you hold?"
HEAD_REPLY_KIND = "head_reply"  # carries HEAD_HASH (32 uint8), HEAD_SIG (64 uint8) and HEAD_INDEX, or nothing
HEAD_HASH = "ledger.entry_hash"
HEAD_SIG = "ledger.head_signature"  # the asking node's own signature of that head: proof it sent it
HEAD_INDEX = "ledger_index"
RECEIPT_KIND = "receipt"  # the answer to a goodbye: HEAD_HASH + HEAD_INDEX of the head it carried, RECEIPT_SIG
RECEIPT_SIG = "ledger.receipt_signature"  # the answering node's signature that it received that head
# what a node serves and accepts as replies: kind -> "model" (tensors required) / "empty" / "any"
REQUEST_KINDS = {"exchange_request": "model", "model": "model", "innovation": "model",
                 **{k: "empty" for k in CONTROL_KINDS}, HEAD_QUERY_KIND: "empty"}
REPLY_KINDS = {"exchange_reply": "model", REFUSED_KIND: "empty", "ack": "empty", HEAD_REPLY_KIND: "any",
               RECEIPT_KIND: "model"}
HEAD_SPEC = {HEAD_HASH: TensorExpectation((32,), "|u1", allow_sparse=False),
             HEAD_SIG: TensorExpectation((HEAD_SIGNATURE_BYTES,), "|u1", allow_sparse=False)}
RECEIPT_SPEC = {HEAD_HASH: TensorExpectation((32,), "|u1", allow_sparse=False),
                RECEIPT_SIG: TensorExpectation((HEAD_SIGNATURE_BYTES,), "|u1", allow_sparse=False)}
DEFAULT_MAX_ABS_VALUE = 1e6
DEFAULT_MAX_NORM_RATIO = 100.0
DEFAULT_NORM_FLOOR = 100.0

ReleaseHook = Callable[[str, int, int, str, int], None]  # peer, seq, round, digest hex, bytes
LedgerHeadHook = Callable[[], "tuple[int, bytes] | None"]  # this node's (index, entry hash)
PeerHeadHook = Callable[[str, int, bytes, bytes], None]  # peer, index, entry hash, its head signature
HeadForHook = Callable[[str], "tuple[int, bytes, bytes] | None"]  # the last head we hold for a peer, signed
ReceiptHook = Callable[[str, int, bytes, bytes], None]  # peer, index, entry hash of our head, its receipt
GoodbyeHook = Callable[[str, int, bytes, bytes], bool]  # records a peer's goodbye head; True: receipt it


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
    frame_bytes = max_frame_bytes([np.shape(p) for p in params])
    return {COMPRESSED_FRAME: TensorExpectation((frame_bytes,), "|u1", allow_sparse=False, bounded=True)}


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

    Ledger heads: ``ledger_head()`` gives this node's (index, 32-byte entry hash), signed
    into every outgoing message (called when it is encoded, after ``on_release``);
    ``on_peer_head(peer, index, entry_hash)`` is called for every verified message that
    carries one (requests, replies, acks, notifications); ``head_for(peer)`` answers a
    peer's ``head_query`` (see :meth:`query_head`). A goodbye is answered with a receipt,
    this node's signature that it received the head the goodbye carried
    (:func:`~accounting.heads.sign_receipt`); ``on_receipt(peer, index, entry_hash,
    signature)`` is called for each receipt a neighbour gave for our own current head, once
    its signature verified under the neighbour's certificate (:mod:`accounting.receipts`).
    ``on_goodbye(peer, index, entry_hash, head_signature)`` is called before we sign a receipt
    for a peer's goodbye head (the node records it then); unless it returns True (the head is
    now recorded as that peer's newest), no receipt is given.

    Live trust: with ``crl_path``/``roster_path`` the files are re-read by
    :meth:`reload_trust` (and, with ``trust_poll`` seconds, by a daemon thread watching
    their mtime); a CRL that does not verify or a roster that does not parse is logged
    and the previous one stays in force.

    Bounds: a received model is refused (logged) when any value exceeds ``max_abs_value``
    in magnitude or its L2 norm exceeds ``max_norm_ratio`` × this node's own current
    model norm + ``norm_floor``. ``stream_timeout`` (default 2 × timeout, at least 10 s)
    and ``max_calls_per_peer`` bound the server. Call :meth:`attach` with the strategy
    before :meth:`start`.
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes, neighbors: Sequence[str],
                 names: Sequence[str], template: Sequence[np.ndarray], policy: AdvertisedPolicy | None = None,
                 listen: str | None = None, timeout: float = 10.0, on_release: ReleaseHook | None = None,
                 backoff: PeerBackoff | None = None, *, ledger_head: LedgerHeadHook | None = None,
                 on_peer_head: PeerHeadHook | None = None, head_for: HeadForHook | None = None,
                 on_receipt: ReceiptHook | None = None, on_goodbye: GoodbyeHook | None = None,
                 crl_path: str | os.PathLike[str] | None = None,
                 roster_path: str | os.PathLike[str] | None = None, trust_poll: float | None = 1.0,
                 stream_timeout: float | None = None, max_calls_per_peer: int = 4,
                 max_abs_value: float = DEFAULT_MAX_ABS_VALUE, max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
                 norm_floor: float = DEFAULT_NORM_FLOOR) -> None:
        self.node_id = identity.node_id
        self._own_key = public_key_of_cert(load_certificate(identity.cert_pem))  # checks heads peers hold for us
        self._signing_key = load_private_key(identity.key_pem)  # signs the receipts for goodbyes
        self._ledger_head = ledger_head
        self.roster = roster
        self.names = list(names)
        self.shapes = tuple(tuple(int(s) for s in np.shape(p)) for p in template)
        self._template = [np.asarray(p) for p in template]
        self.spec: ExpectedSpec = SpecChoice((expected_spec_of(self.names, list(template)),
                                              compressed_spec_of(list(template))))
        self.policy = policy
        self.timeout = timeout
        self.on_release = on_release
        self.on_peer_head = on_peer_head
        self.head_for = head_for
        self.on_receipt = on_receipt
        self.on_goodbye = on_goodbye
        self.max_abs_value = max_abs_value
        self.max_norm_ratio = max_norm_ratio
        self.norm_floor = norm_floor
        self.crl_path = Path(crl_path) if crl_path is not None else None
        self.roster_path = Path(roster_path) if roster_path is not None else None
        self.trust_poll = trust_poll
        self.counters = TrafficCounters()
        self._refusals = LogLimiter()  # refusals a peer can trigger: a few lines, not one per message
        self.trust = TrustState(identity.ca_pem, roster, crl, identity.node_id)
        self._neighbors = [n for n in neighbors if n != self.node_id]
        self.client = GossipClient(identity, roster, crl, expected_spec=self.spec, default_timeout=timeout,
                                   counters=self.counters,
                                   backoff=backoff or PeerBackoff(base=0.25, factor=2.0, max_delay=4.0),
                                   trust=self.trust, ledger_head=ledger_head, reply_kinds=REPLY_KINDS,
                                   on_verified=self._verified)
        self.server = GossipServer(identity, roster, crl, self._handle, address=listen,
                                   expected_spec=self.spec, counters=self.counters, trust=self.trust,
                                   ledger_head=ledger_head, kinds=REQUEST_KINDS,
                                   stream_timeout=(stream_timeout if stream_timeout is not None
                                                   else max(10.0, 2 * timeout)),
                                   max_calls_per_peer=max_calls_per_peer, on_verified=self._verified)
        self.strategy: NodeStrategy | None = None
        self.serving_models = True  # False once the node must not release anything more
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, str], ModelMessage] = {}
        self.control: dict[str, set[str]] = {k: set() for k in CONTROL_KINDS}
        self.refused_policy: set[str] = set()
        self._receipted: set[str] = set()  # peers that gave a verified receipt for our head
        self.refused_values: dict[str, str] = {}  # peer -> why its last refused model was refused
        self._t0 = time.monotonic()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stamps = self._file_stamps()

    # ---- lifecycle ------------------------------------------------------------------
    def attach(self, strategy: NodeStrategy) -> None:
        """The strategy whose ``handle_exchange`` / ``handle_message`` serve incoming calls."""
        self.strategy = strategy

    def start(self) -> int:
        """Start the gossip server (and the trust-file watcher); returns its port.

        TransportError naming the address if it cannot be bound (e.g. the same node runs twice).
        """
        port = self.server.start()
        if self.trust_poll and (self.crl_path is not None or self.roster_path is not None):
            self._watch_stop.clear()
            self._watcher = threading.Thread(target=self._watch, name=f"trust-watch-{self.node_id}", daemon=True)
            self._watcher.start()
        return port

    def close(self) -> None:
        """Stop the watcher and the server and close every channel."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
            self._watcher = None
        self.server.stop(grace=1.0)
        self.client.close()

    # ---- live trust -------------------------------------------------------------------
    def _file_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        out = []
        for p in (self.crl_path, self.roster_path):
            try:
                st = p.stat() if p is not None else None
                out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None)
            except OSError:
                out.append(None)
        return tuple(out)

    def _watch(self) -> None:
        assert self.trust_poll
        while not self._watch_stop.wait(self.trust_poll):
            stamps = self._file_stamps()
            if stamps != self._stamps:
                self._stamps = stamps
                try:
                    self.reload_trust()
                except Exception:  # never let the watcher die
                    log.exception("node %s: trust reload failed", self.node_id)

    def reload_trust(self) -> bool:
        """Re-read the CRL and roster files now (e.g. on SIGHUP); True if the trust in force changed.

        A newly revoked peer is refused from then on in both directions: the server refuses
        its next call, the client sends it no new call and refuses its replies.
        """
        changed = self.trust.reload_from_files(self.crl_path, self.roster_path)
        if changed:
            self.roster = self.trust.roster
            self.client.trust_changed()
        return changed

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
        return self._recorded(peer, seq, int(message.round), msg) if msg.tensors else msg

    def _recorded(self, peer: str, seq: int, round: int, msg: Message) -> Message:
        """Report a model about to leave to ``on_release`` (the ledger's write-ahead entry), and carry
        the digest recorded there, so the transport sends it instead of hashing the body again."""
        if self.on_release is None:
            return msg
        nbytes = int(sum(np.asarray(t).nbytes for t in msg.tensors.values()))
        digest = model_digest(msg.tensors)
        self.on_release(peer, seq, round, digest.hex(), nbytes)
        return dataclasses.replace(msg, digest=digest, digest_algorithm=LEDGER_DIGEST)

    # ---- verified messages: ledger heads, value bounds ---------------------------------
    def _verified(self, peer: str, msg: DecodedMessage) -> None:
        """Every signature-verified message (request or reply): report the sender's ledger head.

        A head query's own head is reported after it is answered (``_handle``), so the
        answer is the head held *before* the query.
        """
        if msg.kind != HEAD_QUERY_KIND:
            self._report_head(peer, msg)

    def _report_head(self, peer: str, msg: DecodedMessage) -> None:
        if msg.ledger_head is not None and self.on_peer_head is not None:
            index, entry_hash = msg.ledger_head
            self.on_peer_head(peer, int(index), bytes(entry_hash), msg.head_signature)

    def _own_params(self) -> Sequence[np.ndarray]:
        params = getattr(self.strategy, "params", None)
        return params if params is not None else self._template

    def values_problem(self, arrays: Sequence[np.ndarray]) -> str | None:
        """Why received ``arrays`` are out of bounds (None if they are within them)."""
        sq = 0.0
        for a in arrays:
            a = np.asarray(a)
            if a.size == 0 or a.dtype.kind not in "fiu":
                continue
            biggest = float(np.max(np.abs(a)))
            if math.isnan(biggest):  # the transport refuses it first; NaN compares False with any bound
                return "a value is not a number"
            if biggest > self.max_abs_value:
                return f"a value of magnitude {biggest:.3g} exceeds max_abs_value {self.max_abs_value:g}"
            flat = a.reshape(-1).astype(np.float64, copy=False)
            sq += float(np.dot(flat, flat))
        norm = sq ** 0.5
        own = sum(float(np.dot(np.asarray(p, np.float64).reshape(-1), np.asarray(p, np.float64).reshape(-1)))
                  for p in self._own_params() if np.asarray(p).dtype.kind in "fiu") ** 0.5
        bound = self.max_norm_ratio * own + self.norm_floor
        if not norm <= bound:
            return (f"L2 norm {norm:.4g} exceeds {self.max_norm_ratio:g} x own norm {own:.4g} + "
                    f"{self.norm_floor:g} = {bound:.4g}")
        return None

    def _frame_shapes(self, msg: DecodedMessage) -> tuple[tuple[int, ...], ...]:
        """What a compressed frame of ``msg`` (a request, reply or one-way message) is rebuilt with: what
        the strategy declares (``NodeStrategy.frame_shapes``: the model's shapes, or a public subspace
        mask's per-tensor counts); the model's shapes before a strategy is attached."""
        if self.strategy is None:
            return self.shapes
        return tuple(tuple(int(n) for n in s) for s in self.strategy.frame_shapes(int(msg.round), self.shapes))

    def _accept_values(self, peer: str, kind: str, incoming: ModelMessage) -> bool:
        if incoming.params is not None:
            arrays: Sequence[np.ndarray] = incoming.params
        elif isinstance(incoming.payload, Compressed):
            arrays = decompress(incoming.payload)
        else:
            return True
        problem = self.values_problem(arrays)
        if problem is None:
            return True
        warn_limited(log, self._refusals, ("values", peer, reason_code(problem)),
                     "node %s: refused %s from %s: %s", self.node_id, kind, peer, problem,
                     group=("values", peer))
        self.refused_values[peer] = problem
        return False

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
        if reply.kind != "exchange_reply" or not reply.tensors:
            return None  # busy, stopped or refused: nothing to check, nothing to apply
        if not self._accept_policy(peer, reply.scalars):
            return None
        try:
            incoming = from_transport(reply, self.names, self._frame_shapes(reply))
        except TransportError as exc:
            warn_limited(log, self._refusals, ("invalid reply", peer, reason_code(str(exc))),
                         "node %s: invalid reply from %s: %s", self.node_id, peer, exc,
                         group=("invalid reply", peer))
            return None
        return incoming if self._accept_values(peer, reply.kind, incoming) else None

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
                if kind == "bye":  # answered with a receipt for the head it carries
                    self._take_receipt(peer, self.client.exchange(peer, msg, timeout=timeout or self.timeout,
                                                                  expected=RECEIPT_SPEC))
                else:
                    self.client.send(peer, msg, timeout=timeout or self.timeout)
                ok.add(peer)
            except TransportError as exc:
                log.debug("node %s: %s to %s failed: %s", self.node_id, kind, peer, exc)
        return ok

    def goodbye(self, timeout: float | None = None, witnesses: int = 3) -> set[str]:
        """Say goodbye to the neighbours (the message carries our close head); returns who got it.

        When no neighbour answers with a receipt (every one refused it, or none is reachable), up
        to ``witnesses`` other roster members are asked in roster order until one receipts the
        head, so neighbours that drop our close head and withhold their receipts cannot leave our
        ledger's end unconfirmed on their own."""
        got = self.notify("bye", timeout=timeout)
        if witnesses <= 0 or self._receipted & set(self._neighbors):
            return got
        others = [n for n in sorted(self.trust.roster.nodes) if n != self.node_id and n not in self._neighbors]
        for peer in others[:witnesses]:
            if self.notify("bye", [peer], timeout=timeout) and peer in self._receipted:
                log.info("node %s: no neighbour receipted our close head; member %s did", self.node_id, peer)
                return got
        log.warning("node %s: no neighbour or other member receipted our close head (asked %d)", self.node_id,
                    len(self._neighbors) + min(witnesses, len(others)))
        return got

    def _take_receipt(self, peer: str, reply: DecodedMessage) -> None:
        """Keep ``peer``'s receipt for our head when it verifies under its certificate and is for
        the head we hold now (the one the goodbye carried); anything else is logged and dropped."""
        if reply.kind != RECEIPT_KIND:
            log.info("node %s: %s answered our goodbye without a receipt (%s)", self.node_id, peer, reply.kind)
            return
        h, sig, index = reply.tensors.get(HEAD_HASH), reply.tensors.get(RECEIPT_SIG), reply.scalars.get(HEAD_INDEX)
        ours = self._ledger_head() if self._ledger_head is not None else None
        der = self.client.peer_certificate(peer)
        if h is None or sig is None or isinstance(h, SparseTensor) or isinstance(sig, SparseTensor) \
                or index is None or ours is None or der is None:
            log.warning("node %s: the receipt %s gave for our goodbye is incomplete: dropped", self.node_id, peer)
            return
        head = (int(index), np.asarray(h, dtype=np.uint8).tobytes())
        proof = np.asarray(sig, dtype=np.uint8).tobytes()
        if head != (int(ours[0]), bytes(ours[1])) or not receipt_signed_by(
                x509.load_der_x509_certificate(der).public_key(), peer, self.node_id, head, proof):
            log.warning("node %s: the receipt %s gave for our goodbye is not its signature of our head at "
                        "index %d: dropped", self.node_id, peer, int(ours[0]))
            return
        self._receipted.add(peer)
        if self.on_receipt is not None:
            self.on_receipt(peer, head[0], head[1], proof)

    def _receipt(self, sender: str, msg: DecodedMessage) -> Message | None:
        """The answer to ``sender``'s goodbye: our signature that we received the head it carried."""
        if msg.ledger_head is None:
            return None
        index, entry_hash = int(msg.ledger_head[0]), bytes(msg.ledger_head[1])
        if self.on_goodbye is not None:
            try:
                recorded = self.on_goodbye(sender, index, entry_hash, msg.head_signature) is True
            except Exception as exc:  # not recorded: sign nothing we may not hold
                log.error("node %s: the goodbye head of %s was not recorded, no receipt given: %s",
                          self.node_id, sender, exc)
                return None
            if not recorded:
                log.info("node %s: the goodbye head of %s at entry %d is not recorded as its newest: no receipt",
                         self.node_id, sender, index)
                return None
        proof = sign_receipt(self._signing_key, self.node_id, sender, (index, entry_hash))
        return Message(kind=RECEIPT_KIND, scalars={HEAD_INDEX: float(index)},
                       tensors={HEAD_HASH: np.frombuffer(entry_hash, np.uint8),
                                RECEIPT_SIG: np.frombuffer(proof, np.uint8)})

    def query_head(self, peer_id: str, timeout: float | None = None) -> tuple[int, bytes] | None:
        """Ask ``peer_id`` for the last ledger head of ours that it holds: (index, entry hash) or None.

        The reply is signed and verified like every reply, and the head must come with our
        own signature of it (every head we send is signed): a head we never signed is one
        the peer made up, logged and answered as None, so a member cannot stop our restart
        with it. PeerUnavailable (with the reason) if the peer cannot be reached, refuses,
        or its answer does not verify or is malformed.
        """
        try:
            reply = self.client.exchange(peer_id, Message(kind=HEAD_QUERY_KIND), timeout=timeout or self.timeout,
                                         expected=HEAD_SPEC)
        except PeerUnavailable:
            raise
        except TransportError as exc:
            raise PeerUnavailable(f"head query to {peer_id} failed: {exc}") from None
        if reply.kind != HEAD_REPLY_KIND:
            raise PeerUnavailable(f"head query to {peer_id}: answered with {reply.kind!r}")
        if not reply.tensors and HEAD_INDEX not in reply.scalars:
            return None
        h = reply.tensors.get(HEAD_HASH)
        sig = reply.tensors.get(HEAD_SIG)
        index = reply.scalars.get(HEAD_INDEX)
        if h is None or isinstance(h, SparseTensor) or isinstance(sig, SparseTensor) or index is None \
                or index < 0 or index != int(index) or index >= 2**63:
            raise PeerUnavailable(f"head query to {peer_id}: malformed head reply")
        head = (int(index), np.asarray(h, dtype=np.uint8).tobytes())
        proof = b"" if sig is None else np.asarray(sig, dtype=np.uint8).tobytes()
        if not head_signed_by(self._own_key, self.node_id, head, proof):
            log.warning("node %s: %s answered a ledger head of ours at index %d that we never signed "
                        "(made up, or held from before head signatures): ignored", self.node_id, peer_id, head[0])
            return None
        return head

    def _head_reply(self, sender: str) -> Message:
        head = None
        if self.head_for is not None:
            try:
                head = self.head_for(sender)
            except Exception:  # the ledger side must not take the server down
                log.exception("node %s: head_for(%s) failed", self.node_id, sender)
        if head is None:
            return Message(kind=HEAD_REPLY_KIND)
        index, entry_hash, proof = head
        if len(entry_hash) != 32:
            log.error("node %s: head_for(%s) gave a %d-byte hash; answering with no head", self.node_id, sender,
                      len(entry_hash))
            return Message(kind=HEAD_REPLY_KIND)
        if len(proof) != HEAD_SIGNATURE_BYTES:  # a head held without its proof: zeros, which prove nothing
            proof = bytes(HEAD_SIGNATURE_BYTES)
        tensors = {HEAD_HASH: np.frombuffer(bytes(entry_hash), np.uint8),
                   HEAD_SIG: np.frombuffer(bytes(proof), np.uint8)}
        return Message(kind=HEAD_REPLY_KIND, tensors=tensors, scalars={HEAD_INDEX: float(int(index))})

    def heard(self, kind: str) -> set[str]:
        """Peers that have sent us control message ``kind``."""
        with self._cond:
            return set(self.control[kind])

    # ---- server side ------------------------------------------------------------------
    def _refused(self) -> Message:
        """The reply to a request we do not serve (it carries no model, only our policy)."""
        return Message(kind=REFUSED_KIND, scalars=self.policy.scalars() if self.policy else {})

    def _handle(self, sender: str, msg: DecodedMessage) -> Message | None:
        """Route one authenticated, signature-verified, validated incoming message."""
        self.client.backoff.success(sender)  # it just reached us: it is up, stop skipping it
        if msg.kind == HEAD_QUERY_KIND:
            answer = self._head_reply(sender)
            self._report_head(sender, msg)
            return answer
        if not self._accept_policy(sender, msg.scalars):
            return self._refused()
        if msg.kind in CONTROL_KINDS:
            with self._cond:
                self.control[msg.kind].add(sender)
                self._cond.notify_all()
            log.debug("node %s: %s from %s", self.node_id, msg.kind, sender)
            return self._receipt(sender, msg) if msg.kind == "bye" else None
        try:
            incoming = from_transport(msg, self.names, self._frame_shapes(msg))
        except TransportError as exc:
            warn_limited(log, self._refusals, ("malformed", sender, reason_code(str(exc))),
                         "node %s: refused %s from %s: %s", self.node_id, msg.kind, sender, exc,
                         group=("malformed", sender))
            return self._refused()
        if not self._accept_values(sender, msg.kind, incoming):
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
            if not out.tensors:
                return self._refused()
            return self._recorded(sender, int(msg.sequence), int(reply.round), out)
        strategy.handle_message(sender, incoming)
        return None


__all__ = ["AdvertisedPolicy", "COMPRESSED_FRAME", "CONTROL_KINDS", "GrpcPeerNetwork", "HEAD_QUERY_KIND",
           "HEAD_REPLY_KIND", "INBOX_KINDS", "RECEIPT_KIND", "REFUSED_KIND", "REPLY_KINDS", "REQUEST_KINDS",
           "compressed_from_frame", "compressed_spec_of", "expected_spec_of", "from_transport",
           "policy_problem", "to_transport"]
