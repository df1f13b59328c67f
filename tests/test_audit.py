"""Ledger audit: every kind of tampering is caught at the right entry; ε is recomputed exactly."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from typer.testing import CliRunner

from privfl.accounting.audit import RdpTimeline, audit_ledger, epsilon_from_rdp
from privfl.accounting.ledger import (
    Ledger,
    LedgerPolicy,
    canonical_bytes,
    entry_hash,
    sign_bytes,
    signing_bytes,
    verify_bytes,
)
from tests.helpers import audit_cli
from tests.test_ledger import POLICY, make_pki

pytestmark = pytest.mark.timeout(120)

REL = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
EVENTS = [(1.1, 0.01, 40), (0.9, 0.02, 10), (1.1, 0.01, 25), (2.0, 1.0, 1), (0.9, 0.02, 5)]


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return make_pki(("h1", "h2"))


def build(path: Path, pki: dict[str, Any], events: list[tuple[float, float, int]] = EVENTS,
          policy: LedgerPolicy = POLICY, node: str = "h1") -> Path:
    """A ledger alternating dp_events and messages (header + 2 entries per event)."""
    key, cert = pki["nodes"][node]
    with Ledger.create(path, key, cert, policy, "privfl-test", randomness="secure") as led:
        for i, (s, q, n) in enumerate(events):
            led.append_dp_event(s, q, n, "psac", 1.0)
            led.append_message("h2", i, i, b"payload-%d" % i)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in lines))


def pld_epsilon(groups: dict[tuple[float, float], int], delta: float = 1e-5) -> float:
    """ε at δ of {(σ, q): steps} by dp-accounting's PLDAccountant, called directly."""
    pld = PLDAccountant(neighboring_relation=REL, value_discretization_interval=1e-4)
    for (s, q), n in groups.items():
        pld.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n))
    return float(pld.get_epsilon(delta))


def audit(path: Path, pki: dict[str, Any], **kw: Any) -> Any:
    return audit_ledger(path, pki["ca_pem"], compute_pld=False, **kw)


# --------------------------------------------------------------------------- clean ledger


def test_clean_ledger_passes_every_check(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    rep = audit_ledger(path, pki["ca_pem"], expected_node_id="h1")
    assert rep.ok, rep.issues
    assert rep.first_bad_index is None and rep.issues == []
    assert set(rep.checks) >= {"integrity", "certificate", "policy", "budget", "claimed_epsilon", "node_id"}
    assert all(v == "pass" for v in rep.checks.values())
    assert rep.entries_verified == 11
    assert rep.totals["steps"] == sum(n for _, _, n in EVENTS)
    assert rep.totals["messages"] == 5
    assert rep.totals["bytes_sent"] == sum(len(b"payload-%d" % i) for i in range(5))
    assert rep.totals["peers"] == {"h2": 5}
    assert [p.index for p in rep.timeline] == [1, 3, 5, 7, 9]
    assert json.loads(rep.to_json())["ok"] is True
    # the node id must be the expected one
    assert not audit(path, pki, expected_node_id="h2").ok


def test_epsilon_equals_dp_accounting_directly(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    rep = audit_ledger(path, pki["ca_pem"])
    # RDP: compose every entry separately (no grouping), straight from dp-accounting
    rdp = RdpAccountant(neighboring_relation=REL)
    for i, (s, q, n) in enumerate(EVENTS):
        rdp.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n))
        # ε over time: after each event
        assert rep.timeline[i].epsilon_rdp == pytest.approx(rdp.get_epsilon(1e-5), abs=1e-9)
    assert rep.epsilon_rdp == pytest.approx(rdp.get_epsilon(1e-5), abs=1e-9)
    assert rep.epsilon == rep.epsilon_rdp
    # PLD: the same events, summed per (σ, q)
    groups: dict[tuple[float, float], int] = {}
    for s, q, n in EVENTS:
        groups[(s, q)] = groups.get((s, q), 0) + n
    assert rep.epsilon_pld == pytest.approx(pld_epsilon(groups), abs=1e-9)
    assert 0 < rep.epsilon_pld < rep.epsilon_rdp


