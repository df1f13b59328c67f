"""Consortium PKI: a private CA, per-node ECDSA P-256 certificates, a CRL and the roster.

Why: every gossip peer is authenticated by mutual TLS; a peer's identity is the node id
in its certificate, accepted only when the certificate chains to the consortium CA, is
within its validity period, is not on the CA-signed revocation list and its SHA-256
fingerprint equals the one pinned in the roster.

Layout of a PKI directory (``init_consortium``)::

    <pki>/ca.pem          consortium CA certificate (public)
    <pki>/ca.key          CA private key, 0600 -- stays with the operator
    <pki>/crl.pem         X.509 CRL signed by the CA (revoked certificate serials)
    <pki>/roster.toml     consortium name, nodes (id, address, fingerprint), [policy]
    <pki>/<node>/node.pem node certificate
    <pki>/<node>/node.key node private key, 0600 -- copied to that node only
    <pki>/<node>/ca.pem   copy of the CA certificate for the node's trust store

Node ids and the consortium name are DNS labels (lowercase letters, digits, '-'),
because each certificate carries the DNS SAN ``<node>.<consortium>.privfl`` that
clients pin through ``grpc.ssl_target_name_override`` (server identity check), next to
the URI SAN ``privfl://<consortium>/<node>`` that names the node, ``localhost`` and
``127.0.0.1``. ECDSA P-256 is used because gRPC's TLS refuses Ed25519 leaf certificates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privfl.errors import PrivflError

log = logging.getLogger("privfl.pki")

URI_SCHEME = "privfl"
DNS_SUFFIX = "privfl"
DEFAULT_BASE_PORT = 50051
DEFAULT_DAYS = 365
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
ROSTER_FILE = "roster.toml"
NODE_CERT_FILE = "node.pem"
NODE_KEY_FILE = "node.key"

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


class PKIError(PrivflError):
    """A certificate, key, CRL or roster is invalid or refused; the message says why."""


# --------------------------------------------------------------------------- roster


@dataclass(frozen=True)
class RosterNode:
    """One consortium member: its id, gRPC address and pinned certificate fingerprint."""

    node_id: str
    address: str
    fingerprint: str


@dataclass(frozen=True)
class Policy:
    """Consortium-wide privacy policy that nodes may enforce (all fields optional)."""

    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    delta: float | None = None


@dataclass(frozen=True)
class Roster:
    """The consortium's membership list, loaded from ``roster.toml``."""

    consortium: str
    nodes: dict[str, RosterNode]
    policy: Policy = field(default_factory=Policy)

    @property
    def pins(self) -> dict[str, str]:
        """node id → pinned certificate fingerprint (what an audit checks each ledger's certificate against)."""
        return {nid: n.fingerprint for nid, n in self.nodes.items()}

    def address_of(self, node_id: str) -> str:
        """The address of ``node_id``; PKIError if it is not a member."""
        try:
            return self.nodes[node_id].address
        except KeyError:
            raise PKIError(f"node {node_id!r} is not in the roster of {self.consortium!r}") from None


def validate_label(value: str, what: str) -> str:
    """Check that ``value`` is a DNS label usable as a node id / consortium name."""
    if not isinstance(value, str) or not _LABEL.match(value):
        raise PKIError(
            f"{what} {value!r} is invalid: use 1-63 lowercase letters, digits or '-' "
            "(not at either end)"
        )
    return value


