"""Fault tolerance: kill -9 one of four nodes mid-run, then restart it.

The other three must finish (an unreachable peer is skipped with backoff, never waited
on forever). The killed node, restarted, must resume with at least the ε its ledger
had recorded (the accountant is rebuilt from the ledger, never from zero), detect and
explicitly repair a torn last ledger line (the crash-during-append case, simulated by
writing half a line, since a kill rarely lands inside one write), and leave a ledger
that still verifies.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from privfl.accounting.audit import audit_ledger
from privfl.launch import NodeProcesses, collect, last_metrics, prepare_run
from tests.helpers import patched_copy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"
VICTIM = "childrens"
STEPS = 400


def _config(tmp_path: Path) -> Path:
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ("planned_steps = 150", f"planned_steps = {STEPS}"),
        ("max_steps = 150 ", f"max_steps = {STEPS} "),
        ("checkpoint_every = 5.0", "checkpoint_every = 0.5\nwait_for_peers = 60.0"),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_one_node_and_restart_it(tmp_path: Path) -> None:
    plan = prepare_run(_config(tmp_path), run_name="fault")
    procs = NodeProcesses(plan, grace=5.0)
    victim_dir = plan.node_dirs[VICTIM]
    ledger = victim_dir / "ledger.jsonl"
    ca = (plan.pki_dir / "ca.pem").read_bytes()
    try:
        procs.start_all()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill it once it is well into training
            m = last_metrics(victim_dir / "metrics.jsonl")
            if m is not None and m["steps"] >= 80:
                break
            assert procs.poll()[VICTIM] is None, "victim exited before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("victim never reached 80 steps")
        procs.kill(VICTIM, signal.SIGKILL)
        assert procs.returncodes[VICTIM] == -signal.SIGKILL

        others = [n for n in plan.node_ids if n != VICTIM]
        assert procs.wait(120), "the surviving nodes did not finish"
        for nid in others:
            assert procs.returncodes[nid] == 0, (nid, (plan.node_dirs[nid] / "node.log").read_text()[-2000:])
            s = json.loads((plan.node_dirs[nid] / "summary.json").read_text())
            assert s["stop_reason"] == "max_steps" and s["steps"] == STEPS

        before = audit_ledger(ledger, ca, expected_node_id=VICTIM, compute_pld=False)
        eps_before = before.epsilon_rdp
        steps_before = sum(e["steps"] for e in before.events)
        assert eps_before > 0 and 0 < steps_before < STEPS
        assert not (victim_dir / "summary.json").exists()
        if before.ok:  # simulate the crash landing inside an append: half a line, no newline
            with open(ledger, "ab") as f:
                f.write(b'{"body":{"mechanism":"poisson_gaussian","noise_multi')
        torn = audit_ledger(ledger, ca, compute_pld=False)
        assert not torn.ok and torn.first_issue is not None and torn.first_issue.kind == "torn_tail"

        cfg = plan.node_configs[VICTIM]  # peers are gone now: do not wait for them long
        cfg.write_text(cfg.read_text().replace("wait_for_peers = 60.0", "wait_for_peers = 1.0"))
        procs.start(VICTIM)
        assert procs.wait(120), "the restarted node did not finish"
        log_text = (victim_dir / "node.log").read_text()
        assert procs.returncodes[VICTIM] == 0, log_text[-3000:]
        assert "torn last line" in log_text and "torn tail repaired" in log_text
        assert "resumed model from checkpoint" in log_text

        s = json.loads((victim_dir / "summary.json").read_text())
        assert s["stop_reason"] == "max_steps" and s["steps"] == STEPS
        assert s["steps_this_run"] == STEPS - steps_before  # resumed, never restarted from zero
        assert s["epsilon"] >= eps_before
        after = audit_ledger(ledger, ca, expected_node_id=VICTIM, compute_pld=False)
        assert after.ok, after.first_issue
        assert after.epsilon_rdp == pytest.approx(s["epsilon"], rel=1e-6)
        notes = [json.loads(x)["body"] for x in ledger.read_text().splitlines() if '"kind":"note"' in x]
        assert any(n.get("note") == "torn_tail_repaired" for n in notes)
        summary = collect(plan, procs.returncodes, 0.0)
        assert all(e["audit_ok"] for e in summary["nodes"].values())
    finally:
        procs.cleanup()
    assert not procs.running()


@pytest.mark.timeout(90)
def test_sigterm_stops_a_node_gracefully(tmp_path: Path) -> None:
    """SIGTERM while waiting for peers: the node stops, checkpoints, records 'signal', exits 0."""
    plan = prepare_run(_config(tmp_path), run_name="sigterm")
    procs = NodeProcesses(plan, grace=20.0)
    nid = plan.node_ids[0]
    d = plan.node_dirs[nid]
    try:
        procs.start(nid)  # alone: it waits (up to 60 s) for neighbours that never come
        deadline = time.monotonic() + 60
        while "serving on port" not in (d / "node.log").read_text() and time.monotonic() < deadline:
            assert procs.poll()[nid] is None
            time.sleep(0.1)
        procs.kill(nid, signal.SIGTERM)
        assert procs.wait(30)
        assert procs.returncodes[nid] == 0, (d / "node.log").read_text()[-2000:]
        s = json.loads((d / "summary.json").read_text())
        assert s["stop_reason"] == "signal"
        assert (d / "checkpoint.pt").exists()
        rep = audit_ledger(d / "ledger.jsonl", (plan.pki_dir / "ca.pem").read_bytes(), compute_pld=False)
        assert rep.ok
        assert '"reason":"signal"' in (d / "ledger.jsonl").read_text()
    finally:
        procs.cleanup()
