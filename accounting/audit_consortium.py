"""Consortium audit: every node's ledger, cross-checked against the heads its peers hold.

A single ledger signed by one key cannot prove its own history: whoever holds the node
key can cut it short, roll it back, or re-sign a rewritten one (σ doubled, steps set to
1, events dropped, a higher target ε in the header) and it still verifies. But every
message a node sends carries its ledger head, and each receiver records it (``anchor``
entries in its own ledger, and ``late_anchor`` lines in ``anchors-final.jsonl`` for heads
received after its close entry; see :mod:`accounting.ledger`). An anchor at index i,
held by node B for node A, commits to A's entries 0..i, because each entry's hash covers
the previous one.

:func:`audit_consortium` audits each ledger on its own (:func:`accounting.audit.audit_ledger`;
the node id is the one its certificate names) and then checks every anchor against the
ledger it is about: A's ledger must hold an entry at that index whose hash is the anchored
hash. Each problem names the node and the entry index:

* ``truncated``: A's ledger ends before a head a peer holds (tail cut, cut to half,
  rolled back);
* ``differs``: A's entry at an anchored index has another hash (a rewrite of any entry up
  to there, a re-sign with other σ or steps, a rollback that wrote different entries);
* ``missing``: peers hold heads for a node whose ledger was not given;
* ``unconfirmed_end``: A's ledger does not end with a close entry whose head a peer holds
  (cut back to its last anchored head, or stopped without closing): its end is unconfirmed;
* ``unproven_head``: a holder's ledger holds a head of A that A's ledger does not hold and
  A's key never signed (every head carries its sender's own signature, kept with the
  anchor, :mod:`accounting.heads`): made up by the holder, so the problem is the holder's,
  and a member cannot frame another node as truncated or rewritten;
* ``dropped_head``: a holder signed a receipt for a head of A (A's ``receipts.jsonl``, the
  answer to A's goodbye, :mod:`accounting.receipts`) that neither its ledger nor its
  anchors-final holds, nor any later head of A: the holder's record was cut, or it withheld
  the head. The receipt
  itself confirms A's head, so a neighbour that drops A's close head cannot leave A
  ``unconfirmed_end``;
* ``duplicate``: two ledgers name one node; ``anchors_final``: a side file does not
  verify or does not follow a close entry of its own ledger; ``audit``: a ledger fails
  its own audit (``detail`` is the issue kind, e.g. ``roster``, ``dropped``).

Per node it reports the anchored prefix (the highest index a peer's head confirms) and
the unanchored tail after it, which no peer can vouch for (zero in a normal run that ended
with a close entry and its goodbye; otherwise the ledger is ``unconfirmed_end``). What it
cannot see: a rewrite agreed by every node that holds heads for it.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from privfl.accounting.audit import AuditReport, ConsortiumPolicy, _finite, audit_ledger
from privfl.accounting.heads import HEAD_SIGNATURE_BYTES, head_signed_by
from privfl.accounting.ledger import (
    TornTailError,
    anchor_of,
    entry_hash,
    late_anchors_path,
    ledger_lines,
    read_late_anchors,
)
from privfl.accounting.receipts import read_receipts, receipts_path

log = logging.getLogger("privfl.audit")

LEDGER_FILE = "ledger.jsonl"

# Problem kinds.
TRUNCATED = "truncated"
DIFFERS = "differs"
MISSING = "missing"
DUPLICATE = "duplicate"
ANCHORS_FINAL = "anchors_final"
AUDIT = "audit"
UNCONFIRMED_END = "unconfirmed_end"
UNPROVEN = "unproven_head"
DROPPED = "dropped_head"

CONSORTIUM_NOTE = (
    "a ledger is complete only up to the last head its peers hold; one that does not end with a "
    "close entry a peer holds is reported (unconfirmed_end): it may have been cut back"
)


@dataclass
class ConsortiumProblem:
    """One finding: whose ledger (``node``), which entry, what kind, in words.

    ``holder`` is the peer whose record shows it (None for a ledger's own audit);
    ``detail`` the audit issue kind for ``audit`` problems.
    """

    node: str
    index: int | None
    kind: str
    message: str
    holder: str | None = None
    detail: str | None = None


@dataclass
class NodeSummary:
    """One node's ledger in the consortium audit.

    ``anchored_upto``: the highest entry index a peer's head confirms (None: no peer
    holds one); ``unanchored_tail``: entries after it; ``anchored_by``: holder → highest
    index it holds that matches (a receipt it signed counts); ``heads_held``: anchors this
    node holds for others (chain, late); ``receipts``: the receipts in this node's
    receipts file that verify under their holder's certificate, and those that do not.
    """

    node_id: str
    path: str
    ok: bool
    entries: int
    epsilon: float
    target_epsilon: float | None
    randomness: str | None
    anchored_upto: int | None = None
    unanchored_tail: int = 0
    anchored_by: dict[str, int] = field(default_factory=dict)
    heads_held: dict[str, int] = field(default_factory=lambda: {"ledger": 0, "anchors_final": 0})
    receipts: dict[str, int] = field(default_factory=lambda: {"verified": 0, "unverified": 0})
    audit: AuditReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with a summary of the node's own audit."""
        a = self.audit
        return {
            "node_id": self.node_id,
            "path": self.path,
            "ok": self.ok,
            "entries": self.entries,
            "epsilon": self.epsilon,
            "target_epsilon": self.target_epsilon,
            "randomness": self.randomness,
            "anchored_upto": self.anchored_upto,
            "unanchored_tail": self.unanchored_tail,
            "anchored_by": dict(self.anchored_by),
            "heads_held": dict(self.heads_held),
            "receipts": dict(self.receipts),
            "audit": None if a is None else {
                "ok": a.ok,
                "checks": dict(a.checks),
                "issues": [vars(i) for i in a.issues],
                "first_bad_index": a.first_bad_index,
                "entries_verified": a.entries_verified,
                "scope": a.scope,
                "reason": a.reason,
                "epsilon_rdp": a.epsilon_rdp,
                "epsilon_pld": a.epsilon_pld,
                "totals": dict(a.totals),
            },
        }


