"""What the simulator counts: one metric row per (evaluation, node), and bytes per node that
mean the same for every strategy (sent = the node's messages or uploads, received = what
reached it: its peers' messages or its downloads), checked against hand-computed values."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privfl.clients import DPConfig
from privfl.sim import LinkSpec, SimSpec, SimWorld, StopCriteria, run_simulation, write_results
from privfl.sim import runner as sim_runner
from privfl.sim.engine import Engine, SimulationResult
from privfl.strategies.base import NodeStrategy, Params, StepReport

pytestmark = pytest.mark.timeout(120)

N = 4
ROUNDS = 5
HEADER = 64


def spec(**kw: Any) -> SimSpec:
    dp = DPConfig(noise_multiplier=1.0, batch_size=16, sample_rate=0.14, lr=0.5, target_epsilon=50.0)
    base: dict[str, Any] = dict(num_nodes=N, local_steps=2, dp=dp, links=LinkSpec(header_bytes=HEADER),
                                eval_every=0.01)
    base.update(kw)
    return SimSpec(**base)


class Recording(SimWorld):
    """The SimWorld a run builds, kept for the test (its strategies know their exchanges)."""

    last: Recording | None = None

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        Recording.last = self


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> type[Recording]:
    monkeypatch.setattr(sim_runner, "SimWorld", Recording)
    Recording.last = None
    return Recording


def csv_rows(res: SimulationResult, d: Path) -> list[dict[str, str]]:
    mpath, _ = write_results(res, d)
    with mpath.open() as f:
        return list(csv.DictReader(f))


def check_one_row_per_evaluation(res: SimulationResult, rows: list[dict[str, str]]) -> None:
    """metrics.csv: each evaluation (time, round) holds each node exactly once, the last one too."""
    assert len(rows) == len(res.rows) == res.summary["evaluations"] * N
    per_eval = Counter((r["time"], r["round"]) for r in rows)
    assert set(per_eval.values()) == {N}, per_eval
    keys = Counter((r["time"], r["round"], r["node"]) for r in rows)
    assert max(keys.values()) == 1
    # the final rows are the summary's final state, written once
    final = rows[-N:]
    assert {r["node"] for r in final} == set(res.node_ids)
    assert {(r["time"], r["round"]) for r in final} == {(rows[-1]["time"], rows[-1]["round"])}
    assert {r["node"]: int(r["bytes_sent"]) for r in final} == res.summary["bytes_sent"]
    assert {r["node"]: int(r["bytes_received"]) for r in final} == res.summary["bytes_received"]
    assert {r["node"]: float(r["accuracy"]) for r in final} == pytest.approx(res.summary["final_accuracy"])


def model_bytes(res: SimulationResult) -> int:
    return int(sum(np.asarray(a).nbytes for a in next(iter(res.models.values()))))


@pytest.mark.parametrize("name,params", [("fedavg", {}), ("allreduce", {}), ("periodic", {"period": 3})])
def test_collective_rounds_count_one_upload_and_one_download_per_node(tmp_path: Path, name: str,
                                                                      params: dict[str, Any]) -> None:
    # eval_every_rounds=1: the last round is evaluated by the cadence, and must not be written again
    res = run_simulation(spec(strategy=name, strategy_params=params, stop=StopCriteria(max_rounds=ROUNDS),
                              eval_every=None, eval_every_rounds=1))
    rows = csv_rows(res, tmp_path)
    check_one_row_per_evaluation(res, rows)
    assert res.summary["evaluations"] == ROUNDS + 1  # the initial model, then one per round
    m = model_bytes(res)
    assert m == (30 * 2 + 2) * 4  # logreg on breast_cancer: float32 weights 2x30 + bias 2
    one = ROUNDS * (m + HEADER)  # each round each node uploads one model and downloads one
    assert res.summary["bytes_sent"] == {nid: one for nid in res.node_ids}
    assert res.summary["bytes_received"] == {nid: one for nid in res.node_ids}
    assert res.summary["messages_sent"] == {nid: ROUNDS for nid in res.node_ids}
    # and cumulative per evaluation: after round k, k uploads and k downloads
    for r in rows:
        k = int(r["round"])
        assert int(r["bytes_sent"]) == int(r["bytes_received"]) == k * (m + HEADER)


def test_ring_all_reduce_counts_its_share_each_way(tmp_path: Path) -> None:
    res = run_simulation(spec(strategy="allreduce", strategy_params={"bytes_convention": "ring"},
                              stop=StopCriteria(max_rounds=ROUNDS), eval_every=None, eval_every_rounds=2))
    check_one_row_per_evaluation(res, csv_rows(res, tmp_path))
    share = math.ceil(2 * (N - 1) / N * model_bytes(res))
    for counter in ("bytes_sent", "bytes_received"):
        assert res.summary[counter] == {nid: ROUNDS * (share + HEADER) for nid in res.node_ids}


def test_round_rows_are_not_duplicated_when_the_last_round_is_not_due(tmp_path: Path) -> None:
    # eval every 2 rounds, 5 rounds: evaluations after rounds 0, 2, 4, then the final one after 5
    res = run_simulation(spec(strategy="fedavg", stop=StopCriteria(max_rounds=ROUNDS), eval_every=None,
                              eval_every_rounds=2))
    rows = csv_rows(res, tmp_path)
    check_one_row_per_evaluation(res, rows)
    assert sorted({int(r["round"]) for r in rows}) == [0, 2, 4, 5]


def test_sync_gossip_counts_what_each_node_sent_and_what_reached_it(tmp_path: Path) -> None:
    res = run_simulation(spec(strategy="sync_gossip", topology="ring", stop=StopCriteria(max_rounds=ROUNDS),
                              eval_every=None, eval_every_rounds=1))
    rows = csv_rows(res, tmp_path)
    check_one_row_per_evaluation(res, rows)
    m = model_bytes(res)
    each = ROUNDS * 2 * (m + HEADER)  # each round, its model to each of its two ring neighbours
    assert res.summary["bytes_sent"] == {nid: each for nid in res.node_ids}
    assert res.summary["bytes_received"] == {nid: each for nid in res.node_ids}
    assert res.summary["messages_sent"] == {nid: 2 * ROUNDS for nid in res.node_ids}
    for r in rows[-N:]:
        assert int(r["bytes_sent"]) == int(r["bytes_received"]) == each


@pytest.mark.parametrize("extra", [{}, {"consensus_exchanges": 2}])
def test_async_gossip_counts_what_the_network_delivered(tmp_path: Path, recorded: type[Recording],
                                                        extra: dict[str, Any]) -> None:
    res = run_simulation(spec(strategy="async_gossip", topology="complete", strategy_params=extra,
                              stop=StopCriteria(max_steps=12)))
    rows = csv_rows(res, tmp_path)
    check_one_row_per_evaluation(res, rows)
    world = recorded.last
    assert world is not None
    m, wire = model_bytes(res), model_bytes(res) + HEADER
    exchanges = {nid: world.strategies[nid].exchanges for nid in res.node_ids}
    served = {nid: world.strategies[nid].served for nid in res.node_ids}
    assert sum(exchanges.values()) == sum(served.values()) > 0
    assert all(getattr(world.strategies[nid], "refused", 0) == 0 for nid in res.node_ids)  # one thread: no refusals
    # a node sends a request per exchange it makes and a reply per one it serves, and receives the other two
    for nid in res.node_ids:
        assert res.summary["bytes_sent"][nid] == (exchanges[nid] + served[nid]) * wire
        assert res.summary["bytes_received"][nid] == (exchanges[nid] + served[nid]) * wire
        assert res.summary["messages_sent"][nid] == exchanges[nid] + served[nid]
    assert sum(res.summary["bytes_sent"].values()) == sum(res.summary["bytes_received"].values())
    assert m > 0


def test_gossip_totals_balance_per_evaluation(tmp_path: Path) -> None:
    res = run_simulation(spec(strategy="sync_gossip", topology="ring", stop=StopCriteria(max_rounds=4),
                              eval_every=0.02))
    rows = csv_rows(res, tmp_path)
    check_one_row_per_evaluation(res, rows)
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["time"], r["round"]), []).append(r)
    for g in groups.values():
        assert sum(int(r["bytes_sent"]) for r in g) == sum(int(r["bytes_received"]) for r in g)


# ---- the engine's end-of-run evaluation, on a toy strategy with exact clock values ---------
class Counting(NodeStrategy):
    """Adds 1 to its one-number model per step; no network."""

    def step(self) -> StepReport:
        self.params = [self.params[0] + 1.0]
        return StepReport(local_steps=1)


class NoEpsilon:
    """A client with no ε (the engine reads ``epsilon`` off clients)."""


def toy_engine(stop: StopCriteria, **kw: Any) -> tuple[Engine, list[Counting]]:
    ids = ["a", "b"]
    world = SimWorld(ids, {"a": ["b"], "b": ["a"]}, LinkSpec())
    strategies = [Counting(NoEpsilon(), world.network(nid), [np.zeros(1)]) for nid in ids]  # type: ignore[arg-type]
    evaluate = lambda p: (0.0, float(p[0][0]))  # noqa: E731  "accuracy" = the step count
    engine = Engine(ids, {nid: NoEpsilon() for nid in ids}, world, [1.0, 1.0], 0.25, 1, stop,  # type: ignore[arg-type]
                    evaluate, **kw)
    return engine, strategies


def test_async_final_evaluation_replaces_one_at_the_same_instant() -> None:
    # steps end at 0.25, 0.5, 0.75, 1.0 (exact); the evaluation due at 1.0 runs before the steps at 1.0,
    # and the final one at max_time 1.0 after them: one evaluation at 1.0, of the final models
    engine, strategies = toy_engine(StopCriteria(max_time=1.0), eval_every=0.5)
    t = engine.run_async(strategies)
    assert t == 1.0
    times = [r["time"] for r in engine.rows]
    assert times == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert engine.evals == 3
    assert [r["accuracy"] for r in engine.rows[-2:]] == [4.0, 4.0]  # all four steps of each node
    assert [r["accuracy"] for r in engine.rows[2:4]] == [1.0, 1.0]  # at 0.5: before the steps ending at 0.5


def test_async_final_evaluation_is_written_once_when_nothing_changed() -> None:
    engine, strategies = toy_engine(StopCriteria(max_time=0.1), eval_every=None)
    assert engine.run_async(strategies) == 0.1  # the first step would end at 0.25: none runs
    assert [r["time"] for r in engine.rows] == [0.0, 0.0, 0.1, 0.1]
    engine, strategies = toy_engine(StopCriteria(max_time=0.0), eval_every=None)
    engine.run_async(strategies)
    assert [r["time"] for r in engine.rows] == [0.0, 0.0] and engine.evals == 1


class Adds:
    """A client whose fit adds ``d`` to every weight (or is refused: its budget is spent)."""

    def __init__(self, d: float, refused: bool = False) -> None:
        self.d, self.refused = d, refused

    def fit(self, params: Params, config: dict[str, Any]) -> tuple[Params, int, dict[str, Any]]:
        if self.refused:
            from privfl.accounting import BudgetExhausted

            raise BudgetExhausted(3.0, 3.0, 1e-5, 10)
        return [p + self.d for p in params], 1, {"steps": int(config["local_steps"])}


def test_periodic_counts_the_average_a_refused_node_takes() -> None:
    from privfl.strategies.periodic import PeriodicAveraging

    start = [np.zeros(4, dtype=np.float32)]
    cr = PeriodicAveraging(2).run_round({"a": Adds(1.0), "b": Adds(3.0), "c": Adds(0.0, refused=True)},
                                        {n: start for n in "abc"}, 0)
    assert cr.stopped == {"c"}
    assert all(np.array_equal(cr.params[n][0], np.full(4, 2.0, np.float32)) for n in "abc")
    assert cr.bytes_up == {"a": 16, "b": 16, "c": 0}  # c trained nothing and sent nothing
    assert cr.bytes_down == {"a": 16, "b": 16, "c": 16}  # but it did receive the average