def test_vectorised_conversion_matches_library() -> None:
    tl = RdpTimeline(1e-5)
    rng = np.random.default_rng(0)
    for _ in range(12):
        eps = tl.add(float(rng.uniform(0.5, 3)), float(rng.uniform(0.001, 0.2)), int(rng.integers(1, 500)))
        assert eps == pytest.approx(compute_epsilon(tl.orders, tl.rdp, 1e-5)[0], abs=1e-12)
    # edge cases handled as the library does: zero RDP, infinite RDP, negative RDP
    for vec in (np.zeros_like(tl.orders), np.full_like(tl.orders, np.inf), -np.ones_like(tl.orders)):
        assert epsilon_from_rdp(tl.orders, vec, 1e-5) == compute_epsilon(tl.orders, vec, 1e-5)[0]


# --------------------------------------------------------------------------- tampering


def test_every_flipped_byte_in_a_middle_entry_is_named(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    data = path.read_bytes()
    lines = lines_of(path)
    k = 5
    start = sum(len(x) + 1 for x in lines[:k])
    for off in range(len(lines[k]) + 1):  # every byte of the line, and its newline
        flipped = bytearray(data)
        flipped[start + off] ^= 0x01
        res = verify_bytes(bytes(flipped))
        assert res.error is not None, off
        assert res.error.index == k, (off, res.error)
        assert res.error.kind in ("modified", "malformed"), (off, res.error)
        assert len(res.entries) == k


def test_flipped_byte_reported_by_audit(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    data = bytearray(path.read_bytes())
    lines = lines_of(path)
    assert b'"steps":10}' in lines[3]  # entry 3 is the (0.9, 0.02, 10) event
    pos = sum(len(x) + 1 for x in lines[:3]) + lines[3].index(b'"steps":10}') + len(b'"steps":1')
    data[pos] ^= 0x01  # '0' -> '1': the entry now claims 11 steps
    path.write_bytes(bytes(data))
    rep = audit(path, pki)
    assert not rep.ok and rep.first_bad_index == 3
    assert rep.first_issue is not None and rep.first_issue.kind == "modified"


def test_modified_body_is_named(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    e = json.loads(lines[3])
    assert e["kind"] == "dp_event" and e["body"]["steps"] == 10
    e["body"]["steps"] = 1  # an attacker lowers the recorded steps
    lines[3] = canonical_bytes(e)
    write_lines(path, lines)
    rep = audit(path, pki)
    assert not rep.ok and rep.first_bad_index == 3
    assert rep.first_issue is not None and rep.first_issue.kind == "modified"
    assert rep.entries_verified == 3


def test_modified_body_rehashed_but_not_resigned(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    e = json.loads(lines[5])
    e["body"]["noise_multiplier"] = 5.0
    lines[5] = canonical_bytes(e)
    for i in range(6, len(lines)):  # repair the chain after it
        nxt = json.loads(lines[i])
        nxt["prev_hash"] = entry_hash(lines[i - 1])
        lines[i] = canonical_bytes(nxt)
    write_lines(path, lines)
    res = verify_bytes(path.read_bytes())
    assert res.error is not None and res.error.index == 5 and res.error.kind == "modified"
    assert audit(path, pki).first_bad_index == 5


def test_dropped_line_is_named(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    del lines[4]
    write_lines(path, lines)
    rep = audit(path, pki)
    assert not rep.ok and rep.first_bad_index == 4
    assert rep.first_issue is not None and rep.first_issue.kind == "dropped"
    assert "dropped" in rep.first_issue.message


def test_swapped_lines_are_named(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    lines[6], lines[7] = lines[7], lines[6]
    write_lines(path, lines)
    rep = audit(path, pki)
    assert not rep.ok and rep.first_bad_index == 6
    assert rep.first_issue is not None and rep.first_issue.kind == "reordered"


def test_duplicated_line_is_named(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    lines.insert(5, lines[4])
    write_lines(path, lines)
    res = verify_bytes(path.read_bytes())
    assert res.error is not None and res.error.index == 5 and res.error.kind == "duplicated"


def test_entry_resigned_by_another_node_key(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    other_key, other_cert = pki["nodes"]["h2"]
    e = json.loads(lines[7])
    e["signature"] = sign_bytes(other_key, signing_bytes(e))
    lines[7] = canonical_bytes(e)
    write_lines(path, lines)
    rep = audit(path, pki, other_certs=[other_cert])
    assert not rep.ok and rep.first_bad_index == 7
    assert rep.first_issue is not None and rep.first_issue.kind == "foreign_key"
    assert "h2" in rep.first_issue.message
    # without the other node's certificate it is still caught, as a modification
    rep = audit(path, pki)
    assert rep.first_bad_index == 7 and rep.first_issue is not None
    assert rep.first_issue.kind == "modified"


def test_spliced_fork_breaks_the_chain(tmp_path: Path, pki: dict[str, Any]) -> None:
    """An entry replaced by another validly signed entry with the same index (a fork)."""
    path = build(tmp_path / "l.jsonl", pki, EVENTS[:2])
    key, _ = pki["nodes"]["h1"]
    fork = tmp_path / "fork.jsonl"
    fork.write_bytes(path.read_bytes())
    with Ledger.open(path, key) as led:
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)
        led.append_message("h2", 9, 9, b"x")
    with Ledger.open(fork, key) as led:
        led.append_dp_event(1.0, 0.01, 1, "psac", 1.0)  # a smaller, validly signed record
    lines, flines = lines_of(path), lines_of(fork)
    lines[5] = flines[5]
    write_lines(path, lines)
    res = verify_bytes(path.read_bytes())
    assert res.error is not None and res.error.index == 6 and res.error.kind == "chain_break"


def test_torn_last_line_is_torn_not_tampering(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    data = path.read_bytes()
    path.write_bytes(data + data.split(b"\n")[3][:57])
    rep = audit(path, pki)
    assert not rep.ok
    assert rep.first_issue is not None and rep.first_issue.kind == "torn_tail"
    assert rep.first_bad_index == 11
    assert rep.entries_verified == 11  # every complete line verified
    assert rep.epsilon_rdp > 0 and rep.checks["budget"] == "pass"


def test_signature_garbage_and_header_tampering(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    e = json.loads(lines[2])
    e["signature"] = base64.b64encode(b"not a signature").decode()
    bad = lines.copy()
    bad[2] = canonical_bytes(e)
    write_lines(path, bad)
    assert audit(path, pki).first_bad_index == 2
    # a looser policy written into the header breaks its signature
    h = json.loads(lines[0])
    h["body"]["policy"]["target_epsilon"] = 100.0
    bad = lines.copy()
    bad[0] = canonical_bytes(h)
    write_lines(path, bad)
    rep = audit(path, pki)
    assert not rep.ok and rep.first_bad_index == 0


def test_certificate_from_another_ca_fails(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki)
    stranger = make_pki(("h1",))
    rep = audit_ledger(path, stranger["ca_pem"], compute_pld=False)
    assert not rep.ok and rep.checks["certificate"] == "fail"
    assert rep.checks["integrity"] == "pass"
    # without a CA the chain is reported as skipped, not passed
    rep = audit_ledger(path, None, compute_pld=False)
    assert rep.checks["certificate"] == "skipped"


def test_whole_ledger_forged_by_another_node_fails_node_check(tmp_path: Path, pki: dict[str, Any]) -> None:
    """h2 writes a ledger claiming to be h1: its header cannot name h1."""
    key, cert = pki["nodes"]["h2"]
    with pytest.raises(ValueError, match="not named"):
        Ledger.create(tmp_path / "f.jsonl", key, cert, POLICY, "v", node_id="h1", randomness="secure")


# --------------------------------------------------------------------------- policy and budget


def test_event_beyond_budget_is_flagged(tmp_path: Path, pki: dict[str, Any]) -> None:
    tight = LedgerPolicy(1.5, 1e-5, 0.5, ("psac",))
    events = [(1.0, 0.01, 100)] * 6  # ε(RDP) after each: 1.21, 1.34, 1.45, 1.55, 1.65, 1.75
    path = build(tmp_path / "l.jsonl", pki, events, tight)
    rep = audit(path, pki)
    assert not rep.ok and rep.checks["budget"] == "fail"
    assert rep.checks["integrity"] == "pass"
    assert rep.over_budget == [7, 9, 11]
    assert all(p.epsilon_rdp > 1.5 for p in rep.timeline if p.index in rep.over_budget)
    assert all(p.epsilon_rdp <= 1.5 for p in rep.timeline if p.index not in rep.over_budget)


def test_pld_policy_budget_is_found_by_bisection(tmp_path: Path, pki: dict[str, Any]) -> None:
    pol = LedgerPolicy(1.3, 1e-5, 0.5, ("psac",), accountant="pld")
    pld_after = []
    for k in range(1, 7):
        acc = PLDAccountant(neighboring_relation=REL, value_discretization_interval=1e-4)
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 100 * k))
        pld_after.append(acc.get_epsilon(1e-5))
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, key, cert, pol, "v", randomness="secure") as led:
        for k in range(6):  # the node's recorded ε is the PLD one
            led.append_dp_event(1.0, 0.01, 100, "psac", 1.0, epsilon=pld_after[k])
            led.append_message("h2", k, k, b"m")
    rep = audit_ledger(path, pki["ca_pem"])
    assert rep.epsilon == rep.epsilon_pld == pytest.approx(pld_after[-1], abs=1e-9)
    expected = [2 * k + 1 for k in range(6) if pld_after[k] > 1.3]
    assert expected and len(expected) < 6
    # RDP alone would flag more events; the PLD policy is judged by PLD
    assert len([p for p in rep.timeline if p.epsilon_rdp > 1.3]) > len(expected)
    assert rep.over_budget == expected
    assert rep.checks["claimed_epsilon"] == "pass"


def test_policy_violations_are_flagged(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, key, cert, POLICY, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)
        led.append_dp_event(0.3, 0.01, 10, "psac", 1.0)  # σ below the minimum 0.5
        led.append_dp_event(1.0, 0.01, 10, "none", 1.0)  # clipping rule not allowed
    rep = audit(path, pki)
    assert not rep.ok and rep.checks["policy"] == "fail"
    assert [(i.index, i.kind) for i in rep.issues if i.kind == "policy"] == [(2, "policy"), (3, "policy")]
    assert rep.checks["integrity"] == "pass"


def test_wrong_recorded_epsilon_and_events_after_stop(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, key, cert, POLICY, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0, epsilon=0.01)  # under-reported
        led.append_stop("budget_exhausted")
        led.append_message("h2", 0, 0, b"final model")  # allowed: post-processing
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)  # not allowed after stop
    rep = audit(path, pki)
    assert not rep.ok
    assert rep.checks["claimed_epsilon"] == "fail"
    assert any(i.kind == "epsilon_mismatch" and i.index == 2 for i in rep.issues)
    assert rep.checks["stop"] == "fail"
    assert any(i.kind == "after_stop" and i.index == 5 for i in rep.issues)


# --------------------------------------------------------------------------- CLI


def test_cli_ledger_forms_and_exit_codes(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = build(tmp_path / "l.jsonl", pki, EVENTS[:2])
    ca = tmp_path / "ca.pem"
    ca.write_text(pki["ca_pem"])
    runner = CliRunner()
    app = audit_cli()
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "integrity" in res.output and "ε (RDP)" in res.output
    png = tmp_path / "plots" / "eps.png"
    res = runner.invoke(app, ["audit", "ledger", str(path), "--ca", str(ca), "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] is True and doc["totals"]["steps"] == 50
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # tampered -> 1, naming the entry
    lines = lines_of(path)
    del lines[2]
    write_lines(path, lines)
    res = runner.invoke(app, ["audit", "--ca", str(ca), str(path), "--json", "--no-pld"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["first_bad_index"] == 2 and doc["first_issue"]["kind"] == "dropped"
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld"])
    assert res.exit_code == 1 and "FAIL" in res.output and "dropped" in res.output
    # bad input -> 2 with one clean line
    res = runner.invoke(app, ["audit", str(tmp_path / "missing.jsonl"), "--ca", str(ca)])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert "Traceback" not in res.output
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    res = runner.invoke(app, ["audit", str(path), "--ca", str(junk)])
    assert res.exit_code == 2 and "CA certificate" in res.output


def test_cli_empirical(tmp_path: Path) -> None:
    runner = CliRunner()
    app = audit_cli()
    res = runner.invoke(app, ["audit", "empirical", "--m", "100", "--r", "100", "--v", "75",
                              "--delta", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["epsilon_lb"] == pytest.approx(0.7022, abs=1e-4)
    rng = np.random.default_rng(1)
    signs = np.where(rng.random(200) < 0.5, 1, -1)
    scores = signs * 2.0 + rng.normal(size=200)
    f = tmp_path / "canaries.csv"
    f.write_text("score,included\n" + "".join(f"{s},{int(x > 0)}\n" for s, x in zip(scores, signs)))
    res = runner.invoke(app, ["audit", "empirical", "--scores", str(f), "--k-pos", "30", "--k-neg", "30",
                              "--json", "--epsilon-upper", "100"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["m"] == 200 and doc["r"] == 60 and doc["v"] >= 55 and doc["epsilon_lb"] > 1.0
    # a lower bound above the accountant's ε is a finding: exit 1
    res = runner.invoke(app, ["audit", "empirical", "--scores", str(f), "--k-pos", "30", "--k-neg", "30",
                              "--epsilon-upper", "0.1"])
    assert res.exit_code == 1 and "EXCEEDS" in res.output
    res = runner.invoke(app, ["audit", "empirical", "--scores", str(f)])
    assert res.exit_code == 2 and "--k-pos" in res.output
    res = runner.invoke(app, ["audit", "empirical"])
    assert res.exit_code == 2


def _bad_middle_signature_under_intact_chain(path: Path, pki: dict[str, Any]) -> bytes:
    """Entry 4's signature is garbage; the key holder re-chained and re-signed the rest."""
    key, _ = pki["nodes"]["h1"]
    lines = lines_of(path)
    e = json.loads(lines[4])
    e["signature"] = sign_bytes(key, b"something else")
    lines[4] = canonical_bytes(e)
    for i in range(5, len(lines)):
        nxt = json.loads(lines[i])
        nxt["prev_hash"] = entry_hash(lines[i - 1])
        nxt["signature"] = sign_bytes(key, signing_bytes(nxt))
        lines[i] = canonical_bytes(nxt)
    return b"".join(x + b"\n" for x in lines)


def test_full_check_names_a_bad_middle_signature(tmp_path: Path, pki: dict[str, Any]) -> None:
    data = _bad_middle_signature_under_intact_chain(build(tmp_path / "l.jsonl", pki), pki)
    res = verify_bytes(data)
    assert res.error is not None and res.error.index == 4 and res.error.kind == "modified"
    # the fast reopen path trusts the key holder's last signature (documented)
    assert verify_bytes(data, every_signature=False).ok


@pytest.mark.slow
def test_parallel_signature_check(
    tmp_path: Path, pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import privfl.accounting.ledger as ledger_mod
    monkeypatch.setattr(ledger_mod, "PARALLEL_MIN_ENTRIES", 0)
    path = build(tmp_path / "l.jsonl", pki)
    jobs: list[tuple[bytes, bytes]] = []
    fast = ledger_mod._verify(path.read_bytes(), None, every_signature=False, collect=jobs)
    assert fast.ok and len(jobs) == 9  # all but the header and the last entry
    assert fast.certificate is not None
    assert ledger_mod._verify_parallel(fast.certificate, jobs, 2)
    jobs[3] = (jobs[3][0], jobs[3][1] + b" ")
    assert not ledger_mod._verify_parallel(fast.certificate, jobs, 2)
    data = _bad_middle_signature_under_intact_chain(path, pki)
    res = verify_bytes(data, workers=2)
    assert res.error is not None and res.error.index == 4 and res.error.kind == "modified"


def test_entry_outside_certificate_validity_fails(tmp_path: Path, pki: dict[str, Any]) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(pki["ca_pem"].encode())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now - dt.timedelta(hours=1))
        .sign(pki["ca_key"], hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, key, pem, POLICY, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)
    rep = audit(path, pki)
    assert not rep.ok and rep.checks["certificate"] == "fail"
    assert rep.issues[0].kind == "certificate_validity" and rep.issues[0].index == 0


def test_cli_plot_of_a_ledger_with_no_verified_header_is_one_line(tmp_path: Path, pki: dict[str, Any]) -> None:
    """An empty file and a garbage one: no traceback, one line naming the file, exit 2."""
    ca = tmp_path / "ca.pem"
    ca.write_text(pki["ca_pem"])
    runner, app = CliRunner(), audit_cli()
    for name, data in (("empty.jsonl", b""), ("garbage.jsonl", b"\x00not json\n{\n")):
        bad = tmp_path / name
        bad.write_bytes(data)
        res = runner.invoke(app, ["audit", str(bad), "--ca", str(ca), "--plot", str(tmp_path / "e.png")])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert res.output.startswith("error: cannot plot") and str(bad) in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "e.png").exists()


def test_cli_failed_ledger_says_why_and_what_its_epsilon_covers(tmp_path: Path, pki: dict[str, Any]) -> None:
    """A ledger broken at entry 4: the verdict comes with its reason in one line, and ε (of the
    prefix that verifies) is labelled as covering entries 0..3 only, in the table, JSON and plot."""
    path = build(tmp_path / "l.jsonl", pki)
    lines = lines_of(path)
    e = json.loads(lines[4])
    e["body"]["peer"] = "h3"
    lines[4] = json.dumps(e).encode()
    write_lines(path, lines)
    ca = tmp_path / "ca.pem"
    ca.write_text(pki["ca_pem"])
    runner, app = CliRunner(), audit_cli()
    png = tmp_path / "eps.png"
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld", "--plot", str(png)],
                        env={"COLUMNS": "240"})
    assert res.exit_code == 1, res.output
    out = res.output.splitlines()
    assert out[0].endswith("FAIL") and out[1].startswith("FAIL: ") and "at entry 4" in out[1]
    assert "only entries 0..3, the verified prefix (the ledger breaks at entry 4)" in res.output
    assert "totals over only entries 0..3" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld", "--json"]).output)
    assert doc["reason"].startswith(doc["first_issue"]["kind"] + " at entry 4: ")
    assert doc["scope"].startswith("only entries 0..3") and doc["entries_verified"] == 4
    clean = json.loads(runner.invoke(app, ["audit", str(build(tmp_path / "ok.jsonl", pki)), "--ca", str(ca),
                                           "--no-pld", "--json"]).output)
    assert clean["reason"] is None and clean["scope"] == "the whole ledger"


def test_cli_pld_ledger_shows_the_pld_epsilon_it_is_judged_by(tmp_path: Path, pki: dict[str, Any]) -> None:
    """A PLD ledger whose RDP ε is above the target but whose PLD ε is within it passes, and the
    table, JSON and plot say so: the PLD column and the recorded PLD values, not RDP alone."""
    events = [(1.0, 0.05, 100)] * 4
    groups: dict[tuple[float, float], int] = {}
    pld_after = []
    for s, q, n in events:
        groups[(s, q)] = groups.get((s, q), 0) + n
        pld_after.append(pld_epsilon(groups))
    rdp = RdpAccountant(neighboring_relation=REL)
    rdp.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 400))
    target = (pld_after[-1] + rdp.get_epsilon(1e-5)) / 2  # between the two
    assert pld_after[-1] < target < rdp.get_epsilon(1e-5)
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "pld.jsonl"
    with Ledger.create(path, key, cert, LedgerPolicy(target, 1e-5, 0.5, ("psac",), accountant="pld"), "v",
                       randomness="secure") as led:
        for k, (s, q, n) in enumerate(events):
            led.append_dp_event(s, q, n, "psac", 1.0, epsilon=pld_after[k])
    ca = tmp_path / "ca.pem"
    ca.write_text(pki["ca_pem"])
    runner, app = CliRunner(), audit_cli()
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--plot", str(tmp_path / "p.png")],
                        env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    assert "ε (PLD)" in res.output and "accounted by PLD" in res.output
    assert f"{pld_after[-1]:.4f}" in res.output
    assert "budget judged by PLD" in res.output
    doc = json.loads(runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--json"]).output)
    assert doc["timeline"][-1]["epsilon_pld"] == pytest.approx(pld_after[-1], abs=1e-9)
    assert doc["timeline"][-1]["epsilon_rdp"] > target and all(p["epsilon_pld"] is None for p in doc["timeline"][:-1])
