"""Signed, hash-chained, append-only privacy ledger of one node (JSON lines).

Each line is one entry, written as canonical JSON
(``json.dumps(entry, sort_keys=True, separators=(",", ":"))``) and a newline:

    {"body": {...}, "index": i, "kind": "...", "prev_hash": "<64 hex>",
     "signature": "<base64>", "timestamp": <unix seconds>}

* ``prev_hash`` is the SHA-256 (hex) of the previous line's bytes (the whole canonical
  entry, signature included, without its newline); the header's is 64 zeros.
* ``signature`` is by the node's identity key over the canonical JSON of the entry
  without its ``signature`` field: ECDSA P-256 with SHA-256 (DER, base64), or Ed25519.
* kinds: ``header`` (first entry: node certificate, node id, privacy policy, software
  version, the kind of randomness the noise was drawn from and a public description of
  the site's preprocessing), ``dp_event``, ``message`` (a digest of what was sent, never
  the values), ``stop``, ``note``, ``anchor`` (a head received from a peer) and ``close``
  (the node's last act of a run).
* a ``dp_event`` records the whole mechanism, so an auditor can recompute ε without
  trusting the node: its purpose (training, preprocessing or evaluation), the L2
  sensitivity of the noised sum, the local mechanism and its public parameters, and the
  randomness kind (copied from the header). Every event, whatever its purpose, is a
  Poisson-sampled Gaussian with noise multiplier σ (noise std / sensitivity) and rate q
  (1.0 for a one-shot release) composed into the one accountant.

Anchoring (why a single signed file is not enough): whoever holds the node key can
re-sign and re-chain a whole ledger, so a ledger cannot prove its own history. Every
message a node sends therefore carries its head, :attr:`Ledger.head` = (index of the
newest entry, :func:`entry_hash` of its line: the hash the next ``prev_hash`` holds), and
the receiver records it with :meth:`Ledger.append_anchor` as an ``anchor`` entry
(``{"peer", "index", "entry_hash"}``, and ``"signature"``: the sender's own signature of
that head, which the sender can check when it later asks for it) in its own ledger, only
when it advances what that receiver already holds for the peer. Because each entry commits to every entry before
it, an anchor at index i is evidence of the sender's whole prefix 0..i;
:func:`accounting.audit_consortium.audit_consortium` checks every anchor against the
sender's ledger (a shorter ledger: truncated or rolled back; another hash: rewritten).

The rule for the tail: whatever a node appends after its last message is held by no
peer. So a node ends a run with :meth:`Ledger.append_close` (a ``close`` entry) and sends
that head to its neighbours with its goodbye; in a normal run the LAST entry of every
ledger is then anchored at a peer. Heads the node receives after its own close entry must
not extend its chain (that would leave an unanchored tail again): while the newest entry
is a close entry, :meth:`Ledger.append_anchor` writes them to ``anchors-final.jsonl``
next to the ledger (:meth:`Ledger.append_late_anchor`): the same signed, hash-chained
entry format (kind ``late_anchor``, its own chain from the genesis hash), each body also
naming the close entry it follows (``"after": {"index", "entry_hash"}``). A node that
restarts on a ledger ending in a close entry simply appends again (new heads go back into
the chain). At start a node asks its peers what they hold for it
(:func:`check_against_peers`) and compares its checkpoint with its ledger
(:func:`check_checkpoint_steps`), refusing to train on a ledger that is behind.

Format ``privfl-ledger/2`` adds the randomness and preprocessing to the header and the
mechanism fields to dp_events; ``privfl-ledger/1`` ledgers still verify (their randomness
is "unrecorded" and every event counts as training) but take no new dp_events.

The node rebuilds its accountant from the ledger at start (:meth:`Ledger.rebuild_accountant`),
so a restart never resets the budget. Appends are durable and whole: each entry is one
unbuffered ``os.write`` on an ``O_APPEND`` descriptor, then ``os.fsync`` (batched every
``fsync_every`` entries); a write that fails is truncated back to the last good offset
and raises :class:`LedgerError` ``write_failed`` with the in-memory state unchanged, so
nothing is left in a buffer to be flushed later. A crash mid-append leaves a torn last line (no
trailing newline); :meth:`Ledger.open` refuses it with :class:`TornTailError`, distinct
from tampering, and :meth:`Ledger.repair_torn_tail` truncates it explicitly and records
a note entry.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from privfl.accounting.accountant import (
    NEIGHBORING_RELATION,
    DpEventKey,
    PrivacyAccountant,
    validate_step,
)
from privfl.accounting.heads import HEAD_SIGNATURE_BYTES

try:  # advisory single-writer lock; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("privfl.ledger")

LEDGER_FORMAT = "privfl-ledger/2"
LEDGER_FORMAT_V1 = "privfl-ledger/1"
LEDGER_FORMATS = (LEDGER_FORMAT_V1, LEDGER_FORMAT)
GENESIS_HASH = "0" * 64
KINDS = ("header", "dp_event", "message", "stop", "note", "anchor", "close")
LATE_ANCHOR_KIND = "late_anchor"  # the only kind of an anchors-final file
ANCHORS_FINAL_FILE = "anchors-final.jsonl"
ENTRY_FIELDS = frozenset({"body", "index", "kind", "prev_hash", "signature", "timestamp"})
#: the hashes a message entry's digest may use, each the body key it is stored under (32-byte digests)
MESSAGE_DIGESTS = ("sha256", "blake3")
MECHANISM_POISSON_GAUSSIAN = "poisson_gaussian"

# Where the noise and the sampling came from: an OS-entropy-keyed CSPRNG, or a seed
# (simulations and tests only: anyone who knows the seed can recompute the noise).
RANDOMNESS_SECURE = "secure"
RANDOMNESS_SEEDED = "seeded"
RANDOMNESS_KINDS = (RANDOMNESS_SECURE, RANDOMNESS_SEEDED)
RANDOMNESS_UNRECORDED = "unrecorded"  # a privfl-ledger/1 header, which has no such field

# What a dp_event paid for; every purpose costs ε in the same accountant.
PURPOSE_TRAINING = "training"
PURPOSE_PREPROCESSING = "preprocessing"
PURPOSE_EVALUATION = "evaluation"
DP_PURPOSES = (PURPOSE_TRAINING, PURPOSE_PREPROCESSING, PURPOSE_EVALUATION)
NO_PREPROCESSING: dict[str, Any] = {"kind": "none"}

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Problem kinds named by verification (LedgerError.kind / audit issues).
TORN_TAIL = "torn_tail"
MALFORMED = "malformed"
MODIFIED = "modified"
FOREIGN_KEY = "foreign_key"
DROPPED = "dropped"
REORDERED = "reordered"
DUPLICATED = "duplicated"
CHAIN_BREAK = "chain_break"
BAD_HEADER = "bad_header"
EMPTY = "empty"
NOT_CLOSED = "not_closed"  # a late anchor before the close entry
WRITE_FAILED = "write_failed"  # an append / fsync / repair could not be written (the file is as before)


class LedgerError(Exception):
    """A ledger failed verification or cannot be used.

    ``index`` is the position (line number from 0, which is also the expected entry
    index) of the first bad entry, or None when the problem is not one entry's;
    ``kind`` names the problem (see the module constants), ``reason`` says it in words.
    """

    def __init__(self, index: int | None, reason: str, kind: str = MALFORMED) -> None:
        self.index = index
        self.reason = reason
        self.kind = kind
        where = f"entry {index}: " if index is not None else ""
        super().__init__(f"ledger {kind}: {where}{reason}")


class TornTailError(LedgerError):
    """The last line is incomplete (a crash during an append), not tampering."""

    def __init__(self, index: int, torn_bytes: int) -> None:
        self.torn_bytes = torn_bytes
        super().__init__(
            index,
            f"last line is incomplete ({torn_bytes} bytes, no trailing newline): a crash "
            "during an append; Ledger.repair_torn_tail() truncates it",
            TORN_TAIL,
        )


@dataclass(frozen=True)
class LedgerPolicy:
    """The node's privacy policy, pinned in the ledger header."""

    target_epsilon: float
    delta: float
    min_noise_multiplier: float
    allowed_clipping_rules: tuple[str, ...]
    accountant: str = "rdp"
    neighbouring_relation: str = NEIGHBORING_RELATION

    def __post_init__(self) -> None:
        if not (isinstance(self.target_epsilon, (int, float)) and self.target_epsilon > 0):
            raise ValueError(f"policy.target_epsilon must be > 0, got {self.target_epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"policy.delta must be in (0, 1), got {self.delta!r}")
        if not (
            isinstance(self.min_noise_multiplier, (int, float)) and self.min_noise_multiplier > 0
        ):
            raise ValueError(
                f"policy.min_noise_multiplier must be > 0, got {self.min_noise_multiplier!r}"
            )
        rules = tuple(self.allowed_clipping_rules)
        if not rules or not all(isinstance(r, str) and r for r in rules):
            raise ValueError("policy.allowed_clipping_rules must be a non-empty list of names")
        object.__setattr__(self, "allowed_clipping_rules", rules)
        if self.accountant not in ("rdp", "pld"):
            raise ValueError(f"policy.accountant must be 'rdp' or 'pld', got {self.accountant!r}")
        if self.neighbouring_relation != NEIGHBORING_RELATION:
            raise ValueError(
                f"policy.neighbouring_relation must be {NEIGHBORING_RELATION!r}, "
                f"got {self.neighbouring_relation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (as stored in the header)."""
        d = asdict(self)
        d["target_epsilon"] = float(self.target_epsilon)
        d["delta"] = float(self.delta)
        d["min_noise_multiplier"] = float(self.min_noise_multiplier)
        d["allowed_clipping_rules"] = list(self.allowed_clipping_rules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LedgerPolicy:
        """Parse the header's policy (raises ValueError/KeyError/TypeError when malformed)."""
        return cls(
            target_epsilon=d["target_epsilon"],
            delta=d["delta"],
            min_noise_multiplier=d["min_noise_multiplier"],
            allowed_clipping_rules=tuple(d["allowed_clipping_rules"]),
            accountant=d["accountant"],
            neighbouring_relation=d["neighbouring_relation"],
        )


# --------------------------------------------------------------------------- crypto


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def json_safe_dict(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``value`` as a plain JSON dict (string keys, finite numbers), or ValueError naming ``what``.

    Header and dp_event descriptions must survive canonical JSON unchanged, or the
    signed record and what the node meant would differ.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        if not all(isinstance(k, str) for k in value):
            raise TypeError("keys must be strings")
        return dict(json.loads(canonical_bytes(dict(value))))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-safe (string keys, finite numbers): {exc}") from None


def signing_bytes(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's signature covers: canonical JSON without ``signature``."""
    return canonical_bytes({k: v for k, v in entry.items() if k != "signature"})


def entry_hash(line: bytes) -> str:
    """SHA-256 hex of an entry's line (canonical JSON, no newline): the next prev_hash."""
    return hashlib.sha256(line).hexdigest()


def sign_bytes(key: PrivateKey, data: bytes) -> str:
    """Base64 signature of ``data``: ECDSA P-256/SHA-256 (DER) or Ed25519."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(data)
    else:
        raise ValueError(f"unsupported ledger key type {type(key).__name__}: use ECDSA P-256")
    return base64.b64encode(sig).decode("ascii")


def verify_signature(public_key: PublicKey, signature_b64: str, data: bytes) -> bool:
    """Whether ``signature_b64`` is a valid signature of ``data`` by ``public_key``."""
    try:
        sig = base64.b64decode(signature_b64.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    # Base64 ignores the unused low bits of its last character, so two spellings decode to
    # the same signature; only the canonical one counts, or a flipped bit there would go
    # unnoticed in this entry (and surface only as the next entry's broken hash link).
    if base64.b64encode(sig).decode("ascii") != signature_b64:
        return False
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _check_key_type(key: Any) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"ledger keys must be ECDSA P-256, got curve {key.curve.name}")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"unsupported ledger key type {type(key).__name__}: use ECDSA P-256")


def public_key_of_cert(cert: x509.Certificate) -> PublicKey:
    """The certificate's public key, if it is a type ledgers accept."""
    pk = cert.public_key()
    if isinstance(pk, ec.EllipticCurvePublicKey) and isinstance(pk.curve, ec.SECP256R1):
        return pk
    if isinstance(pk, ed25519.Ed25519PublicKey):
        return pk
    raise ValueError(f"certificate key type {type(pk).__name__} is not ECDSA P-256 or Ed25519")


def _same_public_key(a: Any, b: Any) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return bool(a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt))


def cert_node_ids(cert: x509.Certificate) -> set[str]:
    """Names a certificate can carry a node id in: subject CN, DNS and URI SANs."""
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(san.get_values_for_type(x509.DNSName))
        names.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        pass
    return names


def default_node_id(cert: x509.Certificate) -> str:
    """The node id a certificate names: its subject common name."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise ValueError("node certificate has no subject common name; pass node_id")
    return str(cns[0].value)


def _load_cert(cert_pem: str | bytes) -> x509.Certificate:
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"node certificate is not a PEM X.509 certificate: {exc}") from exc


# --------------------------------------------------------------------------- verification


@dataclass
class VerifiedLedger:
    """The result of verifying a ledger's bytes: the good prefix and the first problem."""

    header: dict[str, Any] | None = None
    certificate: x509.Certificate | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    last_hash: str = GENESIS_HASH
    good_bytes: int = 0
    error: LedgerError | None = None

    @property
    def ok(self) -> bool:
        """Whether every line verified."""
        return self.error is None


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the torn remainder (b'' if none)."""
    if not data:
        return [], b""
    parts = data.split(b"\n")
    return parts[:-1], parts[-1]


def _parse_line(
    pos: int, line: bytes, kinds: tuple[str, ...] = KINDS
) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LedgerError(pos, f"line is not valid JSON ({exc.__class__.__name__})", MALFORMED) from None
    if not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
        raise LedgerError(pos, "line is not a ledger entry (wrong fields)", MALFORMED)
    if (
        not isinstance(entry["index"], int)
        or isinstance(entry["index"], bool)
        or entry["kind"] not in kinds
        or not isinstance(entry["body"], dict)
        or not isinstance(entry["prev_hash"], str)
        or not isinstance(entry["signature"], str)
        or not isinstance(entry["timestamp"], (int, float))
        or isinstance(entry["timestamp"], bool)
    ):
        raise LedgerError(pos, "entry field has the wrong type or unknown kind", MALFORMED)
    try:
        canonical = canonical_bytes(entry)
    except ValueError as exc:  # NaN/Infinity
        raise LedgerError(pos, f"entry is not canonical JSON ({exc})", MALFORMED) from exc
    if canonical != line:
        raise LedgerError(pos, "entry is not in canonical JSON form", MALFORMED)
    return entry


def _unsigned_bytes(line: bytes, entry: Mapping[str, Any]) -> bytes:
    """:func:`signing_bytes` of a canonical line, by cutting its signature field out.

    The top-level ``"signature":"…",`` is the last such text in a canonical line (only
    ``timestamp``, a number, follows it), so this equals re-serialising without it.
    """
    seg = b'"signature":"' + str(entry["signature"]).encode("ascii", "replace") + b'",'
    i = line.rfind(seg)
    if i < 0:
        return signing_bytes(entry)
    return line[:i] + line[i + len(seg) :]


def _classify_index_problem(
    pos: int, found: int, lines: list[bytes], seen: dict[int, str], line: bytes
) -> LedgerError:
    """Name why the entry at ``pos`` has index ``found`` instead of ``pos``."""
    if found < pos:
        if seen.get(found) == entry_hash(line):
            return LedgerError(pos, f"entry {found} appears again at line {pos}", DUPLICATED)
        return LedgerError(
            pos, f"line {pos} holds entry {found}: lines are out of order", REORDERED
        )
    # found > pos: is the expected entry further down the file (reordered) or gone?
    needle = b'"index":%d,' % pos
    for later in lines[pos + 1 :]:
        if needle in later:
            try:
                if json.loads(later).get("index") == pos:
                    return LedgerError(
                        pos, f"line {pos} holds entry {found}: lines are out of order", REORDERED
                    )
            except ValueError:
                continue
    missing = found - pos
    return LedgerError(
        pos,
        f"expected entry {pos}, found entry {found}: {missing} line(s) dropped",
        DROPPED,
    )


def verify_bytes(
    data: bytes,
    other_keys: Mapping[str, PublicKey] | None = None,
    every_signature: bool = True,
    workers: int = 1,
) -> VerifiedLedger:
    """Verify a ledger's bytes: header, signatures, the hash chain and indices.

    Stops at the first bad entry and names it. ``other_keys`` (node id → public key,
    e.g. the other nodes of the roster) lets a bad signature be named as made by
    another node's key rather than just "modified". Does not check the certificate
    chain (see :func:`accounting.audit.audit_ledger`).

    ``every_signature=False`` is the fast path for reopening: each line's prev_hash
    commits to the whole line before it, so an intact chain whose last entry carries a
    valid signature proves every line is as the node wrote it; only the header's and
    the last complete line's signatures are checked. On any failure the full
    verification runs, to name the first bad entry exactly.

    ``workers > 1`` checks every signature in that many processes when the ledger has
    at least ``PARALLEL_MIN_ENTRIES`` lines (a failure again falls back to the serial
    check, which names the first bad entry).
    """
    if not every_signature:
        fast = _verify(data, other_keys, every_signature=False)
        if fast.error is None or isinstance(fast.error, TornTailError):
            return fast
    elif workers > 1 and data.count(b"\n") >= PARALLEL_MIN_ENTRIES:
        jobs: list[tuple[bytes, bytes]] = []
        fast = _verify(data, other_keys, every_signature=False, collect=jobs)
        ok = fast.error is None or isinstance(fast.error, TornTailError)
        if ok and fast.certificate is not None and _verify_parallel(fast.certificate, jobs, workers):
            return fast
    return _verify(data, other_keys, every_signature=True)


PARALLEL_MIN_ENTRIES = 5000


def _verify_chunk(args: tuple[bytes, list[tuple[bytes, bytes]]]) -> bool:
    """Worker: whether every (signature, data) pair verifies with the DER public key."""
    pub_der, jobs = args
    pub = serialization.load_der_public_key(pub_der)
    return all(verify_signature(pub, sig.decode("ascii"), data) for sig, data in jobs)  # type: ignore[arg-type]


def _verify_parallel(
    cert: x509.Certificate, jobs: list[tuple[bytes, bytes]], workers: int
) -> bool:
    """Check many signatures in ``workers`` processes (ECDSA holds the GIL; threads don't help)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if not jobs:
        return True
    pub_der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    n = max(1, -(-len(jobs) // (workers * 4)))
    chunks = [(pub_der, jobs[i : i + n]) for i in range(0, len(jobs), n)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return all(pool.map(_verify_chunk, chunks))


def _verify(
    data: bytes,
    other_keys: Mapping[str, PublicKey] | None,
    every_signature: bool,
    collect: list[tuple[bytes, bytes]] | None = None,
) -> VerifiedLedger:
    result = VerifiedLedger()
    lines, torn = _split_lines(data)
    if not lines and not torn:
        result.error = LedgerError(None, "ledger is empty: no header", EMPTY)
        return result
    pub: PublicKey | None = None
    seen: dict[int, str] = {}
    prev = GENESIS_HASH
    offset = 0
    last = len(lines) - 1
    for pos, line in enumerate(lines):
        try:
            entry = _parse_line(pos, line)
            if pos == 0:
                cert, pub = _verify_header_entry(entry)
                result.header = entry
                result.certificate = cert
            assert pub is not None
            if every_signature or pos == 0 or pos == last:
                if not verify_signature(pub, entry["signature"], _unsigned_bytes(line, entry)):
                    raise _bad_signature(pos, entry, other_keys)
            elif collect is not None:
                collect.append((entry["signature"].encode("ascii", "replace"), _unsigned_bytes(line, entry)))
            if entry["index"] != pos:
                raise _classify_index_problem(pos, entry["index"], lines, seen, line)
            if entry["prev_hash"] != prev:
                raise LedgerError(
                    pos,
                    "prev_hash does not match the previous entry: an entry before it was "
                    "replaced or the chain was spliced",
                    CHAIN_BREAK,
                )
            if pos > 0 and entry["kind"] == "header":
                raise LedgerError(pos, "a second header entry", MALFORMED)
        except LedgerError as exc:
            result.error = exc
            return result
        prev = entry_hash(line)
        seen[pos] = prev
        offset += len(line) + 1
        result.entries.append(entry)
        result.last_hash = prev
        result.good_bytes = offset
    if torn:
        if not lines:
            result.error = LedgerError(0, "the header line is incomplete", TORN_TAIL)
        else:
            result.error = TornTailError(len(lines), len(torn))
    return result


def _bad_signature(
    pos: int, entry: Mapping[str, Any], other_keys: Mapping[str, PublicKey] | None
) -> LedgerError:
    data = signing_bytes(entry)
    for node_id, key in (other_keys or {}).items():
        if verify_signature(key, entry["signature"], data):
            return LedgerError(
                pos, f"entry is signed by another node's key ({node_id})", FOREIGN_KEY
            )
    return LedgerError(
        pos,
        "signature does not verify with the node certificate: the entry was modified "
        "(e.g. a flipped byte or an edited body) or signed by an unknown key",
        MODIFIED,
    )


def _verify_header_entry(entry: Mapping[str, Any]) -> tuple[x509.Certificate, PublicKey]:
    """Check the header's shape and return its certificate and public key."""
    if entry["kind"] != "header":
        raise LedgerError(0, "first entry is not a header", BAD_HEADER)
    if entry["index"] != 0 or entry["prev_hash"] != GENESIS_HASH:
        raise LedgerError(0, "header must have index 0 and the genesis prev_hash", BAD_HEADER)
    body = entry["body"]
    try:
        if body.get("format") not in LEDGER_FORMATS:
            raise ValueError(f"unknown ledger format {body.get('format')!r}")
        if body["format"] != LEDGER_FORMAT_V1:
            if body.get("randomness") not in RANDOMNESS_KINDS:
                raise ValueError(
                    f"randomness must be one of {', '.join(RANDOMNESS_KINDS)}, "
                    f"got {body.get('randomness')!r}"
                )
            if not isinstance(body.get("preprocessing"), dict):
                raise ValueError("preprocessing must be a JSON object")
        cert = _load_cert(body["certificate"])
        pub = public_key_of_cert(cert)
        LedgerPolicy.from_dict(body["policy"])
        node_id = body["node_id"]
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        if node_id not in cert_node_ids(cert):
            raise ValueError(f"node_id {node_id!r} is not named in the certificate")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LedgerError(0, f"bad header: {exc}", BAD_HEADER) from exc
    return cert, pub


def read_ledger(
    path: str | os.PathLike[str],
    other_keys: Mapping[str, PublicKey] | None = None,
    every_signature: bool = True,
    workers: int = 1,
) -> VerifiedLedger:
    """Read and verify the ledger file at ``path`` (see :func:`verify_bytes`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"ledger file {p} does not exist") from exc
    return verify_bytes(data, other_keys, every_signature, workers)


def dp_event_key(body: Mapping[str, Any]) -> DpEventKey:
    """The accountant key of a dp_event body."""
    return DpEventKey(float(body["noise_multiplier"]), float(body["sample_rate"]))


def purpose_of(body: Mapping[str, Any]) -> str:
    """A dp_event body's purpose; events of privfl-ledger/1 (no field) were training."""
    return str(body.get("purpose", PURPOSE_TRAINING))


def events_by_purpose_of(entries: list[dict[str, Any]]) -> dict[str, dict[DpEventKey, int]]:
    """Counted DP events per purpose: purpose → (σ, q) → steps (every known purpose present)."""
    out: dict[str, dict[DpEventKey, int]] = {p: {} for p in DP_PURPOSES}
    for e in entries:
        if e["kind"] == "dp_event":
            events = out.setdefault(purpose_of(e["body"]), {})
            key = dp_event_key(e["body"])
            events[key] = events.get(key, 0) + int(e["body"]["steps"])
    return out


def merge_events(by_purpose: Mapping[str, Mapping[DpEventKey, int]]) -> dict[DpEventKey, int]:
    """All purposes' counted events in one map: what the accountant composes."""
    events: dict[DpEventKey, int] = {}
    for per in by_purpose.values():
        for key, count in per.items():
            events[key] = events.get(key, 0) + count
    return events


def events_of(entries: list[dict[str, Any]]) -> dict[DpEventKey, int]:
    """Counted DP events (σ, q) → steps of every dp_event entry, whatever its purpose."""
    return merge_events(events_by_purpose_of(entries))


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """An open, append-only ledger owned by one node (single writer, thread-safe).

    Create with :meth:`create`, reopen with :meth:`open` (which verifies the file
    first), or :meth:`open_or_create`. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        key: PrivateKey,
        verified: VerifiedLedger,
        fsync_every: int = 1,
    ) -> None:
        """Internal: use :meth:`create` / :meth:`open`."""
        if fsync_every < 0:
            raise ValueError(f"fsync_every must be >= 0, got {fsync_every}")
        assert verified.header is not None and verified.certificate is not None
        self.path = path
        self._key = key
        self._fsync_every = int(fsync_every)
        self.header: dict[str, Any] = verified.header
        self.certificate = verified.certificate
        self.node_id: str = verified.header["body"]["node_id"]
        self.policy = LedgerPolicy.from_dict(verified.header["body"]["policy"])
        self.format: str = verified.header["body"]["format"]
        self._lock = threading.Lock()
        self._next_index = len(verified.entries)
        self._last_hash = verified.last_hash
        self._unsynced = 0
        self._by_purpose = events_by_purpose_of(verified.entries)
        self._events = merge_events(self._by_purpose)
        self._messages = sum(1 for e in verified.entries if e["kind"] == "message")
        self._bytes_sent = sum(
            int(e["body"]["bytes"]) for e in verified.entries if e["kind"] == "message"
        )
        self._stopped = any(e["kind"] == "stop" for e in verified.entries)
        self._last_epsilon = next(
            (
                float(e["body"]["epsilon"])
                for e in reversed(verified.entries)
                if e["kind"] == "dp_event"
            ),
            0.0,
        )
        # Unbuffered (O_APPEND, no Python buffer): an append that fails leaves nothing behind
        # that a later write could flush beside the next entry (see :meth:`_write_entry`).
        self._broken: str | None = None  # why the file no longer matches the in-memory state
        try:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise LedgerError(
                None, f"cannot open {path} for appending: {_os_reason(exc)}", WRITE_FAILED
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._file.close()
                raise LedgerError(
                    None, f"ledger {path} is open by another writer", "locked"
                ) from exc

    # ----- construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        key: PrivateKey,
        cert_pem: str | bytes,
        policy: LedgerPolicy,
        software_version: str,
        node_id: str | None = None,
        fsync_every: int = 1,
        *,
        randomness: str,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> Ledger:
        """Start a new ledger at ``path`` (which must not exist) with a signed header.

        The header pins the node certificate, node id (default: the certificate's CN),
        the privacy policy, the software version, ``randomness`` ("secure": noise and
        sampling from an OS-entropy-keyed CSPRNG; "seeded": from a seed, for simulations
        and tests) and ``preprocessing``, a public JSON-safe description of the site's
        preprocessing (None: ``{"kind": "none"}``). It is written to a temporary file,
        fsynced and renamed, so a crash never leaves a half-written header.
        """
        p = Path(path)
        kind = _check_randomness(randomness)
        prep = (
            dict(NO_PREPROCESSING)
            if preprocessing is None
            else json_safe_dict(preprocessing, "preprocessing")
        )
        _check_key_type(key)
        cert = _load_cert(cert_pem)
        if not _same_public_key(public_key_of_cert(cert), key.public_key()):
            raise ValueError("the ledger key does not match the node certificate's public key")
        nid = node_id if node_id is not None else default_node_id(cert)
        if nid not in cert_node_ids(cert):
            raise ValueError(f"node_id {nid!r} is not named in the node certificate")
        if p.exists():
            raise FileExistsError(f"ledger {p} already exists; use Ledger.open")
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        body = {
            "format": LEDGER_FORMAT,
            "node_id": nid,
            "certificate": pem,
            "policy": policy.to_dict(),
            "software_version": str(software_version),
            "randomness": kind,
            "preprocessing": prep,
        }
        entry, line = _make_entry(key, 0, "header", body, GENESIS_HASH)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)  # atomic, and fails if p appeared meanwhile
        except FileExistsError:
            tmp.unlink()
            raise FileExistsError(f"ledger {p} already exists; use Ledger.open") from None
        tmp.unlink()
        _fsync_dir(p.parent)
        verified = VerifiedLedger(
            header=entry,
            certificate=cert,
            entries=[entry],
            last_hash=entry_hash(line),
            good_bytes=len(line) + 1,
        )
        log.info("ledger created node=%s path=%s randomness=%s", nid, p, kind)
        return cls(p, key, verified, fsync_every)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], key: PrivateKey, fsync_every: int = 1
    ) -> Ledger:
        """Verify the ledger at ``path`` and open it for appending.

        Raises :class:`TornTailError` for an incomplete last line (a crash: see
        :meth:`repair_torn_tail`) and :class:`LedgerError` for anything else that does
        not verify; never continues silently. The key must match the header certificate.
        Checks the whole hash chain and the last entry's signature (see
        :func:`verify_bytes`), so a restart costs ~30 µs per entry.
        """
        p = Path(path)
        _check_key_type(key)
        verified = read_ledger(p, every_signature=False)
        if verified.error is not None:
            raise verified.error
        assert verified.certificate is not None
        if not _same_public_key(public_key_of_cert(verified.certificate), key.public_key()):
            raise LedgerError(
                None, "the key does not match the ledger's node certificate", BAD_HEADER
            )
        ledger = cls(p, key, verified, fsync_every)
        log.info(
            "ledger opened node=%s entries=%d steps=%d",
            ledger.node_id,
            ledger.num_entries,
            ledger.steps,
        )
        return ledger

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike[str],
        key: PrivateKey,
        cert_pem: str | bytes,
        policy: LedgerPolicy,
        software_version: str,
        node_id: str | None = None,
        fsync_every: int = 1,
        *,
        randomness: str,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> Ledger:
        """Open the ledger if it exists, else create it (see :meth:`create`).

        An existing ledger is refused (:class:`LedgerError` ``bad_header``) when its
        policy, certificate, node id, randomness kind or preprocessing description
        differs from the one given: one ledger describes one way of running the site.
        A privfl-ledger/1 ledger records no randomness, so it is always refused here.
        """
        p = Path(path)
        kind = _check_randomness(randomness)
        prep = (
            dict(NO_PREPROCESSING)
            if preprocessing is None
            else json_safe_dict(preprocessing, "preprocessing")
        )
        if not p.exists():
            return cls.create(
                p, key, cert_pem, policy, software_version, node_id, fsync_every,
                randomness=kind, preprocessing=prep,
            )
        ledger = cls.open(p, key, fsync_every)
        cert = _load_cert(cert_pem)
        problems = []
        if ledger.randomness != kind:
            problems.append(
                f"randomness {kind!r} differs from the header's {ledger.randomness!r}"
            )
        if ledger.preprocessing != prep:
            problems.append(
                f"preprocessing {prep} differs from the header's {ledger.preprocessing}"
            )
        if ledger.policy != policy:
            problems.append(f"policy {policy} differs from the header's {ledger.policy}")
        if cert != ledger.certificate:
            problems.append("the node certificate differs from the one in the header")
        if node_id is not None and node_id != ledger.node_id:
            problems.append(f"node id {node_id!r} differs from the header's {ledger.node_id!r}")
        if problems:
            ledger.close()
            raise LedgerError(0, "; ".join(problems) + "; start a new ledger", BAD_HEADER)
        return ledger

    @classmethod
    def repair_torn_tail(
        cls, path: str | os.PathLike[str], key: PrivateKey, fsync_every: int = 1
    ) -> Ledger:
        """Truncate an incomplete last line, record a note entry, and open the ledger.

        Only a torn tail is repaired: every complete line must verify, otherwise
        :class:`LedgerError` is raised and the file is left untouched. With no torn
        tail this is just :meth:`open`.
        """
        p = Path(path)
        verified = read_ledger(p)
        if verified.error is None:
            return cls.open(p, key, fsync_every)
        if not isinstance(verified.error, TornTailError):
            raise verified.error
        size = p.stat().st_size
        with open(p, "rb") as f:
            f.seek(verified.good_bytes)
            torn = f.read()
        try:
            with open(p, "r+b") as f:
                f.truncate(verified.good_bytes)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise LedgerError(
                verified.error.index,
                f"cannot truncate the torn tail of {p}: {_os_reason(exc)}",
                WRITE_FAILED,
            ) from None
        ledger = cls.open(p, key, fsync_every)
        ledger.append_note(
            "torn_tail_repaired",
            dropped_bytes=size - verified.good_bytes,
            dropped_sha256=hashlib.sha256(torn).hexdigest(),
        )
        ledger.sync()
        log.warning(
            "ledger torn tail repaired node=%s dropped_bytes=%d",
            ledger.node_id,
            size - verified.good_bytes,
        )
        return ledger

    # ----- appending

    def _append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Sign and write one entry whole, or raise ``write_failed`` with nothing changed.

        The index, last hash and counters move only after the line is in the file (and
        fsynced when due), so a failed append is simply not there: the next one reuses its
        index and the chain stays intact.
        """
        with self._lock:
            if self._file.closed:
                raise LedgerError(None, "ledger is closed", "closed")
            if self._broken is not None:
                raise LedgerError(self._next_index, self._broken, WRITE_FAILED)
            entry, line = _make_entry(self._key, self._next_index, kind, body, self._last_hash)
            sync = bool(self._fsync_every) and self._unsynced + 1 >= self._fsync_every
            self._write_entry(line + b"\n", sync)
            self._unsynced = 0 if sync else self._unsynced + 1
            self._next_index += 1
            self._last_hash = entry_hash(line)
            return entry

    def _write_entry(self, data: bytes, sync: bool) -> None:
        """Append ``data`` with unbuffered ``os.write`` calls (fsync when ``sync``).

        On any failure (EPERM of an immutable file, EROFS, ENOSPC, EFBIG, EIO, a short
        write) the file is truncated back to its size before the append and
        :class:`LedgerError` ``write_failed`` is raised. If even that truncation fails,
        the ledger refuses every further append (its file and its state may differ); the
        next :meth:`open` then finds the file whole or reports a torn tail that
        :meth:`repair_torn_tail` removes.
        """
        fd = self._file.fileno()
        try:
            start = os.fstat(fd).st_size
        except OSError as exc:
            raise LedgerError(
                self._next_index, f"cannot write {self.path}: {_os_reason(exc)}", WRITE_FAILED
            ) from None
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                n = os.write(fd, view[done:])
                if n <= 0:
                    raise OSError(errno.EIO, f"short write ({done} of {len(data)} bytes)")
                done += n
            if sync:
                os.fsync(fd)
        except OSError as exc:
            reason = f"cannot write {self.path}: {_os_reason(exc)}"
            undo = self._truncate_back(fd, start)
            if undo is not None:
                self._broken = (
                    f"{reason}; and it could not be truncated back to {start} bytes "
                    f"({undo}): reopen the ledger (Ledger.open / repair_torn_tail)"
                )
                log.error("ledger node=%s: %s", self.node_id, self._broken)
                raise LedgerError(self._next_index, self._broken, WRITE_FAILED) from None
            log.error("ledger node=%s: %s (nothing was written)", self.node_id, reason)
            raise LedgerError(self._next_index, reason, WRITE_FAILED) from None

    def _truncate_back(self, fd: int, size: int) -> str | None:
        """Cut the file back to ``size`` bytes if a failed append grew it; the OS reason if that fails."""
        try:
            if os.fstat(fd).st_size == size:
                return None
            os.ftruncate(fd, size)
            if os.fstat(fd).st_size != size:
                return "the size did not change"
        except OSError as exc:
            return _os_reason(exc)
        try:
            os.fsync(fd)
        except OSError:
            pass  # the truncated size is what later reads see; durability is the next fsync's
        return None

    def append_dp_event(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        clipping_rule: str,
        clipping_norm: float,
        epsilon: float | None = None,
        mechanism: str = MECHANISM_POISSON_GAUSSIAN,
        *,
        purpose: str = PURPOSE_TRAINING,
        sensitivity: float | None = None,
        local_mechanism: str = "gaussian",
        mechanism_params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record ``steps`` Poisson-sampled Gaussian releases; returns the entry.

        ``purpose``: "training" (DP-SGD steps; the only ones :attr:`steps` counts),
        "preprocessing" (a DP estimate of statistics) or "evaluation" (a DP release of
        e.g. an accuracy); all cost ε in the same accountant. A one-shot Gaussian
        release has ``sample_rate`` 1.0 and ``steps`` 1. ``noise_multiplier`` is the
        noise std divided by ``sensitivity``, the L2 sensitivity of the noised sum
        (default ``clipping_norm``; √k for TopAgg). ``local_mechanism`` names what the
        node ran ("gaussian", "topagg", "gaussian_count", "feature_moments", ...) and
        ``mechanism_params`` its public, JSON-safe settings (TopAgg: k, threshold, ...).
        ``epsilon`` is the ε (at the policy's δ, by the policy's accountant) after
        this event as the node computed it; when None the ledger computes it. The
        event is recorded even when it breaks the policy (the ledger tells the truth,
        the budget guard prevents; the audit flags it).
        """
        if self.format == LEDGER_FORMAT_V1:
            raise LedgerError(
                None,
                f"a {LEDGER_FORMAT_V1} ledger records no randomness kind and cannot carry "
                "the whole mechanism of a new dp_event; start a new ledger",
                BAD_HEADER,
            )
        validate_step(noise_multiplier, sample_rate, steps)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not _positive_finite(clipping_norm):
            raise ValueError(f"clipping_norm must be a finite number > 0, got {clipping_norm!r}")
        if mechanism != MECHANISM_POISSON_GAUSSIAN:
            raise ValueError(f"unsupported mechanism {mechanism!r}")
        if purpose not in DP_PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(DP_PURPOSES)}, got {purpose!r}")
        sens = clipping_norm if sensitivity is None else sensitivity
        if not _positive_finite(sens):
            raise ValueError(f"sensitivity must be a finite number > 0, got {sens!r}")
        if not (isinstance(local_mechanism, str) and local_mechanism):
            raise ValueError(f"local_mechanism must be a non-empty name, got {local_mechanism!r}")
        params = (
            {} if mechanism_params is None else json_safe_dict(mechanism_params, "mechanism_params")
        )
        key = DpEventKey(float(noise_multiplier), float(sample_rate))
        events = dict(self._events)
        events[key] = events.get(key, 0) + int(steps)
        if epsilon is None:
            acc = PrivacyAccountant(self.policy.accountant)  # type: ignore[arg-type]
            acc.load_state_dict(_state_of(events, self.policy.accountant))
            epsilon = acc.get_epsilon(self.policy.delta)
        if not math.isfinite(float(epsilon)) or float(epsilon) < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        body = {
            "mechanism": mechanism,
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "clipping_rule": str(clipping_rule),
            "clipping_norm": float(clipping_norm),
            "neighbouring_relation": NEIGHBORING_RELATION,
            "accountant": self.policy.accountant,
            "delta": float(self.policy.delta),
            "epsilon": float(epsilon),
            "purpose": purpose,
            "sensitivity": float(sens),
            "local_mechanism": local_mechanism,
            "mechanism_params": params,
            "randomness": self.randomness,
        }
        entry = self._append("dp_event", body)
        self._events = events
        per = self._by_purpose[purpose]
        per[key] = per.get(key, 0) + int(steps)
        self._last_epsilon = float(epsilon)
        if float(epsilon) > self.policy.target_epsilon:
            log.warning(
                "ledger dp_event beyond budget node=%s epsilon=%.4f target=%g",
                self.node_id,
                float(epsilon),
                self.policy.target_epsilon,
            )
        return entry

    def append_message(
        self,
        peer_id: str,
        seq: int,
        round: int,
        payload: bytes | None = None,
        *,
        digest: str | None = None,
        size: int | None = None,
        digest_algorithm: str = "sha256",
    ) -> dict[str, Any]:
        """Record a message sent to ``peer_id``: its digest and size, never its values.

        Pass the ``payload`` bytes (SHA-256-hashed here, not stored) or a precomputed
        ``digest`` (64 hex) and ``size``; ``digest_algorithm`` names the digest's hash (one
        of :data:`MESSAGE_DIGESTS`) and is the key the body stores it under.
        """
        if digest_algorithm not in MESSAGE_DIGESTS:
            raise ValueError(f"digest_algorithm must be one of {', '.join(MESSAGE_DIGESTS)}, got {digest_algorithm!r}")
        if payload is not None:
            if digest is not None or size is not None:
                raise ValueError("pass either payload or digest and size, not both")
            if digest_algorithm != "sha256":
                raise ValueError("a payload is hashed with SHA-256; pass a precomputed digest for another hash")
            digest = hashlib.sha256(payload).hexdigest()
            size = len(payload)
        if digest is None or size is None:
            raise ValueError("append_message needs payload, or digest and size")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"digest must be 64 lowercase hex characters, got {digest!r}")
        if int(size) < 0 or int(seq) < 0 or int(round) < 0:
            raise ValueError("size, seq and round must be >= 0")
        body = {
            "peer": str(peer_id),
            "seq": int(seq),
            "round": int(round),
            digest_algorithm: digest,
            "bytes": int(size),
        }
        entry = self._append("message", body)
        self._messages += 1
        self._bytes_sent += int(size)
        return entry

    def append_stop(self, reason: str, **details: Any) -> dict[str, Any]:
        """Record that the node stopped training (e.g. ``"budget_exhausted"``)."""
        body = {"reason": str(reason), "epsilon": self._last_epsilon, **details}
        entry = self._append("stop", body)
        self._stopped = True
        log.info("ledger stop node=%s reason=%s", self.node_id, reason)
        return entry

    def append_note(self, note: str, **details: Any) -> dict[str, Any]:
        """Record a free-form note (e.g. a repaired torn tail)."""
        return self._append("note", {"note": str(note), **details})

    # ----- anchoring: heads held by peers (see the module docstring)

    _anchors_book: _AnchorBook | None = None  # built on first use (see _anchor_book)

    @property
    def head(self) -> tuple[int, bytes]:
        """(index, 32-byte SHA-256) of the newest entry: the head a message carries.

        The hash is :func:`entry_hash` of the entry's line, the value the next entry's
        ``prev_hash`` holds, so whoever holds it holds evidence of the whole prefix.
        """
        with self._lock:
            return self._next_index - 1, bytes.fromhex(self._last_hash)

    @property
    def late_anchors_path(self) -> Path:
        """The signed side file of heads received after the close entry."""
        return late_anchors_path(self.path)

    @property
    def ends_with_close(self) -> bool:
        """Whether the newest entry is a close entry (new heads then go to anchors-final)."""
        return self._ends_with_close(self._anchor_book())

    def _ends_with_close(self, book: _AnchorBook) -> bool:
        with self._lock:
            return book.close_head == (self._next_index - 1, self._last_hash)

    def _anchor_book(self) -> _AnchorBook:
        """The anchors held so far (built once from the files, on first use)."""
        book = self._anchors_book
        if book is None:
            with _BOOK_LOCK:
                book = self._anchors_book
                if book is None:
                    book = _AnchorBook.load(self.path, public_key_of_cert(self.certificate))
                    self._anchors_book = book
        return book

    def append_anchor(
        self, peer_id: str, index: int, entry_hash: bytes | str, signature: bytes | str | None = None
    ) -> dict[str, Any] | None:
        """Record a head (``index``, ``entry_hash``) received from ``peer_id``; the entry or None.

        ``signature``: the peer's own 64-byte signature of that head (kept in the body, so the
        node can later show the peer a head it provably sent; the ledger does not check it).

        Recorded only when it advances what this ledger already holds for the peer
        (a lower or equal index is dropped; an equal index with another hash is logged as a
        conflict). While the newest entry is this node's close entry the head goes to
        ``anchors-final.jsonl`` instead (:meth:`append_late_anchor`), never into the chain.
        """
        peer, idx, digest = _check_head(peer_id, index, entry_hash, self.node_id)
        sig = _head_signature_hex(signature)
        book = self._anchor_book()
        with book.lock:
            if not book.advances(peer, idx, digest):
                return None
            if self._ends_with_close(book):
                return self._write_late_anchor(book, peer, idx, digest, sig)
            body: dict[str, Any] = {"peer": peer, "index": idx, "entry_hash": digest}
            if sig:
                body["signature"] = sig
            entry = self._append("anchor", body)
            book.chain[peer] = (idx, digest, sig)
        log.debug("ledger anchor node=%s peer=%s index=%d", self.node_id, peer, idx)
        return entry

    def append_close(self, reason: str = "finished", **details: Any) -> dict[str, Any]:
        """Record the end of a run: the node's last entry, whose head goes out with its goodbye.

        Call it after the last message entry, then send :attr:`head` to every neighbour;
        heads received afterwards are late anchors (see the module docstring).
        """
        book = self._anchor_book()
        body = {"reason": str(reason), "steps": self.steps, "epsilon": self._last_epsilon,
                **details}
        with book.lock:
            entry = self._append("close", body)
            book.close_head = (int(entry["index"]), entry_hash(canonical_bytes(entry)))
        log.info("ledger close node=%s index=%d reason=%s", self.node_id, entry["index"], reason)
        return entry

    def append_late_anchor(
        self, peer_id: str, index: int, entry_hash: bytes | str, signature: bytes | str | None = None
    ) -> dict[str, Any] | None:
        """Record a head received after this node's close entry in ``anchors-final.jsonl``.

        Raises :class:`LedgerError` ``not_closed`` unless the newest entry is a close entry;
        returns None when the head does not advance what is held for the peer.
        """
        peer, idx, digest = _check_head(peer_id, index, entry_hash, self.node_id)
        sig = _head_signature_hex(signature)
        book = self._anchor_book()
        with book.lock:
            if not self._ends_with_close(book):
                raise LedgerError(
                    None,
                    "late anchors follow the node's close entry; the newest entry is not one "
                    "(use append_anchor)",
                    NOT_CLOSED,
                )
            if not book.advances(peer, idx, digest):
                return None
            return self._write_late_anchor(book, peer, idx, digest, sig)

    def _write_late_anchor(
        self, book: _AnchorBook, peer: str, idx: int, digest: str, sig: str = ""
    ) -> dict[str, Any]:
        """Sign and append one late anchor (caller holds ``book.lock``, after a close entry)."""
        assert book.close_head is not None
        if book.late_error is not None and not isinstance(book.late_error, TornTailError):
            raise LedgerError(
                book.late_error.index,
                f"{self.late_anchors_path} does not verify ({book.late_error.reason}); "
                "refusing to extend it",
                book.late_error.kind,
            )
        ci, ch = book.close_head
        body: dict[str, Any] = {"peer": peer, "index": idx, "entry_hash": digest,
                                "after": {"index": ci, "entry_hash": ch}}
        if sig:
            body["signature"] = sig
        entry, line = _make_entry(self._key, book.late_next, LATE_ANCHOR_KIND, body,
                                  book.late_last_hash)
        _append_side_line(self.late_anchors_path, line + b"\n", book.late_good_bytes)
        book.late_error = None
        book.late_next += 1
        book.late_last_hash = entry_hash(line)
        book.late_good_bytes += len(line) + 1
        book.late[peer] = (idx, digest, sig)
        log.info("ledger late anchor node=%s peer=%s index=%d", self.node_id, peer, idx)
        return entry

    def last_anchor(self, peer_id: str) -> tuple[int, bytes] | None:
        """The newest head this node holds for ``peer_id`` (ledger or anchors-final), or None.

        What the node answers to the peer's ``head_query``.
        """
        best = self._anchor_book().best(str(peer_id))
        return None if best is None else (best[0], bytes.fromhex(best[1]))

    def last_anchor_signature(self, peer_id: str) -> bytes:
        """The peer's own signature of the newest head held for it (empty if it came without one)."""
        best = self._anchor_book().best(str(peer_id))
        return b"" if best is None or not best[2] else bytes.fromhex(best[2])

    def last_anchors(self) -> dict[str, tuple[int, bytes]]:
        """peer id → the newest head held for it (ledger or anchors-final)."""
        book = self._anchor_book()
        with book.lock:
            peers = set(book.chain) | set(book.late)
        out = {}
        for p in sorted(peers):
            h = self.last_anchor(p)
            if h is not None:
                out[p] = h
        return out

    # ----- durability

    def sync(self) -> None:
        """Fsync everything appended so far (``write_failed`` if the OS refuses)."""
        with self._lock:
            if not self._file.closed:
                try:
                    os.fsync(self._file.fileno())
                except OSError as exc:
                    raise LedgerError(
                        None, f"cannot fsync {self.path}: {_os_reason(exc)}", WRITE_FAILED
                    ) from None
                self._unsynced = 0

    def close(self) -> None:
        """Fsync and close (idempotent); the file is closed even when the fsync fails,
        which is then raised as ``write_failed``."""
        with self._lock:
            if self._file.closed:
                return
            try:
                os.fsync(self._file.fileno())
                self._unsynced = 0
            except OSError as exc:
                raise LedgerError(
                    None, f"cannot fsync {self.path}: {_os_reason(exc)}", WRITE_FAILED
                ) from None
            finally:
                self._file.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- state

    @property
    def num_entries(self) -> int:
        """Number of entries, header included."""
        return self._next_index

    @property
    def steps(self) -> int:
        """Training steps recorded (purpose "training"): what a node's step budget counts."""
        return sum(self._by_purpose[PURPOSE_TRAINING].values())

    @property
    def randomness(self) -> str:
        """The header's randomness kind: "secure", "seeded", or "unrecorded" (privfl-ledger/1)."""
        return str(self.header["body"].get("randomness", RANDOMNESS_UNRECORDED))

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The header's public description of the site's preprocessing (None: privfl-ledger/1)."""
        prep = self.header["body"].get("preprocessing")
        return dict(prep) if isinstance(prep, dict) else None

    def events_by_purpose(self) -> dict[str, dict[DpEventKey, int]]:
        """Counted DP events per purpose: purpose → (σ, q) → steps (each known purpose present)."""
        return {p: dict(per) for p, per in self._by_purpose.items()}

    @property
    def messages(self) -> int:
        """Number of message entries."""
        return self._messages

    @property
    def bytes_sent(self) -> int:
        """Sum of the recorded message sizes."""
        return self._bytes_sent

    @property
    def stopped(self) -> bool:
        """Whether a stop entry was recorded."""
        return self._stopped

    @property
    def last_epsilon(self) -> float:
        """ε recorded with the last dp_event (0 when none)."""
        return self._last_epsilon

    def accountant_events(self) -> dict[DpEventKey, int]:
        """Counted DP events (σ, q) → steps recorded in the ledger, of every purpose."""
        return dict(self._events)

    def rebuild_accountant(self) -> PrivacyAccountant:
        """A fresh accountant holding every DP event of the ledger, whatever its purpose
        (preprocessing and evaluation cost ε too), by the policy's method."""
        acc = PrivacyAccountant(self.policy.accountant)  # type: ignore[arg-type]
        acc.load_state_dict(_state_of(self._events, self.policy.accountant))
        return acc

    def entries(self) -> Iterator[dict[str, Any]]:
        """Re-read and yield the entries on disk (flushes first; not verified)."""
        self.sync()
        with open(self.path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield json.loads(line)


def _os_reason(exc: OSError) -> str:
    """An OS error in words on one line, e.g. "[Errno 28] No space left on device"."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc).replace("\n", " ") or type(exc).__name__


def _positive_finite(x: Any) -> bool:
    """Whether ``x`` is a real number (not a bool), finite and > 0."""
    return (
        isinstance(x, numbers.Real)
        and not isinstance(x, bool)
        and math.isfinite(float(x))
        and float(x) > 0
    )


def _check_randomness(randomness: Any) -> str:
    """The randomness kind, or ValueError for anything but "secure" / "seeded"."""
    if randomness not in RANDOMNESS_KINDS:
        raise ValueError(
            f"randomness must be one of {', '.join(map(repr, RANDOMNESS_KINDS))}, "
            f"got {randomness!r}"
        )
    return str(randomness)


def _state_of(events: Mapping[DpEventKey, int], method: str) -> dict[str, Any]:
    return {
        "method": method,
        "events": [
            {"noise_multiplier": k.noise_multiplier, "sample_rate": k.sample_rate, "count": c}
            for k, c in events.items()
        ],
    }


def _make_entry(
    key: PrivateKey, index: int, kind: str, body: dict[str, Any], prev_hash: str
) -> tuple[dict[str, Any], bytes]:
    """Build, sign and serialise one entry; returns the entry and its line bytes."""
    entry: dict[str, Any] = {
        "body": body,
        "index": index,
        "kind": kind,
        "prev_hash": prev_hash,
        "timestamp": round(time.time(), 6),
    }
    entry["signature"] = sign_bytes(key, canonical_bytes(entry))
    return entry, canonical_bytes(entry)


def _fsync_dir(path: Path) -> None:
    """Fsync a directory so a new file's name is durable (best effort off POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- anchors


def _hex_digest(entry_hash: bytes | str, what: str) -> str:
    """A head's hash as 64 lowercase hex characters (from 32 raw bytes or hex), or ValueError."""
    if isinstance(entry_hash, (bytes, bytearray, memoryview)):
        raw = bytes(entry_hash)
        if len(raw) != 32:
            raise ValueError(f"{what} must be 32 bytes (SHA-256), got {len(raw)}")
        return raw.hex()
    if isinstance(entry_hash, str) and len(entry_hash) == 64 and _is_hex(entry_hash):
        return entry_hash
    raise ValueError(f"{what} must be 32 bytes or 64 lowercase hex characters, got {entry_hash!r}")


def _check_head(
    peer_id: Any, index: Any, entry_hash: bytes | str, own_id: str
) -> tuple[str, int, str]:
    """(peer, index, hex hash) of a received head, or ValueError."""
    if not (isinstance(peer_id, str) and peer_id):
        raise ValueError(f"peer_id must be a non-empty string, got {peer_id!r}")
    if peer_id == own_id:
        raise ValueError(f"a node does not anchor its own head ({peer_id!r})")
    if not (isinstance(index, numbers.Integral) and not isinstance(index, bool) and int(index) >= 0):
        raise ValueError(f"head index must be an integer >= 0, got {index!r}")
    return peer_id, int(index), _hex_digest(entry_hash, "head entry_hash")


def _head_signature_hex(signature: bytes | str | None) -> str:
    """A peer's head signature as 128 lowercase hex characters ("" for none), or ValueError."""
    if signature is None or len(signature) == 0:
        return ""
    raw = bytes.fromhex(signature) if isinstance(signature, str) and _is_hex(signature) else signature
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != HEAD_SIGNATURE_BYTES:
        raise ValueError(f"head signature must be {HEAD_SIGNATURE_BYTES} bytes or "
                         f"{2 * HEAD_SIGNATURE_BYTES} lowercase hex characters")
    return bytes(raw).hex()


def _is_hex(text: str) -> bool:
    return len(text) % 2 == 0 and all(c in "0123456789abcdef" for c in text)


def anchor_of(body: Mapping[str, Any]) -> tuple[str, int, str]:
    """(peer, index, hex hash) of an ``anchor`` / ``late_anchor`` body, or ValueError."""
    try:
        peer, index, digest = body["peer"], body["index"], body["entry_hash"]
    except (KeyError, TypeError):
        raise ValueError("anchor body lacks peer, index or entry_hash") from None
    if not (isinstance(peer, str) and peer):
        raise ValueError(f"anchor peer must be a non-empty string, got {peer!r}")
    if not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
        raise ValueError(f"anchor index must be an integer >= 0, got {index!r}")
    if not isinstance(digest, str):
        raise ValueError("anchor entry_hash must be 64 lowercase hex characters")
    return peer, index, _hex_digest(digest, "anchor entry_hash")


def _stored_signature(body: Mapping[str, Any]) -> str:
    """The head signature kept in an anchor body ("" when absent or malformed)."""
    try:
        return _head_signature_hex(body.get("signature"))
    except (ValueError, TypeError):
        return ""


def late_anchors_path(ledger_path: str | os.PathLike[str]) -> Path:
    """``anchors-final.jsonl`` next to ``ledger.jsonl`` (``<stem>.anchors-final.jsonl`` for
    a ledger of another name, so two ledgers in one folder never share one)."""
    p = Path(ledger_path)
    if p.name == "ledger.jsonl":
        return p.with_name(ANCHORS_FINAL_FILE)
    return p.with_name(f"{p.stem}.{ANCHORS_FINAL_FILE}")


def verify_late_anchor_bytes(data: bytes, public_key: PublicKey) -> VerifiedLedger:
    """Verify an anchors-final file: each line a ``late_anchor`` entry signed by the node key,
    indices 0, 1, …, and a hash chain from the genesis hash. Stops at the first bad line.

    Whether each ``after`` names a close entry of the node's ledger is the consortium
    audit's check (it needs the ledger).
    """
    result = VerifiedLedger()
    lines, torn = _split_lines(data)
    prev = GENESIS_HASH
    for pos, line in enumerate(lines):
        try:
            entry = _parse_line(pos, line, (LATE_ANCHOR_KIND,))
            if not verify_signature(public_key, entry["signature"], _unsigned_bytes(line, entry)):
                raise LedgerError(
                    pos, "signature does not verify with the node certificate: the line was "
                    "modified or signed by another key", MODIFIED)
            if entry["index"] != pos:
                raise LedgerError(pos, f"line {pos} holds entry {entry['index']}", REORDERED)
            if entry["prev_hash"] != prev:
                raise LedgerError(pos, "prev_hash does not match the previous line", CHAIN_BREAK)
            try:
                anchor_of(entry["body"])
                after = entry["body"]["after"]
                if not isinstance(after, dict) or set(after) != {"index", "entry_hash"}:
                    raise ValueError("after must be {index, entry_hash}")
                anchor_of({"peer": "-", **after})
            except (KeyError, ValueError) as exc:
                raise LedgerError(pos, f"late anchor body: {exc}", MALFORMED) from None
        except LedgerError as exc:
            result.error = exc
            return result
        prev = entry_hash(line)
        result.entries.append(entry)
        result.last_hash = prev
        result.good_bytes += len(line) + 1
    if torn:
        result.error = TornTailError(len(lines), len(torn))
    return result


def read_late_anchors(
    path: str | os.PathLike[str], certificate: x509.Certificate
) -> VerifiedLedger:
    """Read and verify an anchors-final file (a missing file is an empty, valid one)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return VerifiedLedger()
    return verify_late_anchor_bytes(data, public_key_of_cert(certificate))


def ledger_lines(path: str | os.PathLike[str]) -> list[bytes]:
    """The complete lines of a ledger file (without newlines), unverified: what anchors
    are compared with (line i's :func:`entry_hash` is entry i's hash)."""
    lines, _ = _split_lines(Path(path).read_bytes())
    return lines


@dataclass
class _AnchorBook:
    """A ledger's anchors: newest head per peer in the chain and in anchors-final."""

    lock: threading.Lock
    late_path: Path
    # peer → (index, hex entry hash, hex head signature or ""), newest in the chain / in anchors-final
    chain: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    late: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    close_head: tuple[int, str] | None = None  # the newest close entry (index, hex hash)
    late_next: int = 0
    late_last_hash: str = GENESIS_HASH
    late_good_bytes: int = 0
    late_error: LedgerError | None = None

    @classmethod
    def load(cls, ledger_path: Path, public_key: PublicKey) -> _AnchorBook:
        """Scan the (already verified) ledger file and the anchors-final file beside it."""
        book = cls(threading.Lock(), late_anchors_path(ledger_path))
        for line in ledger_lines(ledger_path):
            if b'"kind":"anchor"' not in line and b'"kind":"close"' not in line:
                continue
            entry = json.loads(line)
            if entry["kind"] == "anchor":
                try:
                    peer, idx, digest = anchor_of(entry["body"])
                except ValueError:
                    continue
                if peer not in book.chain or idx > book.chain[peer][0]:
                    book.chain[peer] = (idx, digest, _stored_signature(entry["body"]))
            elif entry["kind"] == "close":
                book.close_head = (int(entry["index"]), entry_hash(line))
        try:
            data = book.late_path.read_bytes()
        except FileNotFoundError:
            return book
        verified = verify_late_anchor_bytes(data, public_key)
        for e in verified.entries:
            peer, idx, digest = anchor_of(e["body"])
            if peer not in book.late or idx > book.late[peer][0]:
                book.late[peer] = (idx, digest, _stored_signature(e["body"]))
        book.late_next = len(verified.entries)
        book.late_last_hash = verified.last_hash
        book.late_good_bytes = verified.good_bytes
        book.late_error = verified.error
        if verified.error is not None:
            log.warning("ledger anchors-final %s: %s", book.late_path, verified.error)
        return book

    def best(self, peer: str) -> tuple[int, str, str] | None:
        """The newest head held for ``peer`` (chain or late)."""
        heads = [h for h in (self.chain.get(peer), self.late.get(peer)) if h is not None]
        return max(heads, key=lambda h: h[0]) if heads else None

    def advances(self, peer: str, idx: int, digest: str) -> bool:
        """Whether (idx, digest) is newer than what is held for ``peer`` (logs a conflict)."""
        prev = self.best(peer)
        if prev is None or idx > prev[0]:
            return True
        if idx == prev[0] and digest != prev[1]:
            log.warning(
                "ledger anchor conflict peer=%s index=%d held=%s received=%s: the peer's ledger "
                "forked", peer, idx, prev[1][:16], digest[:16])
        return False


_BOOK_LOCK = threading.Lock()


def _append_side_line(path: Path, data: bytes, good_bytes: int) -> None:
    """Append ``data`` to ``path`` (created if missing) and fsync; on failure cut the file
    back and raise :class:`LedgerError` ``write_failed``. A torn tail past ``good_bytes``
    (a crash mid-append) is cut first."""
    created = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(None, f"cannot open {path}: {exc}", "write_failed") from None
    try:
        size = os.fstat(fd).st_size
        if size > good_bytes:
            os.ftruncate(fd, good_bytes)
            log.warning("ledger anchors-final %s: cut a torn tail of %d bytes", path,
                        size - good_bytes)
        start = good_bytes
        try:
            done = 0
            while done < len(data):
                n = os.write(fd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise LedgerError(None, f"cannot write {path}: {exc}", "write_failed") from None
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def certificate_node_id(cert: x509.Certificate) -> str:
    """The node id a certificate identifies: its single ``privfl://<consortium>/<node>`` URI
    SAN, else its subject common name (ValueError if it names none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith("privfl://")]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) == 1:
        _, sep, node = uris[0][len("privfl://"):].partition("/")
        if sep and node and "/" not in node:
            return node
    return default_node_id(cert)


def check_against_peers(
    ledger: Ledger, heads: Mapping[str, tuple[int, bytes | str] | None]
) -> str | None:
    """None when the ledger holds every head its peers hold for it, else one line naming the
    peer and the entry: the ledger is behind (shorter: truncated or rolled back) or differs
    (rewritten, or rolled back and restarted). ``heads``: peer id → what that peer answered
    to ``head_query`` (None: it holds nothing). A node must refuse to train on a reason.
    """
    lines = ledger_lines(ledger.path)
    n = len(lines)
    for peer in sorted(heads):
        head = heads[peer]
        if head is None:
            continue
        try:
            idx, digest = int(head[0]), _hex_digest(head[1], "head entry_hash")
            if idx < 0:
                raise ValueError(f"head index must be >= 0, got {idx}")
        except (TypeError, ValueError, IndexError) as exc:
            return f"peer {peer} answered a malformed head for this node ({exc}); refusing to train"
        if idx >= n:
            return (
                f"ledger {ledger.path} is behind peer {peer}: it holds this node's entry {idx} "
                f"but the ledger ends at entry {n - 1} (truncated or rolled back); refusing to train"
            )
        have = entry_hash(lines[idx])
        if have != digest:
            return (
                f"ledger {ledger.path} differs from the head peer {peer} holds at entry {idx} "
                f"(peer {digest[:16]}…, ledger {have[:16]}…): rewritten or rolled back and "
                "restarted; refusing to train"
            )
    return None


def check_checkpoint_steps(ledger: Ledger, checkpoint_steps: int) -> str | None:
    """None unless a checkpoint says it saw more training steps than the ledger records
    (a ledger cut short or rolled back under a newer checkpoint); then one line naming both."""
    if int(checkpoint_steps) > ledger.steps:
        return (
            f"the checkpoint was saved after {int(checkpoint_steps)} training steps but ledger "
            f"{ledger.path} records only {ledger.steps}: the ledger was cut short or rolled "
            "back; refusing to train"
        )
    return None
