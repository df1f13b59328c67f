"""The Flower App with subspace DP-SGD and subspace transfer both ways (``subspace-fraction`` > 0).

Every DP step clips and noises only a public random mask; a node uploads only the k values
of its noised change on the round's mask, the ServerApp broadcasts only the k values of the
aggregate's change (privfl's SubspaceK frames, indices derived at both ends). Checked
through the app's local grid (the real ServerApp, Flower's FedAvg and the ClientApp, in
one process): the bytes of every message that crosses the grid, the model the nodes
rebuild (bit-identical to the server's), ε (the dense event: equal to the dense run's and
to privfl's own FedAvg over the same subspace DPClients with whole models on the wire),
the off setting and the refused keys.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "flower-app"
sys.path.insert(0, str(APP_DIR))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.common import Parameters  # noqa: E402
from privfl_app import local_grid, server_app, task  # noqa: E402
from privfl_app.client_app import app as client_app  # noqa: E402
from privfl_app.client_app import build_client  # noqa: E402
from privfl_app.local_grid import app_run_config, node_contexts, per_round, run_in_process  # noqa: E402
from privfl_app.server_app import DPReleaseFedAvg, SubspaceFedAvg, build_strategy, initial_arrays  # noqa: E402
from privfl_app.subspace import (  # noqa: E402
    FRAME_KEY,
    HELD_KEY,
    RECEIVER_KEY,
    VERSION_KEY,
    load_receiver,
    receive,
    to_wire,
)

from privfl.accounting import PrivacyAccountant  # noqa: E402
from privfl.accounting.releases import PUBLIC_FIT_METRICS  # noqa: E402
from privfl.clients import DPClient  # noqa: E402
from privfl.clients.subspace import SubspaceDPOptimizer  # noqa: E402
from privfl.errors import ConfigError  # noqa: E402
from privfl.strategies.compression.message import FRAME_HEADER_BYTES  # noqa: E402
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging, InProcessGrid, arrays_nbytes  # noqa: E402
from privfl.strategies.subspace_transfer import unframe_subspace  # noqa: E402
from privfl.strategies.update_transfer import COMPRESSED_TENSOR_TYPE  # noqa: E402

pytestmark = pytest.mark.timeout(120)

FRACTION, SEED, STEPS, ROUNDS, NODES = 0.1, 7, 3, 3, 3
#: digits + logreg: 650 parameters, so the 20-byte frame header is small next to the 4k value bytes
BASE = {"dataset": "digits", "local-steps": STEPS, "num-server-rounds": ROUNDS, "min-fit-clients": NODES,
        "min-available-clients": NODES}
SUB = {**BASE, "subspace-fraction": FRACTION, "subspace-seed": SEED}


@pytest.fixture(autouse=True)
def _flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))


class RecordingGrid(InProcessGrid):
    """The app's in-process grid, writing down every message that crosses it (both directions)."""

    log: list[dict[str, Any]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent = list(messages)
        for m in sent:
            self.log.append(_entry("down", m, m.metadata.dst_node_id))
        replies = super().send_and_receive(sent, timeout=timeout)
        rnd = int(sent[0].content.config_records["config"]["server-round"]) if sent else 0  # type: ignore[call-overload]
        for r in replies:
            self.log.append({**_entry("up", r, r.metadata.src_node_id), "round": rnd})
        return replies


def _entry(direction: str, msg: Message, node: int) -> dict[str, Any]:
    c = None if msg.has_error() else msg.content
    config = {} if c is None else dict(c.config_records.get("config") or {})
    arrays = None if c is None else c.array_records.get("arrays")
    return {"dir": direction, "kind": msg.metadata.message_type, "node": node, "error": msg.has_error(),
            "round": int(config.get("server-round", 0)), "config": config,
            "records": None if c is None else (sorted(c.array_records), sorted(c.metric_records),
                                               sorted(c.config_records)),
            "keys": None if arrays is None else list(arrays.keys()),
            "nbytes": None if arrays is None else arrays_nbytes(arrays),
            "frame": (arrays[FRAME_KEY].numpy().tobytes() if arrays is not None and list(arrays.keys()) == [FRAME_KEY]
                      else None),
            "metrics": {} if c is None or "metrics" not in c.metric_records else dict(c.metric_records["metrics"])}


def run(monkeypatch: pytest.MonkeyPatch, run_config: dict[str, Any],
        researcher_eval: bool = False) -> tuple[Any, InProcessGrid, list[dict[str, Any]], Any]:
    """The app in-process with a recording grid; (Result, grid, message log, the ServerApp's strategy)."""
    RecordingGrid.log = []
    built: list[Any] = []

    def capture(cfg: dict[str, Any]) -> Any:
        built.append(build_strategy(cfg))
        return built[-1]

    monkeypatch.setattr(local_grid, "InProcessGrid", RecordingGrid)
    monkeypatch.setattr(server_app, "build_strategy", capture)
    result, grid = run_in_process(NODES, run_config, researcher_eval=researcher_eval)
    return result, grid, list(RecordingGrid.log), built[0]


def _cfg(run_config: dict[str, Any]) -> dict[str, Any]:
    return task.settings({**app_run_config(), **run_config})


def _shapes(cfg: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(a.shape) for a in initial_arrays(cfg).to_numpy_ndarrays())


def _k(cfg: dict[str, Any], round_index: int) -> int:
    """How many coordinates round ``round_index`` (0-based: the model version) sends, derived as the nodes do."""
    return int(task.subspace_compressor(cfg).indices_for(round_index, _shapes(cfg)).size)


def test_both_directions_carry_only_the_rounds_framed_k_values(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(SUB)
    dense_bytes = 4 * sum(int(np.prod(s)) for s in _shapes(cfg))
    assert dense_bytes == 4 * 650
    _, _, dense_log, dense_strategy = run(monkeypatch, BASE)
    result, grid, log, strategy = run(monkeypatch, SUB)
    assert type(dense_strategy) is DPReleaseFedAvg and isinstance(strategy, SubspaceFedAvg)
    assert result is not None and set(result.train_metrics_clientapp) == {1, 2, 3}
    for entries in (dense_log, log):
        assert {(e["dir"], e["kind"]) for e in entries} == {("down", MessageType.TRAIN), ("up", MessageType.TRAIN)}
        assert not any(e["error"] for e in entries)
        for rnd in range(1, ROUNDS + 1):
            for d in ("down", "up"):
                nodes = sorted(e["node"] for e in entries if e["round"] == rnd and e["dir"] == d)
                assert nodes == sorted(grid.contexts)
    # dense: the whole model every message, both ways
    assert {e["nbytes"] for e in dense_log} == {dense_bytes}
    k_mask = subspace_k_of(cfg)
    for e in log:
        rnd = e["round"]
        if e["dir"] == "down" and rnd == 1:  # the first instruction: the whole initial model
            assert e["keys"] != [FRAME_KEY] and e["nbytes"] == dense_bytes
            assert int(e["config"][VERSION_KEY]) == 0
            continue
        # one framed tensor of round (rnd - 1)'s k values: down = the aggregate's change to version rnd - 1,
        # up = the node's noised change trained on version rnd - 1 (the mask of round index rnd - 1 both)
        version = rnd - 1 if e["dir"] == "up" else rnd - 2
        assert e["keys"] == [FRAME_KEY], e
        assert e["nbytes"] == FRAME_HEADER_BYTES + 4 * _k(cfg, version)
        assert _k(cfg, version) == k_mask  # one mask per round (period = local-steps): k = fraction · d
        if e["dir"] == "down":
            assert int(e["config"][VERSION_KEY]) == rnd - 1
        else:  # a reply: the frame and the public metrics, nothing else
            assert e["records"] == (["arrays"], ["metrics"], [])
            assert set(e["metrics"]) <= set(PUBLIC_FIT_METRICS) | {"num-examples"}
    # the values: each upload is on round (rnd - 1)'s derived mask, and the next broadcast carries exactly
    # the mean of the round's uploads there (equal public weights): the aggregate's change on the mask
    comp, shapes = task.subspace_compressor(cfg), _shapes(cfg)
    for rnd in range(1, ROUNDS):
        ups = [_values(e["frame"], comp, rnd - 1, shapes) for e in log if e["dir"] == "up" and e["round"] == rnd]
        downs = [_values(e["frame"], comp, rnd - 1, shapes) for e in log
                 if e["dir"] == "down" and e["round"] == rnd + 1]
        assert len(ups) == len(downs) == NODES
        mean = np.mean([v for _, v in ups], axis=0)
        for idx, _ in ups + downs:
            assert np.array_equal(idx, comp.indices_for(rnd - 1, shapes))
        assert np.abs(mean).max() > 1e-3  # noised DP changes, not zeros
        for _, v in downs:
            np.testing.assert_allclose(v, mean, rtol=0, atol=1e-5)
    ratio = dense_bytes / (FRAME_HEADER_BYTES + 4 * k_mask)
    assert 0.9 / FRACTION < ratio <= 1 / FRACTION
    total = {name: sum(e["nbytes"] for e in lg if e["round"] > 1) for name, lg in (("dense", dense_log), ("sub", log))}
    assert 0.9 / FRACTION < total["dense"] / total["sub"] <= 1 / FRACTION
    # the server's own counts agree with what crossed the grid
    for rnd in range(1, ROUNDS + 1):
        assert sum(strategy.bytes_up[rnd].values()) == sum(e["nbytes"] for e in log
                                                           if e["round"] == rnd and e["dir"] == "up")
        assert sum(strategy.bytes_down[rnd].values()) == sum(e["nbytes"] for e in log
                                                             if e["round"] == rnd and e["dir"] == "down")


def _values(frame: bytes, comp: Any, round_index: int, shapes: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of a frame read on round ``round_index``'s mask, as privfl's receiver reads it."""
    msg = unframe_subspace(Parameters(tensors=[frame], tensor_type=COMPRESSED_TENSOR_TYPE), comp, round_index, shapes)
    return np.asarray(msg.indices), np.asarray(msg.values, dtype=np.float64)


def subspace_k_of(cfg: dict[str, Any]) -> int:
    from privfl.accounting.subspace import subspace_k

    return subspace_k(sum(int(np.prod(s)) for s in _shapes(cfg)), FRACTION)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def test_nodes_rebuild_the_servers_global_model_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(SUB)
    result, grid, _, strategy = run(monkeypatch, SUB)
    tracker = strategy.tracker
    assert tracker.version == ROUNDS
    final = result.arrays.to_numpy_ndarrays()
    assert _flat(final).tobytes() == _flat(tracker.model).tobytes()
    init = _flat(initial_arrays(cfg).to_numpy_ndarrays())
    # the DP steps moved only the masks of the run's rounds, and (noise) nearly all of their coordinates
    on = np.unique(np.concatenate([task.subspace_compressor(cfg).indices_for(r, _shapes(cfg)) for r in range(ROUNDS)]))
    moved = np.flatnonzero(_flat(final) != init)
    assert set(moved) <= set(on) and len(moved) > 0.9 * len(on)
    assert len(on) < 0.4 * init.size
    for nid, ctx in grid.contexts.items():
        receiver = load_receiver(ctx, cfg)
        # a node last heard of version ROUNDS - 1 (round ROUNDS's instruction); the server's last change
        # (what a next instruction would carry) brings it to the server's final model, bit for bit
        assert receiver.version == ROUNDS - 1
        assert HELD_KEY in ctx.state.array_records and RECEIVER_KEY in ctx.state.config_records
        frame = to_wire(tracker.downlink(str(nid)))
        assert list(frame.keys()) == [FRAME_KEY]
        got = receive(receiver, frame, {VERSION_KEY: tracker.version})
        assert _flat(got).tobytes() == _flat(final).tobytes()
        # the node's DP optimizer took every step of every round (its mask counter in context.state)
        client, _ = build_client(ctx)
        assert isinstance(client.optimizer, SubspaceDPOptimizer)
        assert client.optimizer.steps_taken == ROUNDS * STEPS


def test_with_dp_evaluation_the_nodes_end_on_the_servers_final_model(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_run = {**SUB, "num-server-rounds": 2, "eval-noise-multiplier": 2.0, "eval-denominator": 120}
    cfg = _cfg(cfg_run)
    result, grid, log, strategy = run(monkeypatch, cfg_run)
    evals = [e for e in log if e["kind"] == MessageType.EVALUATE and e["dir"] == "down"]
    assert len(evals) == 2 * NODES
    for e in evals:  # the evaluation instruction: the k values of the round's aggregate change
        assert e["keys"] == [FRAME_KEY] and e["nbytes"] == FRAME_HEADER_BYTES + 4 * _k(cfg, e["round"] - 1)
    assert set(per_round(result.evaluate_metrics_clientapp, "accuracy")) == {1, 2}
    final = _flat(result.arrays.to_numpy_ndarrays())
    for ctx in grid.contexts.values():
        receiver = load_receiver(ctx, cfg)
        assert receiver.version == 2 and _flat(receiver.held).tobytes() == final.tobytes()
    # round 2's train instruction was an empty change (the node already held version 1 from the evaluation)
    r2 = [e for e in log if e["kind"] == MessageType.TRAIN and e["dir"] == "down" and e["round"] == 2]
    assert all(e["keys"] == [FRAME_KEY] and e["nbytes"] == FRAME_HEADER_BYTES for e in r2)


def _dense_upload_subspace_epsilons(cfg: dict[str, Any]) -> dict[int, list[float]]:
    """privfl's own FedAvg (whole models on the wire) over DPClients with the app's subspace DP config."""
    clients = {}
    for i in range(NODES):
        site = task.site_of(cfg, i, NODES)
        clients[f"n{i}"] = DPClient(task.make_model(cfg, site), site.train, site.test, task.dp_config(cfg))
    assert all(isinstance(c.optimizer, SubspaceDPOptimizer) for c in clients.values())
    fedavg = FederatedAveraging(FedAvgConfig(local_steps=STEPS, min_fit_clients=NODES, min_available_clients=NODES,
                                             evaluate=False, upload="model"))
    init = initial_arrays(cfg).to_numpy_ndarrays()
    params = {n: init for n in clients}
    out: dict[int, list[float]] = {}
    for r in range(1, ROUNDS + 1):
        rnd = fedavg.run_round(clients, params, round=r)
        params = rnd.params
        out[r] = sorted(float(rnd.metrics[n]["epsilon"]) for n in clients)
    return out


def test_epsilon_per_round_is_the_dense_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(SUB)
    sub, sub_grid, sub_log, _ = run(monkeypatch, SUB)
    dense, _, _, _ = run(monkeypatch, BASE)
    eps_sub = per_round(sub.train_metrics_clientapp, "epsilon_max")
    eps_dense = per_round(dense.train_metrics_clientapp, "epsilon_max")
    assert set(eps_sub) == {1, 2, 3} and eps_sub == eps_dense
    reference = _dense_upload_subspace_epsilons(cfg)
    acc = PrivacyAccountant()
    for r in range(1, ROUNDS + 1):
        acc.step(float(cfg["noise-multiplier"]), float(cfg["sample-rate"]), STEPS)
        expected = acc.get_epsilon(float(cfg["delta"]))
        assert eps_sub[r] == pytest.approx(expected, rel=1e-12)
        assert reference[r] == pytest.approx([expected] * NODES, rel=1e-12)
        # every node released the same ε (q and σ are public: not a function of the site's size)
        released = [float(e["metrics"]["epsilon"]) for e in sub_log if e["dir"] == "up" and e["round"] == r]
        assert released == pytest.approx([expected] * NODES, rel=1e-12)
    assert all(task.epsilon_of(c) == pytest.approx(eps_sub[ROUNDS], rel=1e-12) for c in sub_grid.contexts.values())


def test_the_off_setting_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert app_run_config()["subspace-fraction"] == 0.0 == task.DEFAULTS["subspace-fraction"]
    default, off = task.settings({}), task.settings({"subspace-fraction": 0.0, "subspace-seed": 0,
                                                     "subspace-period": 0})
    assert default == off and not task.subspace_on(off)
    dp = task.dp_config(off)
    assert dp == task.dp_config({k: v for k, v in default.items()}) and dp.mechanism == "gaussian"
    assert dp.mechanism_params == {}
    assert type(build_strategy(off)) is DPReleaseFedAvg
    result, grid, log, strategy = run(monkeypatch, {**BASE, "subspace-fraction": 0.0})
    assert type(strategy) is DPReleaseFedAvg
    names = list(initial_arrays(off).keys())
    init = initial_arrays(_cfg(BASE)).to_numpy_ndarrays()
    for e in log:
        assert e["keys"] == list(initial_arrays(_cfg(BASE)).keys()) and VERSION_KEY not in e["config"]
    assert names == list(task.make_model(off, task.site_of(off, 0, 1)).state_dict()) and FRAME_KEY not in names
    first = [e for e in log if e["dir"] == "down" and e["round"] == 1]
    assert len(first) == NODES and all(e["nbytes"] == 4 * sum(a.size for a in init) for e in first)
    for ctx in grid.contexts.values():
        assert HELD_KEY not in ctx.state.array_records and RECEIVER_KEY not in ctx.state.config_records
        client, _ = build_client(ctx)
        assert not isinstance(client.optimizer, SubspaceDPOptimizer)


@pytest.mark.parametrize(("run_config", "key"), [
    ({"subspace-fraction": 1.5}, "subspace-fraction"),
    ({"subspace-fraction": -0.1}, "subspace-fraction"),
    ({"subspace-fraction": "a tenth"}, "subspace-fraction"),
    ({"subspace-fraction": 0.1, "subspace-seed": -1}, "subspace-seed"),
    ({"subspace-fraction": 0.1, "subspace-seed": 1.5}, "subspace-seed"),
    ({"subspace-fraction": 0.1, "subspace-period": -2}, "subspace-period"),
    ({"subspace-seed": 3}, "subspace-seed"),  # read only with the subspace on
    ({"subspace-period": 5}, "subspace-period"),
    ({"subspace-fraction": 0.1, "fraction-fit": 0.5}, "fraction-fit"),  # the round's mask needs every node
])
def test_bad_subspace_keys_are_refused_naming_the_key(run_config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        task.settings(run_config)
    assert "\n" not in str(info.value)


def test_the_strategy_itself_refuses_a_partial_fraction() -> None:
    cfg = task.settings({"subspace-fraction": 0.1})
    comp = task.subspace_compressor(cfg)
    with pytest.raises(ConfigError, match="fraction-fit"):
        SubspaceFedAvg(comp, comp, fraction_train=0.5)


def _instruction(record: ArrayRecord, config: dict[str, Any]) -> Message:
    from privfl.strategies.federated import ensure_task_identity

    ensure_task_identity()
    return Message(RecordDict({"arrays": record, "config": ConfigRecord(config)}), dst_node_id=101,
                   message_type=MessageType.TRAIN)


def test_a_node_refuses_a_change_it_cannot_apply_and_the_server_then_sends_the_whole_model() -> None:
    cfg = task.settings(SUB)
    ctx: Context = node_contexts(NODES, {**app_run_config(), **SUB})[101]
    init = initial_arrays(cfg)
    comp = task.subspace_compressor(cfg)
    strategy = SubspaceFedAvg(comp, task.subspace_compressor(cfg), fraction_train=1.0)
    tracker = strategy._start(init)
    tracker.advance([a + 0.5 for a in init.to_numpy_ndarrays()])
    tracker.downlink("101")  # the server believes the node holds version 1 (say its state was lost since)
    tracker.advance([a + 1.0 for a in init.to_numpy_ndarrays()])  # version 2
    frame = to_wire(tracker.downlink("101"))  # so it sends the change 1 -> 2
    assert list(frame.keys()) == [FRAME_KEY]
    # the node holds nothing: it cannot rebuild a change, and says so (an error reply)
    with pytest.raises(ValueError, match="whole model"):
        client_app(_instruction(frame, {"local_steps": STEPS, "server-round": 3, VERSION_KEY: 2}), ctx)
    assert HELD_KEY not in ctx.state.array_records
    tracker.forget("101")  # what aggregate_train does with an error reply
    whole = to_wire(tracker.downlink("101"))
    assert list(whole.keys()) != [FRAME_KEY]
    out = client_app(_instruction(whole, {"local_steps": STEPS, "server-round": 3, VERSION_KEY: 2}), ctx)
    assert not out.has_error() and list(out.content["arrays"].keys()) == [FRAME_KEY]
    assert load_receiver(ctx, cfg).version == 2
    # a dense ServerApp's instruction (no declared version) is refused, not guessed at
    with pytest.raises(ConfigError, match=VERSION_KEY):
        client_app(_instruction(init, {"local_steps": STEPS, "server-round": 1}), ctx)
    # the server asking for other local steps than the mask's is refused naming the setting
    with pytest.raises(ConfigError, match="local-steps"):
        client_app(_instruction(whole, {"local_steps": STEPS + 1, "server-round": 4, VERSION_KEY: 2}), ctx)


def test_a_node_that_does_not_reply_gets_the_whole_model_next_round() -> None:
    cfg = task.settings(SUB)
    strategy = SubspaceFedAvg(task.subspace_compressor(cfg), task.subspace_compressor(cfg), fraction_train=1.0,
                              min_train_nodes=2, min_available_nodes=2)
    contexts = node_contexts(2, {**app_run_config(), **SUB, "min-fit-clients": 2, "min-available-clients": 2})
    grid = InProcessGrid(client_app, contexts, run_id=1)
    init = initial_arrays(cfg)
    sent = list(strategy.configure_train(1, init, ConfigRecord({"local_steps": STEPS}), grid))
    replies = grid.send_and_receive(sent)
    came = [r for r in replies if r.metadata.src_node_id == 101]  # node 102's reply never came (a timeout)
    arrays, _ = strategy.aggregate_train(1, came)
    assert arrays is not None and strategy.tracker.version == 1
    round2 = strategy.configure_train(2, arrays, ConfigRecord({"local_steps": STEPS}), grid)
    again = {m.metadata.dst_node_id: m for m in round2}
    assert list(again[101].content["arrays"].keys()) == [FRAME_KEY]  # it holds version 0: the change 0 -> 1
    assert list(again[102].content["arrays"].keys()) != [FRAME_KEY]  # unknown: the whole model
    replies = grid.send_and_receive(again.values())
    assert not any(r.has_error() for r in replies)
    assert all(load_receiver(c, cfg).version == 1 for c in contexts.values())
