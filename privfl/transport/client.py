"""Gossip client: mutual-TLS gRPC calls to roster peers, with deadlines, backoff and checks.

Server identity: every channel sets ``grpc.ssl_target_name_override`` to the peer's
per-node DNS SAN (``<peer>.<consortium>.privfl``), so gRPC's own TLS hostname check
refuses a server whose certificate names another node. gRPC Python exposes neither the
server's TLS certificate nor a verification callback on the client, so the roster pin
and the CRL are checked on what the server *signs*: the server answers every request
header with an ``accept`` message signed by its node key and bound to our sequence
number (``transport/signing.py``), and the client streams its body only after that
accept verified (certificate chains to the CA, equals the roster pin of the peer we
called, not revoked by the current CRL, signature valid). The reply is verified the
same way before anything is decoded. A server holding a revoked or unpinned certificate
-- or a man in the middle forwarding our connection to one -- never receives our model,
and nothing it sends is applied. No private key is copied anywhere.

A peer whose verified certificate is revoked (learned from its reply, or by re-checking
the last certificate it showed when the CRL/roster changes) gets no new call until a
trust change accepts it again; this is logged once per peer.

TLS: gRPC Python (grpcio 1.85) cannot set a minimum TLS version and has no client-side
auth context, so the client cannot refuse a TLS 1.2 server itself; a privfl server
refuses every call on a session that is not TLS 1.3 (see server.py), and BoringSSL
negotiates TLS 1.3 between privfl nodes.
Handshake failures reach the client only as an UNAVAILABLE status whose details name
the TLS error; they are logged through privfl's logger with the peer and its address.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from privfl.pki import NodeIdentity, Roster, node_dns_name
from privfl.transport.codec import (
    DecodedMessage,
    ExpectedSpec,
    KindRules,
    Message,
    MessageAssembler,
    PeerRefused,
    PeerUnavailable,
    TransportError,
    encode_message,
    iter_chunks,
)
from privfl.transport.common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    METHOD,
    PeerBackoff,
    TrafficCounters,
    TrustState,
    grpc_options,
)
from privfl.transport.proto import gossip_pb2 as pb
from privfl.transport.server import ACCEPT_KIND, ACK_KIND, HeadSource
from privfl.transport.signing import AuthenticationFailed, PeerVerifier, Signer, head_signature_of

log = logging.getLogger("privfl.transport")

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_TLS_HINTS = ("handshake", "ssl", "tsi", "certificate", "tls")
_ACCEPT_RULES: KindRules = {ACCEPT_KIND: "empty"}
FIRST_CONTACT_WINDOW = 5.0  # s: how long the first call to a peer retries a refused connection
_RETRY_PAUSE = 0.1  # s between those retries


class _Retry(Exception):
    """Internal: the connection was refused and the call may be made again (first contact)."""


@dataclass(frozen=True)
class Delivery:
    """What was sent by ``send``: sequence number, model digest, serialized bytes, and the peer's
    verified ack (its ledger head included)."""

    peer: str
    sequence: int
    digest: bytes
    bytes_sent: int
    reply: DecodedMessage | None = None


@dataclass
class _Peer:
    channel: grpc.Channel
    call: grpc.StreamStreamMultiCallable
    address: str


class GossipClient:
    """Calls roster peers over mutual TLS; one cached channel per peer.

    ``exchange`` sends a message and returns the peer's verified reply (pairwise model
    averaging); ``send`` sends and waits for the peer's ack. Sequence numbers start at the
    current time in microseconds and increase by one per message, so a restarted node is
    never mistaken for a replay. A peer that fails is skipped by ``backoff`` for a while.

    ``ledger_head()``: the node's (index, entry hash) signed into every outgoing message
    (called when the message is encoded, i.e. after the node's write-ahead ledger entry).
    ``reply_kinds``: the reply kinds accepted and what each carries (None: any).
    ``on_verified(peer, reply)``: called for every verified reply. ``trust``: a TrustState
    shared with the node's server (default: one of its own).

    First contact: the first call to each peer retries a refused connection (nobody listens
    at its address: nothing of the request reached anyone) every 0.1 s for up to
    ``first_contact_window`` seconds, within its own deadline. At start-up a neighbour may
    not listen yet; without the retry it went into back-off and the node's first message
    to it was skipped. Any other failure (a TLS handshake refused, a deadline) is not retried.
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes,
                 expected_spec: ExpectedSpec | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 default_timeout: float = 30.0, counters: TrafficCounters | None = None,
                 backoff: PeerBackoff | None = None, verify_digest: bool = True,
                 trust: TrustState | None = None, ledger_head: HeadSource | None = None,
                 reply_kinds: KindRules | None = None,
                 on_verified: Callable[[str, DecodedMessage], None] | None = None,
                 first_contact_window: float = FIRST_CONTACT_WINDOW) -> None:
        self.identity = identity
        self.first_contact_window = first_contact_window
        self.verify_digest = verify_digest
        self.node_id = identity.node_id
        self.expected_spec = expected_spec
        self.max_message_bytes = max_message_bytes
        self.default_timeout = default_timeout
        self.counters = counters or TrafficCounters()
        self.backoff = backoff or PeerBackoff()
        self.ledger_head = ledger_head
        self.reply_kinds = reply_kinds
        self.on_verified = on_verified
        self._lock = threading.Lock()
        self.trust = trust or TrustState(identity.ca_pem, roster, crl, identity.node_id)
        self.verifier = PeerVerifier(self.trust)
        self._signer = Signer(identity.key_pem, identity.cert_pem)
        self._peers: dict[str, _Peer] = {}
        self._seen_cert: dict[str, bytes] = {}  # peer -> DER of the last certificate that verified
        self._blocked: dict[str, str] = {}  # peer -> why no call goes to it (revoked)
        self._contacted: set[str] = set()  # peers whose first call was made (see _contact_until)
        self._generation = self.trust.generation
        self._seq = time.time_ns() // 1000
        self._creds = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem, private_key=identity.key_pem,
            certificate_chain=identity.cert_pem)

    # ------------------------------------------------------------------ trust, channels

    def update_trust(self, roster: Roster | None = None, crl: bytes | None = None) -> None:
        """Swap roster and/or CRL (the CRL is verified against the CA first), then re-check peers."""
        self.trust.update(roster, crl)
        self.trust_changed()

    def trust_changed(self) -> None:
        """Re-check the last verified certificate of every peer under the trust in force now.

        A peer whose pinned certificate is now revoked (or no longer valid) is blocked
        (logged once); a peer whose pin changed is forgotten (its next reply shows its new
        certificate); a previously blocked peer that passes again is unblocked.
        """
        roster = self.trust.roster
        with self._lock:
            self._generation = self.trust.generation
            seen = dict(self._seen_cert)
            stale = [p for p, c in self._peers.items() if p not in roster.nodes or
                     roster.nodes[p].address != c.address]
            for p in stale:
                self._peers.pop(p).channel.close()
        for peer, der in seen.items():
            entry = roster.nodes.get(peer)
            pinned = entry is not None and entry.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
            if not pinned:
                with self._lock:
                    self._seen_cert.pop(peer, None)
                    self._blocked.pop(peer, None)
                continue
            try:
                self.verifier.certificate(der, claimed=peer)
            except AuthenticationFailed as exc:
                self._block(peer, str(exc))
            else:
                with self._lock:
                    if self._blocked.pop(peer, None) is not None:
                        log.info("node %s: peer %s accepted again after a trust change", self.node_id, peer)

    def _block(self, peer: str, reason: str) -> None:
        with self._lock:
            first = peer not in self._blocked
            self._blocked[peer] = reason
        if first:
            log.warning("node %s: peer %s refused from now on (no calls, no replies): %s",
                        self.node_id, peer, reason)

    def blocked(self) -> dict[str, str]:
        """Peers that get no calls now, with the reason (e.g. a revoked certificate)."""
        with self._lock:
            return dict(self._blocked)

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            peers, self._peers = self._peers, {}
        for p in peers.values():
            p.channel.close()

    def __enter__(self) -> GossipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_sequence(self) -> int:
        """Reserve and return the next outgoing sequence number."""
        with self._lock:
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
            return self._seq

    def available(self, peer_id: str) -> bool:
        """False while ``peer_id`` is being skipped after failures or is blocked."""
        with self._lock:
            if peer_id in self._blocked:
                return False
        return self.backoff.available(peer_id)

    def _peer(self, peer_id: str) -> _Peer:
        if self.trust.generation != self._generation:
            self.trust_changed()
        roster = self.trust.roster
        if peer_id not in roster.nodes:
            raise TransportError(f"node {self.node_id}: unknown peer {peer_id!r} (not in roster)")
        if peer_id == self.node_id:
            raise TransportError(f"node {self.node_id}: refusing to call itself")
        address = roster.nodes[peer_id].address
        with self._lock:
            reason = self._blocked.get(peer_id)
            cached = self._peers.get(peer_id)
        if reason is not None:
            raise PeerRefused(f"peer {peer_id} is refused: {reason}")
        if cached is not None and cached.address == address:
            return cached
        channel = grpc.secure_channel(address, self._creds, options=grpc_options([
            ("grpc.ssl_target_name_override", node_dns_name(roster.consortium, peer_id)),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
        ]))
        peer = _Peer(channel, channel.stream_stream(METHOD), address)
        with self._lock:
            old = self._peers.get(peer_id)
            if old is not None and old.address == address:  # another thread won the race
                channel.close()
                return old
            self._peers[peer_id] = peer
        if old is not None:
            old.channel.close()
        return peer

    # ------------------------------------------------------------------ calls

    def _contact_until(self, peer_id: str) -> float:
        """Until when a refused connection to ``peer_id`` is retried: ``first_contact_window`` from
        now on the first call to it, never afterwards."""
        with self._lock:
            first = peer_id not in self._contacted
            self._contacted.add(peer_id)
        return time.monotonic() + self.first_contact_window if first else 0.0

    def _check_reply_header(self, peer_id: str, seq: int, header: pb.Header) -> None:
        """Before any body byte of a reply (or the accept): addressing and the sender's certificate."""
        if header.sender != peer_id or header.recipient != self.node_id:
            raise TransportError(f"reply from {header.sender!r} to {header.recipient!r}, "
                                 f"expected {peer_id!r} to {self.node_id!r}")
        if header.in_reply_to != seq:
            raise TransportError(f"reply is for sequence {header.in_reply_to}, not {seq}")
        self.verifier.certificate(header.sender_certificate, claimed=peer_id)

    def _verified(self, peer_id: str, asm: MessageAssembler) -> DecodedMessage:
        """The reply of a complete assembler once its signature verified (nothing decoded before)."""
        assert asm.header is not None and asm.trailer is not None and asm.digest is not None
        peer, head = self.verifier.message(asm.header, asm.trailer, asm.digest, claimed=peer_id)
        with self._lock:
            self._seen_cert[peer_id] = bytes(asm.header.sender_certificate)
        return asm.message(head, head_signature_of(asm.trailer))

    def peer_certificate(self, peer_id: str) -> bytes | None:
        """The DER certificate ``peer_id``'s last verified accept or reply was signed with (None: none yet)."""
        with self._lock:
            return self._seen_cert.get(peer_id)

    def _auth_failed(self, peer_id: str, address: str, exc: AuthenticationFailed) -> None:
        """Log a refused accept/reply; block the peer if its own pinned certificate is revoked."""
        (log.debug if exc.repeat else log.warning)(
            "node %s: refused reply from %s at %s: %s", self.node_id, peer_id, address, exc)
        der = exc.certificate
        entry = self.trust.roster.nodes.get(peer_id)
        if der and entry is not None and "is revoked" in str(exc) and \
                entry.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest():
            self._block(peer_id, str(exc))

    def _call(self, peer_id: str, msg: Message, timeout: float | None,
              expected: ExpectedSpec | None) -> tuple[DecodedMessage, int, bytes, int]:
        timeout = self.default_timeout if timeout is None else timeout
        with self._lock:
            reason = self._blocked.get(peer_id)
        if reason is not None:
            raise PeerRefused(f"peer {peer_id} is refused: {reason}")
        if not self.backoff.available(peer_id):
            raise PeerUnavailable(f"peer {peer_id} skipped: backing off for "
                                  f"{self.backoff.remaining(peer_id):.1f} s more")
        deadline = time.monotonic() + timeout
        peer = self._peer(peer_id)
        seq = msg.sequence if msg.sequence is not None else self.next_sequence()
        retry_until = min(deadline, self._contact_until(peer_id))
        while True:
            try:
                return self._attempt(peer_id, peer, msg, seq, deadline, expected, retry_until)
            except _Retry:  # the peer is not listening yet: its request never reached it
                time.sleep(_RETRY_PAUSE)

    def _attempt(self, peer_id: str, peer: _Peer, msg: Message, seq: int, deadline: float,
                 expected: ExpectedSpec | None, retry_until: float) -> tuple[DecodedMessage, int, bytes, int]:
        """One call; _Retry instead of a failure while a refused connection may still be retried."""
        head = self.ledger_head() if self.ledger_head is not None else None
        enc = encode_message(msg, sender=self.node_id, recipient=peer_id, sequence=seq,
                             certificate=self._signer.certificate_der,
                             seal=lambda h, d: self._signer.seal(h, d, head))
        sent = [0]
        go = threading.Event()  # set once the server's accept verified (or the call is over)
        proceed = [False]

        def requests():  # consumed by a gRPC thread: header, then the body only after the accept
            # the body waits for the accept; meanwhile this thread hashes it ahead (until ``go``)
            chunks = iter_chunks(enc, header_alone=True, ready=go)
            first = next(chunks)
            sent[0] += len(first)
            yield first
            body = next(chunks, None)  # returns once ``go`` is set (or the body is hashed)
            go.wait(max(0.0, deadline - time.monotonic()))
            if not proceed[0]:
                return
            if body is not None:
                sent[0] += len(body)
                yield body
            for raw in chunks:
                sent[0] += len(raw)
                yield raw

        accept = MessageAssembler(None, 0, True, kinds=_ACCEPT_RULES,
                                  on_header=lambda h: self._check_reply_header(peer_id, seq, h))
        asm = MessageAssembler(expected, self.max_message_bytes, self.verify_digest, kinds=self.reply_kinds,
                               on_header=lambda h: self._check_reply_header(peer_id, seq, h))
        received, done = 0, False
        responses = None
        current = accept
        try:
            responses = peer.call(requests(), timeout=max(0.001, deadline - time.monotonic()))
            for raw in responses:
                received += len(raw)
                if current is accept:
                    if accept.feed(raw):
                        self._verified(peer_id, accept)
                        proceed[0] = True
                        go.set()
                        current = asm
                    continue
                done = asm.feed(raw)
            if not done:
                raise TransportError("reply stream ended before the message was complete")
            reply = self._verified(peer_id, asm)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details()  # type: ignore[attr-defined]
            if (code == grpc.StatusCode.UNAVAILABLE and not received and "connection refused" in
                    (details or "").lower() and time.monotonic() + _RETRY_PAUSE < retry_until):
                raise _Retry from None
            if code != grpc.StatusCode.INVALID_ARGUMENT:  # our message was bad, not the peer
                self.backoff.failure(peer_id)
            if code in _UNAVAILABLE:
                tls = code == grpc.StatusCode.UNAVAILABLE and any(t in (details or "").lower() for t in _TLS_HINTS)
                (log.warning if tls else log.info)(
                    "node %s: peer %s at %s unavailable%s: %s %s", self.node_id, peer_id, peer.address,
                    " (TLS handshake failed)" if tls else "", code.name, details)
                raise PeerUnavailable(f"peer {peer_id} unavailable: {code.name}: {details}") from None
            log.warning("node %s: peer %s at %s refused seq=%d: %s %s", self.node_id, peer_id, peer.address,
                        seq, code.name, details)
            raise PeerRefused(f"peer {peer_id} refused the call: {code.name}: {details}") from None
        except AuthenticationFailed as exc:
            if responses is not None:
                responses.cancel()
            self.backoff.failure(peer_id)
            self._auth_failed(peer_id, peer.address, exc)
            raise
        except TransportError as exc:
            if responses is not None:
                responses.cancel()
            self.backoff.failure(peer_id)
            log.warning("node %s: refused reply from %s at %s: %s", self.node_id, peer_id, peer.address, exc)
            raise
        finally:
            go.set()  # never leave the request thread waiting
            accept.close()
            asm.close()
            self.counters.add_sent(peer_id, sent[0], messages=1 if proceed[0] else 0)
            self.counters.add_received(peer_id, received, messages=int(done))
        self.backoff.success(peer_id)
        if self.on_verified is not None:
            try:
                self.on_verified(peer_id, reply)
            except Exception:  # bookkeeping must not fail the exchange
                log.exception("node %s: on_verified failed for the reply of %s", self.node_id, peer_id)
        return reply, seq, enc.compute_digest(), sent[0]

    def exchange(self, peer_id: str, msg: Message, timeout: float | None = None,
                 expected: ExpectedSpec | None = None) -> DecodedMessage:
        """Send ``msg`` to ``peer_id`` and return its verified reply (``in_reply_to`` = our seq).

        Raises PeerUnavailable (unreachable, handshake refused, deadline, busy, backing off),
        PeerRefused (the peer refused the call, or it is blocked as revoked),
        AuthenticationFailed (its accept or reply failed the certificate/signature check:
        nothing of it is used) or TransportError (invalid reply).
        """
        reply, _, _, _ = self._call(peer_id, msg, timeout,
                                    self.expected_spec if expected is None else expected)
        return reply

    def send(self, peer_id: str, msg: Message, timeout: float | None = None) -> Delivery:
        """Send ``msg`` one way and wait for the peer's (verified) ack."""
        reply, seq, digest, nbytes = self._call(peer_id, msg, timeout, None)
        if reply.kind != ACK_KIND:
            log.info("node %s: peer %s answered a send with %s", self.node_id, peer_id, reply.kind)
        return Delivery(peer_id, seq, digest, nbytes, reply)
