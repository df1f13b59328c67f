"""The impersonation attack against real `privfl node` processes.

Two hospitals, `a` and `b`, run as real node processes with a launched PKI. The roster
gives b's address as a port where a man in the middle (a TCP proxy in this test) forwards
every connection to a rogue gRPC server holding b's *revoked* old certificate and key;
the genuine b listens elsewhere (``[node].listen``) and reaches a directly. Node a must
refuse the rogue on every call with a logged reason (b's certificate is revoked), send it
not one body byte of its model, apply nothing of it, and still finish, as b does. Before
the fix a proxy like this one received a's model and a averaged in the rogue's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from privfl.launch import NodeProcesses, free_ports, load_model, prepare_run
from privfl.pki import issue_node, load_roster
from tests.e2e.test_mitm import Proxy, _start_rogue
from tests.helpers import patched_copy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"


def test_real_nodes_refuse_a_rogue_holding_the_revoked_certificate(tmp_path: Path) -> None:
    cfg = patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ('nodes = ["st-mary", "general", "childrens", "university"]', 'nodes = ["a", "b"]'),
        ("planned_steps = 150", "planned_steps = 20000"), ("max_steps = 150 ", "max_steps = 20000 "),
        ("max_seconds = 120.0", "max_seconds = 12.0"), ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
        ("consensus_exchanges = 20", "consensus_exchanges = 5\nwait_for_peers = 20.0\npeer_timeout = 3.0"),
    ])
    plan = prepare_run(cfg, run_name="mitm")
    pki = plan.pki_dir
    roster = load_roster(pki / "roster.toml")
    advertised = int(roster.address_of("b").rpartition(":")[2])
    # keep b's current certificate as "old", then re-issue b: the old one is revoked in the CRL
    old = pki / "b.old"
    old.mkdir()
    for f in ("node.pem", "node.key"):
        shutil.copy(pki / "b" / f, old / f)
    issue_node(pki, "b", roster.address_of("b"))
    # the genuine b listens on another port; the roster's address for b is the proxy's
    (real_b,) = free_ports(1)
    b_cfg = plan.node_configs["b"]
    b_cfg.write_text(b_cfg.read_text().replace("[node]\n", f'[node]\nlisten = "127.0.0.1:{real_b}"\n', 1))
    rogue, rogue_port, record = _start_rogue(pki, tmp_path, "b", "revoked_old")
    proxy = Proxy(advertised, rogue_port)
    procs = NodeProcesses(plan, grace=5.0)
    try:
        procs.start_all()
        assert procs.wait(150), "the nodes did not finish"
        logs = {n: (plan.node_dirs[n] / "node.log").read_text() for n in plan.node_ids}
        for n in plan.node_ids:
            assert procs.returncodes[n] == 0, (n, logs[n][-3000:])
        seen = json.loads(record.read_text())
        assert seen["calls"] >= 1 and seen["header"] >= 1, seen  # the attack reached the rogue
        assert seen["data"] == 0 and seen["data_bytes"] == 0, seen  # not one byte of a's model
        refusals = [x for x in logs["a"].splitlines() if "b" in x and "is revoked" in x]
        assert refusals and f"127.0.0.1:{advertised}" in refusals[0], logs["a"][-3000:]
        # nothing of the rogue (its model is all 7.0) reached a's model
        final = load_model(plan.node_dirs["a"] / "final_model.npz")
        assert not any(np.any(np.isclose(p, 7.0)) for p in final)
        # the genuine b took part: a served its requests (a's ledger records models released to b)
        released = [json.loads(x)["body"]["peer"] for x in (plan.node_dirs["a"] / "ledger.jsonl").read_text()
                    .splitlines() if '"kind":"message"' in x]
        assert "b" in released
    finally:
        proxy.close()
        rogue.kill()
        rogue.wait(timeout=10)
        procs.cleanup()
    assert not procs.running()