@dataclass
class ConsortiumReport:
    """Everything :func:`audit_consortium` found; ``ok`` when no problem was found."""

    source: str
    ok: bool = False
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    problems: list[ConsortiumProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=lambda: [CONSORTIUM_NOTE])

    def problems_of(self, node: str) -> list[ConsortiumProblem]:
        """The problems about ``node``'s ledger."""
        return [p for p in self.problems if p.node == node]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return _finite({
            "source": self.source,
            "ok": self.ok,
            "nodes": {n: s.to_dict() for n, s in self.nodes.items()},
            "problems": [vars(p) for p in self.problems],
            "notes": list(self.notes),
        })

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)


@dataclass
class _Held:
    """One head a holder keeps for a node, and where it is written."""

    holder: str
    index: int
    digest: str
    where: str
    signature: str = ""  # the node's own signature of this head, as the holder kept it (hex)
    receipt: bool = False  # from the node's receipts file: the holder signed that it received it

    def proven(self, node: str, cert: x509.Certificate | None) -> bool:
        """Whether ``node``'s certificate key signed this head: evidence against ``node``'s ledger,
        not the holder's word only."""
        if cert is None or len(self.signature) != 2 * HEAD_SIGNATURE_BYTES:
            return False
        try:
            sig = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return head_signed_by(cert.public_key(), node, (self.index, bytes.fromhex(self.digest)), sig)


def find_ledgers(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The ledgers of a ``privfl launch`` run folder: ``<run>/<node>/ledger.jsonl``."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"run folder {d} does not exist")
    found = sorted(p for p in d.glob(f"*/{LEDGER_FILE}") if p.is_file())
    if not found:
        raise ValueError(f"no ledgers in {d} (expected <node>/{LEDGER_FILE})")
    return found


def load_roster_pins(roster: str | os.PathLike[str] | Mapping[str, str]) -> dict[str, str]:
    """node id → pinned certificate fingerprint, from a mapping or a roster.toml path."""
    if isinstance(roster, Mapping):
        return {str(k): str(v) for k, v in roster.items()}
    p = Path(roster)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
        return {str(n["id"]): str(n["fingerprint"]) for n in raw["nodes"]}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read roster {p}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"roster {p} lacks [[nodes]] id/fingerprint ({exc})") from None


