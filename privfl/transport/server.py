"""Gossip server: mutual-TLS gRPC endpoint that authenticates every call and validates input.

Why: the TLS handshake already refuses clients without a certificate or with one from
another CA (and expired ones); revocation, roster membership and fingerprint pins are
checked here, on every call, against the current roster and CRL (``update_trust``
swaps them at run time). gRPC shows handshake and authorization failures to the client
only as a status code, so every refusal is logged here with the real reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from privfl.pki import NodeIdentity, PKIError, Roster, verify_node_certificate
from privfl.transport.codec import (
    DecodedMessage,
    ExpectedSpec,
    Message,
    MessageAssembler,
    TransportError,
    encode_message,
    iter_chunks,
)
from privfl.transport.common import DEFAULT_MAX_MESSAGE_BYTES, METHOD, TrafficCounters, TrustState, grpc_options

log = logging.getLogger("privfl.transport")

Handler = Callable[[str, DecodedMessage], Message | None]
ACK_KIND = "ack"


class _Refused(Exception):
    """Internal: abort the call with a status code after logging."""

    def __init__(self, code: grpc.StatusCode, public: str) -> None:
        super().__init__(public)
        self.code, self.public = code, public


class GossipServer:
    """A node's gossip endpoint.

    ``handler(sender_id, message)`` runs for every authenticated, validated message (in a
    gRPC worker thread); its return value is streamed back as the reply (``None`` sends an
    ``ack``). Replies go out with ``in_reply_to`` set to the request's sequence number.
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes, handler: Handler,
                 address: str | None = None, expected_spec: ExpectedSpec | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 8,
                 counters: TrafficCounters | None = None, verify_digest: bool = True) -> None:
        self.identity = identity
        self.verify_digest = verify_digest
        self.node_id = identity.node_id
        self.handler = handler
        self.expected_spec = expected_spec
        self.max_message_bytes = max_message_bytes
        self.counters = counters or TrafficCounters()
        self.address = address or roster.address_of(identity.node_id)
        self._lock = threading.Lock()
        self._trust = TrustState(identity.ca_pem, roster, crl)
        self._last_seq: dict[str, int] = {}
        self._reply_seq = time.time_ns() // 1000  # monotone across restarts
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Bind and start serving; returns the bound port (use port 0 for an ephemeral one)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                                        thread_name_prefix=f"gossip-{self.node_id}"),
                             options=grpc_options())
        handler = grpc.stream_stream_rpc_method_handler(self._exchange)  # raw bytes both ways
        service, method = METHOD.rsplit("/", 1)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service.lstrip("/"), {method: handler}),))
        creds = grpc.ssl_server_credentials(
            [(self.identity.key_pem, self.identity.cert_pem)],
            root_certificates=self.identity.ca_pem, require_client_auth=True)
        port = server.add_secure_port(self.address, creds)
        if port == 0:
            raise TransportError(f"node {self.node_id}: cannot bind {self.address}")
        server.start()
        self._server, self.port = server, port
        log.info("node %s: gossip server listening on %s (port %d)", self.node_id, self.address, port)
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving and wait until in-flight calls end (or ``grace`` runs out)."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
            log.info("node %s: gossip server stopped", self.node_id)

    def __enter__(self) -> GossipServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update_trust(self, roster: Roster | None = None, crl: bytes | None = None) -> None:
        """Swap the roster and/or CRL used for every following call (e.g. after a revocation)."""
        self._trust.update(roster, crl)
        log.info("node %s: trust updated (roster=%s, crl=%s)", self.node_id,
                 roster is not None, crl is not None)

    # ------------------------------------------------------------------ per call

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            log.warning("node %s: refused %s: no client certificate in the TLS session",
                        self.node_id, context.peer())
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "client certificate required")
        roster, crl = self._trust.current()
        try:
            return verify_node_certificate(pems[0], self.identity.ca_pem, roster, crl)
        except PKIError as exc:
            log.warning("node %s: refused %s: %s", self.node_id, context.peer(), exc)
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "peer not authorized") from None

    def _check_replay(self, peer: str, msg_header: object) -> None:
        header = msg_header  # pb.Header
        if header.sender != peer:  # type: ignore[attr-defined]
            raise TransportError(f"header sender {header.sender!r} is not the "  # type: ignore[attr-defined]
                                 f"authenticated peer {peer!r}")
        if header.recipient != self.node_id:  # type: ignore[attr-defined]
            raise TransportError(f"message is addressed to {header.recipient!r}, "  # type: ignore[attr-defined]
                                 f"not {self.node_id!r}")
        seq = header.sequence  # type: ignore[attr-defined]
        with self._lock:
            last = self._last_seq.get(peer, 0)
            if seq <= last:
                raise TransportError(f"replayed or out-of-order sequence {seq} (last seen {last})")
            self._last_seq[peer] = seq

    def _receive(self, peer: str, request_iterator: Iterator[bytes]) -> DecodedMessage:
        asm = MessageAssembler(self.expected_spec, self.max_message_bytes, self.verify_digest)
        done = False
        received = 0
        try:
            for raw in request_iterator:
                received += len(raw)
                had_header = asm.header is not None
                done = asm.feed(raw)
                if not had_header and asm.header is not None:
                    self._check_replay(peer, asm.header)
                if done:
                    break
        finally:
            asm.close()
            self.counters.add_received(peer, received, messages=1 if done else 0)
        if not done:
            raise TransportError("stream ended before the message was complete")
        return asm.message()

    def _next_reply_seq(self) -> int:
        with self._lock:
            self._reply_seq += 1
            return self._reply_seq

    def _exchange(self, request_iterator: Iterator[bytes],
                  context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            peer = self._authenticate(context)
            try:
                msg = self._receive(peer, request_iterator)
            except TransportError as exc:
                log.warning("node %s: refused message from %s: %s", self.node_id, peer, exc)
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            log.debug("node %s: %s seq=%d round=%d from %s (%d bytes)", self.node_id, msg.kind,
                      msg.sequence, msg.round, peer, msg.wire_bytes)
            try:
                reply = self.handler(peer, msg)
            except Exception:  # the handler is user code; never let it kill the server
                log.exception("node %s: handler failed on %s seq=%d from %s", self.node_id,
                              msg.kind, msg.sequence, peer)
                raise _Refused(grpc.StatusCode.INTERNAL, "handler failed") from None
            enc = encode_message(reply or Message(kind=ACK_KIND), sender=self.node_id,
                                 recipient=peer, sequence=self._next_reply_seq(),
                                 in_reply_to=msg.sequence)
        except _Refused as ref:
            context.abort(ref.code, ref.public)
            return
        sent, complete = 0, False
        try:
            for raw in iter_chunks(enc):
                sent += len(raw)
                yield raw
            complete = True
        finally:
            self.counters.add_sent(peer, sent, messages=int(complete))
