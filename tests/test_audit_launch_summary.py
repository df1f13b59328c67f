"""The launch summary audits each node's ledger by the node's own accountant, computes the
other method too, and never shows a placeholder for a value that was not computed."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from privfl.accounting.audit import audit_ledger
from privfl.accounting.ledger import Ledger, LedgerPolicy
from tests.test_ledger import make_pki

pytestmark = pytest.mark.timeout(120)

launch = pytest.importorskip("privfl.launch")


def _plan(tmp_path: Path, pki: dict[str, Any], nodes: dict[str, tuple[str, str]]) -> Any:
    """A LaunchPlan whose node folders hold a ledger each: node id → (accountant, randomness)."""
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (pki_dir / "ca.pem").write_text(pki["ca_pem"])
    dirs: dict[str, Path] = {}
    for nid, (accountant, randomness) in nodes.items():
        d = tmp_path / nid
        d.mkdir()
        key, cert = pki["nodes"][nid]
        pol = LedgerPolicy(20.0, 1e-5, 0.5, ("psac",), accountant=accountant)
        with Ledger.create(d / "ledger.jsonl", key, cert, pol, "v", randomness=randomness) as led:
            led.append_dp_event(2.0, 1.0, 1, "feature_clip", 4.0, purpose="preprocessing")
            led.append_dp_event(1.0, 0.02, 200, "psac", 1.0)
            eps = led.last_epsilon
        (d / "summary.json").write_text(json.dumps({"steps": 200, "epsilon": eps, "stop_reason": "max_steps",
                                                    "accuracy": 0.9}))
        dirs[nid] = d
    return launch.LaunchPlan("t", tmp_path, list(nodes), dirs, {}, pki_dir, 60.0, 5.0, 20.0)


def _render(table: Any) -> str:
    console = Console(width=250, file=io.StringIO())
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)


def _cells(text: str, node: str) -> dict[str, str]:
    """Header → cell of ``node``'s row in a rendered table."""
    rows = [[c.strip() for c in line.split("│" if "│" in line else "┃")[1:-1]]
            for line in text.splitlines() if "│" in line or "┃" in line]
    header = rows[0]
    row = next(r for r in rows[1:] if r and r[0] == node)
    return dict(zip(header, row))


def test_collect_reports_audit_epsilon_by_the_node_accountant(tmp_path: Path) -> None:
    pki = make_pki(("h1", "h2"))
    plan = _plan(tmp_path, pki, {"h1": ("rdp", "secure"), "h2": ("pld", "secure")})
    summary = launch.collect(plan, {"h1": 0, "h2": 0}, 1.0)
    h1, h2 = summary["nodes"]["h1"], summary["nodes"]["h2"]
    for nid, e in (("h1", h1), ("h2", h2)):
        rep = audit_ledger(plan.node_dirs[nid] / "ledger.jsonl", pki["ca_pem"])
        assert e["audit_ok"] is True and e["audit_randomness"] == "secure"
        assert e["audit_epsilon_rdp"] == pytest.approx(rep.epsilon_rdp, abs=1e-12)
        assert rep.epsilon_pld is not None
        assert e["audit_epsilon_pld"] == pytest.approx(rep.epsilon_pld, abs=1e-12)
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-4)  # matches the node's own
    assert h1["audit_accountant"] == "rdp" and h1["audit_epsilon"] == h1["audit_epsilon_rdp"]
    assert h2["audit_accountant"] == "pld" and h2["audit_epsilon"] == h2["audit_epsilon_pld"]
    assert h2["audit_epsilon_pld"] < h2["audit_epsilon_rdp"]  # the two methods really differ
    assert summary["ok"] is True
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["nodes"]["h2"]["audit_epsilon"] == h2["audit_epsilon"]
    text = _render(launch.result_table(summary))
    cells = _cells(text, "h2")  # mixed accountants: each cell names its method
    assert cells["ε (audit, node's accountant)"] == f"{h2['audit_epsilon_pld']:.3f} (pld)"
    assert cells["ε (audit, other method)"] == f"{h2['audit_epsilon_rdp']:.3f} (rdp)"
    assert _cells(text, "h1")["ε (audit, node's accountant)"] == f"{h1['audit_epsilon_rdp']:.3f} (rdp)"
    assert "nan" not in text.lower()


