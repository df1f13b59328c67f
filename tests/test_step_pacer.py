"""Fixed-time DP steps ([node].step_seconds): a model leaves at start + steps × step_seconds
whatever a step costs, so a peer timing the releases of a small and a large site sees the
same schedule; a node that falls behind says so once; the setting's bounds name the field."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from privfl.errors import ConfigError
from privfl.node_config import load_node_config
from privfl.step_pacer import StepPacer
from tests.test_node_config import _close, _tables, _write, pki  # noqa: F401  (the module's PKI fixture)

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        assert dt >= 0
        self.now += dt


def release_times(step_cost: float, step_seconds: float, local: int = 5, rounds: int = 8) -> list[float]:
    """When each round's model leaves at a site whose DP step costs ``step_cost`` seconds
    (a stand-in for the Poisson batch q·N: a larger site, a dearer step)."""
    clock = FakeClock()
    pacer = StepPacer("n", step_seconds, clock=clock, sleep=clock.sleep)
    pacer.start(0)
    out, steps = [], 0
    for _ in range(rounds):
        clock.now += 0.003  # the write-ahead ledger entry, the exchange: the same at every site
        clock.now += local * step_cost
        steps += local
        pacer.wait(steps)
        out.append(clock.now - 100.0)
    return out


def test_a_peer_timing_releases_cannot_tell_a_small_site_from_a_large_one() -> None:
    small, large = release_times(0.004, 0.05), release_times(0.03, 0.05)  # 7.5× the records
    assert small == pytest.approx(large, abs=1e-9)
    assert small == pytest.approx([0.25 * (r + 1) for r in range(8)], abs=1e-9)
    # without pacing the timing gives the step cost away (the attack the setting defeats)
    bare_small, bare_large = release_times(0.004, 0.0), release_times(0.03, 0.0)
    assert bare_large[-1] / bare_small[-1] > 5


def test_falling_behind_the_schedule_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="privfl.node"):
        release_times(0.08, 0.05)
    behind = [r for r in caplog.records if "behind [node].step_seconds" in r.getMessage()]
    assert len(behind) == 1 and "raise it" in behind[0].getMessage()


def test_a_restart_starts_the_schedule_at_its_step_count() -> None:
    clock = FakeClock()
    pacer = StepPacer("n", 0.5, clock=clock, sleep=clock.sleep)
    pacer.start(40)  # 40 steps from an earlier run: the new schedule counts from here
    assert pacer.slot(40) == 100.0 and pacer.slot(44) == 102.0
    assert StepPacer("n", 0.0).slot(10) is None  # off by default


def test_a_real_node_holds_its_fit_to_the_steps_slot_outside_the_strategy_lock(
        pki: Path, tmp_path: Path) -> None:  # noqa: F811
    """The wait is in the training thread, after the fit's DP steps and before the model can leave:
    a release itself (a reply served to a probing peer, under the strategy's lock) never waits,
    so a probe cannot tell a node still computing from one waiting for its slot."""
    from privfl.node import Node
    from privfl.step_pacer import PacedClient

    t = _tables(pki, tmp_path / "out", node={"step_seconds": 0.2, "peer_timeout": 10.0},
                strategy={"name": "async_gossip", "local_steps": 3})
    node = Node(load_node_config(_write(tmp_path, t)))
    try:
        client = node.strategy.client
        assert isinstance(client, PacedClient)
        start = time.monotonic()
        node._pacer.start(node.total_steps)
        new, _, metrics = client.fit(client.get_parameters({}), {"local_steps": 3})  # 3 real DP steps
        assert metrics["steps"] == 3 and time.monotonic() - start >= 3 * 0.2  # returned at its slot
        node.ledger.append_dp_event(2.0, 0.14, 3, "psac", 1.0)  # the next fit's steps, written ahead
        t0 = time.monotonic()
        node._on_release("h-b", 1, 0, "00" * 32, 10)  # a reply served meanwhile does not wait for their slot
        assert time.monotonic() - t0 < 0.5  # (their slot is 0.6 s away)
        assert any(e["kind"] == "message" for e in _entries(tmp_path / "out" / "ledger.jsonl"))
    finally:
        _close(node)


def _entries(path: Path) -> list[dict]:
    import json
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_bad_step_seconds_name_the_field(pki: Path, tmp_path: Path) -> None:  # noqa: F811
    from privfl.node import Node, NodeError

    with pytest.raises(ConfigError, match=r"\[node\]\.step_seconds: must be a finite number >= 0"):
        load_node_config(_write(tmp_path, _tables(pki, tmp_path / "o1", node={"step_seconds": -1.0})))
    t = _tables(pki, tmp_path / "o2", node={"step_seconds": 2.0, "peer_timeout": 10.0},
                strategy={"name": "async_gossip", "local_steps": 5})
    with pytest.raises(NodeError, match=r"\[node\]\.step_seconds: 2 s × \[strategy\]\.local_steps 5 = 10 s"):
        Node(load_node_config(_write(tmp_path, t)))
    assert not (tmp_path / "o2" / "ledger.jsonl").exists()
