"""``privfl audit --consortium RUN --ca CA`` on a run folder as `privfl launch` writes it, and
the single-ledger audit's node id from the certificate, roster pin and "cannot see" note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from privfl.accounting.ledger import Ledger
from privfl.pki import load_certificate, load_private_key, make_node_cert
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
    assert "PASS" in out and "anchored up to" in out
    for n in ("h1", "h2", "h3"):
        assert f"│ {n} " in out
    assert "roster.toml" in out  # the run's roster was used by default
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
