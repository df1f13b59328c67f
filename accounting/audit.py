"""Independent audit of a node's privacy ledger.

:func:`audit_ledger` checks that the node certificate in the header chains to the
consortium CA and was valid when each entry was written, every signature, the hash
chain and the index sequence (naming the first bad entry and the kind of problem),
that the noise was drawn from secure randomness (a seeded ledger fails unless the
caller allows it, for simulations and tests: anyone who knows a seed can recompute the
noise and subtract it), that every DP event obeys the header's policy, and recomputes ε
from every dp_event entry — training, preprocessing and evaluation alike —
with dp-accounting directly (``RdpAccountant`` and ``PLDAccountant`` on
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``, composed once per distinct (σ, q)
with the summed step count) — not with privfl's own accountant, so a bug there cannot
hide here. ε over time (RDP, after every dp_event) is computed incrementally: the
per-step RDP curve of each distinct (σ, q) is taken once from ``RdpAccountant`` and
the running sum is converted with dp-accounting's improved RDP→(ε, δ) bound.

The node id is the one the certificate names (its ``privfl://`` URI SAN, else its CN);
the header must name the same, and with ``roster`` the certificate must be the roster's
pin for that id. What one ledger cannot show: that it is complete and the node's only
history. Whoever holds the node key can cut it short or re-sign a rewritten one, and it
still verifies; only the heads its peers hold catch that
(:func:`accounting.audit_consortium.audit_consortium`, ``privfl audit --consortium``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import dp_accounting
import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privfl.accounting.ledger import (
    DP_PURPOSES,
    LEDGER_FORMAT_V1,
    MECHANISM_POISSON_GAUSSIAN,
    MESSAGE_DIGESTS,
    PURPOSE_TRAINING,
    RANDOMNESS_SECURE,
    RANDOMNESS_SEEDED,
    RANDOMNESS_UNRECORDED,
    TORN_TAIL,
    LedgerPolicy,
    PublicKey,
    anchor_of,
    cert_node_ids,
    certificate_node_id,
    public_key_of_cert,
    purpose_of,
    read_ledger,
)

log = logging.getLogger("privfl.audit")

PLD_DISCRETIZATION = 1e-4
# A recomputed ε may differ from the node's by float noise; beyond these it is a finding.
BUDGET_TOLERANCE = 1e-9
CLAIM_RTOL = {"rdp": 1e-6, "pld": 1e-4}

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

# Issue kinds of the randomness check.
SEEDED_NOISE = "seeded_noise"
UNRECORDED_RANDOMNESS = "unrecorded_randomness"
RANDOMNESS_MISMATCH = "randomness_mismatch"

# What a single-ledger audit cannot see (in every report and the CLI output).
SINGLE_LEDGER_NOTE = (
    "a single ledger cannot prove it is complete: truncation, a rollback or an insider's "
    "re-signed rewrite is only caught by `privfl audit --consortium` (the heads its peers hold)"
)


class ConsortiumPolicy(Protocol):
    """The consortium's floor on every node's privacy (the roster's ``[policy]``; any field None).

    ``privfl.pki.Policy`` is one. A ledger's own header cannot be trusted for this: whoever
    holds the node key can write a header with a higher target ε and re-sign the ledger.
    """

    @property
    def max_epsilon(self) -> float | None: ...

    @property
    def min_noise_multiplier(self) -> float | None: ...

    @property
    def delta(self) -> float | None: ...


@dataclass
class AuditIssue:
    """One finding: the entry index (None when not one entry's), its kind, in words."""

    index: int | None
    kind: str
    message: str


@dataclass
class EpsilonPoint:
    """ε after one dp_event: recomputed (RDP) and as the node recorded it.

    ``steps`` is the running count of every accounted step (all purposes). ``epsilon_pld``
    (recomputed) is set on the last point only when PLD was computed: one PLD composition
    takes seconds, so it is not recomputed after every event; for a PLD ledger the RDP
    curve is an upper bound and the recorded ε are the node's PLD values.
    """

    index: int
    timestamp: float
    steps: int
    epsilon_rdp: float
    epsilon_claimed: float | None
    purpose: str = PURPOSE_TRAINING
    epsilon_pld: float | None = None


@dataclass
class AuditReport:
    """Everything :func:`audit_ledger` found; ``ok`` only when every check passed.

    ``randomness`` is the header's kind ("secure", "seeded", or "unrecorded" for a
    privfl-ledger/1 header); ``randomness_allowed`` is True when a non-secure kind
    passed only because the caller gave ``allow_seeded``. ``epsilon_pld`` is None when
    PLD was not computed. ``by_purpose``: purpose → {"events", "steps"}.
    ``certificate_node_id`` is the node the certificate names (``node_id`` is the
    header's; they must agree); ``notes`` say what this audit cannot see.
    """

    path: str
    ok: bool = False
    node_id: str | None = None
    certificate_node_id: str | None = None
    software_version: str | None = None
    format: str | None = None
    randomness: str | None = None
    randomness_allowed: bool = False
    preprocessing: dict[str, Any] | None = None
    entries_verified: int = 0
    first_bad_index: int | None = None
    issues: list[AuditIssue] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    certificate: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    epsilon_rdp: float = 0.0
    epsilon_pld: float | None = None
    epsilon: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[EpsilonPoint] = field(default_factory=list)
    over_budget: list[int] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    by_purpose: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=lambda: [SINGLE_LEDGER_NOTE])

    @property
    def randomness_label(self) -> str:
        """The randomness kind in words, e.g. "secure" or "seeded (allowed)"."""
        kind = self.randomness or RANDOMNESS_UNRECORDED
        return f"{kind} (allowed)" if self.randomness_allowed else kind

    @property
    def first_issue(self) -> AuditIssue | None:
        """The integrity issue at the first bad entry, else the first issue, else None."""
        for i in self.issues:
            if self.first_bad_index is not None and i.index == self.first_bad_index:
                return i
        return self.issues[0] if self.issues else None

    @property
    def scope(self) -> str:
        """What the ε and totals cover: the whole ledger, or the verified prefix before a break."""
        if self.first_bad_index is None:
            return "the whole ledger"
        if self.entries_verified == 0:
            return "no entry (nothing verifies)"
        return (f"only entries 0..{self.entries_verified - 1}, the verified prefix "
                f"(the ledger breaks at entry {self.first_bad_index})")

    @property
    def reason(self) -> str | None:
        """Why the audit failed, in one line (None when it passed)."""
        if self.ok:
            return None
        first = self.first_issue
        if first is None:
            failed = [k for k, v in self.checks.items() if v not in (PASS, SKIPPED)]
            return f"check {', '.join(failed) or 'integrity'} failed"
        where = "" if first.index is None else f" at entry {first.index}"
        more = len(self.issues) - 1
        return f"{first.kind}{where}: {first.message}" + (f" (and {more} more)" if more else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report (with its ``scope`` and one-line ``reason``)."""
        d = asdict(self)
        d["first_issue"] = asdict(self.first_issue) if self.first_issue else None
        d["scope"] = self.scope
        d["reason"] = self.reason
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (infinite ε written as the string "inf")."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- ε from events


def _relation() -> Any:
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def dp_event_of(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)`` for dp-accounting."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(sample_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        ),
        int(steps),
    )


def epsilon_rdp_of(groups: Mapping[tuple[float, float], int], delta: float) -> float:
    """ε at δ by ``RdpAccountant``, composing each (σ, q) once with its summed count."""
    if not any(groups.values()):
        return 0.0
    acc = RdpAccountant(neighboring_relation=_relation())
    for (sigma, q), count in groups.items():
        if count:
            acc.compose(dp_event_of(sigma, q, count))
    return float(acc.get_epsilon(delta))


def epsilon_pld_of(groups: Mapping[tuple[float, float], int], delta: float) -> float:
    """ε at δ by ``PLDAccountant`` (discretisation 1e-4), each (σ, q) composed once."""
    if not any(groups.values()):
        return 0.0
    acc = PLDAccountant(
        neighboring_relation=_relation(), value_discretization_interval=PLD_DISCRETIZATION
    )
    for (sigma, q), count in groups.items():
        if count:
            acc.compose(dp_event_of(sigma, q, count))
    return float(acc.get_epsilon(delta))


def epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """dp-accounting's ``compute_epsilon`` (improved conversion), vectorised over orders.

    Same cases as the library: negative RDP and the KL shortcut give 0, orders ≤ 1.01
    are ignored, and the result is clamped at 0.
    """
    a = orders
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound = rdp + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
        eps = np.where(a > 1.01, bound, np.inf)
        eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
        eps = np.where(rdp < 0, 0.0, eps)
    return float(max(0.0, float(np.min(eps))))


class RdpTimeline:
    """Running RDP of a sequence of counted events, converted to ε after each one.

    The per-step RDP curve of each distinct (σ, q) comes from ``RdpAccountant`` once;
    composition is additive in RDP, so each event costs one vector add.
    """

    def __init__(self, delta: float) -> None:
        self.delta = float(delta)
        probe = RdpAccountant(neighboring_relation=_relation())
        self.orders = probe.orders
        self.rdp = np.zeros_like(self.orders, dtype=np.float64)
        self._curves: dict[tuple[float, float], np.ndarray] = {}

    def _curve(self, sigma: float, q: float) -> np.ndarray:
        key = (float(sigma), float(q))
        if key not in self._curves:
            acc = RdpAccountant(neighboring_relation=_relation())
            acc.compose(dp_event_of(sigma, q, 1))
            self._curves[key] = acc.rdp
        return self._curves[key]

    def add(self, sigma: float, q: float, steps: int) -> float:
        """Compose ``steps`` more steps; returns ε at δ after them."""
        self.rdp = self.rdp + int(steps) * self._curve(sigma, q)
        return epsilon_from_rdp(self.orders, self.rdp, self.delta)


# --------------------------------------------------------------------------- certificates


def _cert_info(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_valid_before": cert.not_valid_before_utc.isoformat(),
        "not_valid_after": cert.not_valid_after_utc.isoformat(),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _check_chain(cert: x509.Certificate, ca: x509.Certificate) -> str | None:
    """None if ``cert`` is directly issued and signed by ``ca``, else the reason."""
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return "the given CA certificate is not a CA (basicConstraints CA:FALSE)"
    except x509.ExtensionNotFound:
        pass
    try:
        cert.verify_directly_issued_by(ca)
    except InvalidSignature:
        return "the node certificate's signature does not verify with the CA key"
    except (ValueError, TypeError) as exc:
        return f"the node certificate is not issued by this CA ({exc})"
    return None


def _load_pem_cert(pem: str | bytes, what: str) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{what} is not a PEM X.509 certificate: {exc}") from exc


def _ts(t: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(t, tz=_dt.UTC)


# --------------------------------------------------------------------------- the audit


def audit_ledger(
    path: str | os.PathLike[str],
    ca_pem: str | bytes | None = None,
    *,
    other_certs: Sequence[str | bytes] = (),
    expected_node_id: str | None = None,
    compute_pld: bool = True,
    workers: int = 1,
    allow_seeded: bool = False,
    roster: Mapping[str, str] | None = None,
    roster_policy: ConsortiumPolicy | None = None,
    crl_pem: str | bytes | None = None,
) -> AuditReport:
    """Verify the ledger at ``path`` and recompute its ε; see the module docstring.

    ``allow_seeded``: for simulations and tests only, let a ledger whose noise was
    seeded (or whose randomness a privfl-ledger/1 header did not record) pass the
    randomness check. ``ca_pem``: the consortium CA certificate (PEM); without it the
    certificate check is reported as skipped (not failed). ``other_certs``: other nodes' certificates,
    so that an entry signed by one of them is named as such. ``expected_node_id``:
    fail unless the header names this node. ``workers``: processes for checking the
    signatures of a ledger of ≥ 5000 entries (1 = serial, the default: worth it only
    on an idle machine with several cores). ``roster``: node id → pinned certificate
    fingerprint (``sha256:<hex of the DER>``, as in roster.toml): fail unless the
    certificate's node is a member and the certificate is its pin. ``roster_policy``: the
    roster's ``[policy]``: fail when the header's policy is weaker (a higher target ε or
    δ, a lower σ floor) or the ε spent exceeds its ``max_epsilon`` (check
    ``roster_policy``). ``crl_pem``: the consortium's CRL (PEM, signed by the CA): fail
    when it revokes the node certificate before an entry was written (check
    ``revocation``, only with a CRL). Raises FileNotFoundError for a missing
    file and ValueError for an unreadable CA/other certificate (bad input, not a
    finding).
    """
    report = AuditReport(path=str(path))
    ca = _load_pem_cert(ca_pem, "CA certificate") if ca_pem is not None else None
    crl = _load_crl(crl_pem, ca) if crl_pem is not None else None
    other_keys: dict[str, PublicKey] = {}
    for i, pem in enumerate(other_certs):
        oc = _load_pem_cert(pem, f"other certificate #{i + 1}")
        names = sorted(cert_node_ids(oc)) or [f"certificate #{i + 1}"]
        try:
            other_keys[names[0]] = public_key_of_cert(oc)
        except ValueError:
            continue

    verified = read_ledger(path, other_keys, workers=workers)
    entries = verified.entries
    report.entries_verified = len(entries)
    if verified.error is not None:
        err = verified.error
        report.first_bad_index = err.index
        report.issues.append(AuditIssue(err.index, err.kind, err.reason))
        report.checks["integrity"] = FAIL if err.kind != TORN_TAIL else "fail (torn tail)"
    else:
        report.checks["integrity"] = PASS

    if verified.header is None or verified.certificate is None:
        report.checks.setdefault("certificate", SKIPPED)
        report.ok = False
        return report

    header = verified.header["body"]
    cert = verified.certificate
    policy = LedgerPolicy.from_dict(header["policy"])
    report.node_id = header["node_id"]
    report.software_version = header.get("software_version")
    report.format = header.get("format")
    prep = header.get("preprocessing")
    report.preprocessing = dict(prep) if isinstance(prep, dict) else None
    report.certificate = _cert_info(cert)
    report.policy = policy.to_dict()
    report.target_epsilon = policy.target_epsilon
    report.delta = policy.delta
    report.accountant = policy.accountant

    _check_certificate(report, cert, ca, entries)
    _check_revocation(report, cert, crl, entries)
    _check_randomness(report, header, entries, allow_seeded)
    _check_node_id(report, cert, expected_node_id, roster)
    _check_events(report, policy, entries, compute_pld, roster_policy)

    report.ok = all(v in (PASS, SKIPPED) for v in report.checks.values()) and not report.issues
    eps = f"eps_rdp={report.epsilon_rdp:.4f}"
    if report.epsilon_pld is not None:
        eps += f" eps_pld={report.epsilon_pld:.4f}"
    log.debug(  # the report is the output; its one-line summary is for a debug log
        "audit node=%s ok=%s entries=%d randomness=%s %s issues=%d",
        report.node_id,
        report.ok,
        report.entries_verified,
        report.randomness_label,
        eps,
        len(report.issues),
    )
    return report


def _check_node_id(
    report: AuditReport,
    cert: x509.Certificate,
    expected_node_id: str | None,
    roster: Mapping[str, str] | None,
) -> None:
    """The certificate's node must be the header's, the expected one, and the roster's pin."""
    try:
        report.certificate_node_id = certificate_node_id(cert)
    except ValueError:
        report.certificate_node_id = None
    who = report.certificate_node_id
    problems: list[tuple[str, str]] = []
    if who != report.node_id:
        problems.append(("node_id", f"the header names node {report.node_id!r} but the "
                                    f"certificate is node {who!r}'s"))
    if expected_node_id is not None and who != expected_node_id:
        problems.append(("node_id", f"the ledger is node {who!r}'s, not {expected_node_id!r}'s"))
    for kind, message in problems:
        report.issues.append(AuditIssue(0, kind, message))
    report.checks["node_id"] = PASS if not problems else FAIL
    if roster is None:
        return
    pin = roster.get(who) if who is not None else None
    fp = "sha256:" + report.certificate.get("sha256_fingerprint", "")
    if pin is None:
        report.issues.append(AuditIssue(0, "roster", f"node {who!r} is not in the roster"))
    elif pin.lower() != fp:
        report.issues.append(AuditIssue(
            0, "roster", f"the certificate of node {who!r} ({fp[:23]}…) is not the roster's "
            f"pin ({pin[:23]}…): another certificate than the one the consortium admitted"))
    report.checks["roster"] = PASS if pin is not None and pin.lower() == fp else FAIL


def _check_randomness(
    report: AuditReport,
    header: Mapping[str, Any],
    entries: list[dict[str, Any]],
    allow_seeded: bool,
) -> None:
    """The header must say "secure" (or the caller allows seeded), and every dp_event agree."""
    recorded = header.get("randomness") if header.get("format") != LEDGER_FORMAT_V1 else None
    kind = recorded if isinstance(recorded, str) else RANDOMNESS_UNRECORDED
    report.randomness = kind
    ok = True
    if kind != RANDOMNESS_SECURE:
        if allow_seeded:
            report.randomness_allowed = True
        else:
            ok = False
            if kind == RANDOMNESS_SEEDED:
                report.issues.append(AuditIssue(
                    0, SEEDED_NOISE,
                    "the noise and sampling were seeded from a value: anyone who knows the seed "
                    "can recompute the noise and remove it, so the ε below does not hold "
                    "(pass allow_seeded / --allow-seeded for simulations and tests)"))
            else:
                report.issues.append(AuditIssue(
                    0, UNRECORDED_RANDOMNESS,
                    f"the header ({header.get('format')}) does not record whether the noise was "
                    "drawn from secure randomness or seeded, so the ε below is not established "
                    "(pass allow_seeded / --allow-seeded for simulations and tests)"))
    odd = [e for e in entries if e["kind"] == "dp_event" and e["body"].get("randomness") != recorded]
    if odd:
        ok = False
        first = odd[0]
        report.issues.append(AuditIssue(
            first["index"], RANDOMNESS_MISMATCH,
            f"{len(odd)} dp_event(s) record a randomness other than the header's {recorded!r}; "
            f"first at entry {first['index']} ({first['body'].get('randomness')!r})"))
    report.checks["randomness"] = PASS if ok else FAIL


def _load_crl(pem: str | bytes, ca: x509.Certificate | None) -> x509.CertificateRevocationList:
    """The CRL, which must be signed by the CA (ValueError otherwise: bad input, not a finding).

    Its next-update time is not enforced: an audit looks back at entries already written.
    """
    if ca is None:
        raise ValueError("a CRL needs the CA certificate that signs it")
    try:
        crl = x509.load_pem_x509_crl(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise ValueError(f"CRL is not a PEM X.509 CRL: {exc}") from None
    key = ca.public_key()
    if crl.issuer != ca.subject or not crl.is_signature_valid(key):  # type: ignore[arg-type]
        raise ValueError("the CRL is not signed by the consortium CA")
    return crl


REVOKED = "certificate_revoked"


def _check_revocation(
    report: AuditReport,
    cert: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    entries: list[dict[str, Any]],
) -> None:
    """No entry may be written after the CA revoked the node certificate.

    Entries before the revocation stay valid (the key was trusted when they were written);
    their timestamps are the node's own word, which its peers' heads cross-check.
    """
    if crl is None:
        return
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if revoked is None:
        report.checks["revocation"] = PASS
        return
    when = revoked.revocation_date_utc
    after = [e for e in entries if float(e["timestamp"]) >= when.timestamp()]
    report.certificate["revoked_at"] = when.isoformat()
    if after:
        first = after[0]
        report.issues.append(AuditIssue(first["index"], REVOKED, (
            f"the node certificate (serial {cert.serial_number:x}) was revoked at "
            f"{when.isoformat()}; {len(after)} entries were written after it, first entry "
            f"{first['index']} at {_ts(float(first['timestamp'])).isoformat()}")))
    report.checks["revocation"] = FAIL if after else PASS


def _check_certificate(
    report: AuditReport,
    cert: x509.Certificate,
    ca: x509.Certificate | None,
    entries: list[dict[str, Any]],
) -> None:
    if ca is None:
        report.checks["certificate"] = SKIPPED
        return
    problem = _check_chain(cert, ca)
    if problem is None:
        lo = max(cert.not_valid_before_utc, ca.not_valid_before_utc).timestamp()
        hi = min(cert.not_valid_after_utc, ca.not_valid_after_utc).timestamp()
        for e in entries:
            if not lo <= float(e["timestamp"]) <= hi:
                t = _ts(float(e["timestamp"]))
                problem = (
                    f"entry {e['index']} was written at {t.isoformat()}, outside the validity "
                    "of the node or CA certificate"
                )
                report.issues.append(AuditIssue(e["index"], "certificate_validity", problem))
                break
    else:
        report.issues.append(AuditIssue(0, "certificate_chain", problem))
    report.checks["certificate"] = PASS if problem is None else FAIL


def _check_events(
    report: AuditReport,
    policy: LedgerPolicy,
    entries: list[dict[str, Any]],
    compute_pld: bool,
    roster_policy: ConsortiumPolicy | None = None,
) -> None:
    """Policy, budget, claimed-ε and totals over the verified entries (and the roster's
    policy when given)."""
    timeline = RdpTimeline(policy.delta)
    v1 = report.format == LEDGER_FORMAT_V1
    groups: dict[tuple[float, float], int] = {}
    purpose_groups: dict[tuple[str, float, float], int] = {}
    by_purpose: dict[str, dict[str, int]] = {p: {"events": 0, "steps": 0} for p in DP_PURPOSES}
    prefix_groups: list[dict[tuple[float, float], int]] = []  # only kept for PLD bisection
    dp_positions: list[int] = []
    policy_issues: list[AuditIssue] = []
    stop_seen: int | None = None
    after_stop: list[int] = []
    totals: dict[str, Any] = {
        "entries": len(entries),
        "dp_events": 0,
        "steps": 0,
        "messages": 0,
        "bytes_sent": 0,
        "stops": 0,
        "notes": 0,
        "anchors": 0,
        "closes": 0,
        "peers": {},
    }
    for e in entries:
        kind, body, idx = e["kind"], e["body"], e["index"]
        if kind == "message":
            try:
                peer, size = str(body["peer"]), int(body["bytes"])
                int(body["seq"]), int(body["round"])
                digests = [str(body[k]) for k in MESSAGE_DIGESTS if k in body]
                if len(digests) != 1 or len(digests[0]) != 64:
                    raise ValueError("not exactly one 32-byte message digest")
            except (KeyError, TypeError, ValueError):
                policy_issues.append(AuditIssue(idx, "bad_entry", "message body is malformed"))
                continue
            totals["messages"] += 1
            totals["bytes_sent"] += size
            totals["peers"][peer] = totals["peers"].get(peer, 0) + 1
        elif kind == "stop":
            totals["stops"] += 1
            if stop_seen is None:
                stop_seen = idx
        elif kind == "note":
            totals["notes"] += 1
        elif kind == "anchor":
            try:
                anchor_of(body)
            except ValueError as exc:
                policy_issues.append(AuditIssue(idx, "bad_entry", f"anchor body: {exc}"))
                continue
            totals["anchors"] += 1
        elif kind == "close":
            totals["closes"] += 1
        elif kind == "dp_event":
            accountable, problems = _event_problems(body, policy, v1)
            policy_issues.extend(AuditIssue(idx, k, m) for k, m in problems)
            if not accountable:
                continue  # σ, q or steps unusable: nothing to compose
            if stop_seen is not None:
                after_stop.append(idx)
            sigma, q, steps = (
                float(body["noise_multiplier"]),
                float(body["sample_rate"]),
                int(body["steps"]),
            )
            purpose = purpose_of(body)
            key = (sigma, q)
            groups[key] = groups.get(key, 0) + steps
            pkey = (purpose, sigma, q)
            purpose_groups[pkey] = purpose_groups.get(pkey, 0) + steps
            per = by_purpose.setdefault(purpose, {"events": 0, "steps": 0})
            per["events"] += 1
            per["steps"] += steps
            totals["dp_events"] += 1
            totals["steps"] += steps
            eps = timeline.add(sigma, q, steps)
            claimed = body.get("epsilon")
            report.timeline.append(
                EpsilonPoint(
                    idx,
                    float(e["timestamp"]),
                    totals["steps"],
                    eps,
                    float(claimed) if isinstance(claimed, (int, float)) else None,
                    purpose,
                )
            )
            dp_positions.append(idx)
            if policy.accountant == "pld":
                prefix_groups.append(dict(groups))
    if entries:
        totals["first_timestamp"] = float(entries[0]["timestamp"])
        totals["last_timestamp"] = float(entries[-1]["timestamp"])
    report.totals = totals
    report.by_purpose = by_purpose
    report.events = [
        {"purpose": p, "noise_multiplier": s, "sample_rate": q, "steps": c}
        for (p, s, q), c in purpose_groups.items()
    ]

    # ε with dp-accounting directly, from the summed counts of every purpose.
    report.epsilon_rdp = epsilon_rdp_of(groups, policy.delta)
    need_pld = compute_pld or policy.accountant == "pld"
    report.epsilon_pld = epsilon_pld_of(groups, policy.delta) if need_pld else None
    if report.epsilon_pld is not None and report.timeline:
        report.timeline[-1].epsilon_pld = report.epsilon_pld
    if policy.accountant == "pld":
        assert report.epsilon_pld is not None
        report.epsilon = report.epsilon_pld
    else:
        report.epsilon = report.epsilon_rdp

    report.issues.extend(policy_issues)
    report.checks["policy"] = PASS if not policy_issues else FAIL

    def over(bound: float) -> list[int]:
        """The dp_events whose cumulative ε (by the policy's accountant) exceeds ``bound``."""
        limit = bound + BUDGET_TOLERANCE
        if policy.accountant == "rdp":
            return [p.index for p in report.timeline if p.epsilon_rdp > limit]
        if report.epsilon > limit:
            return dp_positions[_first_pld_over(prefix_groups, policy.delta, limit):]
        return []

    report.over_budget = over(policy.target_epsilon)
    if report.over_budget:
        report.issues.append(
            AuditIssue(
                report.over_budget[0],
                "over_budget",
                f"{len(report.over_budget)} dp_event(s) take ε ({policy.accountant}) above the "
                f"target {policy.target_epsilon:g} at δ={policy.delta:g}; first at entry "
                f"{report.over_budget[0]}",
            )
        )
    report.checks["budget"] = PASS if not report.over_budget else FAIL

    if after_stop:
        report.issues.append(
            AuditIssue(
                after_stop[0],
                "after_stop",
                f"{len(after_stop)} dp_event(s) after the stop entry {stop_seen}",
            )
        )
    report.checks["stop"] = PASS if not after_stop else FAIL

    if roster_policy is not None:
        _check_roster_policy(report, policy, entries, roster_policy, over)
    _check_claims(report, policy)


ROSTER_POLICY = "roster_policy"


def _check_roster_policy(
    report: AuditReport,
    policy: LedgerPolicy,
    entries: list[dict[str, Any]],
    floor: ConsortiumPolicy,
    over: Callable[[float], list[int]],
) -> None:
    """The header's policy and the ε spent must be within the roster's ``[policy]``.

    The header is the node's own word: a node that re-signs its ledger with a target ε
    of 10 passes its own budget check, but not the consortium's maximum.
    """
    found: list[AuditIssue] = []
    cap = floor.max_epsilon
    if cap is not None:
        if policy.target_epsilon > cap + BUDGET_TOLERANCE:
            found.append(AuditIssue(0, ROSTER_POLICY, (
                f"the header's target ε {policy.target_epsilon:g} exceeds the roster's "
                f"[policy].max_epsilon {cap:g}")))
        beyond = over(cap)
        if beyond:
            found.append(AuditIssue(beyond[0], ROSTER_POLICY, (
                f"ε spent ({policy.accountant}) {report.epsilon:.4f} exceeds the roster's "
                f"[policy].max_epsilon {cap:g}: {len(beyond)} dp_event(s) beyond it, first at "
                f"entry {beyond[0]}")))
    if floor.delta is not None and policy.delta > floor.delta:
        found.append(AuditIssue(0, ROSTER_POLICY, (
            f"the header's δ {policy.delta:g} exceeds the roster's [policy].delta {floor.delta:g}")))
    sigma_floor = floor.min_noise_multiplier
    if sigma_floor is not None:
        if policy.min_noise_multiplier < sigma_floor:
            found.append(AuditIssue(0, ROSTER_POLICY, (
                f"the header's σ floor {policy.min_noise_multiplier:g} is below the roster's "
                f"[policy].min_noise_multiplier {sigma_floor:g}")))
        weak = [e for e in entries if e["kind"] == "dp_event"
                and purpose_of(e["body"]) == PURPOSE_TRAINING
                and isinstance(e["body"].get("noise_multiplier"), (int, float))
                and e["body"]["noise_multiplier"] < sigma_floor]
        if weak:
            found.append(AuditIssue(weak[0]["index"], ROSTER_POLICY, (
                f"{len(weak)} training dp_event(s) with σ below the roster's "
                f"[policy].min_noise_multiplier {sigma_floor:g}; first at entry "
                f"{weak[0]['index']} (σ={weak[0]['body']['noise_multiplier']:g})")))
    report.issues.extend(found)
    report.checks[ROSTER_POLICY] = PASS if not found else FAIL


def _event_problems(
    body: Mapping[str, Any], policy: LedgerPolicy, v1: bool
) -> tuple[bool, list[tuple[str, str]]]:
    """(accountable, [(kind, message), ...]) for one dp_event body.

    Not accountable (σ, q, steps or the mechanism unusable) means it cannot be composed;
    any other "bad_entry" or "policy" problem is reported while the event still counts
    in ε and the budget. The policy's σ floor and clipping rules bind training events;
    every event needs a finite sensitivity > 0 and the policy's relation, accountant
    and δ. Events of a privfl-ledger/1 ledger lack the mechanism fields: they are
    training events of sensitivity = clipping norm.
    """
    try:
        sigma = body["noise_multiplier"]
        q = body["sample_rate"]
        steps = body["steps"]
        norm = body["clipping_norm"]
        rule = body["clipping_rule"]
        eps = body["epsilon"]
    except (KeyError, TypeError):
        return False, [("bad_entry", "dp_event body lacks a required field")]
    nums = (sigma, q, norm, eps)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in nums):
        return False, [("bad_entry", "dp_event has a non-numeric parameter")]
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        return False, [("bad_entry", f"dp_event steps must be an integer >= 1, got {steps!r}")]
    if not (sigma > 0 and 0 < q <= 1 and math.isfinite(sigma)):
        return False, [("bad_entry", f"dp_event has σ={sigma!r}, q={q!r}: not accountable")]
    if body.get("mechanism") != MECHANISM_POISSON_GAUSSIAN:
        return False, [("bad_entry", f"unknown mechanism {body.get('mechanism')!r}")]

    out: list[tuple[str, str]] = []
    new_fields = ("purpose", "sensitivity", "local_mechanism", "mechanism_params", "randomness")
    missing = [] if v1 else [f for f in new_fields if f not in body]
    if missing:
        out.append(("bad_entry", f"dp_event lacks {', '.join(missing)}"))
    purpose = purpose_of(body)
    sens = body.get("sensitivity", norm)
    params = body.get("mechanism_params", {})
    local = body.get("local_mechanism", "gaussian")
    bad = []
    if purpose not in DP_PURPOSES:
        bad.append(f"purpose {purpose!r} is not one of {', '.join(DP_PURPOSES)}")
    if not (
        isinstance(sens, (int, float)) and not isinstance(sens, bool)
        and math.isfinite(sens) and sens > 0
    ):
        bad.append(f"sensitivity {sens!r} must be a finite number > 0")
    if not (isinstance(local, str) and local):
        bad.append(f"local_mechanism {local!r} must be a non-empty name")
    if not isinstance(params, dict):
        bad.append("mechanism_params must be a JSON object")
    elif local == "topagg" and not bad:
        k = params.get("k")
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            bad.append(f"TopAgg event lacks an integer k >= 1 in mechanism_params (got {k!r})")
        elif not math.isclose(float(sens), math.sqrt(k), rel_tol=1e-9):
            bad.append(f"TopAgg with k={k} has L2 sensitivity √k = {math.sqrt(k):.6g}, "
                       f"but the event records {sens!r}")
    out.extend(("bad_entry", f"dp_event: {b}") for b in bad)

    problems = []
    if purpose == PURPOSE_TRAINING:
        if sigma < policy.min_noise_multiplier:
            problems.append(
                f"σ={sigma:g} is below the policy's minimum {policy.min_noise_multiplier:g}"
            )
        if rule not in policy.allowed_clipping_rules:
            problems.append(f"clipping rule {rule!r} is not allowed by the policy")
    if not norm > 0:
        problems.append(f"clipping norm {norm!r} must be > 0")
    if body.get("neighbouring_relation") != policy.neighbouring_relation:
        problems.append(f"neighbouring relation {body.get('neighbouring_relation')!r}")
    if body.get("accountant") != policy.accountant:
        problems.append(f"accountant {body.get('accountant')!r} differs from the policy's")
    if "delta" not in body:
        problems.append("the event records no δ")
    elif body["delta"] != policy.delta:
        problems.append(f"δ {body['delta']!r} differs from the policy's")
    if problems:
        out.append(("policy", "; ".join(problems)))
    return True, out


def _first_pld_over(
    prefix_groups: list[dict[tuple[float, float], int]], delta: float, limit: float
) -> int:
    """The first dp_event position whose cumulative PLD ε exceeds ``limit`` (bisection)."""
    lo, hi = 0, len(prefix_groups) - 1  # ε(hi) > limit is known
    while lo < hi:
        mid = (lo + hi) // 2
        if epsilon_pld_of(prefix_groups[mid], delta) > limit:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check_claims(report: AuditReport, policy: LedgerPolicy) -> None:
    """The node's recorded ε must match the recomputation (every event for RDP, the last for PLD)."""
    rtol = CLAIM_RTOL[policy.accountant]
    points = report.timeline
    if policy.accountant == "rdp":
        checks = [(p, p.epsilon_rdp, "RDP") for p in points]
    else:
        checks = [(points[-1], report.epsilon, "PLD")] if points else []
    bad = next(((p, want, method) for p, want, method in checks
                if p.epsilon_claimed is None or not _close(p.epsilon_claimed, want, rtol)), None)
    if bad is not None:
        p, want, method = bad
        report.issues.append(AuditIssue(
            p.index, "epsilon_mismatch",
            f"the node recorded ε={p.epsilon_claimed} but the events give ε={want:.6f} ({method})"))
    report.checks["claimed_epsilon"] = PASS if bad is None else FAIL


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(1.0, abs(b))
