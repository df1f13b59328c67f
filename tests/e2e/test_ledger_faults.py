"""A node whose ledger stops taking writes mid-run stops fail closed, and restarts on it.

Issue 11, finding 6: a ledger made immutable for a moment (``chattr +i``) used to keep the
refused entries in the Python file buffer and flush them later beside the next one (one
index three times: the audit said "reordered" and the node never started again). Here a
real node process of a four-hospital consortium gets ``chattr +i`` on its ledger while it
trains: it must exit 2 with one line naming the ledger and the OS reason, leave a ledger
that verifies, and, once the file is writable again, restart on it and finish with no
duplicate index. The second test fills the disk under a lone node (its output folder on
a small tmpfs) mid-run: whichever of its files hits ENOSPC first, it exits 2 with one line,
and after room is made it restarts on its ledger and finishes.

Faults: ``chattr +i`` (root, ext4/xfs/btrfs/tmpfs with the immutable flag) and a tmpfs
mount (root); each test skips where this machine cannot cause its fault. Node ledgers
draw secure noise, so the plain audit applies.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from privfl.accounting.audit import audit_ledger
from privfl.launch import NodeProcesses, dump_toml, last_metrics, prepare_run
from privfl.pki import init_consortium
from tests.helpers import patched_copy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hospitals-gossip" / "consortium.toml"
VICTIM = "childrens"
STEPS = 300


def _chattr(flag: str, path: Path) -> bool:
    exe = shutil.which("chattr")
    if exe is None or os.geteuid() != 0:
        return False
    return subprocess.run([exe, flag, str(path)], capture_output=True).returncode == 0


def _indices(path: Path) -> list[int]:
    return [json.loads(x)["index"] for x in path.read_bytes().splitlines()]


def _error_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith("error:")]


def _config(tmp_path: Path) -> Path:
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ("planned_steps = 150", f"planned_steps = {STEPS}"),
        ("max_steps = 150 ", f"max_steps = {STEPS} "),
        ("checkpoint_every = 5.0", "checkpoint_every = 0.5\nwait_for_peers = 60.0"),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_immutable_ledger_mid_run_stops_the_node_and_it_restarts(tmp_path: Path) -> None:
    plan = prepare_run(_config(tmp_path), run_name="immutable")
    procs = NodeProcesses(plan, grace=5.0)
    d = plan.node_dirs[VICTIM]
    ledger, log_file = d / "ledger.jsonl", d / "node.log"
    ca = (plan.pki_dir / "ca.pem").read_bytes()
    immutable = False
    try:
        procs.start_all()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # well into training
            m = last_metrics(d / "metrics.jsonl")
            if m is not None and m["steps"] >= 40:
                break
            assert procs.poll()[VICTIM] is None, log_file.read_text()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the victim never reached 40 steps")
        if not _chattr("+i", ledger):
            pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag)")
        immutable = True
        deadline = time.monotonic() + 60
        while procs.poll()[VICTIM] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.returncodes.get(VICTIM) == 2, log_file.read_text()[-3000:]
        assert _chattr("-i", ledger)  # the fault goes away
        immutable = False
        text = log_file.read_text()
        errors = _error_lines(text)
        assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text[-3000:]
        assert str(ledger) in errors[0] and "Operation not permitted" in errors[0], errors[0]
        assert "fail closed" in errors[0]

        before = audit_ledger(ledger, ca, expected_node_id=VICTIM, compute_pld=False)
        assert before.ok, before.first_issue  # nothing half-written, nothing buffered
        idx = _indices(ledger)
        assert idx == list(range(len(idx)))
        steps_before = sum(e["steps"] for e in before.events)
        assert 40 <= steps_before < STEPS

        others = [n for n in plan.node_ids if n != VICTIM]
        assert procs.wait(150), "the other nodes did not finish"
        for nid in others:
            assert procs.returncodes[nid] == 0, (nid, (plan.node_dirs[nid] / "node.log").read_text()[-2000:])

        cfg = plan.node_configs[VICTIM]  # its peers are gone now: do not wait for them long
        cfg.write_text(cfg.read_text().replace("wait_for_peers = 60.0", "wait_for_peers = 1.0"))
        procs.start(VICTIM)
        assert procs.wait(150), "the restarted node did not finish"
        text = log_file.read_text()
        assert procs.returncodes[VICTIM] == 0, text[-3000:]
        s = json.loads((d / "summary.json").read_text())
        assert s["stop_reason"] == "max_steps" and s["steps"] == STEPS
        assert s["steps_this_run"] == STEPS - steps_before
        after = audit_ledger(ledger, ca, expected_node_id=VICTIM, compute_pld=False)
        assert after.ok, after.first_issue
        assert after.epsilon_rdp == pytest.approx(s["epsilon"], rel=1e-6)
        idx = _indices(ledger)
        assert idx == list(range(len(idx)))  # no duplicate, no gap
    finally:
        if immutable:
            _chattr("-i", ledger)
        procs.cleanup()
    assert not procs.running()


# --------------------------------------------------------------------------- a full disk


@pytest.fixture()
def tmpfs(make_tmpfs: Any) -> Path:
    """A 1 MiB tmpfs (see conftest.make_tmpfs)."""
    return make_tmpfs("1m")


def _fill(path: Path, leave: int) -> None:
    """Write ``path`` until the filesystem has about ``leave`` bytes free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize > leave:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _node_toml(pki: Path, path: Path, out: Path, max_steps: int) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "node": {"id": "h-a", "output": str(out), "wait_for_peers": 0.0, "consensus_exchanges": 0,
                 "consensus_wait": 0.0, "linger": 0.0, "peer_timeout": 1.0, "checkpoint_every": 0.2},
        "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0},
        "model": {"name": "logreg"},
        "dp": {"noise_multiplier": 5.0, "target_epsilon": 50.0, "batch_size": 32, "sample_rate": 0.14},
        "strategy": {"name": "async_gossip", "local_steps": 1},
        "stop": {"max_steps": max_steps, "max_seconds": 90.0},
    }
    path.write_text(dump_toml(tables))
    return path


