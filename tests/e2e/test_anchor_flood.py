"""The anchor flood against a real `privfl node` process.

A consortium of a, b and c; a and b run as real node processes, while c is a member
gone rogue: with its genuine certificate it sends a hundreds of hellos, each signed with
a higher ledger head. Before the fix, a wrote one signed anchor entry per hello (its
ledger grew with whatever c sent). Node a must write at most one anchor for c per entry
of its own, still hold c's newest head at the end (kept back, then written), and finish
with a ledger that audits clean, as b's does.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from privfl.accounting.audit import audit_ledger
from privfl.accounting.ledger import late_anchors_path
from privfl.launch import NodeProcesses, prepare_run
from privfl.peer_network import AdvertisedPolicy, GrpcPeerNetwork
from privfl.pki import NodeIdentity, load_pki
from tests.helpers import patched_copy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"


def _entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_a_member_flooding_hellos_with_rising_heads_cannot_grow_the_ledger(tmp_path: Path) -> None:
    cfg = patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ('nodes = ["st-mary", "general", "childrens", "university"]', 'nodes = ["a", "b", "c"]'),
        ("planned_steps = 150", "planned_steps = 20000"), ("max_steps = 150 ", "max_steps = 20000 "),
        ("max_seconds = 120.0", "max_seconds = 8.0"), ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
        ("consensus_exchanges = 20", "consensus_exchanges = 3\nwait_for_peers = 20.0\npeer_timeout = 2.0\n"
                                     "linger = 3.0\nconsensus_wait = 3.0"),
    ])
    plan = prepare_run(cfg, run_name="flood")
    _ca, roster, crl = load_pki(plan.pki_dir)
    counter = itertools.count(1000)
    head = [next(counter)]
    rogue = GrpcPeerNetwork(
        NodeIdentity.load(plan.pki_dir / "c"), roster, crl, ["a"], ["w"], [np.zeros(4, np.float32)],
        policy=AdvertisedPolicy(1.0, 3.0, 1e-5), timeout=2.0, trust_poll=None,
        ledger_head=lambda: (head[0], head[0].to_bytes(32, "big")))
    procs = NodeProcesses(plan, grace=5.0)
    accepted: list[int] = []
    try:
        procs.start("a")
        procs.start("b")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and procs.poll()["a"] is None:
            head[0] = next(counter)
            if rogue.notify("hello", ["a"], timeout=2.0):
                accepted.append(head[0])
            elif accepted:
                time.sleep(0.05)
        assert procs.wait(60), "the nodes did not finish"
        logs = {n: (plan.node_dirs[n] / "node.log").read_text() for n in ("a", "b")}
        for n in ("a", "b"):
            assert procs.returncodes[n] == 0, (n, logs[n][-3000:])
    finally:
        rogue.close()
        procs.cleanup()
    assert not procs.running()
    assert len(accepted) >= 200, len(accepted)  # the flood reached a
    ledger = _entries(plan.node_dirs["a"] / "ledger.jsonl")
    own = [e for e in ledger if e["kind"] in ("dp_event", "stop", "close")]  # a's own progress, not releases
    from_c = [e["body"]["index"] for e in ledger if e["kind"] == "anchor" and e["body"]["peer"] == "c"]
    late = late_anchors_path(plan.node_dirs["a"] / "ledger.jsonl")
    late_c = [e["body"]["index"] for e in _entries(late) if e["body"]["peer"] == "c"] if late.exists() else []
    # at most one anchor for c per DP event of a's own (the chain), at most two after the close
    assert len(from_c) <= len(own), (len(from_c), len(own))
    assert len(from_c) < len(accepted) // 2, (len(from_c), len(accepted))
    assert len(late_c) <= 2, late_c
    # and c's newest accepted head is still held (the kept-back head was written)
    assert max(from_c + late_c) == accepted[-1], (max(from_c + late_c), accepted[-1])
    # a still anchors its honest neighbour, and both ledgers audit clean from the run folder
    assert any(e["kind"] == "anchor" and e["body"]["peer"] == "b" for e in ledger)
    for n in ("a", "b"):
        report = audit_ledger(plan.node_dirs[n] / "ledger.jsonl", ca_pem=(plan.pki_dir / "ca.pem").read_bytes())
        assert report.ok, (n, report.reason)
