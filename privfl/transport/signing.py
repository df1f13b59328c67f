"""Per-message identity: canonical bytes, ECDSA P-256 signatures, and the peer verifier.

Why: gRPC Python gives a client no way to pin its server's certificate, and a TLS
session alone does not say *which* roster member produced a message once a proxy can
splice connections. So every message (requests, replies and the server's ``accept``)
carries its sender's DER certificate in the header and, in the trailer, an ECDSA
P-256 / SHA-256 signature by the sender's node key (the key of its TLS certificate)
over what identifies it: wire version, sender, recipient, sequence, in_reply_to, round,
kind, the tensor specs and body length, the model digest and its hash's name, the scalars, the sender's
ledger head and the SHA-256 of the sender certificate. A receiver accepts a message only
when the certificate chains to the consortium CA, is within its validity, is not on the
current CRL, names the claimed sender, equals the roster pin for that sender, and the
signature verifies -- all before anything is decoded or applied.

The ledger head also carries a signature of its own (:func:`sign_head`): the sender's key
over its node id, the index and the entry hash alone. A peer keeps it with the anchor,
and when the sender restarts and asks which head of its it holds, the answer is a head
the sender can check it signed: a member cannot stop a restarting node with a head it
made up (see :meth:`privfl.peer_network.GrpcPeerNetwork.query_head`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privfl.accounting.heads import head_signed_by, sign_head
from privfl.pki import PKIError, load_private_key, verify_node_certificate
from privfl.transport.codec import TransportError, spec_line
from privfl.transport.common import TrustState
from privfl.transport.proto import gossip_pb2 as pb

DOMAIN = b"privfl-gossip-signature-v3\n"  # v3: wire version 2 (packed Chunks); v2 signed the digest's algorithm
HASH_BYTES = 32
MAX_CERTIFICATE_BYTES = 16 * 1024
_ECDSA = ec.ECDSA(hashes.SHA256())

LedgerHead = tuple[int, bytes]  # (index, 32-byte entry hash) of the sender's newest ledger entry


class AuthenticationFailed(TransportError):
    """A message's certificate or signature was refused; the message says why.

    ``repeat`` is True when the same certificate was already refused for revocation
    (callers log such repeats at debug level, so a revoked peer is logged once).
    """

    def __init__(self, reason: str, repeat: bool = False) -> None:
        super().__init__(reason)
        self.repeat = repeat
        self.certificate: bytes = b""  # the refused certificate (DER or PEM as given), if any


def _str(value: str) -> bytes:
    b = value.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def canonical_bytes(header: pb.Header, digest: bytes, head: LedgerHead | None) -> bytes:
    """The exact bytes a message's signature covers (length-prefixed, big-endian, sorted scalars)."""
    if len(digest) != HASH_BYTES:
        raise TransportError(f"model digest has {len(digest)} bytes, not {HASH_BYTES}")
    out = bytearray(DOMAIN)
    out += struct.pack(">I", header.version)
    out += _str(header.sender) + _str(header.recipient)
    out += struct.pack(">QQQ", header.sequence, header.in_reply_to, header.round)
    out += _str(header.kind)
    out += struct.pack(">QI", header.body_bytes, len(header.tensors))
    for spec in header.tensors:
        line = spec_line(spec)
        out += struct.pack(">I", len(line)) + line
    out += _str(header.digest_algorithm) + digest
    out += struct.pack(">I", len(header.scalars))
    for key in sorted(header.scalars):
        out += _str(key) + struct.pack(">d", header.scalars[key])
    if head is None:
        out += b"\x00"
    else:
        index, entry_hash = head
        if len(entry_hash) != HASH_BYTES:
            raise TransportError(f"ledger head hash has {len(entry_hash)} bytes, not {HASH_BYTES}")
        out += b"\x01" + struct.pack(">Q", index) + entry_hash
    out += hashlib.sha256(header.sender_certificate).digest()
    return bytes(out)


