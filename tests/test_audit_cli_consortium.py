"""``privfl audit --consortium RUN --ca CA`` on a run folder as `privfl launch` writes it, and
the single-ledger audit's node id from the certificate, roster pin and "cannot see" note."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from privfl.accounting.ledger import Ledger
from privfl.pki import init_consortium, load_certificate, load_private_key, make_crl, make_node_cert
from tests.helpers import audit_cli
from tests.test_audit_consortium import (
    POLICY,
    _double_sigma,
    insider_rewrite,
    lines_of,
    node_key,
    simulate_run,
    write_lines,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_run(tmp_path_factory.mktemp("cli") / "run", rounds=6)


@pytest.fixture()
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(audit_cli(), ["audit", *args])
    return res.exit_code, res.output


def test_consortium_passes_on_an_untouched_run(run: Path) -> None:
    ca = str(run / "pki" / "ca.pem")
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld")
    assert code == 0, out
    assert "PASS" in out and "anchored" in out and "up to" in out and "verified" in out
    for n in ("h1", "h2", "h3"):
        assert f"│ {n} " in out
    assert "roster.toml" in out  # the run's roster was used by default
    assert "the roster has no [policy]" in out  # and it sets no consortium minimum
    # the sub-command form and JSON
    code, out = invoke("consortium", str(run), "--ca", ca, "--no-pld", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["nodes"]["h1"]["unanchored_tail"] == 0


def test_consortium_names_node_and_entry_of_each_problem(run: Path) -> None:
    ca = str(run / "pki" / "ca.pem")
    p = run / "h3" / "ledger.jsonl"
    lines = lines_of(p)
    write_lines(p, lines[:-2])
    insider_rewrite(run / "h2" / "ledger.jsonl", node_key(run, "h2"), _double_sigma)
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld")
    assert code == 1, out
    assert "FAIL" in out and "Traceback" not in out
    assert f"problem: node h3 entry {len(lines) - 2} truncated (held by h1)" in out
    assert "problem: node h2 entry" in out and "differs (held by h" in out
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld", "--json")
    assert code == 1
    doc = json.loads(out)
    assert {(q["node"], q["kind"]) for q in doc["problems"]} >= {("h3", "truncated"), ("h2", "differs")}
    assert all(q["index"] is not None for q in doc["problems"] if q["kind"] in ("truncated", "differs"))


def test_consortium_bad_input_exits_2_with_one_line(run: Path, tmp_path: Path) -> None:
    ca = str(run / "pki" / "ca.pem")
    for args, words in [
        (["--consortium", str(tmp_path / "nope"), "--ca", ca], "does not exist"),
        (["--consortium", str(tmp_path), "--ca", ca], "no ledgers"),
        (["--consortium", str(run), "--ca", str(tmp_path / "ca.pem")], "does not exist"),
        (["--consortium", str(run), "--ca", ca, "--roster", str(tmp_path / "r.toml")], "does not exist"),
        (["consortium", "--ca", ca], "run folder"),
    ]:
        code, out = invoke(*args)
        assert code == 2, (args, out)
        assert words in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    code, out = invoke("--consortium", str(run), "--ca", str(junk), "--no-pld")
    assert code == 2 and "CA certificate" in out


def test_single_ledger_prints_node_id_and_cannot_see_note(run: Path) -> None:
    ca = str(run / "pki" / "ca.pem")
    code, out = invoke(str(run / "h2" / "ledger.jsonl"), "--ca", ca, "--no-pld")
    assert code == 0, out
    assert "node id (from its certificate): h2" in out
    assert "a single ledger cannot prove it is complete" in out and "--consortium" in out
    # the wrong node's complete ledger passes alone but not with --node-id
    code, out = invoke(str(run / "h2" / "ledger.jsonl"), "--ca", ca, "--no-pld", "--node-id", "h1")
    assert code == 1 and "not 'h1'" in out
    code, out = invoke(str(run / "h2" / "ledger.jsonl"), "--ca", ca, "--no-pld", "--json",
                       "--roster", str(run / "pki" / "roster.toml"))
    assert code == 0, out
    doc = json.loads(out)
    assert doc["certificate_node_id"] == "h2" and doc["checks"]["roster"] == "pass"
    assert any("--consortium" in n for n in doc["notes"])


def _ledger_with_unpinned_cert(run: Path, node: str, tmp_path: Path) -> Path:
    """A ledger whose certificate the consortium CA did sign, but the roster does not pin."""
    ca_cert = load_certificate((run / "pki" / "ca.pem").read_bytes())
    ca_key = load_private_key((run / "pki" / "ca.key").read_bytes())
    cert, key = make_node_cert(ca_cert, ca_key, "test", node)
    path = tmp_path / f"{node}-rogue" / "ledger.jsonl"
    with Ledger.create(path, key, cert.public_bytes(serialization.Encoding.PEM), POLICY, "v",
                       randomness="secure") as led:
        led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
    return path


def test_single_ledger_roster_refuses_an_unpinned_certificate(run: Path, tmp_path: Path) -> None:
    ca = str(run / "pki" / "ca.pem")
    roster = str(run / "pki" / "roster.toml")
    rogue = _ledger_with_unpinned_cert(run, "h1", tmp_path)
    code, out = invoke(str(rogue), "--ca", ca, "--no-pld")
    assert code == 0, out  # chains to the CA: passes without the roster
    code, out = invoke(str(rogue), "--ca", ca, "--no-pld", "--roster", roster)
    assert code == 1 and "roster" in out and "pin" in out
    stranger = _ledger_with_unpinned_cert(run, "h9", tmp_path)
    code, out = invoke(str(stranger), "--ca", ca, "--no-pld", "--roster", roster, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["checks"]["roster"] == "fail"
    assert any(i["kind"] == "roster" and "not in the roster" in i["message"] for i in doc["issues"])
    bad = tmp_path / "bad.toml"
    bad.write_text("consortium = 'x'\n")
    code, out = invoke(str(rogue), "--ca", ca, "--roster", str(bad))
    assert code == 2 and "Traceback" not in out


def test_consortium_refuses_a_swapped_in_ledger(run: Path, tmp_path: Path) -> None:
    """h1's folder holds a ledger with a rogue (CA-signed, unpinned) h1 certificate."""
    rogue = _ledger_with_unpinned_cert(run, "h1", tmp_path)
    shutil.copy(rogue, run / "h1" / "ledger.jsonl")
    (run / "h1" / "anchors-final.jsonl").unlink()
    code, out = invoke("--consortium", str(run), "--ca", str(run / "pki" / "ca.pem"), "--no-pld", "--json")
    assert code == 1
    doc = json.loads(out)
    kinds = {(q["node"], q["kind"], q["detail"]) for q in doc["problems"]}
    assert ("h1", "audit", "roster") in kinds
    assert ("h1", "truncated", None) in kinds or ("h1", "differs", None) in kinds