def _run_node(config: Path, log: Path, timeout: float = 120) -> int:
    """Run ``python -m privfl.node`` (stdout and stderr to ``log``, off the full disk); its exit code."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "privfl.node", "--config", str(config)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_disk_mid_run_stops_the_node_and_it_restarts(tmp_path: Path, tmpfs: Path) -> None:
    pki = tmp_path / "pki"
    init_consortium("fulldisk", ["h-a", "h-b"], pki, base_port=47330)
    out = tmpfs / "out"
    _fill(tmpfs / "filler", leave=160 * 1024)  # room for ~100 steps of ledger, metrics and checkpoints
    cfg = _node_toml(pki, tmp_path / "node.toml", out, max_steps=100_000)
    rc = _run_node(cfg, tmp_path / "first.log")
    text = (tmp_path / "first.log").read_text()
    assert rc == 2, text[-3000:]
    errors = _error_lines(text)
    assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text[-3000:]
    assert "No space left on device" in errors[0] and str(out) in errors[0], errors[0]
    assert "Traceback" not in text, text[-3000:]

    (tmpfs / "filler").unlink()  # room again
    ledger = out / "ledger.jsonl"
    ca = (pki / "ca.pem").read_bytes()
    before = audit_ledger(ledger, ca, expected_node_id="h-a", compute_pld=False)
    assert before.ok, before.first_issue
    steps_before = sum(e["steps"] for e in before.events)
    assert steps_before >= 10, (steps_before, errors[0])  # it failed mid-run, not at start

    _node_toml(pki, cfg, out, max_steps=steps_before + 5)
    rc = _run_node(cfg, tmp_path / "second.log")
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "max_steps" and s["steps"] == steps_before + 5
    after = audit_ledger(ledger, ca, expected_node_id="h-a", compute_pld=False)
    assert after.ok, after.first_issue
    idx = _indices(ledger)
    assert idx == list(range(len(idx)))