def _check_address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PKIError(f"{where}: expected a 'host:port' string, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PKIError(f"{where}: expected 'host:port' with a port in 1..65535, got {value!r}")
    return value


def load_roster(path: str | os.PathLike[str]) -> Roster:
    """Read and validate a roster TOML file; errors name the file and the field."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PKIError(f"{p}: roster file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PKIError(f"{p}: cannot parse roster: {exc}") from None
    consortium = raw.get("consortium")
    if consortium is None:
        raise PKIError(f"{p}: missing field 'consortium'")
    try:
        validate_label(consortium, "consortium")
    except PKIError as exc:
        raise PKIError(f"{p}: field 'consortium': {exc}") from None
    entries = raw.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise PKIError(f"{p}: field 'nodes' must be a non-empty array of tables ([[nodes]])")
    nodes: dict[str, RosterNode] = {}
    for i, entry in enumerate(entries):
        where = f"{p}: nodes[{i}]"
        if not isinstance(entry, dict):
            raise PKIError(f"{where}: expected a table")
        for key in ("id", "address", "fingerprint"):
            if key not in entry:
                raise PKIError(f"{where}: missing field '{key}'")
        try:
            node_id = validate_label(entry["id"], "node id")
        except PKIError as exc:
            raise PKIError(f"{where}.id: {exc}") from None
        if node_id in nodes:
            raise PKIError(f"{where}.id: duplicate node id {node_id!r}")
        address = _check_address(entry["address"], f"{where}.address")
        fp = entry["fingerprint"]
        if not isinstance(fp, str) or not _FINGERPRINT.match(fp):
            raise PKIError(f"{where}.fingerprint: expected 'sha256:<64 hex digits>', got {fp!r}")
        nodes[node_id] = RosterNode(node_id, address, fp)
    policy = _load_policy(raw.get("policy", {}), p)
    return Roster(consortium=consortium, nodes=nodes, policy=policy)


def _load_policy(raw: Any, p: Path) -> Policy:
    if not isinstance(raw, dict):
        raise PKIError(f"{p}: field 'policy' must be a table")
    unknown = set(raw) - {"min_noise_multiplier", "max_epsilon", "delta"}
    if unknown:
        raise PKIError(f"{p}: policy.{sorted(unknown)[0]}: unknown field")
    values: dict[str, float | None] = {}
    for key in ("min_noise_multiplier", "max_epsilon", "delta"):
        v = raw.get(key)
        if v is None:
            values[key] = None
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise PKIError(f"{p}: policy.{key}: expected a positive number, got {v!r}")
        if key == "delta" and not v < 1:
            raise PKIError(f"{p}: policy.delta: expected 0 < delta < 1, got {v!r}")
        values[key] = float(v)
    return Policy(**values)


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string with ASCII escapes is a valid TOML basic string


def dump_roster(roster: Roster, path: str | os.PathLike[str]) -> None:
    """Write ``roster`` as TOML (atomically: temp file then rename)."""
    lines = [f"consortium = {_toml_str(roster.consortium)}", ""]
    pol = {k: v for k, v in vars(roster.policy).items() if v is not None}
    if pol:
        lines.append("[policy]")
        lines += [f"{k} = {v!r}" for k, v in pol.items()]
        lines.append("")
    for node in roster.nodes.values():
        lines += [
            "[[nodes]]",
            f"id = {_toml_str(node.node_id)}",
            f"address = {_toml_str(node.address)}",
            f"fingerprint = {_toml_str(node.fingerprint)}",
            "",
        ]
    _write_atomic(Path(path), "\n".join(lines).encode("utf-8"), mode=0o644)


# --------------------------------------------------------------------------- helpers


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_certificate(data: bytes | str | x509.Certificate) -> x509.Certificate:
    """Parse a PEM certificate (bytes/str) or pass a Certificate through."""
    if isinstance(data, x509.Certificate):
        return data
    try:
        return x509.load_pem_x509_certificate(data.encode() if isinstance(data, str) else data)
    except ValueError as exc:
        raise PKIError(f"malformed certificate: {exc}") from None


def load_private_key(data: bytes | str | ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    """Parse a PEM ECDSA P-256 private key (bytes/str) or pass a key object through."""
    if isinstance(data, ec.EllipticCurvePrivateKey):
        return data
    try:
        key = serialization.load_pem_private_key(
            data.encode() if isinstance(data, str) else data, password=None
        )
    except (ValueError, TypeError) as exc:
        raise PKIError(f"malformed private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PKIError("private key is not an ECDSA P-256 key")
    return key


def load_crl(data: bytes | str | x509.CertificateRevocationList) -> x509.CertificateRevocationList:
    """Parse a PEM CRL or pass a CRL object through."""
    if isinstance(data, x509.CertificateRevocationList):
        return data
    try:
        return x509.load_pem_x509_crl(data.encode() if isinstance(data, str) else data)
    except ValueError as exc:
        raise PKIError(f"malformed CRL: {exc}") from None


def fingerprint(cert: bytes | str | x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding (what the roster pins)."""
    der = load_certificate(cert).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def node_uri(consortium: str, node_id: str) -> str:
    """The URI SAN naming ``node_id`` in ``consortium``."""
    return f"{URI_SCHEME}://{consortium}/{node_id}"


def node_dns_name(consortium: str, node_id: str) -> str:
    """The per-node DNS SAN a client pins with ``grpc.ssl_target_name_override``."""
    return f"{node_id}.{consortium}.{DNS_SUFFIX}"


def node_identity_of(cert: bytes | str | x509.Certificate) -> tuple[str, str]:
    """(consortium, node id) from the certificate's ``privfl://`` URI SAN."""
    c = load_certificate(cert)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate has no subjectAltName, so no node id") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{URI_SCHEME}://")]
    if len(uris) != 1:
        raise PKIError(f"certificate must carry exactly one {URI_SCHEME}:// URI SAN, has {len(uris)}")
    rest = uris[0][len(URI_SCHEME) + 3:]
    consortium, sep, node_id = rest.partition("/")
    if not sep or not _LABEL.match(consortium) or not _LABEL.match(node_id):
        raise PKIError(f"certificate URI SAN {uris[0]!r} is not privfl://<consortium>/<node>")
    return consortium, node_id


