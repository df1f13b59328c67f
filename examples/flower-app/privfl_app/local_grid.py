"""Run the ServerApp and the ClientApp together in one process, without Ray or a SuperLink.

Flower's own in-process path (``flwr.simulation.run_simulation``) needs Ray, which privfl
does not install. A ``ServerApp`` only talks to nodes through a ``flwr.serverapp.Grid``,
so :class:`LocalGrid` implements that interface by handing each message straight to the
``ClientApp`` with the destination node's own ``Context`` (whose ``state`` persists for
the whole run, as a SuperNode's does). Everything else — the ServerApp, Flower's FedAvg,
the legacy-compat ``GridClientProxy``, the message (de)serialisation and the ClientApp —
is Flower's real code. Use it for a smoke test; real deployments use ``flwr run``.

Being a simulator, it holds every site's data, so with ``researcher_eval`` it measures
the true test accuracy of each round's global model on all sites' test splits through
Flower's server-side ``evaluate_fn`` (``History.metrics_centralized``) — for the
researcher's figures only, apart from what the nodes release (``metrics_distributed``,
empty unless a DP evaluation release is configured).

    python -m privfl_app.local_grid --nodes 3 --run-config "num-server-rounds=2"
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Scalar
from flwr.common.constant import ErrorCode
from flwr.server.compat.app import start_grid
from flwr.server.history import History
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

log = logging.getLogger("privfl.flower_app")

APP_DIR = Path(__file__).resolve().parent.parent


def app_run_config(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml (what ``flwr run`` starts from)."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


class LocalGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process, one ``Context`` per node."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any], run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self.contexts: dict[int, Context] = {
            node_id: Context(run_id=run_id, node_id=node_id,
                             node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config=dict(run_config))
            for i, node_id in enumerate(range(1, num_nodes + 1))
        }
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()  # one ClientApp call at a time: deterministic, torch-thread friendly

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ctx = self.contexts.get(msg.metadata.dst_node_id)
            with self._lock:
                if ctx is None:
                    reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {msg.metadata.dst_node_id}"),
                                    reply_to=msg)
                else:
                    try:
                        reply = self.client_app(msg, ctx)
                    except Exception as exc:  # what a SuperNode does with a raising ClientApp
                        log.warning("node %s: ClientApp raised %s: %s", msg.metadata.dst_node_id,
                                    type(exc).__name__, exc)
                        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                              f"{type(exc).__name__}: {exc}"), reply_to=msg)
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def researcher_evaluate_fn(cfg: Mapping[str, Any], num_nodes: int) -> Callable[..., tuple[float, dict[str, Scalar]]]:
    """Flower ``evaluate_fn``: (loss, {"true_accuracy"}) of a global model on every site's test split.

    Simulation only: no node computes or releases this; the simulator reads the data it
    generated itself.
    """
    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset

    from privfl.clients.dp_client import evaluate_dataset, evaluate_model
    from privfl_app.task import make_model, settings, site_of

    full = settings(cfg)
    sites = [site_of(full, i, num_nodes) for i in range(num_nodes)]
    model = make_model(full, sites[0])
    if all(isinstance(s.test, tuple) for s in sites):
        x = torch.as_tensor(np.concatenate([s.test[0] for s in sites])).float()
        y = torch.as_tensor(np.concatenate([s.test[1] for s in sites])).long()

        def score() -> tuple[float, float]:
            return evaluate_model(model, x, y, torch.device("cpu"))
    else:
        union = ConcatDataset([s.test for s in sites])

        def score() -> tuple[float, float]:
            return evaluate_dataset(model, union, torch.device("cpu"))

    def evaluate(server_round: int, parameters: list[Any],
                 config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(model.state_dict(), parameters)})
        loss, acc = score()
        return loss, {"true_accuracy": acc}

    return evaluate


def run_in_process(num_nodes: int, run_config: Mapping[str, Any] | None = None,
                   server_app: ServerApp | None = None,
                   researcher_eval: bool = False) -> tuple[History | None, LocalGrid]:
    """Run the app's ServerApp against ``num_nodes`` in-process ClientApp nodes.

    With ``server_app`` given, that ServerApp object itself is called (its return value
    is None, so no History); otherwise the app's ``server_fn`` components are run with
    ``start_grid`` — what ``ServerApp.__call__`` does — to return Flower's ``History``.
    ``researcher_eval`` adds the simulator's own true accuracy (see the module docstring).
    """
    from privfl_app.client_app import app as client_app
    from privfl_app.server_app import server_fn

    cfg = {**app_run_config(), **dict(run_config or {})}
    grid = LocalGrid(client_app, num_nodes, cfg)
    server_ctx = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    if server_app is not None:
        server_app(grid, server_ctx)
        return None, grid
    components = server_fn(server_ctx)
    if researcher_eval:
        components.strategy.evaluate_fn = researcher_evaluate_fn(cfg, num_nodes)  # type: ignore[attr-defined]
    hist = start_grid(grid=grid, strategy=components.strategy, config=components.config)
    return hist, grid


def _parse_run_config(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in text.split():
        key, _, raw = item.partition("=")
        out[key] = tomllib.loads(f"v = {raw}")["v"]
    return out


def main() -> None:
    """Command line: run the app in-process and print the per-round figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--run-config", default="", help='e.g. "num-server-rounds=2 local-steps=5"')
    args = p.parse_args()
    t0 = time.perf_counter()
    hist, grid = run_in_process(args.nodes, _parse_run_config(args.run_config), researcher_eval=True)
    assert hist is not None
    from privfl_app.task import epsilon_of

    print(json.dumps({
        "seconds": round(time.perf_counter() - t0, 2),
        # the simulator's own measurement (never released by a node)
        "true_accuracy": hist.metrics_centralized.get("true_accuracy", []),
        # what the nodes released: a DP accuracy, only with eval-noise-multiplier/eval-denominator set
        "released_dp_accuracy": hist.metrics_distributed.get("accuracy", []),
        "epsilon_max": hist.metrics_distributed_fit.get("epsilon_max", []),
        "epsilon_per_node": {n: epsilon_of(c) for n, c in grid.contexts.items()},
    }))


if __name__ == "__main__":
    main()
