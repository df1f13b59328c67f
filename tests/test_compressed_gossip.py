"""Compressed gossip end to end: config wiring, consensus, exact wire bytes, the Released-only rule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.client import NumPyClient

from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.sim import LinkSpec, SimSpec, SimWorld, StopCriteria, run_simulation
from privfl.sim.runner import sync_compression_params
from privfl.strategies.compression import Compressed, Quantize8, Released, TopK, compressor_from_config, released
from privfl.strategies.gossip import ErrorFeedbackGossip, SyncGossip
from privfl.strategies.topology import build_topology

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-compressed" / "compare.toml"


def dp(**kw: Any) -> DPConfig:
    base: dict[str, Any] = dict(noise_multiplier=1.0, batch_size=16, sample_rate=0.14, lr=0.5, target_epsilon=50.0)
    base.update(kw)
    return DPConfig(**base)


def spec(**kw: Any) -> SimSpec:
    base: dict[str, Any] = dict(num_nodes=4, model="logreg", local_steps=1, dp=dp(), strategy="sync_gossip",
                                stop=StopCriteria(max_rounds=8), eval_every_rounds=4)
    base.update(kw)
    return SimSpec(**base)


# ---- fixed-point consensus through the strategies and the simulator's network --------------
class FixedPoint(NumPyClient):
    """Returns its input unchanged (a fixed-point problem: only the gossip moves models)."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [np.array(p, copy=True) for p in parameters], 1, {"epsilon": 0.0, "steps": 1, "dp": 1}


def _run_rounds(models: list[list[np.ndarray]], make_comp: Any, rounds: int, gamma: float) -> tuple[list, int]:
    ids = [f"n{i}" for i in range(len(models))]
    topo = build_topology("ring", ids)
    world = SimWorld(ids, {i: topo.neighbors(i) for i in ids}, LinkSpec())
    nodes = []
    for i, nid in enumerate(ids):
        s = SyncGossip(FixedPoint(), world.network(nid), models[i],
                       {"local_steps": 1, "topology": topo, "compressor": make_comp(), "gamma": gamma,
                        "timeout": math.inf})
        world.strategies[nid] = s
        nodes.append(s)
    for r in range(rounds):
        for s in nodes:
            s.begin_round()
        for nid, s in zip(ids, nodes):
            s.finish_round(world.network(nid).receive(r, list(s.mixing), math.inf))
    return [s.params for s in nodes], sum(world.bytes_sent)


@pytest.mark.parametrize("make_comp", [
    lambda: TopK(ratio=0.2, error_feedback=False),           # CHOCO innovation gossip
    lambda: TopK(ratio=0.2, error_feedback=True),            # error-feedback gossip
    lambda: compressor_from_config("adacomp", bin_size=4, quantize=False),  # AdaComp residue
    lambda: Quantize8(),
], ids=["innovation-topk", "ef-topk", "ef-adacomp", "innovation-q8"])
def test_compressed_gossip_reaches_consensus_on_a_fixed_point_problem(make_comp: Any) -> None:
    rng = np.random.default_rng(0)
    models = [[rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)] for _ in range(6)]
    mean0 = [np.mean([m[k] for m in models], axis=0) for k in range(2)]
    spread0 = max(float(np.abs(m[0] - mean0[0]).max()) for m in models)
    final, _ = _run_rounds(models, make_comp, rounds=120, gamma=0.4)
    spread = max(float(np.abs(m[k] - mean0[k]).max()) for m in final for k in range(2))
    assert spread < 0.02 * spread0  # every node at the initial average: consensus, sum preserved


def test_error_feedback_gossip_refuses_raw_arrays_and_errs_on_unknown_sender() -> None:
    g = ErrorFeedbackGossip("a", {"b": 0.5}, TopK(k=1), 0.5)
    with pytest.raises(TypeError, match="Released"):
        g.make_message([np.ones(3)])
    with pytest.raises(TypeError, match="Released"):
        g.consensus_step(np.ones(3))
    msg = g.make_message(released([np.array([1.0, -2.0, 0.5])], "test"))
    assert msg.kind == "sparse" and list(msg.indices) == [1]
    with pytest.raises(ValueError, match="non-neighbour"):
        g.receive("c", msg)


# ---- the simulator: bytes, ε, consensus --------------------------------------------------
def _total(r: Any) -> int:
    return int(sum(r.summary["bytes_sent"].values()))


