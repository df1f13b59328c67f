"""The Flower App (examples/flower-app): DPClient under Flower's runtime, privacy state in context.state.

What a node releases is public or DP only: equal public weights, public fit metrics,
no evaluation unless a DP accuracy release is configured (then over its public
denominator, its cost in the node's accountant).

Flower's Message API throughout (ClientApp ``@app.train()`` / ``@app.evaluate()``,
ServerApp ``@app.main()`` with ``flwr.serverapp.strategy.FedAvg``). No Ray and no SuperLink:
the ClientApp is called with hand-built Messages, and the ServerApp runs against
in-process ClientApp nodes through privfl's InProcessGrid (a ``flwr.serverapp.Grid`` that
hands each message to the ClientApp), as the app's local_grid runs it.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "flower-app"
sys.path.insert(0, str(APP_DIR))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from privfl_app import task  # noqa: E402
from privfl_app.client_app import app as client_app  # noqa: E402
from privfl_app.local_grid import app_run_config, per_round, run_in_process  # noqa: E402
from privfl_app.server_app import app as server_app  # noqa: E402
from privfl_app.server_app import build_strategy, initial_arrays  # noqa: E402

from privfl.accounting.releases import PUBLIC_FIT_METRICS  # noqa: E402
from privfl.errors import ConfigError  # noqa: E402
from privfl.strategies.federated import ensure_task_identity  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _flower_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))


RUN_CONFIG = {**app_run_config(), "local-steps": 4}


def node_context(pid: int = 0, n: int = 3, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config=dict(run_config or RUN_CONFIG))


class Reply:
    """What a reply carries: its model (arrays), its weight (num-examples) and its other metrics."""

    def __init__(self, msg: Message) -> None:
        assert not msg.has_error(), msg.error
        c = msg.content
        assert not c.config_records  # a node replies with its model and metrics, nothing else
        self.parameters = c.array_records["arrays"].to_numpy_ndarrays() if "arrays" in c.array_records else []
        records = list(c.metric_records.values())
        assert len(records) <= 1
        m = dict(records[0]) if records else {}
        self.num_examples = int(m.pop("num-examples", 0))
        self.loss = float(m.pop("loss", 0.0))
        self.metrics = m


def initial_params(cfg: dict | None = None) -> list[np.ndarray]:
    return initial_arrays(task.settings(cfg or RUN_CONFIG)).to_numpy_ndarrays()


def message(params: list[np.ndarray], kind: str, config: dict) -> Message:
    """A server's instruction as Flower's FedAvg builds it: the model and a config."""
    ensure_task_identity()  # Flower's Message() reads the task identity a Flower runtime would have set
    content = RecordDict({"arrays": ArrayRecord(params), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=100, message_type=kind)


def fit(ctx: Context, params: list[np.ndarray], n: int, steps: int = 4) -> Reply:
    out = client_app(message(params, MessageType.TRAIN, {"local_steps": steps, "server-round": n}), ctx)
    return Reply(out)


def test_clientapp_epsilon_accumulates_across_rounds_in_context_state() -> None:
    ctx = node_context()
    w0 = initial_params()
    r1 = fit(ctx, w0, 1)
    eps1 = float(r1.metrics["epsilon"])
    # round 2 gets the *same* global model: a client rebuilt from scratch would restart at eps1
    r2 = fit(ctx, w0, 2)
    eps2 = float(r2.metrics["epsilon"])
    assert 0 < eps1 < eps2
    assert r1.metrics["total_steps"] == 4 and r2.metrics["total_steps"] == 8
    assert task.load_state(ctx)[1] == 2 and task.epsilon_of(ctx) == pytest.approx(eps2)
    # fresh noise and batches every round: same input model, different output
    p1, p2 = r1.parameters, r2.parameters
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(p1, p2))
    # the state is the context's, not the process's: another node's context starts from zero
    other = fit(node_context(pid=0), w0, 3)
    assert float(other.metrics["epsilon"]) == pytest.approx(eps1)


def evaluate(ctx: Context, params: list[np.ndarray], n: int) -> Reply:
    return Reply(client_app(message(params, MessageType.EVALUATE, {"server-round": n}), ctx))


def test_the_apps_are_message_api_apps() -> None:
    assert isinstance(client_app, ClientApp) and isinstance(server_app, ServerApp)
    assert isinstance(build_strategy(task.settings({})), FedAvg)  # flwr.serverapp.strategy.FedAvg
    msg = message(initial_params(), MessageType.TRAIN, {"local_steps": 1})
    out = client_app(msg, node_context())
    assert set(out.content.array_records) == {"arrays"} and set(out.content.metric_records) == {"metrics"}
    # the reply's model keeps the keys the server sent (the model's state_dict names)
    assert list(out.content["arrays"].keys()) == list(msg.content["arrays"].keys())


def test_clientapp_fit_releases_only_public_values() -> None:
    w0 = initial_params()
    sizes = {pid: task.load_site("breast_cancer", "iid", 0, pid, 2).train_size for pid in (0, 1)}
    res = {pid: fit(node_context(pid=pid, n=2), w0, 1) for pid in (0, 1)}
    for pid, r in res.items():
        assert r.num_examples == 1 != sizes[pid]  # equal public weights, never the record count
        assert set(r.metrics) <= set(PUBLIC_FIT_METRICS)
        assert not {"loss", "accuracy", "n_train"} & set(r.metrics)
    assert res[0].metrics == res[1].metrics  # q is public: ε does not depend on a site's size


def test_clientapp_evaluates_nothing_by_default() -> None:
    ctx = node_context(pid=1)
    w0 = initial_params()
    fit(ctx, w0, 1)
    eps = task.epsilon_of(ctx)
    res = evaluate(ctx, w0, 2)
    assert res.num_examples == 0 and res.metrics == {} and res.loss == 0.0
    assert task.epsilon_of(ctx) == eps and task.load_state(ctx)[1] == 1


def test_clientapp_dp_evaluation_release_is_accounted_in_context_state() -> None:
    cfg = {**RUN_CONFIG, "eval-noise-multiplier": 2.0, "eval-denominator": 40}
    ctx = node_context(pid=1, run_config=cfg)
    w0 = initial_params(cfg)
    fit(ctx, w0, 1)
    eps = task.epsilon_of(ctx)
    steps = task.load_state(ctx)[0]["accountant"]
    res = evaluate(ctx, w0, 2)
    assert res.num_examples == 40  # the public denominator, not the test-split size (38)
    assert set(res.metrics) == {"accuracy", "dp"} and res.metrics["dp"] == 1
    assert 0.0 <= float(res.metrics["accuracy"]) <= 1.0
    assert res.loss == pytest.approx(1.0 - float(res.metrics["accuracy"]))
    # the release's cost is in the node's saved state (a rebuilt client keeps it); no fit was counted
    assert task.epsilon_of(ctx) > eps and task.load_state(ctx)[1] == 1
    assert task.load_state(ctx)[0]["accountant"] != steps
    r2 = fit(ctx, w0, 3)
    assert float(r2.metrics["epsilon"]) > task.epsilon_of(node_context(pid=1)) and r2.metrics["total_steps"] == 8


def test_dp_evaluation_run_config_needs_both_keys() -> None:
    with pytest.raises(ConfigError, match="eval-denominator"):
        task.settings({"eval-noise-multiplier": 2.0})
    with pytest.raises(ConfigError, match="eval-noise-multiplier"):
        task.settings({"eval-denominator": 40})
    with pytest.raises(ConfigError, match="sample-rate"):
        task.settings({"sample-rate": 1.5})
    assert build_strategy(task.settings({})).fraction_evaluate == 0.0
    evaluating = task.settings({"eval-noise-multiplier": 2.0, "eval-denominator": 40})
    assert build_strategy(evaluating).fraction_evaluate == 1.0


def test_no_per_message_seed_noise_is_secure() -> None:
    assert not hasattr(task, "message_seed")
    ctx = node_context()
    w0 = initial_params()
    a, b = fit(ctx, w0, 1), fit(node_context(), w0, 1)  # same node, same state, same input model
    pa, pb = a.parameters, b.parameters
    assert any(np.abs(x - y).max() > 1e-6 for x, y in zip(pa, pb))  # a seeded rebuild would repeat itself


def test_clientapp_fails_closed_when_the_budget_is_spent() -> None:
    cfg = {**RUN_CONFIG, "target-epsilon": 3.0}
    ctx = node_context(run_config=cfg)
    w0 = initial_params(cfg)
    r1 = fit(ctx, w0, 1, steps=1000)
    assert r1.metrics["budget_exhausted"] == 1 and float(r1.metrics["epsilon"]) <= 3.0
    steps = task.load_state(ctx)[0]["accountant"]["events"][0]["count"]
    try:
        out = client_app(message(w0, MessageType.TRAIN, {"local_steps": 1}), ctx)
    except Exception as exc:  # Flower may raise to its runtime, which replies with an error
        assert "budget exhausted" in str(exc)
    else:
        assert out.has_error() and "budget exhausted" in str(out.error.reason)
    # nothing more was spent, and the state still says so
    assert task.load_state(ctx)[0]["accountant"]["events"][0]["count"] == steps


def test_serverapp_and_clientapp_in_process_fedavg() -> None:
    threads_before = set(threading.enumerate())
    result, grid = run_in_process(3, {"num-server-rounds": 2, "local-steps": 3}, researcher_eval=True)
    assert set(threading.enumerate()) <= threads_before  # nothing left running
    assert result is not None
    assert result.evaluate_metrics_clientapp == {}  # the nodes released no evaluation
    # the simulator's own measurement of the global model, apart from anything the nodes release
    acc = per_round(result.evaluate_metrics_serverapp, "true_accuracy")
    assert set(acc) == {0, 1, 2} and all(0.5 < acc[r] <= 1.0 for r in (1, 2))
    # ε grows across rounds, read from what the nodes released (their public fit metrics)
    eps = per_round(result.train_metrics_clientapp, "epsilon")
    eps_max = per_round(result.train_metrics_clientapp, "epsilon_max")
    assert 0 < eps[1] < eps[2] and 0 < eps_max[1] < eps_max[2]
    assert per_round(result.train_metrics_clientapp, "total_steps") == {1: 3.0, 2: 6.0}
    assert not {"loss", "accuracy", "n_train"} & {k for m in result.train_metrics_clientapp.values() for k in m}
    for ctx in grid.contexts.values():
        state, fits = task.load_state(ctx)
        assert fits == 2 and state is not None
        assert state["accountant"]["events"][0]["count"] == 6
    assert max(task.epsilon_of(c) for c in grid.contexts.values()) == pytest.approx(eps_max[2])


def test_serverapp_with_dp_evaluation_release() -> None:
    result, grid = run_in_process(3, {"num-server-rounds": 2, "local-steps": 3, "eval-noise-multiplier": 2.0,
                                      "eval-denominator": 38})
    assert result is not None
    acc = per_round(result.evaluate_metrics_clientapp, "accuracy")  # noisy counts / 38, averaged by Flower's FedAvg
    assert set(acc) == {1, 2} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert {k for m in result.evaluate_metrics_clientapp.values() for k in m} == {"accuracy", "dp", "loss"}
    eps_max = per_round(result.train_metrics_clientapp, "epsilon_max")
    # round 2's fit ε includes round 1's evaluation release; the last release comes after it
    assert all(task.epsilon_of(c) > eps_max[2] for c in grid.contexts.values())


def test_the_serverapp_object_itself_drives_the_nodes() -> None:
    result, grid = run_in_process(2, {"num-server-rounds": 2, "local-steps": 2}, server_app=server_app)
    assert result is None
    assert [task.load_state(c)[1] for c in grid.contexts.values()] == [2, 2]
    assert all(task.epsilon_of(c) > 0 for c in grid.contexts.values())


def test_bad_run_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="local-steps"):
        task.settings({"local-steps": "ten"})
    with pytest.raises(ConfigError, match="unknown key"):
        task.settings({"rounds": 3})
    with pytest.raises(ConfigError, match="partition-id"):
        task.partition_of(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


HOSPITAL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from sklearn.datasets import load_digits

CALLS = []

def load_site(site_index, num_sites, root=None):
    CALLS.append((site_index, num_sites, root))
    d = load_digits()
    x = torch.tensor(d.data.reshape(-1, 1, 8, 8) / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    idx = torch.arange(len(y))[site_index::num_sites]
    cut = int(len(idx) * 0.8)
    return TensorDataset(x[idx[:cut]], y[idx[:cut]]), TensorDataset(x[idx[cut:]], y[idx[cut:]])

def Net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
'''


def test_flower_app_runs_the_hospitals_own_model_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flower App builds through the same registries: a model factory and a data factory by
    import path, with Adam; the server never reads site data for a factory model."""
    (tmp_path / "hosp_flower.py").write_text(HOSPITAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    result, grid = run_in_process(2, {"num-server-rounds": 2, "local-steps": 10, "model": "hosp_flower:Net",
                                      "data-factory": "hosp_flower:load_site", "data-root": str(tmp_path),
                                      "optimizer": "adam", "lr": 0.02, "sample-rate": 0.1},
                                  researcher_eval=True)
    import hosp_flower  # type: ignore[import-not-found]

    assert result is not None
    assert {(c[0], c[1]) for c in hosp_flower.CALLS} == {(0, 2), (1, 2)}  # the sites' own calls only
    assert all(c[2] == str(tmp_path) for c in hosp_flower.CALLS)
    acc = per_round(result.evaluate_metrics_serverapp, "true_accuracy")
    assert acc[2] > 0.2  # ten classes: better than chance after two DP rounds
    assert 0 < per_round(result.train_metrics_clientapp, "epsilon_max")[2] <= 8.0