@dataclass(frozen=True)
class RosterPolicy:
    """A roster.toml's ``[policy]`` table (each field None when absent): a ConsortiumPolicy."""

    max_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    delta: float | None = None


def load_roster_policy(roster: str | os.PathLike[str]) -> RosterPolicy:
    """The ``[policy]`` of a roster.toml (all None when it has none)."""
    p = Path(roster)
    try:
        table = tomllib.loads(p.read_text(encoding="utf-8")).get("policy", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read roster {p}: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError(f"roster {p}: [policy] must be a table")
    values: dict[str, float | None] = {}
    for key in ("max_epsilon", "min_noise_multiplier", "delta"):
        v = table.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"roster {p}: [policy].{key} must be a positive number, got {v!r}")
        values[key] = None if v is None else float(v)
    return RosterPolicy(**values)


def _header_cert(lines: list[bytes]) -> x509.Certificate | None:
    """The certificate in a ledger's first line, if it can be read (unverified)."""
    try:
        pem = json.loads(lines[0])["body"]["certificate"]
        return x509.load_pem_x509_certificate(pem.encode())
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class _Ledger:
    path: Path
    node: str
    lines: list[bytes]
    report: AuditReport
    cert: x509.Certificate | None
    hashes: list[str] = field(default_factory=list)


def audit_consortium(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    ca_pem: str | bytes,
    *,
    allow_seeded: bool = False,
    roster: str | os.PathLike[str] | Mapping[str, str] | None = None,
    roster_policy: ConsortiumPolicy | None = None,
    compute_pld: bool = True,
    crl_pem: str | bytes | None = None,
) -> ConsortiumReport:
    """Audit every ledger of a run (a run folder or a list of ledger paths) and cross-check
    the heads the nodes hold for each other; see the module docstring.

    ``roster``: a roster.toml path or node id → pinned fingerprint; each ledger's
    certificate must then be its node's pin. ``roster_policy``: the consortium's
    ``[policy]`` every ledger is held to (read from ``roster`` when that is a path and
    this is not given). ``crl_pem``: the consortium CRL; a ledger written on after its
    certificate's revocation fails. ``allow_seeded``: for simulations and tests.
    Raises ValueError for bad input (no ledgers, an unreadable CA or roster).
    """
    run_mode = not isinstance(source, (list, tuple))
    if run_mode:
        paths = find_ledgers(source)  # type: ignore[arg-type]
        label = str(source)
    else:
        paths = [Path(p) for p in source]  # type: ignore[union-attr]
        if not paths:
            raise ValueError("no ledgers given")
        for p in paths:
            if not p.is_file():
                raise ValueError(f"ledger file {p} does not exist")
        label = ", ".join(map(str, paths))
    pins = load_roster_pins(roster) if roster is not None else None
    if roster_policy is None and roster is not None and not isinstance(roster, Mapping):
        roster_policy = load_roster_policy(roster)
    report = ConsortiumReport(label)

    ledgers: list[_Ledger] = []
    raw = [ledger_lines(p) for p in paths]
    certs = [_header_cert(lines) for lines in raw]
    pems = [c.public_bytes(Encoding.PEM) for c in certs if c is not None]
    for path, lines, cert in zip(paths, raw, certs):
        expected = path.parent.name if run_mode else None
        rep = audit_ledger(
            path, ca_pem,
            other_certs=[p for p in pems if cert is None or p != cert.public_bytes(Encoding.PEM)],
            expected_node_id=expected, compute_pld=compute_pld, allow_seeded=allow_seeded,
            roster=pins, roster_policy=roster_policy, crl_pem=crl_pem,
        )
        node = rep.certificate_node_id or rep.node_id or expected or str(path)
        led = _Ledger(path, node, lines, rep, cert)
        led.hashes = [entry_hash(line) for line in lines]
        ledgers.append(led)
        for issue in rep.issues:
            report.problems.append(ConsortiumProblem(
                node, issue.index, AUDIT, f"{issue.kind}: {issue.message}", None, issue.kind))

    by_node: dict[str, list[_Ledger]] = {}
    for led in ledgers:
        by_node.setdefault(led.node, []).append(led)
    for node, group in by_node.items():
        if len(group) > 1:
            report.problems.append(ConsortiumProblem(
                node, None, DUPLICATE,
                f"{len(group)} ledgers name node {node}: {', '.join(str(g.path) for g in group)}"))

    held: dict[str, list[_Held]] = {}
    counts: dict[str, dict[str, int]] = {}
    for led in ledgers:
        counts[led.path.as_posix()] = _collect_heads(led, held, report)
    holders = {node: group[0] for node, group in by_node.items() if len(group) == 1 and _cert_trusted(group[0])}
    receipts: dict[str, dict[str, int]] = {}
    for led in ledgers:
        receipts[led.path.as_posix()] = _collect_receipts(led, holders, held, report)

    for led in ledgers:
        summary = _cross_check(led, held.get(led.node, []), report)
        summary.heads_held = counts[led.path.as_posix()]
        summary.receipts = receipts[led.path.as_posix()]
        key = led.node if led.node not in report.nodes else f"{led.node} ({led.path})"
        report.nodes[key] = summary

    for node in sorted(set(held) - set(by_node)):
        for holder in sorted({h.holder for h in held[node]}):
            top = max((h for h in held[node] if h.holder == holder), key=lambda h: h.index)
            report.problems.append(ConsortiumProblem(
                node, top.index, MISSING,
                f"{holder} holds node {node}'s head at entry {top.index} ({top.where}) but no "
                f"ledger of {node} was given: deleted, or left out of the audit", holder))

    report.problems.sort(key=lambda p: (p.node, -1 if p.index is None else p.index, p.kind,
                                        p.holder or ""))
    report.ok = not report.problems
    log.info("audit consortium source=%s ok=%s nodes=%d problems=%d", label, report.ok,
             len(report.nodes), len(report.problems))
    return report


