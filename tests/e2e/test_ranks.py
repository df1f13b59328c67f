"""End to end: two hospitals, each a site of two ranks ([node] ranks = 2), gossip over mutual TLS.

Each node's rank 0 spawns its worker; the pair trains as one DP learner. The consortium
finishes with verified ledgers whose ε is the single-process ε of the same events (one
Poisson(q)-Gaussian(σ) step per step, the site-level q and σ); the workers listen on the
loopback only and never connect to another site's port, and none outlives its node.
"""

from __future__ import annotations

import json
import os
import re
import threading
import tomllib
from pathlib import Path

import pytest

from privfl.accounting import PrivacyAccountant
from privfl.launch import launch_consortium
from tests.test_distributed import _alive, listening

CONSORTIUM = """
[consortium]
name = "ranks"
nodes = ["north", "south"]
runs_dir = "{runs}"
timeout = 120.0

[policy]
min_noise_multiplier = 0.8
max_epsilon = 3.0
delta = 1e-5

[node]
ranks = 2
checkpoint_every = 5.0
consensus_exchanges = 2
consensus_wait = 10.0
linger = 5.0

[data]
source = "breast_cancer"
partitioning = "iid"
seed = 11

[model]
name = "logreg"

[dp]
clipping = "psac"
noise_multiplier = 0.0
planned_steps = 20
target_epsilon = 3.0
delta = 1e-5
batch_size = 32
sample_rate = 0.15
lr = 0.5

[topology]
kind = "complete"

[strategy]
name = "async_gossip"
local_steps = 5

[stop]
max_steps = 20
max_seconds = 90.0
"""


def _connections(pid: int) -> list[tuple[str, int]]:
    """(remote host, remote port) of ``pid``'s established IPv4 TCP connections."""
    inodes = {os.readlink(f)[8:-1] for f in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(f).startswith("socket:[")}
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and f[9] in inodes:  # ESTABLISHED
            addr, port = f[2].split(":")
            out.append((".".join(str(b) for b in bytes.fromhex(addr)[::-1]), int(port, 16)))
    return out


class WorkerWatch(threading.Thread):
    """Finds the site workers of this run and records their sockets.

    A site worker is a process a node forked that stays a node process (its command line
    still names this run). A node also starts children that fork and then exec another
    program (its noise worker): between the two, such a child still shows the node's
    command line. One seen later under another (non-empty) command line is moved to
    ``execd`` and is not a site worker; an empty one is a process that is exiting.
    """

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.seen: dict[int, dict[str, set]] = {}
        self.execd: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            nodes: dict[int, int] = {}  # pid → parent pid, of this run's node processes
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
                    ours = self.marker in cmdline
                    if ours:
                        nodes[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:  # it ended meanwhile
                    continue
                # an exiting process (a zombie) shows an empty command line: it ended, it did not exec
                if cmdline and not ours and int(d.name) in self.seen:  # it exec'd another program
                    self.execd.add(int(d.name))
                    del self.seen[int(d.name)]
            for pid in (p for p, parent in nodes.items() if parent in nodes and p not in self.execd):
                try:
                    rec = self.seen.setdefault(pid, {"listen": set(), "remote": set()})
                    rec["listen"].update(listening(pid))
                    rec["remote"].update(_connections(pid))
                except OSError:  # it ended meanwhile
                    continue
            self.done.wait(0.2)


def _logged_workers(log: str) -> set[int]:
    """The worker pids a node's log says it forked."""
    out: set[int] = set()
    for m in re.finditer(r"site ranks: forked \d+ worker\(s\) \(pids ([\d,]+)\)", log):
        out |= {int(x) for x in m.group(1).split(",")}
    return out


@pytest.mark.timeout(150)
def test_two_sites_of_two_ranks(tmp_path: Path) -> None:
    cfg = tmp_path / "consortium.toml"
    cfg.write_text(CONSORTIUM.format(runs=tmp_path / "runs"))
    watch = WorkerWatch(str(tmp_path / "runs"))
    watch.start()
    try:
        summary = launch_consortium(cfg, progress=False, run_name="ranks")
    finally:
        watch.done.set()
        watch.join(5)
    run_dir = Path(summary["run_dir"])
    grpc_ports = set()
    for nid in ("north", "south"):
        node = tomllib.loads((run_dir / nid / "node.toml").read_text())
        roster = tomllib.loads(Path(node["identity"]["roster"]).read_text())
        grpc_ports |= {int(str(v).rsplit(":", 1)[1]) for v in json.dumps(roster).split('"') if
                       v.startswith("127.0.0.1:")}
    assert len(grpc_ports) == 2
    logged: set[int] = set()
    for nid, e in summary["nodes"].items():
        assert e["exit_code"] == 0, (nid, e)
        assert e["stop_reason"] == "max_steps" and e["steps"] == 20, (nid, e)
        assert e["audit_ok"], (nid, e.get("audit_issue"))
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        assert e["exchanges"] + e["served"] > 0  # they gossiped
        own = json.loads((run_dir / nid / "summary.json").read_text())
        assert own["ranks"] == 2
        # the single-process ε: the site-level q and σ, one Poisson-Gaussian event per step
        entries = [json.loads(line) for line in (run_dir / nid / "ledger.jsonl").read_text().splitlines()]
        training = [x["body"] for x in entries if x["kind"] == "dp_event" and x["body"]["purpose"] == "training"]
        assert sum(int(x["steps"]) for x in training) == 20
        assert {(x["noise_multiplier"], x["sample_rate"]) for x in training} == {(own["noise_multiplier"], 0.15)}
        acc = PrivacyAccountant("rdp")
        acc.step(own["noise_multiplier"], 0.15, 20)
        assert e["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        log = (run_dir / nid / "node.log").read_text()
        assert "site rank 1 of 2" in log and "this is rank 0" in log
        logged |= _logged_workers(log)
    # one worker per site, the ones the nodes logged; loopback only; never a connection to a
    # site's gRPC port; none left behind
    assert len(logged) == 2, logged
    assert set(watch.seen) == logged, (watch.seen, logged, watch.execd)
    for pid, rec in watch.seen.items():
        assert rec["listen"] and all(a.startswith("127.0.0.1:") for a in rec["listen"]), (pid, rec)
        assert all(host == "127.0.0.1" and port not in grpc_ports for host, port in rec["remote"]), (pid, rec)
        assert not _alive(pid), f"worker {pid} outlived its node"