def _with_policy(run: Path, policy: str) -> Path:
    """The run's roster with a ``[policy]`` table (the consortium's floor on every node)."""
    roster, pristine = run / "pki" / "roster.toml", run / "pki" / "roster.toml.orig"
    if not pristine.exists():
        shutil.copy(roster, pristine)
    head, sep, rest = pristine.read_text().partition("[[nodes]]")
    roster.write_text(f"{head}[policy]\n{policy}\n\n{sep}{rest}")
    return roster


def _overspend(entries: list[dict]) -> list[dict]:
    """The insider's header says target ε 80, and 10 more steps at σ 1, q 1 go in before the close."""
    entries[0]["body"]["policy"]["target_epsilon"] = 80.0
    last_dp = max(i for i, e in enumerate(entries) if e["kind"] == "dp_event")
    extra = json.loads(json.dumps(entries[last_dp]))
    extra["body"].update(noise_multiplier=1.0, sample_rate=1.0, steps=10)
    return [*entries[: last_dp + 1], extra, *entries[last_dp + 1:]]


def test_an_insider_who_raises_its_own_target_fails_against_the_roster_policy(run: Path) -> None:
    """h1 re-signs its ledger with its own key: a header target ε of 80 and ε spent far past the
    consortium's maximum of 8. Its own header vouches for it; the roster's [policy] does not."""
    ca = str(run / "pki" / "ca.pem")
    roster = _with_policy(run, "max_epsilon = 8.0\ndelta = 1e-5")
    ledger = run / "h1" / "ledger.jsonl"
    insider_rewrite(ledger, node_key(run, "h1"), _overspend)
    code, out = invoke(str(ledger), "--ca", ca, "--no-pld", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["epsilon"] > 8.0, out  # the attack: alone, it passes
    code, out = invoke(str(ledger), "--ca", ca, "--no-pld", "--json", "--roster", str(roster))
    assert code == 1, out
    doc = json.loads(out)
    assert doc["checks"]["roster_policy"] == "fail"
    found = [i for i in doc["issues"] if i["kind"] == "roster_policy"]
    assert any("target ε 80 exceeds the roster's [policy].max_epsilon 8" in i["message"] for i in found)
    over = [i for i in found if "ε spent" in i["message"]]
    assert over and over[0]["index"] == next(p["index"] for p in doc["timeline"] if p["epsilon_rdp"] > 8.0)
    # the consortium audit holds every ledger to the run's roster policy (read by default)
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld", "--json")
    assert code == 1
    doc = json.loads(out)
    assert {(q["node"], q["detail"]) for q in doc["problems"] if q["kind"] == "audit"} >= {("h1", "roster_policy")}
    assert not any(q["node"] != "h1" and q["detail"] == "roster_policy" for q in doc["problems"])


def test_roster_delta_and_sigma_floor_bind_every_ledger(run: Path) -> None:
    """An honest run whose nodes all used δ 1e-5 and σ ≥ 1, against a stricter roster."""
    ca = str(run / "pki" / "ca.pem")
    ledger = str(run / "h2" / "ledger.jsonl")
    roster = _with_policy(run, "max_epsilon = 8.0\ndelta = 1e-5\nmin_noise_multiplier = 0.5")
    assert invoke(ledger, "--ca", ca, "--no-pld", "--roster", str(roster))[0] == 0
    roster = _with_policy(run, "delta = 1e-6\nmin_noise_multiplier = 1.005")
    code, out = invoke(ledger, "--ca", ca, "--no-pld", "--json", "--roster", str(roster))
    assert code == 1
    msgs = [i["message"] for i in json.loads(out)["issues"] if i["kind"] == "roster_policy"]
    assert any("δ 1e-05 exceeds the roster's [policy].delta 1e-06" in m for m in msgs)
    assert any("σ floor 0.5 is below the roster's [policy].min_noise_multiplier 1.005" in m for m in msgs)
    # the run's σ cycles 1.00, 1.01, 1.02: every third event is below 1.005
    weak = [json.loads(x)["body"]["noise_multiplier"] for x in lines_of(Path(ledger))
            if json.loads(x)["kind"] == "dp_event"]
    weak = [s for s in weak if s < 1.005]
    assert weak and any(m.startswith(f"{len(weak)} training dp_event(s) with σ below") for m in msgs), msgs


def test_consortium_row_of_a_broken_ledger_shows_how_much_verifies(run: Path) -> None:
    """h2's entry 5 is altered (not re-signed): its row says 5 of its entries verify and its ε is
    that prefix's, even though the raw bytes of later entries still match the heads peers hold."""
    path = run / "h2" / "ledger.jsonl"
    lines = lines_of(path)
    e = json.loads(lines[5])
    e["timestamp"] += 1.0
    lines[5] = json.dumps(e).encode()
    write_lines(path, lines)
    code, out = invoke("--consortium", str(run), "--ca", str(run / "pki" / "ca.pem"), "--no-pld")
    assert code == 1
    row = next(x for x in out.splitlines() if x.startswith("│ h2 "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[2:4] == [str(len(lines)), "5"], row
    assert "note: node h2: its ledger breaks at entry 5; its ε covers entries 0..4 only" in out


def _crl_revoking(run: Path, node: str, when: float, ca_dir: Path | None = None) -> bytes:
    """A CRL signed by the run's CA (or the one in ``ca_dir``) revoking ``node``'s certificate at ``when``."""
    ca_dir = ca_dir or run / "pki"
    ca_cert = load_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = load_private_key((ca_dir / "ca.key").read_bytes())
    serial = load_certificate((run / "pki" / node / "node.pem").read_bytes()).serial_number
    crl = make_crl(ca_cert, ca_key, {serial: dt.datetime.fromtimestamp(when, tz=dt.UTC)})
    return crl.public_bytes(serialization.Encoding.PEM)


def test_an_entry_written_after_the_certificate_was_revoked_fails(run: Path, tmp_path: Path) -> None:
    """The CA revoked h2's certificate (its key was stolen) at the time of its entry 10: entries
    from there on are not the consortium's member's; those before stay valid."""
    ca = str(run / "pki" / "ca.pem")
    ledger = run / "h2" / "ledger.jsonl"
    # h2's ledger, written again by the real API, across a whole second (a CRL dates to the second)
    ledger.unlink()
    (run / "h2" / "anchors-final.jsonl").unlink(missing_ok=True)
    with Ledger.create(ledger, node_key(run, "h2"), (run / "pki" / "h2" / "node.pem").read_bytes(),
                       POLICY, "v", randomness="secure") as led:
        for k in range(6):
            if k == 3:
                time.sleep(1.05)
            led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
    stamps = [json.loads(x)["timestamp"] for x in lines_of(ledger)]
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl_revoking(run, "h2", math.ceil(stamps[3])))
    assert stamps[3] < math.ceil(stamps[3]) <= stamps[4]
    assert invoke(str(ledger), "--ca", ca, "--no-pld")[0] == 0  # without the CRL it passes
    code, out = invoke(str(ledger), "--ca", ca, "--no-pld", "--json", "--crl", str(crl))
    assert code == 1, out
    doc = json.loads(out)
    assert doc["checks"]["revocation"] == "fail"
    first = next(i for i in doc["issues"] if i["kind"] == "certificate_revoked")
    assert first["index"] == 4  # the first entry after the revocation
    assert "3 entries were written after it" in first["message"]
    # revoked after its last entry: every entry was written while the key was trusted
    late = tmp_path / "late.pem"
    late.write_bytes(_crl_revoking(run, "h2", stamps[-1] + 60))
    code, out = invoke(str(ledger), "--ca", ca, "--no-pld", "--json", "--crl", str(late))
    assert code == 0 and json.loads(out)["checks"]["revocation"] == "pass", out
    # another node's revocation does not touch h2; the consortium audit reads <run>/pki/crl.pem
    (run / "pki" / "crl.pem").write_bytes(crl.read_bytes())
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld", "--json")
    assert code == 1
    probs = json.loads(out)["problems"]
    assert {(q["node"], q["detail"]) for q in probs if q["kind"] == "audit"} == {("h2", "certificate_revoked")}
    code, out = invoke("--consortium", str(run), "--ca", ca, "--no-pld", "--crl", str(late), "--json")
    assert not any(q["kind"] == "audit" for q in json.loads(out)["problems"]), out
    # a CRL the consortium CA did not sign is bad input, not a verdict
    init_consortium("other", ["h2"], tmp_path / "other")
    forged = tmp_path / "forged.pem"
    forged.write_bytes(_crl_revoking(run, "h2", stamps[-1] + 60, ca_dir=tmp_path / "other"))
    code, out = invoke(str(ledger), "--ca", ca, "--crl", str(forged))
    assert code == 2 and "not signed by the consortium CA" in out and "Traceback" not in out
    code, out = invoke(str(ledger), "--ca", ca, "--crl", str(tmp_path / "none.pem"))
    assert code == 2 and "CRL file" in out