def _collect_heads(
    led: _Ledger, held: dict[str, list[_Held]], report: ConsortiumReport
) -> dict[str, int]:
    """Add the heads ``led``'s node holds (verified prefix and anchors-final) to ``held``."""
    n_chain = n_late = 0
    for line in led.lines[: led.report.entries_verified]:
        if b'"kind":"anchor"' not in line:
            continue
        entry = json.loads(line)
        if entry["kind"] != "anchor":
            continue
        try:
            peer, idx, digest = anchor_of(entry["body"])
        except ValueError:
            continue  # the node's own audit names it (bad_entry)
        if peer == led.node:
            continue
        held.setdefault(peer, []).append(
            _Held(led.node, idx, digest, f"{led.node}'s ledger entry {entry['index']}",
                  _signature_of(entry["body"])))
        n_chain += 1
    side = late_anchors_path(led.path)
    if led.cert is None or not side.exists():
        return {"ledger": n_chain, "anchors_final": 0}
    try:
        verified = read_late_anchors(side, led.cert)
    except ValueError as exc:
        report.problems.append(ConsortiumProblem(led.node, None, ANCHORS_FINAL, f"{side}: {exc}"))
        return {"ledger": n_chain, "anchors_final": 0}
    if verified.error is not None and not isinstance(verified.error, TornTailError):
        report.problems.append(ConsortiumProblem(
            led.node, verified.error.index, ANCHORS_FINAL,
            f"{side} line {verified.error.index} does not verify ({verified.error.kind}: "
            f"{verified.error.reason}); its later lines are not used"))
    for e in verified.entries:
        after = e["body"]["after"]
        ai, ah = int(after["index"]), str(after["entry_hash"])
        if not (ai < len(led.lines) and led.hashes[ai] == ah and b'"kind":"close"' in led.lines[ai]):
            report.problems.append(ConsortiumProblem(
                led.node, ai, ANCHORS_FINAL,
                f"{side} line {e['index']} follows {led.node}'s close entry {ai}, which its "
                "ledger does not hold (the ledger was cut or rewritten after the run)"))
        peer, idx, digest = anchor_of(e["body"])
        if peer == led.node:
            continue
        held.setdefault(peer, []).append(
            _Held(led.node, idx, digest, f"{led.node}'s anchors-final line {e['index']}",
                  _signature_of(e["body"])))
        n_late += 1
    return {"ledger": n_chain, "anchors_final": n_late}


