"""Gossip client: mutual-TLS gRPC calls to roster peers, with deadlines, backoff and checks.

Server identity: every channel sets ``grpc.ssl_target_name_override`` to the peer's
per-node DNS SAN (``<peer>.<consortium>.privfl``), so gRPC's own TLS hostname check
refuses a server whose CA-signed certificate names another node. gRPC Python exposes
neither the server's certificate nor a verification callback on the client, so the
roster fingerprint pin and the CRL are checked by a *probe*: before a channel is first
used (and again every ``probe_interval`` seconds or after ``update_trust``) the client
does one TLS handshake to the peer with Python's ``ssl`` and verifies the presented
certificate with :func:`privfl.pki.verify_node_certificate`. That check is per connection
attempt, not bound to the gRPC connection itself (documented limitation).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from privfl.pki import (
    NodeIdentity,
    PKIError,
    Roster,
    node_dns_name,
    verify_node_certificate,
)
from privfl.transport.codec import (
    DecodedMessage,
    ExpectedSpec,
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
from privfl.transport.server import ACK_KIND

log = logging.getLogger("privfl.transport")

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class Delivery:
    """What was sent by ``send``: sequence number, model digest and serialized bytes."""

    peer: str
    sequence: int
    digest: bytes
    bytes_sent: int


@dataclass
class _Peer:
    channel: grpc.Channel
    call: grpc.StreamStreamMultiCallable
    probed_at: float


class GossipClient:
    """Calls roster peers over mutual TLS; one cached channel per peer.

    ``exchange`` sends a message and returns the peer's validated reply (pairwise model
    averaging); ``send`` sends and waits for the peer's ack. Sequence numbers start at the
    current time in microseconds and increase by one per message, so a restarted node is
    never mistaken for a replay. A peer that fails is skipped by ``backoff`` for a while.
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes,
                 expected_spec: ExpectedSpec | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 default_timeout: float = 30.0, counters: TrafficCounters | None = None,
                 backoff: PeerBackoff | None = None, probe_server: bool = True,
                 probe_interval: float = 300.0, verify_digest: bool = True) -> None:
        self.identity = identity
        self.verify_digest = verify_digest
        self.node_id = identity.node_id
        self.expected_spec = expected_spec
        self.max_message_bytes = max_message_bytes
        self.default_timeout = default_timeout
        self.counters = counters or TrafficCounters()
        self.backoff = backoff or PeerBackoff()
        self.probe_server = probe_server
        self.probe_interval = probe_interval
        self._lock = threading.Lock()
        self._trust = TrustState(identity.ca_pem, roster, crl)
        self._peers: dict[str, _Peer] = {}
        self._seq = time.time_ns() // 1000
        self._creds = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem, private_key=identity.key_pem,
            certificate_chain=identity.cert_pem)
        self._tmp: Path | None = None
        self._ssl_ctx: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ trust, channels

    def update_trust(self, roster: Roster | None = None, crl: bytes | None = None) -> None:
        """Swap roster and/or CRL; cached channels are closed so peers are probed again."""
        self._trust.update(roster, crl)
        with self._lock:
            peers, self._peers = self._peers, {}
        for p in peers.values():
            p.channel.close()

    def close(self) -> None:
        """Close every channel and remove the probe's temporary key files."""
        with self._lock:
            peers, self._peers = self._peers, {}
        for p in peers.values():
            p.channel.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

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
        """False while ``peer_id`` is being skipped after failures."""
        return self.backoff.available(peer_id)

    def _probe_context(self) -> ssl.SSLContext:
        if self._ssl_ctx is None:
            tmp = Path(tempfile.mkdtemp(prefix=f"privfl-{self.node_id}-"))
            os.chmod(tmp, 0o700)
            cert, key = tmp / "node.pem", tmp / "node.key"
            cert.write_bytes(self.identity.cert_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.identity.key_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=self.identity.ca_pem.decode())
            ctx.load_cert_chain(str(cert), str(key))
            ctx.set_alpn_protocols(["h2"])
            self._tmp, self._ssl_ctx = tmp, ctx
        return self._ssl_ctx

    def _probe(self, peer_id: str, address: str, roster: Roster, crl: object,
               timeout: float) -> None:
        """TLS-handshake the peer and verify its certificate against roster, pin and CRL."""
        host, _, port = address.rpartition(":")
        ctx = self._probe_context()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
                with ctx.wrap_socket(sock, server_hostname=node_dns_name(roster.consortium,
                                                                          peer_id)) as tls:
                    der = tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError as exc:
            log.warning("node %s: server %s at %s failed TLS verification: %s", self.node_id,
                        peer_id, address, exc.verify_message)
            raise PeerRefused(f"peer {peer_id} at {address}: server certificate refused: "
                              f"{exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise PeerUnavailable(f"peer {peer_id} at {address} unreachable: {exc}") from None
        if der is None:
            raise PeerRefused(f"peer {peer_id} at {address}: no server certificate")
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        try:
            got = verify_node_certificate(pem, self.identity.ca_pem, roster, crl)  # type: ignore[arg-type]
        except PKIError as exc:
            log.warning("node %s: server %s at %s refused: %s", self.node_id, peer_id, address, exc)
            raise PeerRefused(f"peer {peer_id} at {address}: server certificate refused: {exc}") from None
        if got != peer_id:
            log.warning("node %s: server at %s is %s, expected %s", self.node_id, address, got, peer_id)
            raise PeerRefused(f"peer {peer_id} at {address}: server identifies as {got}")

    def _peer(self, peer_id: str, timeout: float) -> _Peer:
        roster, crl = self._trust.current()
        with self._lock:
            cached = self._peers.get(peer_id)
        if peer_id not in roster.nodes:
            raise TransportError(f"node {self.node_id}: unknown peer {peer_id!r} (not in roster)")
        if peer_id == self.node_id:
            raise TransportError(f"node {self.node_id}: refusing to call itself")
        now = time.monotonic()
        if cached is not None and (not self.probe_server
                                   or now - cached.probed_at < self.probe_interval):
            return cached
        address = roster.nodes[peer_id].address
        if self.probe_server:
            self._probe(peer_id, address, roster, crl, timeout)
        if cached is not None:
            cached.probed_at = now
            return cached
        channel = grpc.secure_channel(address, self._creds, options=grpc_options([
            ("grpc.ssl_target_name_override", node_dns_name(roster.consortium, peer_id)),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.enable_retries", 0),
        ]))
        peer = _Peer(channel, channel.stream_stream(METHOD), now)
        with self._lock:
            if peer_id in self._peers:  # another thread won the race
                channel.close()
                return self._peers[peer_id]
            self._peers[peer_id] = peer
        return peer

    # ------------------------------------------------------------------ calls

    def _call(self, peer_id: str, msg: Message, timeout: float | None,
              expected: ExpectedSpec | None) -> tuple[DecodedMessage, int, bytes, int]:
        timeout = self.default_timeout if timeout is None else timeout
        if not self.backoff.available(peer_id):
            raise PeerUnavailable(f"peer {peer_id} skipped: backing off for "
                                  f"{self.backoff.remaining(peer_id):.1f} s more")
        deadline = time.monotonic() + timeout
        try:
            peer = self._peer(peer_id, timeout)
        except PeerUnavailable:
            self.backoff.failure(peer_id)
            raise
        except PeerRefused:
            self.backoff.failure(peer_id)
            raise
        seq = msg.sequence if msg.sequence is not None else self.next_sequence()
        enc = encode_message(msg, sender=self.node_id, recipient=peer_id, sequence=seq)
        sent = [0]

        def requests():  # consumed by a gRPC thread
            for raw in iter_chunks(enc):
                sent[0] += len(raw)
                yield raw

        asm = MessageAssembler(expected, self.max_message_bytes, self.verify_digest)
        received, done = 0, False
        responses = None
        try:
            responses = peer.call(requests(), timeout=max(0.001, deadline - time.monotonic()))
            for raw in responses:
                received += len(raw)
                done = asm.feed(raw)
            if not done:
                raise TransportError("reply stream ended before the message was complete")
            reply = asm.message()
            if reply.sender != peer_id or reply.recipient != self.node_id:
                raise TransportError(f"reply from {reply.sender!r} to {reply.recipient!r}, "
                                     f"expected {peer_id!r} to {self.node_id!r}")
            if reply.in_reply_to != seq:
                raise TransportError(f"reply is for sequence {reply.in_reply_to}, not {seq}")
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details()  # type: ignore[attr-defined]
            if code != grpc.StatusCode.INVALID_ARGUMENT:  # our message was bad, not the peer
                self.backoff.failure(peer_id)
            if code in _UNAVAILABLE:
                log.info("node %s: peer %s unavailable: %s %s", self.node_id, peer_id,
                         code.name, details)
                raise PeerUnavailable(f"peer {peer_id} unavailable: {code.name}: {details}") from None
            log.warning("node %s: peer %s refused seq=%d: %s %s", self.node_id, peer_id, seq,
                        code.name, details)
            raise PeerRefused(f"peer {peer_id} refused the call: {code.name}: {details}") from None
        except TransportError as exc:
            if responses is not None:
                responses.cancel()
            self.backoff.failure(peer_id)
            log.warning("node %s: refused reply from %s: %s", self.node_id, peer_id, exc)
            raise
        finally:
            asm.close()
            self.counters.add_sent(peer_id, sent[0], messages=1 if sent[0] else 0)
            self.counters.add_received(peer_id, received, messages=int(done))
        self.backoff.success(peer_id)
        return reply, seq, enc.compute_digest(), sent[0]

    def exchange(self, peer_id: str, msg: Message, timeout: float | None = None,
                 expected: ExpectedSpec | None = None) -> DecodedMessage:
        """Send ``msg`` to ``peer_id`` and return its validated reply (``in_reply_to`` = our seq).

        Raises PeerUnavailable (unreachable, handshake refused, deadline, backing off),
        PeerRefused (the peer refused the call) or TransportError (invalid reply).
        """
        reply, _, _, _ = self._call(peer_id, msg, timeout,
                                    self.expected_spec if expected is None else expected)
        return reply

    def send(self, peer_id: str, msg: Message, timeout: float | None = None) -> Delivery:
        """Send ``msg`` one way and wait for the peer's ack."""
        reply, seq, digest, nbytes = self._call(peer_id, msg, timeout, None)
        if reply.kind != ACK_KIND:
            log.info("node %s: peer %s answered a send with %s", self.node_id, peer_id, reply.kind)
        return Delivery(peer_id, seq, digest, nbytes)