def sign_message(key: ec.EllipticCurvePrivateKey, header: pb.Header, digest: bytes,
                 head: LedgerHead | None) -> bytes:
    """DER ECDSA P-256 / SHA-256 signature of the message's canonical bytes."""
    return key.sign(canonical_bytes(header, digest, head), _ECDSA)


def verify_message(public_key: ec.EllipticCurvePublicKey, header: pb.Header, digest: bytes,
                   head: LedgerHead | None, signature: bytes) -> None:
    """Check a message signature; AuthenticationFailed if it does not verify."""
    if not signature:
        raise AuthenticationFailed("message is not signed")
    try:
        public_key.verify(signature, canonical_bytes(header, digest, head), _ECDSA)
    except InvalidSignature:
        raise AuthenticationFailed(f"signature of {header.kind} seq={header.sequence} from "
                                   f"{header.sender!r} does not verify") from None


def head_of(trailer: pb.Trailer) -> LedgerHead | None:
    """The trailer's ledger head (None if absent); TransportError if malformed."""
    if not trailer.HasField("ledger_head"):
        return None
    h = trailer.ledger_head
    if len(h.entry_hash) != HASH_BYTES:
        raise TransportError(f"ledger head hash has {len(h.entry_hash)} bytes, not {HASH_BYTES}")
    return int(h.index), bytes(h.entry_hash)


def head_signature_of(trailer: pb.Trailer) -> bytes:
    """The trailer's head signature (empty when there is no head)."""
    return bytes(trailer.ledger_head.signature) if trailer.HasField("ledger_head") else b""


def trailer_of(digest: bytes, head: LedgerHead | None, signature: bytes,
               head_signature: bytes = b"") -> pb.Trailer:
    """The trailer of a signed message."""
    t = pb.Trailer(model_digest=digest, signature=signature)
    if head is not None:
        t.ledger_head.index, t.ledger_head.entry_hash = int(head[0]), bytes(head[1])
        t.ledger_head.signature = head_signature
    return t


class Signer:
    """Signs a node's outgoing messages with its node key (parsed once)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        self._key = load_private_key(key_pem)
        self.certificate_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(
            serialization.Encoding.DER)
        self._lock = threading.Lock()
        self._head_cache: tuple[str, LedgerHead, bytes] | None = None  # the last head signed

    def seal(self, header: pb.Header, digest: bytes, head: LedgerHead | None) -> pb.Trailer:
        """The signed trailer for ``header`` with ``digest`` and ``head`` (the head signed too)."""
        head_sig = self.head_signature(header.sender, head) if head is not None else b""
        return trailer_of(digest, head, sign_message(self._key, header, digest, head), head_sig)

    def head_signature(self, node_id: str, head: LedgerHead) -> bytes:
        """The head's own signature (the last one is cached: the head moves once per ledger entry)."""
        head = (int(head[0]), bytes(head[1]))
        with self._lock:
            cached = self._head_cache
        if cached is not None and cached[0] == node_id and cached[1] == head:
            return cached[2]
        sig = sign_head(self._key, node_id, head)
        with self._lock:
            self._head_cache = (node_id, head, sig)
        return sig


@dataclass(frozen=True)
class VerifiedPeer:
    """A certificate that passed every check under the trust state of ``generation``."""

    node_id: str
    fingerprint: str
    certificate: x509.Certificate
    public_key: ec.EllipticCurvePublicKey
    generation: int