def test_collect_fails_a_seeded_ledger(tmp_path: Path) -> None:
    pki = make_pki(("h1",))
    plan = _plan(tmp_path, pki, {"h1": ("rdp", "seeded")})
    summary = launch.collect(plan, {"h1": 0}, 1.0)
    e = summary["nodes"]["h1"]
    assert e["audit_ok"] is False and e["audit_randomness"] == "seeded" and summary["ok"] is False
    assert "seed" in e["audit_issue"]


def test_collect_holds_each_ledger_to_the_roster_pins_and_policy(tmp_path: Path) -> None:
    """With the run's roster.toml, the summary's audit is the consortium's: the ledgers' headers
    promise ε ≤ 20 (their own word), which a roster cap of 20 admits and a cap of half the ε
    they spent does not."""
    from privfl.pki import ROSTER_FILE, Policy, Roster, RosterNode, dump_roster, fingerprint

    pki = make_pki(("h1", "h2"))
    plan = _plan(tmp_path, pki, {"h1": ("rdp", "secure"), "h2": ("rdp", "secure")})
    spent = audit_ledger(plan.node_dirs["h1"] / "ledger.jsonl", pki["ca_pem"]).epsilon
    pins = {nid: RosterNode(nid, "127.0.0.1:1", fingerprint(cert)) for nid, (_, cert) in pki["nodes"].items()}
    dump_roster(Roster("t", pins, Policy(max_epsilon=20.0)), plan.pki_dir / ROSTER_FILE)
    summary = launch.collect(plan, {"h1": 0, "h2": 0}, 1.0)
    assert summary["ok"] is True and all(e["audit_ok"] for e in summary["nodes"].values())
    dump_roster(Roster("t", pins, Policy(max_epsilon=spent / 2)), plan.pki_dir / ROSTER_FILE)
    summary = launch.collect(plan, {"h1": 0, "h2": 0}, 1.0)
    assert summary["ok"] is False
    for e in summary["nodes"].values():
        assert e["audit_ok"] is False and "[policy].max_epsilon" in e["audit_issue"]


def test_result_table_headers_and_missing_values() -> None:
    summary = {"name": "t", "wall_seconds": 1.0, "nodes": {
        "a": {"exit_code": 0, "steps": 10, "epsilon": 1.5, "audit_ok": True, "audit_accountant": "pld",
              "audit_epsilon": 1.4, "audit_epsilon_pld": 1.4, "audit_epsilon_rdp": 1.9,
              "audit_randomness": "secure", "accuracy": 0.8},
        "b": {"exit_code": 0, "steps": 10, "epsilon": 1.5, "audit_ok": True, "audit_accountant": "pld",
              "audit_epsilon": 1.3, "audit_epsilon_pld": 1.3, "audit_epsilon_rdp": math.nan,
              "audit_randomness": "secure"},
        "c": {"exit_code": 1, "error": "no summary.json (the node did not finish)"},
    }}
    text = _render(launch.result_table(summary))
    assert "ε (audit, pld)" in text and "ε (audit, rdp)" in text
    assert "1.400" in text and "1.900" in text and "1.300" in text
    assert "nan" not in text.lower()
    a, b, c = (_cells(text, n) for n in "abc")
    assert a["ε (audit, pld)"] == "1.400" and a["ε (audit, rdp)"] == "1.900" and a["noise"] == "secure"
    assert b["ε (audit, pld)"] == "1.300" and b["ε (audit, rdp)"] == "-"  # not computed: "-", never nan
    assert c["ε (audit, pld)"] == c["ε (audit, rdp)"] == "-" and c["ledger"] == "FAILED"