def _collect_receipts(
    led: _Ledger, holders: Mapping[str, _Ledger], held: dict[str, list[_Held]], report: ConsortiumReport
) -> dict[str, int]:
    """Add the receipts in ``led``'s receipts file that verify under their holder's (trusted)
    certificate to ``held``: a receipt for a head ``led``'s ledger holds is the holder vouching for
    it, and one whose head the holder's own records lack (nor a later one) is reported
    (``dropped_head``); a receipt for a head the ledger does not hold is evidence against the
    ledger only when the node's own signature of that head proves it (else it is unverified, and
    blames no one). Run after every ledger's heads are collected."""
    path = receipts_path(led.path)
    if not path.exists():
        return {"verified": 0, "unverified": 0}
    try:
        found, bad = read_receipts(path)
    except OSError as exc:
        log.warning("audit consortium: cannot read %s: %s", path, exc)
        return {"verified": 0, "unverified": 0}
    verified = 0
    newest: dict[str, int] = {}  # holder -> the highest index of led's heads its own records hold
    for h in held.get(led.node, []):
        if not h.receipt:
            newest[h.holder] = max(h.index, newest.get(h.holder, -1))
    n = len(led.lines)
    for number, r in found:
        holder = holders.get(r.holder)
        if r.node != led.node or holder is None or holder.cert is None or not r.signed_by(holder.cert.public_key()):
            bad += 1
            continue
        where = f"{led.node}'s receipts line {number}, signed by {r.holder}"
        head = _Held(r.holder, r.index, r.entry_hash, where, r.head_signature, True)
        if not (r.index < n and led.hashes[r.index] == r.entry_hash):
            if not (_cert_trusted(led) and head.proven(led.node, led.cert)):
                bad += 1  # not a head of this ledger, nor one the node provably sent
                continue
            verified += 1
            held.setdefault(led.node, []).append(head)  # evidence against the node's own ledger
            continue
        verified += 1
        held.setdefault(led.node, []).append(head)
        # a holder keeps a node's newest head (which commits to every entry before it), so it
        # dropped nothing while it holds one at or above the receipted index
        if newest.get(r.holder, -1) < r.index:
            report.problems.append(ConsortiumProblem(
                r.holder, None, DROPPED,
                f"{r.holder} signed a receipt for node {led.node}'s head at entry {r.index} ({where}) but "
                f"neither its ledger nor its anchors-final holds that head or a later one: {r.holder}'s record was cut "
                "after the run, it withheld the head, or it stopped (crashed) before writing it", led.node))
    return {"verified": verified, "unverified": bad}


def _cert_trusted(led: _Ledger) -> bool:
    """Whether ``led``'s certificate is its node's (chains to the CA, names the node, is the roster's
    pin when one is given, and is not revoked): only then can it decide which heads the node signed.
    A ledger swapped in under another certificate is judged by the heads its peers hold."""
    checks = led.report.checks
    return led.cert is not None and all(
        checks.get(name) != "fail" for name in ("certificate", "node_id", "roster", "revocation", "integrity"))


def _signature_of(body: Mapping[str, Any]) -> str:
    sig = body.get("signature")
    return sig if isinstance(sig, str) else ""


