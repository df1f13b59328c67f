"""Gossip server: mutual-TLS gRPC endpoint that authenticates every call and every message.

Why: the TLS handshake refuses clients without a certificate or with one from another CA
(and expired ones); revocation, roster membership and fingerprint pins of the TLS client
certificate are checked here on every call, against the current roster and CRL
(``update_trust`` / ``TrustState.reload_from_files`` swap them at run time). On top of
that every message is signed by its sender's node key (``transport/signing.py``): the
header's certificate must be the roster pin of the TLS peer and the signature must
verify before the handler sees anything.

One call: the client sends its header (a Chunk of its own); once the header (kind, sizes,
sender, pin, revocation, replay) passes, the server answers with a signed ``accept``
message bound to the request's sequence number (one Chunk: header and trailer), and only
then does the client stream the body (its last Chunk carries the trailer); the reply's
header rides with its first body piece, so a small exchange is four gRPC messages. A client
never sends a model to a server that cannot sign as the roster member it called.

Bounded resources: every stream has a server-side deadline (``stream_timeout``; a reaper
thread cancels a call that has not finished in time -- gRPC Python cannot time out a
blocked ``next(request_iterator)`` by itself, but cancelling the call from another thread
unblocks it), each peer may hold at most ``max_calls_per_peer`` calls at once (beyond:
RESOURCE_EXHAUSTED, logged), and the worker pool is sized from the roster so one member
cannot starve the others. ``grpc.so_reuseport`` is off, so a second process cannot bind
the same port.

TLS version: the design asks for TLS 1.3 only. gRPC Python (grpcio 1.85) exposes no
minimum TLS version: ``grpc.ssl_server_credentials`` / ``ssl_channel_credentials`` take
no such argument, the core's ``grpc_ssl_server_credentials_options_set_min_tls_version``
is not wrapped, and no channel argument or environment variable sets it. So a TLS 1.2
handshake still completes, but the server's auth context carries the negotiated
``ssl_tls_version``, and every call on a session that is not TLSv1.3 is refused here
(PERMISSION_DENIED, logged with the peer address) before anything is read. A client
cannot see the version it negotiated (gRPC Python has no client auth context); it
does not need to, since a server must sign as the roster member anyway. Handshake failures (no client
certificate, unknown CA, expired) never reach Python on the server side: gRPC core logs
them to its own stderr (GRPC_VERBOSITY) and no call is created, so privfl cannot log
them with the peer address here; the client side logs them (see client.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from privfl.accounting.log_limit import LogLimiter, reason_code, source_host, warn_limited
from privfl.errors import PrivflError
from privfl.pki import NodeIdentity, Roster
from privfl.transport.codec import (
    DecodedMessage,
    ExpectedSpec,
    KindRules,
    Message,
    MessageAssembler,
    TransportError,
    encode_message,
    iter_chunks,
)
from privfl.transport.common import DEFAULT_MAX_MESSAGE_BYTES, METHOD, TrafficCounters, TrustState, grpc_options
from privfl.transport.proto import gossip_pb2 as pb
from privfl.transport.signing import AuthenticationFailed, LedgerHead, PeerVerifier, Signer, head_signature_of

log = logging.getLogger("privfl.transport")

Handler = Callable[[str, DecodedMessage], Message | None]
HeadSource = Callable[[], LedgerHead | None]
ACK_KIND = "ack"
ACCEPT_KIND = "accept"  # the server's signed "go ahead" after a request header passed
DEFAULT_STREAM_TIMEOUT = 60.0
DEFAULT_CALLS_PER_PEER = 4
REQUIRED_TLS_VERSION = "TLSv1.3"  # as gRPC's auth context names it (ssl_tls_version)


class _Refused(Exception):
    """Internal: abort the call with a status code after logging."""

    def __init__(self, code: grpc.StatusCode, public: str) -> None:
        super().__init__(public)
        self.code, self.public = code, public


class _Reaper:
    """Cancels calls that outlive their server-side deadline (one daemon thread per server)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._cond = threading.Condition()
        self._calls: dict[int, tuple[float, grpc.ServicerContext, str, str, float]] = {}
        self._ids = itertools.count()
        self._stop = False
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name=f"gossip-reaper-{node_id}", daemon=True)
        self._thread.start()

    def add(self, context: grpc.ServicerContext, peer: str, address: str, timeout: float) -> int:
        """Watch one call; returns the token for :meth:`remove`."""
        token = next(self._ids)
        with self._cond:
            self._calls[token] = (time.monotonic() + timeout, context, peer, address, timeout)
            self._cond.notify()
        return token

    def remove(self, token: int) -> None:
        """The call ended: stop watching it."""
        with self._cond:
            self._calls.pop(token, None)

    def stop(self) -> None:
        """End the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                due = [(t, v) for t, v in self._calls.items() if v[0] <= now]
                for t, _ in due:
                    del self._calls[t]
                wait = min((v[0] for v in self._calls.values()), default=now + 1.0) - now
                if not due:
                    self._cond.wait(max(0.01, min(wait, 1.0)))
                    continue
            for _, (_, context, peer, address, timeout) in due:
                self.cancelled += 1
                log.warning("node %s: call from %s at %s exceeded the server deadline of %.1f s; cancelled",
                            self.node_id, peer, address, timeout)
                context.cancel()


class GossipServer:
    """A node's gossip endpoint.

    ``handler(sender_id, message)`` runs for every authenticated, signature-verified,
    validated message (in a gRPC worker thread); its return value is streamed back as the
    signed reply (``None`` sends an ``ack``), with ``in_reply_to`` = the request's sequence.

    ``kinds``: the request kinds served and what each carries (see ``check_header``; None:
    any well-formed kind). ``ledger_head()``: the node's ledger head to sign into every
    reply (called when the reply is built). ``on_verified(peer, message)``: called for every
    verified request before the handler (e.g. to record the peer's ledger head).
    ``trust``: a TrustState shared with the node's client (default: one of its own).
    """

    def __init__(self, identity: NodeIdentity, roster: Roster, crl: bytes, handler: Handler,
                 address: str | None = None, expected_spec: ExpectedSpec | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int | None = None,
                 counters: TrafficCounters | None = None, verify_digest: bool = True,
                 trust: TrustState | None = None, ledger_head: HeadSource | None = None,
                 kinds: KindRules | None = None, stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
                 max_calls_per_peer: int = DEFAULT_CALLS_PER_PEER,
                 on_verified: Callable[[str, DecodedMessage], None] | None = None) -> None:
        self.identity = identity
        self.verify_digest = verify_digest
        self.node_id = identity.node_id
        self.handler = handler
        self.expected_spec = expected_spec
        self.max_message_bytes = max_message_bytes
        self.counters = counters or TrafficCounters()
        self.address = address or roster.address_of(identity.node_id)
        self.kinds = kinds
        self.ledger_head = ledger_head
        self.on_verified = on_verified
        self.stream_timeout = stream_timeout
        self.max_calls_per_peer = max_calls_per_peer
        self._lock = threading.Lock()
        self.trust = trust or TrustState(identity.ca_pem, roster, crl, identity.node_id)
        self.verifier = PeerVerifier(self.trust)
        self._signer = Signer(identity.key_pem, identity.cert_pem)
        self._last_seq: dict[str, int] = {}
        self._refusal_log = LogLimiter()  # a flood of refused calls cannot flood the operator's log
        self._active: dict[str, int] = {}
        self._reply_seq = 0  # see _next_reply_seq: the wall clock, monotone across restarts
        # every member may hold its cap of calls at once, plus a margin for the refusals
        self._max_workers = max_workers or len(roster.nodes) * max_calls_per_peer + 4
        self._server: grpc.Server | None = None
        self._reaper: _Reaper | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Bind and start serving; returns the bound port (use port 0 for an ephemeral one).

        TransportError naming the address if it cannot be bound (e.g. another process,
        perhaps a second node with the same identity, already listens there).
        """
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                                        thread_name_prefix=f"gossip-{self.node_id}"),
                             options=grpc_options([("grpc.so_reuseport", 0),
                                                   ("grpc.server_handshake_timeout_ms", 10_000)]))
        handler = grpc.stream_stream_rpc_method_handler(self._exchange)  # raw bytes both ways
        service, method = METHOD.rsplit("/", 1)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service.lstrip("/"), {method: handler}),))
        creds = grpc.ssl_server_credentials(
            [(self.identity.key_pem, self.identity.cert_pem)],
            root_certificates=self.identity.ca_pem, require_client_auth=True)
        try:
            port = server.add_secure_port(self.address, creds)
        except RuntimeError as exc:
            port = 0
            detail = str(exc)
        else:
            detail = "add_secure_port returned 0"
        if port == 0:
            server.stop(None)
            raise TransportError(f"node {self.node_id}: cannot bind {self.address} (already in use by another "
                                 f"process, perhaps a second node with this identity?): {detail}")
        self._reaper = _Reaper(self.node_id)
        server.start()
        self._server, self.port = server, port
        log.info("node %s: gossip server listening on %s (port %d, %d workers, %d calls per peer, "
                 "stream deadline %.1f s)", self.node_id, self.address, port, self._max_workers,
                 self.max_calls_per_peer, self.stream_timeout)
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving and wait until in-flight calls end (or ``grace`` runs out)."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
            log.info("node %s: gossip server stopped", self.node_id)
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None

    def __enter__(self) -> GossipServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update_trust(self, roster: Roster | None = None, crl: bytes | None = None) -> None:
        """Swap the roster and/or CRL used for every following call (e.g. after a revocation)."""
        self.trust.update(roster, crl)
        log.info("node %s: trust updated (roster=%s, crl=%s)", self.node_id,
                 roster is not None, crl is not None)

    @property
    def deadline_cancellations(self) -> int:
        """Calls cancelled by the server-side deadline so far."""
        return self._reaper.cancelled if self._reaper is not None else 0

    # ------------------------------------------------------------------ per call

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        version = b"".join(auth.get("ssl_tls_version", [])).decode("ascii", "replace")
        if version != REQUIRED_TLS_VERSION:
            self._warn_refusal(("tls", source_host(context.peer())), "node %s: refused %s: TLS version %s, only %s "
                               "is accepted", self.node_id, context.peer(), version or "unknown", REQUIRED_TLS_VERSION)
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"{REQUIRED_TLS_VERSION} required")
        pems = auth.get("x509_pem_cert")
        if not pems:
            self._warn_refusal(("no-cert", source_host(context.peer())),
                               "node %s: refused %s: no client certificate in the TLS session",
                               self.node_id, context.peer())
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "client certificate required")
        try:
            return self.verifier.certificate(pems[0], pem=True).node_id
        except AuthenticationFailed as exc:
            if exc.repeat:
                log.debug("node %s: refused %s: %s", self.node_id, context.peer(), exc)
            else:
                self._warn_refusal(("cert", source_host(context.peer()), reason_code(str(exc))),
                                   "node %s: refused %s: %s", self.node_id, context.peer(), exc)
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "peer not authorized") from None

    def _admit(self, peer: str, address: str) -> None:
        with self._lock:
            n = self._active.get(peer, 0)
            if n >= self.max_calls_per_peer:
                refuse = True
            else:
                refuse = False
                self._active[peer] = n + 1
        if refuse:
            self._warn_refusal(("cap", peer), "node %s: refused a call from %s at %s: %d calls already in "
                               "flight (cap %d)", self.node_id, peer, address, n, self.max_calls_per_peer)
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent calls")

    def _warn_refusal(self, key: tuple[str, ...], fmt: str, *args: object) -> None:
        """One warning per (reason, source) every 10 s, a few per source whatever the reason's
        text; the repeats are counted."""
        warn_limited(log, self._refusal_log, key, fmt, *args, group=key[:2])

    def _release(self, peer: str) -> None:
        with self._lock:
            n = self._active.get(peer, 1) - 1
            if n <= 0:
                self._active.pop(peer, None)
            else:
                self._active[peer] = n

    def _check_header(self, peer: str, header: pb.Header) -> None:
        """Before any body byte: sender, recipient, the sender's certificate and replay."""
        if header.sender != peer:
            raise TransportError(f"header sender {header.sender!r} is not the authenticated peer {peer!r}")
        if header.recipient != self.node_id:
            raise TransportError(f"message is addressed to {header.recipient!r}, not {self.node_id!r}")
        self.verifier.certificate(header.sender_certificate, claimed=peer)
        seq = header.sequence
        with self._lock:
            last = self._last_seq.get(peer, 0)
            if seq <= last:
                raise TransportError(f"replayed or out-of-order sequence {seq} (last seen {last})")
            self._last_seq[peer] = seq

    def _next_reply_seq(self) -> int:
        """The reply's sequence: the wall clock in µs when it is sent (kept increasing). A
        counter from the start would tell a peer how many replies this node has served and
        when it started; the time of a reply is what the peer sees anyway."""
        with self._lock:
            self._reply_seq = max(self._reply_seq + 1, time.time_ns() // 1000)
            return self._reply_seq

    def _encode(self, msg: Message, peer: str, in_reply_to: int) -> list[bytes] | Iterator[bytes]:
        head = self.ledger_head() if self.ledger_head is not None else None
        enc = encode_message(msg, sender=self.node_id, recipient=peer, sequence=self._next_reply_seq(),
                             in_reply_to=in_reply_to, certificate=self._signer.certificate_der,
                             seal=lambda h, d: self._signer.seal(h, d, head))
        return iter_chunks(enc)

    def _refuse(self, peer: str, address: str, exc: TransportError) -> _Refused:
        if isinstance(exc, AuthenticationFailed) and exc.repeat:
            log.debug("node %s: refused message from %s (%s): %s", self.node_id, peer, address, exc)
        else:
            self._warn_refusal(("message", peer, reason_code(str(exc))),
                               "node %s: refused message from %s (%s): %s", self.node_id, peer, address, exc)
        code = (grpc.StatusCode.PERMISSION_DENIED if isinstance(exc, AuthenticationFailed)
                else grpc.StatusCode.INVALID_ARGUMENT)
        return _Refused(code, "peer not authorized" if isinstance(exc, AuthenticationFailed) else str(exc))

    def _exchange(self, request_iterator: Iterator[bytes],
                  context: grpc.ServicerContext) -> Iterator[bytes]:
        address = context.peer()
        try:
            peer = self._authenticate(context)
            self._admit(peer, address)
        except _Refused as ref:
            context.abort(ref.code, ref.public)
            return
        reaper = self._reaper
        token = reaper.add(context, peer, address, self.stream_timeout) if reaper is not None else None
        try:
            yield from self._serve(peer, address, request_iterator, context)
        finally:
            if reaper is not None and token is not None:
                reaper.remove(token)
            self._release(peer)

    def _serve(self, peer: str, address: str, request_iterator: Iterator[bytes],
               context: grpc.ServicerContext) -> Iterator[bytes]:
        asm = MessageAssembler(self.expected_spec, self.max_message_bytes, self.verify_digest,
                               kinds=self.kinds, on_header=lambda h: self._check_header(peer, h))
        received, done, sent = 0, False, 0
        try:
            try:
                it = iter(request_iterator)
                first = next(it, None)
                if first is None:
                    raise TransportError("stream ended before the header")
                received += len(first)
                done = asm.feed(first)  # our clients send the header alone; a whole message in one Chunk is fine too
                assert asm.header is not None
                accept = list(self._encode(Message(kind=ACCEPT_KIND), peer, asm.header.sequence))
            except TransportError as exc:
                raise self._refuse(peer, address, exc) from None
            for raw in accept:
                sent += len(raw)
                yield raw
            try:
                while not done and (piece := next(it, None)) is not None:
                    received += len(piece)
                    done = asm.feed(piece)
                if not done:
                    raise TransportError("stream ended before the message was complete")
                assert asm.header is not None and asm.trailer is not None and asm.digest is not None
                _, head = self.verifier.message(asm.header, asm.trailer, asm.digest, claimed=peer)
                msg = asm.message(head, head_signature_of(asm.trailer))
            except TransportError as exc:
                if not context.is_active():
                    log.info("node %s: call from %s (%s) ended before its message was complete",
                             self.node_id, peer, address)
                    return
                raise self._refuse(peer, address, exc) from None
            finally:
                asm.close()
                self.counters.add_received(peer, received, messages=int(done))
            log.debug("node %s: %s seq=%d round=%d from %s (%d bytes)", self.node_id, msg.kind,
                      msg.sequence, msg.round, peer, msg.wire_bytes)
            if self.on_verified is not None:
                try:
                    self.on_verified(peer, msg)
                except Exception:  # bookkeeping must not take the server down
                    log.exception("node %s: on_verified failed for %s from %s", self.node_id, msg.kind, peer)
            try:
                reply = self.handler(peer, msg)
            except PrivflError as exc:  # a refusal the node explains (e.g. its ledger cannot be written)
                log.error("node %s: %s seq=%d from %s not served: %s", self.node_id, msg.kind, msg.sequence,
                          peer, exc)
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "not served") from None
            except Exception:  # the handler is user code; never let it kill the server
                log.exception("node %s: handler failed on %s seq=%d from %s", self.node_id,
                              msg.kind, msg.sequence, peer)
                raise _Refused(grpc.StatusCode.INTERNAL, "handler failed") from None
            try:
                chunks = self._encode(reply or Message(kind=ACK_KIND), peer, msg.sequence)
            except TransportError as exc:
                log.error("node %s: cannot encode the reply to %s from %s: %s", self.node_id, msg.kind, peer, exc)
                raise _Refused(grpc.StatusCode.INTERNAL, "reply could not be encoded") from None
        except grpc.RpcError:  # the call was cancelled (deadline or client) while we read
            log.info("node %s: call from %s (%s) cancelled", self.node_id, peer, address)
            return
        except _Refused as ref:
            context.abort(ref.code, ref.public)
            return
        complete = False
        try:
            for raw in chunks:
                sent += len(raw)
                yield raw
            complete = True
        finally:
            self.counters.add_sent(peer, sent, messages=int(complete))
