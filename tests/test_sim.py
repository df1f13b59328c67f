"""The virtual-clock simulator: determinism, time model, strategies of every family, results."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.sim import (
    LinkSpec,
    SimSpec,
    SimWorld,
    StopCriteria,
    compute_speeds,
    consensus_distance,
    run_simulation,
    write_results,
)
from privfl.strategies.base import ModelMessage

pytestmark = pytest.mark.timeout(60)


def dp(**kw: object) -> DPConfig:
    base = dict(noise_multiplier=1.0, batch_size=16, sample_rate=0.14, lr=0.5, target_epsilon=8.0)  # 16 / ~114 rows
    base.update(kw)
    return DPConfig(**base)  # type: ignore[arg-type]


def spec(**kw: object) -> SimSpec:
    base: dict[str, object] = dict(num_nodes=4, local_steps=2, dp=dp(), stop=StopCriteria(max_steps=16),
                                   eval_every=0.05)
    base.update(kw)
    return SimSpec(**base)  # type: ignore[arg-type]


def test_identical_seeds_give_identical_metrics() -> None:
    s = spec(strategy="async_gossip", compute_profile="lognormal", compute_params={"sigma": 0.5})
    a, b = run_simulation(s), run_simulation(s)
    assert len(a.rows) > 8
    assert a.rows == b.rows
    c = run_simulation(spec(strategy="async_gossip", compute_profile="lognormal", compute_params={"sigma": 0.5},
                            seed=1))
    assert c.rows != a.rows


def test_epsilon_per_node_is_the_same_for_async_and_sync_at_equal_steps() -> None:
    a = run_simulation(spec(strategy="async_gossip", stop=StopCriteria(max_steps=12)))
    s = run_simulation(spec(strategy="sync_gossip", stop=StopCriteria(max_rounds=6)))
    assert a.summary["steps"] == s.summary["steps"] == {f"node{i}": 12 for i in range(4)}
    for nid in a.node_ids:
        assert a.summary["epsilon"][nid] == pytest.approx(s.summary["epsilon"][nid], rel=1e-12)
        assert 0 < a.summary["epsilon"][nid] < 8.0
    # the rows carry the same ε as the summary at the end
    last = {r["node"]: r["epsilon"] for r in a.rows[-4:]}
    assert last == a.summary["epsilon"]


def test_async_gossip_learns_and_counts_bytes() -> None:
    r = run_simulation(spec(strategy="async_gossip", stop=StopCriteria(max_steps=40)))
    assert r.summary["mean_accuracy"] > 0.85
    model_bytes = (30 * 2 + 2) * 4  # logreg on 30 features, float32
    header = LinkSpec().header_bytes
    # ring of 4 is bipartite: the 2 active nodes initiate 20 exchanges each (request + reply)
    sent = r.summary["bytes_sent"]
    assert sent["node0"] == sent["node2"] == 20 * (model_bytes + header)
    assert sent["node1"] + sent["node3"] == 40 * (model_bytes + header)
    assert sum(sent.values()) == sum(r.summary["bytes_received"].values())
    # the consensus distance is recorded and shrinks relative to no-communication drift
    assert all(row["consensus_max"] >= 0 for row in r.rows)


def test_straggler_costs_virtual_time_not_wall_time() -> None:
    fast = run_simulation(spec(strategy="sync_gossip", stop=StopCriteria(max_rounds=5), step_cost=0.1))
    slow = run_simulation(spec(strategy="sync_gossip", stop=StopCriteria(max_rounds=5), step_cost=0.1,
                               compute_profile="straggler", compute_params={"factor": 4.0, "index": 1}))
    comm = fast.summary["virtual_time"] - 5 * 2 * 0.1
    assert comm > 0
    assert slow.summary["virtual_time"] == pytest.approx(5 * 2 * 0.1 * 4 + comm, rel=1e-9)
    # asynchronous: by a deadline the straggler has done about a quarter of the others' steps
    r = run_simulation(spec(strategy="async_gossip", step_cost=0.01, local_steps=1, dp=dp(noise_multiplier=5.0),
                            stop=StopCriteria(max_time=1.005), compute_profile="straggler",
                            compute_params={"factor": 4.0, "index": 1}, links=LinkSpec(latency=0.0, bandwidth=1e12)))
    steps = r.summary["steps"]
    assert steps["node0"] == steps["node2"] == steps["node3"] == 100
    assert steps["node1"] == 25
    assert r.summary["end_reason"] == "max_time" and r.summary["virtual_time"] == 1.005


def test_sim_network_exchange_costs_a_round_trip() -> None:
    links = LinkSpec(latency=0.01, bandwidth=1000.0, header_bytes=10)
    world = SimWorld(["a", "b"], {"a": ["b"], "b": ["a"]}, links)

    class Echo:
        def handle_exchange(self, sender: str, msg: ModelMessage) -> ModelMessage:
            return ModelMessage(sender="b", round=0, kind="exchange_reply", params=[np.zeros(5, np.float32)])

    world.strategies["b"] = Echo()  # type: ignore[assignment]
    net = world.network("a")
    reply = net.exchange("b", ModelMessage("a", 0, "exchange_request", params=[np.zeros(10, np.float32)]))
    assert reply is not None and reply.sender == "b"
    assert net.now() == pytest.approx(2 * 0.01 + (40 + 10) / 1000 + (20 + 10) / 1000)
    assert world.clocks[1] == 0.0  # the passive side serves in its communication thread
    assert world.bytes_sent == [50, 30] and world.bytes_received == [30, 50]
    # one-way sends arrive after latency + size/bandwidth; a late message misses the deadline
    assert net.send("b", ModelMessage("a", 3, "model", params=[np.zeros(10, np.float32)]))
    nb = world.network("b")
    assert nb.receive(3, ["a"], timeout=0.01) == {}
    assert net.send("b", ModelMessage("a", 4, "model", params=[np.zeros(10, np.float32)]))
    got = nb.receive(4, ["a"], timeout=math.inf)
    assert set(got) == {"a"} and nb.now() == pytest.approx(net.now() + 0.01 + 50 / 1000)


def test_fedavg_collective_round_time_and_consensus() -> None:
    r = run_simulation(spec(strategy="fedavg", stop=StopCriteria(max_rounds=6), step_cost=0.05, dp=dp(lr=2.0),
                            links=LinkSpec(latency=0.01, bandwidth=1e4, header_bytes=0),
                            compute_profile="explicit", compute_params={"speeds": [1.0, 1.0, 0.5, 1.0]}))
    model_bytes = (30 * 2 + 2) * 4
    per_round = 2 * 0.05 / 0.5 + 2 * (0.01 + model_bytes / 1e4)  # slowest node: compute + up + down
    assert r.summary["virtual_time"] == pytest.approx(6 * per_round, rel=1e-9)
    assert r.summary["final_consensus_max"] == 0.0  # everyone holds the global model
    assert r.summary["steps"] == {f"node{i}": 12 for i in range(4)}
    assert r.summary["mean_accuracy"] > 0.8


def test_budget_exhaustion_ends_the_run_fail_closed() -> None:
    r = run_simulation(spec(strategy="async_gossip", dp=dp(target_epsilon=4.0), stop=StopCriteria(max_steps=1000)))
    assert r.summary["end_reason"] == "all_stopped"
    assert all(v <= 4.0 for v in r.summary["epsilon"].values())
    assert all("budget" in v for v in r.summary["stop_reasons"].values())
    assert set(r.summary["steps"].values()) == {7}
    s = run_simulation(spec(strategy="sync_gossip", dp=dp(target_epsilon=4.0), stop=StopCriteria(max_rounds=100)))
    assert s.summary["steps"] == r.summary["steps"] and s.summary["end_reason"] == "all_stopped"


def test_dp_disabled_is_reported_as_no_guarantee() -> None:
    r = run_simulation(spec(strategy="sync_gossip", dp=dp(enabled=False), stop=StopCriteria(max_rounds=3)))
    assert all(math.isinf(v) for v in r.summary["epsilon"].values())
    assert r.summary["dp"] is False
    assert all(math.isinf(row["epsilon"]) for row in r.rows if row["round"] > 0)


def test_target_accuracy_stops_early_and_results_are_written(tmp_path) -> None:
    r = run_simulation(spec(strategy="async_gossip", stop=StopCriteria(max_steps=400, target_accuracy=0.8)))
    assert r.summary["end_reason"] == "target_accuracy"
    assert r.summary["mean_accuracy"] >= 0.8
    assert max(r.summary["steps"].values()) < 400
    mpath, spath = write_results(r, tmp_path / "run")
    with mpath.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(r.rows)
    assert set(rows[0]) >= {"time", "node", "steps", "loss", "accuracy", "epsilon", "bytes_sent",
                            "bytes_received", "consensus_max"}
    summary = json.loads(spath.read_text())
    assert summary["strategy"] == "async_gossip" and summary["end_reason"] == "target_accuracy"


def test_eval_every_rounds_and_time() -> None:
    r = run_simulation(spec(strategy="sync_gossip", stop=StopCriteria(max_rounds=6), eval_every=None,
                            eval_every_rounds=2))
    assert sorted({row["round"] for row in r.rows}) == [0, 2, 4, 6]
    a = run_simulation(spec(strategy="async_gossip", step_cost=0.01, eval_every=0.02,
                            links=LinkSpec(latency=0.0, bandwidth=1e12), stop=StopCriteria(max_time=0.1)))
    times = sorted({row["time"] for row in a.rows})
    assert times[:6] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])


def test_consensus_distance() -> None:
    m = [[np.zeros(2)], [np.array([3.0, 4.0])], [np.zeros(2)]]
    mx, rms = consensus_distance(m)
    assert mx == 5.0
    mean = np.array([1.0, 4 / 3])
    expect = math.sqrt(np.mean([np.sum(mean ** 2), np.sum((np.array([3.0, 4.0]) - mean) ** 2), np.sum(mean ** 2)]))
    assert rms == pytest.approx(expect)
    assert consensus_distance([[np.ones(3)]]) == (0.0, 0.0)


def test_profiles_and_bad_input() -> None:
    assert compute_speeds("homogeneous", 3) == [1.0, 1.0, 1.0]
    assert compute_speeds("straggler", 3, params={"factor": 5}) == [1.0, 1.0, 0.2]
    ln = compute_speeds("lognormal", 5, seed=3, params={"sigma": 0.7})
    assert ln == compute_speeds("lognormal", 5, seed=3, params={"sigma": 0.7}) and len(set(ln)) == 5
    assert compute_speeds("explicit", 2, params={"speeds": [2, 0.5]}) == [2.0, 0.5]
    with pytest.raises(ConfigError, match="profile"):
        compute_speeds("warp", 3)
    with pytest.raises(ConfigError, match="speeds"):
        compute_speeds("explicit", 3, params={"speeds": [1.0]})
    with pytest.raises(ConfigError, match="factor"):
        compute_speeds("straggler", 3, params={"factor": -1})
    with pytest.raises(ConfigError, match="strategy.name"):
        run_simulation(spec(strategy="nope"))
    with pytest.raises(ConfigError, match="stop"):
        run_simulation(spec(stop=StopCriteria()))
    with pytest.raises(ConfigError, match="bandwidth"):
        run_simulation(spec(links=LinkSpec(bandwidth=0)))


@pytest.mark.parametrize("name,params", [("allreduce", {}), ("periodic", {"period": 3}),
                                         ("adaptive_period", {"warmup_syncs": 2, "p_max": 8})])
def test_allreduce_family_runs_as_collective_strategies(name: str, params: dict) -> None:
    r = run_simulation(spec(strategy=name, strategy_params=params, stop=StopCriteria(max_steps=12), eval_every=None,
                            eval_every_rounds=1))
    assert r.summary["final_consensus_max"] == 0.0
    assert min(r.summary["steps"].values()) >= 12
    assert all(sent > 0 for sent in r.summary["bytes_sent"].values())
    eps = set(r.summary["epsilon"].values())
    assert len(eps) == 1 and 0 < eps.pop() < 8.0  # same steps, same q: the same ε on every node


def test_collective_budget_exhaustion_keeps_the_last_model() -> None:
    r = run_simulation(spec(strategy="allreduce", dp=dp(target_epsilon=4.0), stop=StopCriteria(max_rounds=50)))
    assert r.summary["end_reason"] == "all_stopped"
    assert set(r.summary["steps"].values()) == {7}
    assert all("budget" in v for v in r.summary["stop_reasons"].values())


def test_sync_gossip_with_compression_sends_fewer_bytes() -> None:
    # features in [−1, 1] from the published ranges: a larger lr and 16 rounds to learn (z-scores needed 8)
    dense = run_simulation(spec(strategy="sync_gossip", model="mlp", dp=dp(lr=1.0), stop=StopCriteria(max_rounds=16)))
    comp = run_simulation(spec(strategy="sync_gossip", model="mlp", dp=dp(lr=1.0), stop=StopCriteria(max_rounds=16),
                               strategy_params={"compressor": "topk",
                                                "compression_params": {"ratio": 0.05, "error_feedback": False}}))
    assert sum(comp.summary["bytes_sent"].values()) < 0.2 * sum(dense.summary["bytes_sent"].values())
    assert comp.summary["epsilon"] == dense.summary["epsilon"]  # compression is post-processing
    assert comp.summary["mean_accuracy"] > 0.85


# ---- preprocessing: public by default, a DP estimate's cost in each site's budget ----------
def test_default_preprocessing_is_public_and_described_in_the_summary() -> None:
    from privfl.preprocessing import PreprocessingSpec

    res = run_simulation(spec(dp=dp(sample_rate=0.2), stop=StopCriteria(max_steps=4)))
    assert SimSpec().preprocessing == PreprocessingSpec()
    for nid in res.node_ids:
        d = res.summary["preprocessing"][nid]
        assert d["kind"] == "public" and len(d["low"]) == 30 and "event" not in d


def test_dp_preprocessing_event_is_in_each_sites_accountant_and_sigma_is_calibrated_for_both() -> None:
    from privfl.accounting import PrivacyAccountant
    from privfl.preprocessing import PreprocessingSpec

    pre = PreprocessingSpec(scaling="dp", transform="log1p", dp_noise_multiplier=2.0, dp_bound=9.0)
    steps = StopCriteria(max_steps=16)
    # fixed σ: ε is the composition of the preprocessing estimate and the 16 training steps
    fixed = run_simulation(spec(preprocessing=pre, dp=dp(sample_rate=0.2, target_epsilon=50.0), stop=steps))
    acc = PrivacyAccountant("rdp")
    acc.step(2.0, 1.0, 1)
    acc.step(1.0, 0.2, 16)
    plain = run_simulation(spec(dp=dp(sample_rate=0.2, target_epsilon=50.0), stop=steps))
    for nid in fixed.node_ids:
        assert fixed.summary["steps"][nid] == 16
        assert fixed.summary["epsilon"][nid] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert fixed.summary["epsilon"][nid] > plain.summary["epsilon"][nid]
        d = fixed.summary["preprocessing"][nid]
        assert d["kind"] == "dp" and d["event"]["sensitivity"] == pytest.approx(math.sqrt(61))
        assert d["randomness"] == "seeded"
    # seeded per site: different sites draw different noise, the same seed the same
    scales = [tuple(fixed.summary["preprocessing"][n]["estimate"]["scale"]) for n in fixed.node_ids]
    assert len(set(scales)) == len(scales)
    again = run_simulation(spec(preprocessing=pre, dp=dp(sample_rate=0.2, target_epsilon=50.0), stop=steps))
    assert again.rows == fixed.rows
    # calibrated σ: preprocessing + planned training steps spend the target ε, no more
    cal = run_simulation(spec(preprocessing=pre, stop=steps,
                              dp=dp(sample_rate=0.2, noise_multiplier=None, planned_steps=16, target_epsilon=3.0)))
    for nid in cal.node_ids:
        assert cal.summary["steps"][nid] == 16
        assert 2.9 < cal.summary["epsilon"][nid] <= 3.0


def test_site_zscore_still_runs_in_simulation_with_a_warning(caplog) -> None:
    from privfl.preprocessing import PreprocessingSpec

    with caplog.at_level("WARNING", logger="privfl.data"):
        res = run_simulation(spec(preprocessing=PreprocessingSpec(scaling="site"), dp=dp(sample_rate=0.2),
                                  stop=StopCriteria(max_steps=4)))
    assert "private statistics outside DP" in caplog.text
    assert res.summary["preprocessing"]["node0"]["kind"] == "site"


def test_evaluation_records_are_the_records_the_run_scores_its_models_on() -> None:
    """``evaluation_records`` is the union of the sites' test splits as the run splits, seeds and
    preprocesses them: each node's last model, re-scored on it, has the accuracy the run recorded for it;
    a user client that loads its own records has none to give."""
    import torch

    from privfl.data import load_dataset
    from privfl.models import build_model
    from privfl.sim import evaluation_records

    s = spec(strategy="sync_gossip", stop=StopCriteria(max_rounds=3), seed=5)
    res = run_simulation(s)
    records = evaluation_records(s)
    assert isinstance(records, torch.utils.data.TensorDataset)
    x, y = records.tensors
    other = evaluation_records(spec(seed=6))
    assert other is not None and not torch.equal(other.tensors[1], y)  # the seed changes the split
    classes = load_dataset(s.dataset).num_classes
    model = build_model(s.model, tuple(x.shape[1:]), classes, seed=s.seed, hidden=tuple(s.hidden))
    last = {r["node"]: float(r["accuracy"]) for r in res.rows}
    for nid in res.node_ids:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in zip(res.param_names, res.models[nid])})
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(last[nid], abs=1e-6)
    user = spec(client_app="hospital.app:client_fn")  # loads its own records; nothing is imported here
    assert evaluation_records(user) is None