class PeerVerifier:
    """Checks peer certificates (cached per fingerprint) and message signatures.

    The cache holds only certificates that passed the full check and is dropped whenever
    the trust state changes (a new CRL or roster); validity times and CRL expiry are
    re-checked on every use.
    """

    def __init__(self, trust: TrustState) -> None:
        self.trust = trust
        self._lock = threading.Lock()
        self._cache: dict[bytes, VerifiedPeer] = {}
        self._generation = -1
        self._revoked_seen: set[bytes] = set()

    def certificate(self, data: bytes, claimed: str | None = None, pem: bool = False) -> VerifiedPeer:
        """Verify a peer certificate (DER, or PEM with ``pem``) for ``claimed`` sender.

        AuthenticationFailed with the precise reason: unknown CA, expired, revoked, not in
        the roster, fingerprint differs from the pin, or it names another node than claimed.
        """
        try:
            return self._certificate(data, claimed, pem)
        except AuthenticationFailed as exc:
            exc.certificate = bytes(data)
            raise

    def _certificate(self, data: bytes, claimed: str | None, pem: bool) -> VerifiedPeer:
        if not data:
            raise AuthenticationFailed("no sender certificate")
        if len(data) > MAX_CERTIFICATE_BYTES:
            raise AuthenticationFailed(f"sender certificate of {len(data)} bytes is too large")
        key = hashlib.sha256(data).digest()
        generation = self.trust.generation
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            if generation != self._generation:
                self._cache.clear()
                self._revoked_seen.clear()
                self._generation = generation
            hit = self._cache.get(key)
        if hit is not None and hit.certificate.not_valid_before_utc <= now <= hit.certificate.not_valid_after_utc \
                and self.trust.crl_fresh(now):
            peer = hit
        else:
            peer = self._full_check(data, key, pem, generation, now)
        if claimed is not None and peer.node_id != claimed:
            raise AuthenticationFailed(f"certificate names node {peer.node_id!r}, the message claims {claimed!r}")
        return peer

    def _full_check(self, data: bytes, key: bytes, pem: bool, generation: int,
                    now: dt.datetime) -> VerifiedPeer:
        try:
            cert = (x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data))
        except ValueError as exc:
            raise AuthenticationFailed(f"malformed sender certificate: {exc}") from None
        roster, crl = self.trust.current()
        try:
            node_id = verify_node_certificate(cert, self.trust.ca_pem, roster, crl, now)  # type: ignore[arg-type]
        except PKIError as exc:
            revoked = "is revoked" in str(exc)
            with self._lock:
                repeat = revoked and key in self._revoked_seen
                if revoked:
                    self._revoked_seen.add(key)
            raise AuthenticationFailed(str(exc), repeat=repeat) from None
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise AuthenticationFailed("certificate key is not an ECDSA key")
        fp = roster.nodes[node_id].fingerprint
        peer = VerifiedPeer(node_id, fp, cert, pub, generation)
        with self._lock:
            if generation == self._generation:
                self._cache[key] = peer
        return peer

    def message(self, header: pb.Header, trailer: pb.Trailer, digest: bytes,
                claimed: str | None = None) -> tuple[VerifiedPeer, LedgerHead | None]:
        """Verify a whole message: its certificate for ``claimed`` (default: the header's sender)
        and its signature; returns the verified peer and the sender's ledger head."""
        peer = self.certificate(header.sender_certificate, claimed or header.sender)
        if peer.node_id != header.sender:
            raise AuthenticationFailed(f"header sender {header.sender!r} is not the certificate's "
                                       f"node {peer.node_id!r}")
        head = head_of(trailer)
        verify_message(peer.public_key, header, digest, head, trailer.signature)
        if head is not None and not head_signed_by(peer.public_key, peer.node_id, head,
                                                   head_signature_of(trailer)):
            raise AuthenticationFailed(f"ledger head of {header.kind} seq={header.sequence} from "
                                       f"{header.sender!r} is not signed by its key")
        return peer, head


def certificate_der(cert_pem: bytes) -> bytes:
    """DER of a PEM certificate."""
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


__all__ = ["AuthenticationFailed", "LedgerHead", "PeerVerifier", "Signer", "VerifiedPeer",
           "canonical_bytes", "certificate_der", "head_of", "head_signature_of", "sign_message", "trailer_of",
           "verify_message"]
