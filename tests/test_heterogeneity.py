"""Compute heterogeneity in the simulator: the step-time model (fixed / exponential, seeded per
node) and a small version of benchmarks/heterogeneity.py's set-up (async gossip against all-reduce
under a persistent straggler, at equal per-node ε budget)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.preprocessing import PreprocessingSpec
from privfl.sim import STEP_TIMES, SimSpec, StepTimes, StopCriteria, run_simulation

pytestmark = pytest.mark.timeout(60)


def test_fixed_step_times_are_cost_over_speed() -> None:
    st = StepTimes("fixed", 0.05, [1.0, 0.25])
    assert [st(0, 1), st(1, 1), st(1, 3), st(0, 0)] == pytest.approx([0.05, 0.2, 0.6, 0.0])
    assert STEP_TIMES == ("fixed", "exponential")


def test_exponential_step_times_are_seeded_per_node_with_the_right_mean() -> None:
    speeds = [1.0, 0.25]
    a = StepTimes("exponential", 0.05, speeds, seed=3)
    draws = {i: np.array([a(i, 1) for _ in range(4000)]) for i in (0, 1)}
    for i, mean in ((0, 0.05), (1, 0.2)):
        d = draws[i]
        assert d.min() > 0 and abs(d.mean() / mean - 1) < 0.06, (i, d.mean())
        assert 0.9 < d.std() / d.mean() < 1.1  # exponential: the spread equals the mean
        assert np.mean(d > mean) == pytest.approx(math.exp(-1), abs=0.03)  # memoryless tail
    # the same seed gives the same times, whatever order the driver asks nodes in
    b = StepTimes("exponential", 0.05, speeds, seed=3)
    other = [b(1, 1) for _ in range(4000)]
    assert [b(0, 1) for _ in range(4000)] == draws[0].tolist() and other == draws[1].tolist()
    c = StepTimes("exponential", 0.05, speeds, seed=4)
    assert [c(0, 1) for _ in range(5)] != draws[0][:5].tolist()
    k = StepTimes("exponential", 0.05, speeds, seed=3)
    several = np.array([k(0, 5) for _ in range(2000)])  # five steps: Gamma(5), mean 5 × 0.05
    assert abs(several.mean() / 0.25 - 1) < 0.05 and 0.35 < several.std() / several.mean() < 0.55
    with pytest.raises(ConfigError, match="SimSpec.step_time"):
        StepTimes("lognormal", 0.05, speeds)


def _spec(strategy: str, step_time: str = "exponential", **kw: object) -> SimSpec:
    """benchmarks/heterogeneity.py's set-up, small: digits, logistic regression (at the CNN's nominal
    step cost, so compute outweighs the link as there), 4 nodes, one 4× straggler, exponential step
    times, DP-SGD with σ calibrated for 30 steps at ε = 8 (Poisson rate 0.5)."""
    params: dict[str, object] = {}
    # the benchmark's async set-up: two exchanges per step on the communication thread beside the next step
    # (overlap), each gradient at the mean of the node's model and the last 8 peer models it received, a
    # deadline of 1.1 × a nominal node's 30 steps (E[max(compute, exchanges)] for exponential compute), then
    # 5 consensus exchanges. Measured on seeds 0 / 1 / 2 (this test runs seed 0): −0.83 / −1.94 / −0.83 pp against
    # all-reduce, 1.9 / 2.7 / 3.1× sooner, the straggler taking 10 / 12 / 8 steps (before a step expected to end
    # past the deadline was not begun: −0.83 / −0.83 / 0.00 pp, 1.9 / 2.2 / 2.7×, 10 / 14 / 9 steps; one exchange,
    # own-model gradients, no overlap, before a step that begins before the deadline trained in the simulator too:
    # −1.11 / −1.39 / +0.28 pp)
    if strategy == "async_gossip":
        rtt = 2 * (0.005 + (650 * 4 + 64) / 12.5e6)
        nominal = 2 * rtt + 0.05 * math.exp(-2 * rtt / 0.05)
        params = {"exchanges_per_step": 2, "overlap": True, "gradient_peers": 8, "consensus_exchanges": 5,
                  "train_seconds": 1.1 * 30 * nominal}
    base: dict[str, object] = dict(
        dataset="digits", num_nodes=4, partitioning="iid", preprocessing=PreprocessingSpec(scaling="none"),
        model="logreg",
        dp=DPConfig(noise_multiplier=None, planned_steps=30, target_epsilon=8.0, delta=1e-5, batch_size=16,
                    sample_rate=0.5, lr=0.5, clipping="psac", engine="fast"),
        strategy=strategy, strategy_params=params, topology="complete", compute_profile="straggler",
        compute_params={"factor": 4.0}, step_time=step_time, step_cost=0.05, stop=StopCriteria(max_steps=30),
        eval_every=0.1, seed=0)
    base.update(kw)
    return SimSpec(**base)  # type: ignore[arg-type]


def test_simulation_step_times_are_deterministic_and_bad_names_refused() -> None:
    tiny = dict(stop=StopCriteria(max_steps=5), eval_every=None)
    one, two = run_simulation(_spec("allreduce", **tiny)), run_simulation(_spec("allreduce", **tiny))
    assert one.summary["virtual_time"] == two.summary["virtual_time"]
    fixed = 5 * (0.05 / 0.25 + 2 * (0.005 + (650 * 4 + 64) / 12.5e6))  # 5 rounds at the straggler's mean
    assert one.summary["virtual_time"] != pytest.approx(fixed)
    with pytest.raises(ConfigError, match="SimSpec.step_time"):
        _spec("allreduce", "gamma").validate()


def _mean_curve(res) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    by: dict[float, list[float]] = {}
    for r in res.rows:
        by.setdefault(float(r["time"]), []).append(float(r["accuracy"]))
    return sorted((t, float(np.mean(v))) for t, v in by.items())


def test_async_gossip_reaches_allreduce_accuracy_sooner_under_a_straggler() -> None:
    """The benchmark's claim, small: at equal ε budget, async gossip with a training deadline and
    its end-of-training consensus ends within 1 pp of all-reduce's final accuracy, sooner in virtual
    time than all-reduce first reaches (its final − 1 pp); the straggler spends less ε, no node more
    than its budget."""
    sync, asy = run_simulation(_spec("allreduce")), run_simulation(_spec("async_gossip"))
    s_curve, a_curve = _mean_curve(sync), _mean_curve(asy)
    s_final, a_final = s_curve[-1][1], a_curve[-1][1]
    assert a_final >= s_final - 0.01, (a_final, s_final)
    t_sync = next(t for t, a in s_curve if a >= s_final - 0.01)
    assert asy.summary["virtual_time"] < t_sync / 1.5, (asy.summary["virtual_time"], t_sync)
    eps = asy.summary["epsilon"]
    assert eps["node3"] < min(eps["node0"], eps["node1"], eps["node2"])  # the straggler: fewer steps, less ε
    assert asy.summary["steps"]["node3"] < 30 and "deadline" in asy.summary["stop_reasons"]["node3"]
    for res in (sync, asy):
        assert max(res.summary["epsilon"].values()) <= 8.0 + 1e-6


def test_step_time_is_an_experiment_config_key(tmp_path: Path) -> None:
    from privfl.experiment import load_experiment, spec_for
    from tests.helpers import TINY_EXPERIMENT

    path = tmp_path / "e.toml"
    path.write_text(TINY_EXPERIMENT.format(seed=0) + 'step_time = "exponential"\n')
    exp = load_experiment(path)
    assert spec_for(exp, exp.runs[0]).step_time == "exponential"
    path.write_text(TINY_EXPERIMENT.format(seed=0) + 'step_time = "gamma"\n')
    with pytest.raises(ConfigError, match=r"\[simulation\]\.step_time: must be one of fixed, exponential"):
        load_experiment(path)


def test_async_gossip_on_8_bit_whole_model_frames_keeps_accuracy_and_epsilon() -> None:
    """benchmarks/heterogeneity.py ``--bits 8``: async exchanges carry every coordinate's offset from the public
    initial model at 8 bits (the subspace exchange on a mask of all coordinates, no [dp].subspace: the DP step
    is the dense one). Every message is that frame (4× fewer bytes than the float32 model), the fast nodes spend
    the same ε as with float32 frames (their budget; the straggler's steps depend on the exchange time), none
    more, and the run ends within 1 pp of the float32 run's accuracy."""
    from privfl.strategies.compression.subspace import SubspaceK
    from privfl.strategies.compression.subspace_exchange import SubspaceExchange

    dense = run_simulation(_spec("async_gossip"))
    spec = _spec("async_gossip")
    spec.strategy_params.update(compressor="subspace", fraction=1.0, public_seed=0, period=30, bits=8)
    quant = run_simulation(spec)
    shapes = [np.shape(p) for p in dense.models["node0"]]
    init = [np.zeros(s, dtype=np.float32) for s in shapes]
    frame = SubspaceExchange("probe", SubspaceK(fraction=1.0, public_seed=0, period=30, bits=8), init, 30
                             ).encode(init).nbytes
    model = 4 * sum(int(np.prod(s)) for s in shapes)
    sent, messages = sum(quant.summary["bytes_sent"].values()), sum(quant.summary["messages_sent"].values())
    assert messages > 0 and sent == messages * (frame + 64), (sent, messages, frame)
    assert frame < model / 3.5
    eps_q, eps_d = quant.summary["epsilon"], dense.summary["epsilon"]
    assert [eps_q[f"node{i}"] for i in range(3)] == [eps_d[f"node{i}"] for i in range(3)]
    assert max(eps_q.values()) <= 8.0 + 1e-6
    assert abs(quant.summary["mean_accuracy"] - dense.summary["mean_accuracy"]) <= 0.01, (
        quant.summary["mean_accuracy"], dense.summary["mean_accuracy"])


def test_a_step_expected_to_end_past_the_deadline_is_not_begun_and_one_begun_trains(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator charges a step's compute before calling ``step()``. As on a real node (which decides when
    it would begin a step, then trains it however long it takes), a step is begun only if it begins before
    ``train_seconds`` and its expected end -- its beginning plus the node's mean measured step time -- is not
    past it; a step that was begun trains even when it ends after the deadline (here: the straggler's first, with
    no step time measured yet), and one not begun is neither charged nor trained: the node stops at the moment
    it would have begun it."""
    from privfl.strategies.gossip import AsyncGossip

    deadline = 0.17
    begun: dict[str, list[tuple[float, bool]]] = {}
    calls: dict[str, list[tuple[float, int, bool]]] = {}
    begin, step = AsyncGossip.begin_compute, AsyncGossip.step

    def spy_begin(self: AsyncGossip, t: float) -> bool:
        ok = begin(self, t)
        begun.setdefault(self.node_id, []).append((t, ok))
        return ok

    def spy_step(self: AsyncGossip):  # type: ignore[no-untyped-def]
        t = self.network.now()
        rep = step(self)
        calls.setdefault(self.node_id, []).append((t, rep.local_steps, self.stopped))
        return rep

    monkeypatch.setattr(AsyncGossip, "begin_compute", spy_begin)
    monkeypatch.setattr(AsyncGossip, "step", spy_step)
    res = run_simulation(_spec("async_gossip", "fixed", eval_every=None, strategy_params={
        "exchanges_per_step": 1, "consensus_exchanges": 0, "overlap": True, "train_seconds": deadline}))
    straggler = "node3"  # 0.2 s a step: begins at 0 (trained, ends at 0.2, past the deadline), refused at 0.2
    for node, starts in begun.items():
        trained = [t for t, ok in starts if ok]
        assert [ok for _, ok in starts] == [True] * len(trained) + [False]  # one refusal: then it stops
        assert all(t < deadline for t in trained)
        assert res.summary["steps"][node] == len(trained) == sum(n for _, n, _ in calls[node])
        t_stop, n_last, stopped = calls[node][-1]
        # no compute charged: it stops once the last step's exchange (one round trip, ~10 ms) is back
        assert stopped and n_last == 0 and starts[-1][0] <= t_stop < starts[-1][0] + 0.02
        assert "deadline" in res.summary["stop_reasons"][node]
    for node in ("node0", "node1", "node2"):  # 0.05 s a step: begun at 0, 0.05, 0.10 (ends 0.15); 0.15 + 0.05 > 0.17
        assert [round(t, 6) for t, ok in begun[node]] == [0.0, 0.05, 0.1, 0.15] and res.summary["steps"][node] == 3
    assert res.summary["steps"][straggler] == 1 and begun[straggler] == [(0.0, True), (pytest.approx(0.2), False)]
    assert calls[straggler][0][:2] == (pytest.approx(0.2), 1)  # ended past the deadline, trained all the same


def _benchmark_module():  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "heterogeneity.py"
    spec = importlib.util.spec_from_file_location("heterogeneity_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_paired_gap_rescores_the_runs_final_models_on_their_own_test_records() -> None:
    """``final_gap_on_test_records`` re-scores each run's final node models on the union of the sites' test
    splits: its per-record mean must be the run's own final accuracy (the same records, split and models),
    and the paired bootstrap interval must hold the gap; a wrong split or stale models break the equality."""
    import argparse

    bench = _benchmark_module()
    args = argparse.Namespace(dataset="digits", ema_decay=None, exchanges=1, consensus=2, overlap=True,
                              gradient_peers=0, bits=8, steps=4, epsilon=8.0, sample_rate=0.5, step_time="fixed",
                              latency=0.005, bandwidth=12.5e6, eval_every=0.1, seed=3)
    sync = bench.run("allreduce", 4, 2.0, 0.7, None, args)
    asy = bench.run("async_gossip", 4, 2.0, 0.7, 0.5, args)
    x, y = bench.test_records(4, args)
    for r in (sync, asy):
        per_record = bench.correct_per_record(r, x, y, args)
        assert per_record.shape == (len(y),)
        assert float(per_record.mean()) == pytest.approx(r["final_accuracy"], abs=5e-5)
    paired = bench.paired_gap(sync, asy, 4, args, resamples=500)
    gap = 100 * (asy["final_accuracy"] - sync["final_accuracy"])
    assert paired["test_records"] == len(y) and paired["gap_pp"] == pytest.approx(gap, abs=0.02)
    lo, hi = paired["gap_ci95_pp"]
    assert lo <= paired["gap_pp"] <= hi and paired["one_record_pp"] == pytest.approx(100 / len(y), abs=1e-3)