def node_id_from_cert(cert: bytes | str | x509.Certificate) -> str:
    """The node id named by the certificate's ``privfl://<consortium>/<node>`` URI SAN."""
    return node_identity_of(cert)[1]


# --------------------------------------------------------------------------- issuing


def make_ca(consortium: str, days: int = DEFAULT_DAYS,
            not_before: dt.datetime | None = None,
            not_after: dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed consortium CA (BasicConstraints ca=True, keyCertSign + cRLSign)."""
    validate_label(consortium, "consortium")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} privfl CA"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_node_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                   consortium: str, node_id: str, days: int = DEFAULT_DAYS,
                   not_before: dt.datetime | None = None,
                   not_after: dt.datetime | None = None,
                   key: ec.EllipticCurvePrivateKey | None = None,
                   ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A node certificate signed by the CA: ECDSA P-256, node-id SANs, EKU server+client auth.

    ``not_before``/``not_after`` override the validity window (e.g. an expired cert in tests).
    """
    validate_label(consortium, "consortium")
    validate_label(node_id, "node id")
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    if end <= start:
        raise PKIError(f"node {node_id}: not_after must be after not_before")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        ]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(node_uri(consortium, node_id)),
            x509.DNSName(node_dns_name(consortium, node_id)),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
             revoked: dict[int, dt.datetime] | None = None,
             days: int = DEFAULT_DAYS) -> x509.CertificateRevocationList:
    """A CRL signed by the CA listing ``revoked`` serial -> revocation time."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    for serial, when in sorted((revoked or {}).items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class NodeIdentity:
    """What a node needs to speak mTLS: its id, its cert + key (PEM) and the CA cert (PEM)."""

    node_id: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, node_dir: str | os.PathLike[str], ca_pem_path: str | os.PathLike[str] | None = None
             ) -> NodeIdentity:
        """Load ``node.pem``, ``node.key`` and ``ca.pem`` from a node folder made by ``init``."""
        d = Path(node_dir)
        try:
            cert_pem = (d / NODE_CERT_FILE).read_bytes()
            key_pem = (d / NODE_KEY_FILE).read_bytes()
            ca_pem = Path(ca_pem_path or d / CA_FILE).read_bytes()
        except OSError as exc:
            raise PKIError(f"{d}: cannot read node identity: {exc}") from None
        load_private_key(key_pem)
        return cls(node_id_from_cert(cert_pem), cert_pem, key_pem, ca_pem)


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_pem = (pki_dir / CA_FILE).read_bytes()
        ca_key_pem = (pki_dir / CA_KEY_FILE).read_bytes()
    except OSError as exc:
        raise PKIError(f"{pki_dir}: cannot read the CA ({CA_FILE}, {CA_KEY_FILE}): {exc}") from None
    return load_certificate(ca_pem), load_private_key(ca_key_pem)


def _write_node(pki_dir: Path, ca_cert: x509.Certificate, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey, node_id: str) -> None:
    node_dir = pki_dir / node_id
    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    _write_atomic(node_dir / NODE_KEY_FILE, _key_pem(key), mode=0o600)
    _write_atomic(node_dir / NODE_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomic(node_dir / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _parse_node_ids(node_ids: list[str] | tuple[str, ...]) -> list[str]:
    ids = [validate_label(n, "node id") for n in node_ids]
    if not ids:
        raise PKIError("nodes: at least one node id is required")
    dup = {n for n in ids if ids.count(n) > 1}
    if dup:
        raise PKIError(f"nodes: duplicate node id {sorted(dup)[0]!r}")
    return ids


def init_consortium(consortium: str, node_ids: list[str] | tuple[str, ...],
                    out_dir: str | os.PathLike[str],
                    addresses: dict[str, str] | None = None,
                    base_port: int = DEFAULT_BASE_PORT, days: int = DEFAULT_DAYS,
                    policy: Policy | None = None) -> Roster:
    """Create the CA, one key + certificate per node, an empty CRL and the roster.

    Addresses default to ``127.0.0.1:<base_port + i>``. Refuses to overwrite an existing CA.
    """
    validate_label(consortium, "consortium")
    ids = _parse_node_ids(node_ids)
    if days <= 0:
        raise PKIError(f"days: expected a positive number of days, got {days}")
    out = Path(out_dir)
    if (out / CA_KEY_FILE).exists():
        raise PKIError(f"{out / CA_KEY_FILE}: a CA already exists here; refusing to overwrite it")
    addresses = dict(addresses or {})
    unknown = set(addresses) - set(ids)
    if unknown:
        raise PKIError(f"addresses: node {sorted(unknown)[0]!r} is not among the nodes")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(consortium, days=days)
    _write_atomic(out / CA_KEY_FILE, _key_pem(ca_key), mode=0o600)
    _write_atomic(out / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomic(out / CRL_FILE, make_crl(ca_cert, ca_key, days=days).public_bytes(
        serialization.Encoding.PEM), 0o644)
    nodes: dict[str, RosterNode] = {}
    for i, node_id in enumerate(ids):
        address = _check_address(addresses.get(node_id, f"127.0.0.1:{base_port + i}"),
                                 f"addresses[{node_id}]")
        cert, key = make_node_cert(ca_cert, ca_key, consortium, node_id, days=days)
        _write_node(out, ca_cert, cert, key, node_id)
        nodes[node_id] = RosterNode(node_id, address, fingerprint(cert))
    roster = Roster(consortium, nodes, policy or Policy())
    dump_roster(roster, out / ROSTER_FILE)
    log.info("pki: consortium %s created in %s with nodes %s", consortium, out, ",".join(ids))
    return roster


def _read_crl_file(pki_dir: Path) -> x509.CertificateRevocationList:
    try:
        return load_crl((pki_dir / CRL_FILE).read_bytes())
    except OSError as exc:
        raise PKIError(f"{pki_dir / CRL_FILE}: cannot read CRL: {exc}") from None


def _revoke_serials(pki_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                    serials: list[int], days: int = DEFAULT_DAYS) -> None:
    crl = _read_crl_file(pki_dir)
    revoked = {r.serial_number: r.revocation_date_utc for r in crl}
    for s in serials:
        revoked.setdefault(s, _now())
    new = make_crl(ca_cert, ca_key, revoked, days=days)
    _write_atomic(pki_dir / CRL_FILE, new.public_bytes(serialization.Encoding.PEM), 0o644)


def issue_node(pki_dir: str | os.PathLike[str], node_id: str, address: str,
               days: int = DEFAULT_DAYS) -> RosterNode:
    """Issue (or re-issue) a node certificate and add/update its roster entry.

    Re-issuing an existing node revokes its previous certificate in the CRL.
    """
    d = Path(pki_dir)
    validate_label(node_id, "node id")
    _check_address(address, "address")
    ca_cert, ca_key = _load_ca(d)
    roster = load_roster(d / ROSTER_FILE)
    old_pem = d / node_id / NODE_CERT_FILE
    if node_id in roster.nodes and old_pem.exists():
        _revoke_serials(d, ca_cert, ca_key, [load_certificate(old_pem.read_bytes()).serial_number])
        log.info("pki: previous certificate of node %s revoked on re-issue", node_id)
    cert, key = make_node_cert(ca_cert, ca_key, roster.consortium, node_id, days=days)
    _write_node(d, ca_cert, cert, key, node_id)
    entry = RosterNode(node_id, address, fingerprint(cert))
    nodes = dict(roster.nodes)
    nodes[node_id] = entry
    dump_roster(Roster(roster.consortium, nodes, roster.policy), d / ROSTER_FILE)
    log.info("pki: node %s issued at %s (%s)", node_id, address, entry.fingerprint)
    return entry


def revoke_node(pki_dir: str | os.PathLike[str], node_id: str) -> int:
    """Add the node's current certificate serial to the CA-signed CRL; returns the serial.

    The roster entry is kept (so ``show`` can display it as revoked); the CRL is authoritative.
    """
    d = Path(pki_dir)
    ca_cert, ca_key = _load_ca(d)
    roster = load_roster(d / ROSTER_FILE)
    if node_id not in roster.nodes:
        raise PKIError(f"node {node_id!r} is not in the roster of {roster.consortium!r}")
    try:
        serial = load_certificate((d / node_id / NODE_CERT_FILE).read_bytes()).serial_number
    except OSError as exc:
        raise PKIError(f"node {node_id}: cannot read its certificate: {exc}") from None
    _revoke_serials(d, ca_cert, ca_key, [serial])
    log.info("pki: node %s revoked (serial %x)", node_id, serial)
    return serial


def revoked_serials(crl: bytes | str | x509.CertificateRevocationList) -> set[int]:
    """Serial numbers listed in a CRL."""
    return {r.serial_number for r in load_crl(crl)}


# --------------------------------------------------------------------------- verification


def verify_crl(crl: bytes | str | x509.CertificateRevocationList,
               ca: bytes | str | x509.Certificate, now: dt.datetime | None = None
               ) -> x509.CertificateRevocationList:
    """Check that the CRL is signed by the CA and not past its next update (fail closed)."""
    c = load_crl(crl)
    ca_cert = load_certificate(ca)
    if c.issuer != ca_cert.subject or not c.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PKIError("CRL is not signed by the consortium CA")
    now = now or _now()
    nxt = c.next_update_utc
    if nxt is not None and now > nxt:
        raise PKIError(f"CRL expired at {nxt.isoformat()}; re-sign it with `privfl pki revoke`")
    return c


def verify_node_certificate(cert_pem: bytes | str | x509.Certificate,
                            ca_pem: bytes | str | x509.Certificate,
                            roster: Roster,
                            crl: bytes | str | x509.CertificateRevocationList | None,
                            now: dt.datetime | None = None) -> str:
    """Return the node id of a peer certificate, or raise PKIError with the precise reason.

    Checks, in order: issued by the consortium CA, within validity, CRL (signed by the CA)
    does not list it, node id from the URI SAN, same consortium, in the roster, and its
    fingerprint equals the roster's pin.
    """
    now = now or _now()
    cert = load_certificate(cert_pem)
    ca = load_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError("certificate is not issued by the consortium CA (unknown CA)") from None
    if now < cert.not_valid_before_utc:
        raise PKIError(f"certificate not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise PKIError(f"certificate expired at {cert.not_valid_after_utc.isoformat()}")
    if crl is None:
        raise PKIError("no revocation list given; refusing (fail closed)")
    crl_obj = verify_crl(crl, ca, now)
    consortium, node_id = node_identity_of(cert)
    if crl_obj.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise PKIError(f"certificate of node {node_id} (serial {cert.serial_number:x}) is revoked")
    if consortium != roster.consortium:
        raise PKIError(f"certificate names consortium {consortium!r}, roster is {roster.consortium!r}")
    entry = roster.nodes.get(node_id)
    if entry is None:
        raise PKIError(f"node {node_id} is not in the roster")
    fp = fingerprint(cert)
    if fp != entry.fingerprint:
        raise PKIError(f"node {node_id}: certificate fingerprint {fp} does not match the roster "
                       f"pin {entry.fingerprint}")
    return node_id


# --------------------------------------------------------------------------- signatures


def sign_bytes(key: bytes | str | ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of ``data`` with a node key (for the ledger)."""
    return load_private_key(key).sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert: bytes | str | x509.Certificate, data: bytes, sig: bytes) -> None:
    """Check an ECDSA P-256 / SHA-256 signature made by the certificate's key; PKIError if bad."""
    pub = load_certificate(cert).public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PKIError("certificate key is not an ECDSA key")
    try:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PKIError("signature does not verify with the certificate's key") from None


def load_pki(pki_dir: str | os.PathLike[str]) -> tuple[bytes, Roster, bytes]:
    """(CA PEM, roster, CRL PEM) of a PKI directory -- what a node's trust decisions need."""
    d = Path(pki_dir)
    try:
        ca_pem = (d / CA_FILE).read_bytes()
        crl_pem = (d / CRL_FILE).read_bytes()
    except OSError as exc:
        raise PKIError(f"{d}: cannot read CA or CRL: {exc}") from None
    return ca_pem, load_roster(d / ROSTER_FILE), crl_pem


__all__ = [
    "NodeIdentity", "PKIError", "Policy", "Roster", "RosterNode",
    "dump_roster", "fingerprint", "init_consortium", "issue_node", "load_certificate",
    "load_crl", "load_pki", "load_private_key", "load_roster", "make_ca", "make_crl",
    "make_node_cert", "node_dns_name", "node_id_from_cert", "node_identity_of", "node_uri",
    "revoke_node", "revoked_serials", "sign_bytes", "validate_label", "verify_crl",
    "verify_node_certificate", "verify_signature",
]
