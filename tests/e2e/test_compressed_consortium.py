"""End to end: three real node processes run compressed sync_gossip (quantize8) over mutual TLS.

Short (a few rounds): the point is that compressed messages really travel between node
processes — every node finishes its steps, its ledger verifies with the recomputed ε,
and every released message the ledger records is the quantised frame's size, not the dense one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privfl.launch import launch_consortium
from tests.helpers import patched_copy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"
STEPS = 12
NODES = ["st-mary", "general", "childrens"]
# logreg on breast_cancer: weight (2, 30) + bias (2) = 62 float32 = 248 bytes dense;
# quant8 carries 62 one-byte codes and (low, step) per tensor = 62 + 16 = 78 payload bytes,
# and travels as one Compressed.to_bytes() frame: a 20-byte header (version, kind, shared
# flag, pad, four u32 array lengths) + those 78 bytes = 98, the bytes the ledger records
DENSE_BYTES, QUANT8_BYTES = 248, 20 + 62 + 16


def _config(tmp_path: Path) -> Path:
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ('nodes = ["st-mary", "general", "childrens", "university"]', f"nodes = {json.dumps(NODES)}"),
        ("timeout = 300.0", "timeout = 90.0"),
        ("planned_steps = 150", f"planned_steps = {STEPS}"),
        ("max_steps = 150 ", f"max_steps = {STEPS} "),
        ('name = "async_gossip"\nlocal_steps = 5',
         'name = "sync_gossip"\nlocal_steps = 2\nparams = { compressor = "quantize8", gamma = 0.5 }'),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


def _message_sizes(ledger: Path) -> list[int]:
    sizes = []
    for line in ledger.read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "message":
            sizes.append(int(entry["body"]["bytes"]))
    return sizes


@pytest.mark.timeout(120)
def test_three_nodes_gossip_quantised_models(tmp_path: Path) -> None:
    summary = launch_consortium(_config(tmp_path), progress=False, run_name="e2e-q8")
    nodes = summary["nodes"]
    assert set(nodes) == set(NODES)
    run_dir = Path(summary["run_dir"])
    for nid, e in nodes.items():
        assert e["exit_code"] == 0, (nid, e)
        assert e["stop_reason"] == "max_steps", (nid, e)
        assert e["steps"] == STEPS
        assert e["audit_ok"], (nid, e.get("audit_issue"))
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        sizes = _message_sizes(run_dir / nid / "ledger.jsonl")
        assert len(sizes) >= 2 * (STEPS // 2) - 2, (nid, sizes)  # to both neighbours, (nearly) every round
        assert set(sizes) == {QUANT8_BYTES} and QUANT8_BYTES < DENSE_BYTES, (nid, sizes)
        assert 0 < e["bytes_received"]


def _async_subspace_config(tmp_path: Path) -> Path:
    """Async gossip on a fixed public mask (half of logreg's 62 coordinates), 4-bit offsets from
    the shared initial model, exchanges on a communication thread beside training (``overlap``)."""
    mask = f"fraction = 0.5, seed = 7, period = {STEPS}"
    return patched_copy(EXAMPLE, tmp_path / "consortium.toml", [
        ('nodes = ["st-mary", "general", "childrens", "university"]', f"nodes = {json.dumps(NODES)}"),
        ("timeout = 300.0", "timeout = 90.0"),
        ("planned_steps = 150", f"planned_steps = {STEPS}\nsubspace = {{ {mask} }}\nengine = \"opacus\""),
        ("max_steps = 150 ", f"max_steps = {STEPS} "),
        ('name = "async_gossip"\nlocal_steps = 5',
         'name = "async_gossip"\nlocal_steps = 2\nparams = { compressor = "subspace", fraction = 0.5, '
         f'public_seed = 7, period = {STEPS}, bits = 4, overlap = true }}'),
        ('runs_dir = "runs"', f'runs_dir = "{tmp_path / "runs"}"'),
    ])


@pytest.mark.timeout(120)
def test_three_nodes_async_gossip_on_a_public_subspace_with_overlap(tmp_path: Path) -> None:
    """Real node processes: every exchange request and reply the ledgers record is the 4-bit
    frame of the mask's values, and the final models never left the public initial model off the mask."""
    from privfl.launch import load_model
    from privfl.strategies.compression.subspace import SubspaceK
    from privfl.strategies.compression.subspace_exchange import SubspaceExchange

    summary = launch_consortium(_async_subspace_config(tmp_path), progress=False, run_name="e2e-async-sub")
    nodes = summary["nodes"]
    assert set(nodes) == set(NODES)
    run_dir = Path(summary["run_dir"])
    init = load_model(run_dir / NODES[0] / "initial_model.npz")
    exchange = SubspaceExchange("test", SubspaceK(fraction=0.5, public_seed=7, period=STEPS, bits=4), init, STEPS)
    frame = len(exchange.encode(init).to_bytes())
    assert frame < DENSE_BYTES
    for nid, e in nodes.items():
        assert e["exit_code"] == 0, (nid, e)
        assert e["steps"] == STEPS, (nid, e)
        assert e["audit_ok"], (nid, e.get("audit_issue"))
        assert e["audit_epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        sizes = _message_sizes(run_dir / nid / "ledger.jsonl")
        assert sizes and set(sizes) == {frame}, (nid, sizes)
        assert 0 < e["bytes_received"], (nid, e)  # exchanges completed, not only requests sent
        assert exchange.off_mask_at_init(load_model(run_dir / nid / "final_model.npz")), nid