def test_compressed_runs_send_exactly_the_compressed_bytes_at_equal_epsilon() -> None:
    fast = dp(lr=2.0)  # features in [−1, 1] from the published ranges learn slower than z-scores
    dense = run_simulation(spec(dp=fast))
    topk = run_simulation(spec(dp=fast, strategy_params={"compressor": "topk", "k": 12, "gamma": 0.5}))
    q8 = run_simulation(spec(dp=fast, strategy_params={"compressor": "quantize8", "gamma": 0.5}))
    local = run_simulation(spec(dp=fast, strategy_params={"mixing": {}}))  # no communication at all
    n_msgs = 8 * 4 * 2  # rounds × nodes × ring neighbours
    header = LinkSpec().header_bytes
    d = dense.summary
    n_params = (_total(dense) // n_msgs - header) // 4
    assert _total(topk) == n_msgs * (8 * 12 + header)  # int32 index + float32 value per kept coordinate
    n_tensors = 2  # logreg: weight + bias
    assert _total(q8) == n_msgs * (n_params + 8 * n_tensors + header)
    assert _total(topk) - n_msgs * header < 0.5 * (_total(dense) - n_msgs * header)  # payloads
    # compression is post-processing: ε and steps are identical to the dense run
    for r in (topk, q8):
        assert r.summary["epsilon"] == d["epsilon"] and r.summary["steps"] == d["steps"]
    # and the nodes still agree far better than without any gossip
    assert topk.summary["final_consensus_max"] < 0.5 * local.summary["final_consensus_max"]
    assert q8.summary["final_consensus_max"] < 0.5 * local.summary["final_consensus_max"]
    assert topk.summary["mean_accuracy"] > 0.8


def test_topagg_run_accounts_like_gaussian_and_counts_compressed_bytes() -> None:
    tp = dp(mechanism="topagg", mechanism_params={"k": 8, "threshold": 0.0}, lr=0.05)
    gauss = run_simulation(spec(stop=StopCriteria(max_rounds=4)))
    top = run_simulation(spec(dp=tp, stop=StopCriteria(max_rounds=4),
                              strategy_params={"compressor": "topk", "k": 10, "gamma": 0.5}))
    # the accountant gets z = σ/√k, the same multiplier, sampling rate and steps: the same ε
    for nid, eps in gauss.summary["epsilon"].items():
        assert top.summary["epsilon"][nid] == pytest.approx(eps, rel=1e-9)
    assert _total(top) == 4 * 4 * 2 * (8 * 10 + LinkSpec().header_bytes)


# ---- only released values reach a compressor, through the gossip path ----------------------
class SpyTopK(TopK):
    """Records what the gossip hands the compressor."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: list[Any] = []

    def compress(self, update: Any) -> Compressed:
        self.seen.append(update)
        return super().compress(update)


@pytest.mark.parametrize("ef", [False, True])
def test_gossip_hands_compressors_only_released_post_fit_models(ef: bool) -> None:
    from privfl.clients import DPClient
    from privfl.data import load_builtin, split_sites
    from privfl.models import build_model
    from privfl.preprocessing import PreprocessingSpec, preprocess_site

    data = load_builtin("breast_cancer")
    sites = [preprocess_site(PreprocessingSpec(), s, dataset_name="breast_cancer")[0]  # published ranges
             for s in split_sites(data, 2, "iid", seed=0)]
    ids = ["a", "b"]
    topo = build_topology("ring", ids)
    world = SimWorld(ids, {i: topo.neighbors(i) for i in ids}, LinkSpec())
    nodes, spies, fitted = [], [], []
    for i, (nid, site) in enumerate(zip(ids, sites)):
        model = build_model("logreg", data.x.shape[1:], data.num_classes, seed=0)
        client = DPClient(model, (site.train.x, site.train.y), None, dp(), seed=i)
        orig_fit = client.fit

        def fit(params: Any, config: Any, _f: Any = orig_fit) -> Any:
            out = _f(params, config)
            fitted.append([np.array(p, copy=True) for p in out[0]])
            return out

        client.fit = fit  # type: ignore[method-assign]
        spy = SpyTopK(k=5, error_feedback=ef)
        s = SyncGossip(client, world.network(nid), client.get_parameters({}),
                       {"local_steps": 2, "topology": topo, "compressor": spy, "gamma": 0.5, "timeout": math.inf,
                        "shared_init": True})
        world.strategies[nid] = s
        nodes.append(s)
        spies.append(spy)
    for r in range(3):
        for s in nodes:
            s.begin_round()
        for nid, s in zip(ids, nodes):
            s.finish_round(world.network(nid).receive(r, list(s.mixing), math.inf))
    seen = [u for spy in spies for u in spy.seen]
    assert len(seen) == 6
    assert all(type(u) is Released for u in seen)
    assert all(not a.flags.writeable for u in seen for a in u.arrays)
    if ef:  # the change of the DP-trained model since the last send
        assert all("change of the released model" in u.source for u in seen)
    else:  # x − x̂ of the DP-trained model (derived inside the innovation gossip)
        assert all("post-processing" in u.source for u in seen)
    # the first thing node a compresses is its DP-trained model minus the shared public start
    # (innovation: x_a − x̂_a with x̂_a = the start; error feedback: x_a − x_a⁻, the same vector)
    first = np.concatenate([a.ravel() for a in fitted[0]]).astype(np.float64)
    start = np.concatenate([p.ravel() for p in build_model("logreg", data.x.shape[1:], data.num_classes,
                                                            seed=0).state_dict().values()]).astype(np.float64)
    assert np.abs(first - start).max() > 0
    np.testing.assert_allclose(spies[0].seen[0].flat(), first - start, rtol=1e-5, atol=1e-6)
    # and a raw array is refused by the very compressor the gossip uses
    with pytest.raises(TypeError, match="Released"):
        spies[0].compress([np.zeros(3)])  # type: ignore[arg-type]


# ---- configuration errors name the bad key -------------------------------------------------
@pytest.mark.parametrize("params,key", [
    ({"compressor": "topk", "ratoi": 0.01}, "ratoi"),
    ({"compressor": "topk", "ratio": 0.01, "gama": 0.5}, "gama"),
    ({"ratio": 0.01}, "ratio"),
    ({"compressor": "zstd"}, "compressor"),
    ({"compressor": "topk", "ratio": 2.0}, "ratio"),
    ({"compressor": "topk", "ratio": 0.1, "gamma": 1.5}, "gamma"),
    ({"compressor": "cltk", "ratio": 0.1}, "cltk"),
    ({"compressor": "quantize8", "ratio": 0.1}, "ratio"),
])
def test_sync_gossip_config_errors_name_the_key(params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        run_simulation(spec(strategy_params=params, stop=StopCriteria(max_rounds=1)))


def test_async_gossip_refuses_a_compressor_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="compressor.*sync_gossip"):
        run_simulation(spec(strategy="async_gossip", strategy_params={"compressor": "topk", "ratio": 0.1},
                            stop=StopCriteria(max_steps=2)))
    with pytest.raises(ConfigError, match="bogus"):
        run_simulation(spec(strategy="async_gossip", strategy_params={"bogus": 1}, stop=StopCriteria(max_steps=2)))


def test_flat_and_nested_compressor_settings_agree_and_sparsifiers_default_to_no_error_feedback() -> None:
    flat = sync_compression_params({"compressor": "top-k", "ratio": 0.01, "gamma": 0.5})
    nested = sync_compression_params({"compressor": "topk", "compression_params": {"ratio": 0.01}})
    assert flat == nested == ("topk", {"ratio": 0.01, "error_feedback": False})
    assert sync_compression_params({"compressor": "none"}) is None
    with pytest.raises(ConfigError, match="ratio"):
        sync_compression_params({"compressor": "topk", "ratio": 0.01, "compression_params": {"ratio": 0.02}})


def test_the_digits_compare_example_resolves_every_run() -> None:
    from privfl.experiment import load_experiment, spec_for

    exp = load_experiment(EXAMPLE)
    labels = exp.strategies
    assert len(labels) >= 6 and "dense" in labels
    from privfl.strategies.federated import FedAvgConfig

    mechs, comps, uploads = set(), set(), set()
    for run in exp.runs:
        s = spec_for(exp, run)
        s.validate()
        mechs.add(s.dp.mechanism)
        if s.strategy == "fedavg":
            cfg = FedAvgConfig(**s.strategy_params)
            cfg.validate()
            uploads.add((cfg.upload, cfg.compressor))
        else:
            assert s.strategy == "sync_gossip"
            c = sync_compression_params(s.strategy_params)
            comps.add(c[0] if c else "none")
        assert s.dp.noise_multiplier == spec_for(exp, "dense").dp.noise_multiplier  # equal ε by construction
    assert mechs == {"gaussian", "topagg"}
    assert {"none", "topk", "randomk", "quantize8", "adacomp"} <= comps
    assert {("model", "exact"), ("update", "exact"), ("update", "quantize8"), ("update", "topk")} <= uploads