def _kind_of(line: bytes) -> str | None:
    """An entry's ``kind`` (None when the line is not a JSON entry)."""
    try:
        kind = json.loads(line).get("kind")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _cross_check(led: _Ledger, heads: list[_Held], report: ConsortiumReport) -> NodeSummary:
    """Check every head held for ``led``'s node against its ledger; the node's summary."""
    rep = led.report
    n = len(led.lines)
    summary = NodeSummary(
        node_id=led.node, path=str(led.path), ok=rep.ok, entries=n, epsilon=rep.epsilon,
        target_epsilon=rep.target_epsilon, randomness=rep.randomness, audit=rep,
    )
    matched: list[int] = []
    for holder in sorted({h.holder for h in heads}):
        mine = sorted((h for h in heads if h.holder == holder), key=lambda h: h.index)
        # a head that would prove a cut or a rewrite must be one the node signed: else it is
        # the holder's word only, and a problem of the holder's ledger
        against = [h for h in mine if h.index >= n or led.hashes[h.index] != h.digest]
        unproven = [h for h in against if not h.proven(led.node, led.cert)] if _cert_trusted(led) else []
        if unproven:
            u = unproven[0]
            report.problems.append(ConsortiumProblem(
                holder, u.index, UNPROVEN,
                f"{holder} holds a head of node {led.node} at entry {u.index} ({u.where}) that "
                f"{led.node}'s key never signed and its ledger does not hold ({len(unproven)} such): "
                f"made up by {holder}, or recorded without the head's signature; it is not evidence "
                f"against {led.node}", led.node))
            gone = {id(h) for h in unproven}
            mine = [h for h in mine if id(h) not in gone]
        beyond = [h for h in mine if h.index >= n]
        wrong = [h for h in mine if h.index < n and led.hashes[h.index] != h.digest]
        good = [h.index for h in mine if h.index < n and led.hashes[h.index] == h.digest]
        matched.extend(good)
        if good:
            summary.anchored_by[holder] = max(good)
        if beyond:
            top = beyond[-1]
            report.problems.append(ConsortiumProblem(
                led.node, n, TRUNCATED,
                f"node {led.node}'s ledger ends at entry {n - 1} but {holder} holds its head at "
                f"entry {top.index} ({top.where}): entries {n}..{top.index} are missing "
                "(truncated or rolled back)", holder))
        if wrong:
            first = wrong[0]
            ok_below = max((i for i in good if i < first.index), default=None)
            since = ("no earlier head confirms any entry" if ok_below is None
                     else f"entries up to {ok_below} match {holder}'s heads")
            report.problems.append(ConsortiumProblem(
                led.node, first.index, DIFFERS,
                f"node {led.node}'s entry {first.index} differs from the head {holder} holds "
                f"({first.where}: {first.digest[:16]}…, ledger: {led.hashes[first.index][:16]}…); "
                f"{len(wrong)} of {holder}'s {len(mine)} heads differ, {since}: the ledger was "
                "rewritten (re-signed) or rolled back and restarted", holder))
    upto = max(matched) if matched else None
    summary.anchored_upto = upto
    summary.unanchored_tail = n - (upto + 1 if upto is not None else 0)
    last = (_kind_of(led.lines[-1]) or "unreadable") if n else None
    if n and not (last == "close" and upto == n - 1):
        why = ("no peer holds the head of its close entry" if last == "close"
               else f"not at a close entry (its last is {last!r})")
        held_to = "no peer holds any of its heads" if upto is None else f"peers hold heads up to entry {upto}"
        report.problems.append(ConsortiumProblem(
            led.node, n - 1, UNCONFIRMED_END,
            f"node {led.node}'s ledger ends at entry {n - 1}, {why}; {held_to}: it may have been "
            "cut back to a head its peers hold (what was cut leaves no trace), or the node stopped "
            "without closing, so its end cannot be confirmed"))
    summary.ok = rep.ok and not report.problems_of(led.node)
    return summary


__all__ = [
    "ANCHORS_FINAL",
    "AUDIT",
    "CONSORTIUM_NOTE",
    "DIFFERS",
    "DROPPED",
    "DUPLICATE",
    "MISSING",
    "TRUNCATED",
    "UNCONFIRMED_END",
    "UNPROVEN",
    "ConsortiumProblem",
    "ConsortiumReport",
    "NodeSummary",
    "RosterPolicy",
    "audit_consortium",
    "find_ledgers",
    "load_roster_pins",
    "load_roster_policy",
]
