"""Run the ServerApp and the ClientApp together in one process, without Ray or a SuperLink.

A ``ServerApp`` only talks to nodes through a ``flwr.serverapp.Grid``; privfl's
:class:`~privfl.strategies.federated.InProcessGrid` implements that interface by handing
each message straight to the ``ClientApp`` with the destination node's own ``Context``
(whose ``state`` persists for the whole run, as a SuperNode's does; a ClientApp that
raises gets an error reply, as a SuperNode gives it). Everything else — the ServerApp,
Flower's FedAvg and its ``start`` loop, the ClientApp — is Flower's real code. Use it for a
quick check and in tests; ``flwr run .`` is the real thing (see the README).

Being a simulator, it holds every site's data, so with ``researcher_eval`` it measures
the true test accuracy of each round's global model on all sites' test splits through
the strategy's server-side ``evaluate_fn`` (``Result.evaluate_metrics_serverapp``) — for
the researcher's figures only, apart from what the nodes release
(``Result.evaluate_metrics_clientapp``, empty unless a DP evaluation release is configured).

    python -m privfl_app.local_grid --nodes 3 --run-config "num-server-rounds=2"
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import Result

from privfl.strategies.federated import FIRST_NODE_ID, InProcessGrid

log = logging.getLogger("privfl.flower_app")

APP_DIR = Path(__file__).resolve().parent.parent
RUN_ID = 1


def app_run_config(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml (what ``flwr run`` starts from)."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def node_contexts(num_nodes: int, run_config: Mapping[str, Any]) -> dict[int, Context]:
    """One Context per node, with the node config a SuperNode gets (``partition-id``, ``num-partitions``)."""
    return {FIRST_NODE_ID + i: Context(run_id=RUN_ID, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_nodes},
                                       state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)}


def researcher_evaluate_fn(cfg: Mapping[str, Any], num_nodes: int) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower ``evaluate_fn``: {true_loss, true_accuracy} of a global model on every site's test split.

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

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = score()
        return MetricRecord({"true_loss": float(loss), "true_accuracy": float(acc)})

    return evaluate


def run_in_process(num_nodes: int, run_config: Mapping[str, Any] | None = None,
                   server_app: ServerApp | None = None,
                   researcher_eval: bool = False) -> tuple[Result | None, InProcessGrid]:
    """Run the app's ServerApp against ``num_nodes`` in-process ClientApp nodes.

    With ``server_app`` given, that ServerApp object itself is called (``@app.main``
    returns nothing, so no Result); otherwise the app's ``run`` — what its main calls —
    returns Flower's ``Result``. ``researcher_eval`` adds the simulator's own true
    accuracy (see the module docstring).
    """
    from privfl_app.client_app import app as client_app
    from privfl_app.server_app import run

    cfg = {**app_run_config(), **dict(run_config or {})}
    grid = InProcessGrid(client_app, node_contexts(num_nodes, cfg), run_id=RUN_ID)
    server_ctx = Context(run_id=RUN_ID, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    if server_app is not None:
        server_app(grid, server_ctx)
        return None, grid
    result = run(grid, server_ctx, evaluate_fn=researcher_evaluate_fn(cfg, num_nodes) if researcher_eval else None)
    return result, grid


def per_round(metrics: Mapping[int, MetricRecord], key: str) -> dict[int, float]:
    """``{round: value}`` of one key of a Result's per-round MetricRecords."""
    return {r: float(m[key]) for r, m in sorted(metrics.items()) if key in m}  # type: ignore[arg-type]


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
    result, grid = run_in_process(args.nodes, _parse_run_config(args.run_config), researcher_eval=True)
    assert result is not None
    from privfl_app.task import epsilon_of

    print(json.dumps({
        "seconds": round(time.perf_counter() - t0, 2),
        # the simulator's own measurement (never released by a node)
        "true_accuracy": per_round(result.evaluate_metrics_serverapp, "true_accuracy"),
        # what the nodes released: a DP accuracy, only with eval-noise-multiplier/eval-denominator set
        "released_dp_accuracy": per_round(result.evaluate_metrics_clientapp, "accuracy"),
        "epsilon_max": per_round(result.train_metrics_clientapp, "epsilon_max"),
        "epsilon_per_node": {n: epsilon_of(c) for n, c in grid.contexts.items()},
    }))


if __name__ == "__main__":
    main()
