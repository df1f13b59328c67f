"""Flower ServerApp: Flower's own FedAvg over privfl DPClients.

Each site does record-level DP-SGD inside its ClientApp and accounts for it there; the
server only averages already-noised models, so FedAvg's weighting by ``num_examples``
does not change any site's (ε, δ).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.common import Scalar, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from privfl_app.task import load_site, make_model, settings
from strategies.federated import weighted_average


def fit_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted means of the clients' fit metrics, plus the largest ε any site has spent."""
    out = weighted_average(metrics)
    eps = [float(m["epsilon"]) for _, m in metrics if "epsilon" in m]  # type: ignore[arg-type]
    if eps:
        out["epsilon_max"] = max(eps)
    return out


def build_strategy(cfg: dict[str, Any]) -> FedAvg:
    """Flower's FedAvg configured from the run config, starting from the shared initial model."""
    site = load_site(str(cfg["dataset"]), str(cfg["partitioning"]), int(cfg["seed"]), 0, 1)
    model = make_model(cfg, site)
    init = [v.detach().cpu().numpy() for v in model.state_dict().values()]
    local_steps = int(cfg["local-steps"])
    return FedAvg(
        fraction_fit=float(cfg["fraction-fit"]),
        fraction_evaluate=1.0,
        min_fit_clients=int(cfg["min-fit-clients"]),
        min_evaluate_clients=int(cfg["min-fit-clients"]),
        min_available_clients=int(cfg["min-available-clients"]),
        on_fit_config_fn=lambda rnd: {"local_steps": local_steps, "server_round": rnd},
        initial_parameters=ndarrays_to_parameters(init),
        fit_metrics_aggregation_fn=fit_metrics,
        evaluate_metrics_aggregation_fn=weighted_average,
    )


def server_fn(context: Context) -> ServerAppComponents:
    """The FedAvg strategy and the number of rounds, from the run config."""
    cfg = settings(context.run_config)
    return ServerAppComponents(strategy=build_strategy(cfg),
                               config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])))


app = ServerApp(server_fn=server_fn)
