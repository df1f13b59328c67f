"""`privfl audit --consortium` on a real launched run, and a rolled-back node refused by its live peers.

One consortium is launched for real (four node processes, mTLS, signed messages carrying
ledger heads). The untouched run passes; each tampering of one hospital's ledger — tail
cuts of 1 and 10 lines, a cut to half, an insider's re-sign with σ doubled or with steps
set to 1 — passes the single-ledger audit yet fails the consortium audit, naming the node
and the entry. A node whose ledger was cut back, restarted while its neighbours still
run, refuses to train.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from privfl.accounting.audit import audit_ledger
from privfl.accounting.audit_consortium import audit_consortium
from privfl.accounting.receipts import read_receipts, receipts_path
from privfl.launch import NodeProcesses, last_metrics, launch_consortium, prepare_run
from tests.helpers import audit_cli, patched_copy
from tests.test_audit_consortium import (
    _double_sigma,
    _steps_to_one,
    insider_rewrite,
    lines_of,
    node_key,
    write_lines,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"
VICTIM = "general"


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("launched")
    cfg = patched_copy(EXAMPLE, tmp / "consortium.toml", [
        ("planned_steps = 150", "planned_steps = 60"), ("max_steps = 150 ", "max_steps = 60 "),
        ('runs_dir = "runs"', f'runs_dir = "{tmp / "runs"}"'), ("timeout = 300.0", "timeout = 150.0"),
    ])
    summary = launch_consortium(cfg, progress=False, run_name="audited")
    assert summary["ok"], summary
    return Path(summary["run_dir"])


@pytest.fixture()
def run(launched: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(launched, dest)
    return dest


def _consortium(run: Path) -> tuple[int, str]:
    res = CliRunner().invoke(audit_cli(), ["audit", "--consortium", str(run), "--ca", str(run / "pki" / "ca.pem"),
                                           "--no-pld"])
    return res.exit_code, res.output


@pytest.mark.timeout(200)
def test_untouched_launched_run_passes(run: Path) -> None:
    code, out = _consortium(run)
    assert code == 0, out
    assert "PASS" in out and "0 problems" in out
    # every node kept its neighbours' signed receipts for the close head its goodbye carried
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    for node, s in rep.nodes.items():
        assert s.receipts["verified"] >= 1 and s.receipts["unverified"] == 0, (node, s.receipts)
        found, bad = read_receipts(receipts_path(run / node / "ledger.jsonl"))
        assert bad == 0 and {r.index for _, r in found} == {s.entries - 1}, node  # the close entry's head


@pytest.mark.timeout(200)
@pytest.mark.parametrize("cut", [1, 10])
def test_tail_truncation_fails_naming_node_and_index(run: Path, cut: int) -> None:
    path = run / VICTIM / "ledger.jsonl"
    lines = lines_of(path)
    write_lines(path, lines[:-cut])
    assert audit_ledger(path, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False).ok  # alone: fooled
    code, out = _consortium(run)
    assert code == 1, out
    assert f"node {VICTIM} entry {len(lines) - cut} truncated" in out, out


@pytest.mark.timeout(200)
def test_truncation_to_half_fails(run: Path) -> None:
    path = run / VICTIM / "ledger.jsonl"
    lines = lines_of(path)
    write_lines(path, lines[: len(lines) // 2])
    code, out = _consortium(run)
    assert code == 1 and f"node {VICTIM} entry {len(lines) // 2} truncated" in out, out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("edit", [_double_sigma, _steps_to_one], ids=["sigma_doubled", "steps_set_to_1"])
def test_insider_resign_fails(run: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    path = run / VICTIM / "ledger.jsonl"
    insider_rewrite(path, node_key(run, VICTIM), edit)
    assert audit_ledger(path, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False).ok  # alone: fooled
    code, out = _consortium(run)
    assert code == 1, out
    assert f"node {VICTIM} entry" in out and "differs" in out, out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rolled_back_node_is_refused_by_its_live_peers(tmp_path: Path) -> None:
    """Kill a node mid-run, cut its ledger back to half, delete its checkpoint, restart it
    while its neighbours run: it asks them for the heads they hold and refuses to train."""
    cfg = patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        # the peers must still run when the victim comes back (it asks them), however slow the
        # machine: more steps than fit in their 120 s; the test stops them once the victim has answered
        ("planned_steps = 150", "planned_steps = 5000"), ("max_steps = 150 ", "max_steps = 5000 "),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
        ("checkpoint_every = 5.0", "checkpoint_every = 0.5\nwait_for_peers = 30.0"),
    ])
    plan = prepare_run(cfg, run_name="rollback")
    procs = NodeProcesses(plan, grace=5.0)
    d = plan.node_dirs[VICTIM]
    try:
        procs.start_all()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            m = last_metrics(d / "metrics.jsonl")
            if m is not None and m["steps"] >= 100:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the victim never reached 100 steps")
        procs.kill(VICTIM, signal.SIGKILL)
        ledger = d / "ledger.jsonl"
        lines = lines_of(ledger)
        write_lines(ledger, lines[: len(lines) // 2])
        (d / "checkpoint.pt").unlink(missing_ok=True)
        assert any(procs.poll()[n] is None for n in plan.node_ids if n != VICTIM), "the peers ended too early"
        procs.start(VICTIM)
        deadline = time.monotonic() + 90  # the victim alone; its peers run on until cleanup
        while procs.poll()[VICTIM] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        log_text = (d / "node.log").read_text()
        assert procs.returncodes[VICTIM] == 2, log_text[-3000:]
        assert "refusing to train" in log_text and "behind" in log_text, log_text[-3000:]
        # it trained no further: the cut ledger gained no DP event
        assert sum(1 for x in lines_of(ledger) if b'"kind":"dp_event"' in x) == \
            sum(1 for x in lines[: len(lines) // 2] if b'"kind":"dp_event"' in x)
    finally:
        procs.cleanup()
    assert not procs.running()
