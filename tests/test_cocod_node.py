"""Two real privfl nodes run CoCoD-SGD ([strategy] name = "cocod") over mutual-TLS gRPC.

In one process (two node threads, each with its own identity, gRPC server, DP client and
signed ledger, as ``privfl launch`` prepares them) so it costs seconds, not process
starts. Every node finishes its steps and its ledger verifies with the recomputed ε; each
round's model leaves at most once to the neighbour; the round-0 release is the public
initial model itself (CoCoD sends the round-start model while it trains), and the release
of round r follows at least r noised DP events in the ledger (write-ahead), so what left
the node carries only already-noised progress; the pure mixing rounds after training add
no DP event and leave both sites with the same final model.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privfl.launch import collect, prepare_run
from privfl.node import run_node
from privfl.transport import model_digest
from tests.helpers import patched_copy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hospitals-gossip" / "consortium.toml"
STEPS, LOCAL = 8, 2
ROUNDS = STEPS // LOCAL
MIXES = 2  # pure mixing rounds after training ([node].consensus_exchanges)
NODES = ["st-mary", "general"]


def _config(tmp_path: Path) -> Path:
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ('nodes = ["st-mary", "general", "childrens", "university"]', f"nodes = {json.dumps(NODES)}"),
        # a neighbour in transport back-off at start (its first connect refused) may miss a round: 2 s, not 10
        ("consensus_exchanges = 20", f"consensus_exchanges = {MIXES}\nsync_timeout = 2.0"),
        ("planned_steps = 150", f"planned_steps = {STEPS}"),
        ("max_steps = 150 ", f"max_steps = {STEPS} "),
        ('name = "async_gossip"\nlocal_steps = 5', f'name = "cocod"\nlocal_steps = {LOCAL}'),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


@pytest.mark.timeout(60)
def test_two_nodes_run_cocod_and_release_only_noised_or_public_models(tmp_path: Path) -> None:
    plan = prepare_run(_config(tmp_path), run_name="cocod")
    errors: dict[str, BaseException] = {}
    level, threads_before = logging.getLogger("privfl").level, torch.get_num_threads()

    def run(nid: str) -> None:
        try:
            run_node(plan.node_configs[nid], install_signals=False)
        except BaseException as exc:  # reported below
            errors[nid] = exc

    workers = [threading.Thread(target=run, args=(nid,), daemon=True) for nid in NODES]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=45)
    finally:
        logging.getLogger("privfl").setLevel(level)
        torch.set_num_threads(threads_before)
    assert not any(w.is_alive() for w in workers) and not errors, errors
    summary = collect(plan, {nid: 0 for nid in NODES}, 0.0)
    for nid in NODES:
        e: dict[str, Any] = summary["nodes"][nid]
        assert e["strategy"] == "cocod" and e["stop_reason"] == "max_steps" and e["steps"] == STEPS, e
        assert e["audit_ok"], (nid, e.get("audit_issue"))
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        d = plan.node_dirs[nid]
        init = np.load(d / "initial_model.npz")
        public = model_digest({k: init[k] for k in init.files}).hex()
        entries = [json.loads(line) for line in (d / "ledger.jsonl").read_text().splitlines()]
        messages, dp_before = {}, 0
        for entry in entries:
            if entry["kind"] == "dp_event":
                dp_before += 1
            elif entry["kind"] == "message":
                body = entry["body"]
                assert body["peer"] != nid and int(body["round"]) not in messages, body  # once per round
                messages[int(body["round"])] = (body["blake3"], dp_before)  # the node's ledger digest: BLAKE3
        # every round's model leaves at most once; a send to a peer still in back-off at start is
        # skipped (nothing leaves), the consensus rounds after training all go out
        assert set(messages) <= set(range(ROUNDS + MIXES)) and len(messages) >= MIXES + ROUNDS // 2, messages
        assert set(range(ROUNDS, ROUNDS + MIXES)) <= set(messages), messages
        if 0 in messages:
            assert messages[0][0] == public  # round 0: the public initial model itself
        for r in sorted(set(messages) - {0}):
            assert messages[r][0] != public
            # r rounds of noised steps recorded before it (all of them before a consensus round's)
            assert messages[r][1] >= min(r, ROUNDS), (nid, r, messages[r])
        assert sum(1 for e in entries if e["kind"] == "dp_event") == ROUNDS  # the mixing rounds cost nothing
    # two sites, W = 1/2: one pure mix after training leaves both with the very same model
    a, b = (np.load(plan.node_dirs[nid] / "final_model.npz") for nid in NODES)
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
