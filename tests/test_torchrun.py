"""A node started under ``torchrun`` (two ranks, gloo on 127.0.0.1) gossips with another site.

The README's command, run for real: ``torchrun --nproc_per_node=2 --master_addr=127.0.0.1 -m
privfl node --config node.toml`` for hospital north; ``privfl node`` for south, whose rank 0
forks its worker itself (``[node] ranks = 2``); the two talk over mTLS. Both stop by themselves
at their planned steps; north's two ranks train as one learner (rank 1 takes every step rank 0
takes), its ledger alone records the site's DP events, and the consortium audit passes with
the same ε on both sites (a site spends the same under either launcher).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privfl.launch import free_ports, prepare_run
from tests.e2e.test_ranks import CONSORTIUM as RANKS_CONSORTIUM
from tests.helpers import audit_cli

STEPS = 20  # the consortium's planned_steps and max_steps
# two sites, [node] ranks = 2, 20 steps; the torchrun site ends far sooner than the plain one, so
# its waits for the other's done and goodbye must outlast a loaded CI machine (they end once it answers)
CONSORTIUM = (RANKS_CONSORTIUM.replace('runs_dir = "{runs}"\n', "")
              .replace("consensus_wait = 10.0", "consensus_wait = 60.0").replace("linger = 5.0", "linger = 30.0"))


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(cwd / "node.log", "wb") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(), start_new_session=True)


@pytest.mark.timeout(240)
def test_a_node_under_torchrun_trains_on_two_ranks_and_gossips_with_a_plain_node(tmp_path: Path) -> None:
    (tmp_path / "consortium.toml").write_text(CONSORTIUM)
    plan = prepare_run(tmp_path / "consortium.toml", runs_dir=tmp_path / "runs", run_name="r")
    (master_port,) = free_ports(1)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["south"] = _start([sys.executable, "-m", "privfl", "node", "--config", str(plan.node_configs["south"])],
                              plan.node_dirs["south"])
        procs["north"] = _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_addr=127.0.0.1", f"--master_port={master_port}",
                               "-m", "privfl", "node", "--config", str(plan.node_configs["north"])],
                              plan.node_dirs["north"])
        deadline = time.monotonic() + 200
        for p in procs.values():
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs = {nid: (plan.node_dirs[nid] / "node.log").read_text() for nid in procs}
        assert {nid: p.returncode for nid, p in procs.items()} == {"north": 0, "south": 0}, logs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    log_a = logs["north"]
    assert "2 ranks (gloo, torchrun) train as one learner; this is rank 0" in log_a
    assert f"site rank 1 took {STEPS} steps" in log_a  # rank 1 took part in every step rank 0 took
    summary = {nid: json.loads((plan.node_dirs[nid] / "summary.json").read_text()) for nid in procs}
    assert summary["north"]["stop_reason"] == summary["south"]["stop_reason"] == "max_steps"  # rank 0's, not rank 1's
    assert summary["north"]["steps"] == STEPS and summary["north"]["exchanges"] > 0
    assert [p.name for p in plan.node_dirs["north"].glob("ledger*.jsonl")] == ["ledger.jsonl"]  # one ledger per site

    from typer.testing import CliRunner

    res = CliRunner().invoke(audit_cli(), ["audit", "consortium", str(plan.run_dir), "--ca",
                                           str(plan.pki_dir / "ca.pem"), "--json", "--no-pld"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    nodes = report["nodes"]
    assert nodes["north"]["ok"] and nodes["south"]["ok"]
    assert nodes["north"]["audit"]["totals"]["steps"] == STEPS
    assert nodes["north"]["epsilon"] == pytest.approx(nodes["south"]["epsilon"], rel=1e-9)
    assert 0 < nodes["north"]["epsilon"] <= 3.0
