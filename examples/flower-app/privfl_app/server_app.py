"""Flower ServerApp: Flower's own FedAvg over privfl DPClients.

Each site does record-level DP-SGD inside its ClientApp and accounts for it there. What
reaches this server is public or DP: noised models, a public FedAvg weight (1 per site:
equal weights, never a site's record count) and public fit metrics (ε, δ, steps,
flags). The server asks for no evaluation (``fraction_evaluate = 0``) unless the run
config sets a DP evaluation release (``eval-noise-multiplier``, ``eval-denominator``);
then each site releases a noisy accuracy over the public denominator, its cost in its
own accountant.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.common import EvaluateRes, Scalar, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from privfl.strategies.federated import released_evaluate_res, weighted_average
from privfl_app.task import dp_evaluation, make_model, needs_site_for_model, settings, site_of


def fit_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Public-weight means of the clients' (public) fit metrics, plus the largest ε any site has spent."""
    out = weighted_average(metrics)
    eps = [float(m["epsilon"]) for _, m in metrics if "epsilon" in m]  # type: ignore[arg-type]
    if eps:
        out["epsilon_max"] = max(eps)
    return out


class DPReleaseFedAvg(FedAvg):
    """Flower's FedAvg whose ``aggregate_evaluate`` takes DP releases only.

    A site that releases nothing (0 examples: e.g. its budget could not pay for the
    release) is left out, so Flower's weighted loss never divides by zero; a round with
    no release gives no evaluation result. Aggregation itself is Flower's.
    """

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        released = [(p, r) for p, r in ((p, released_evaluate_res(r)) for p, r in results) if r.num_examples > 0]
        return super().aggregate_evaluate(server_round, released, failures)


def build_strategy(cfg: dict[str, Any]) -> FedAvg:
    """Flower's FedAvg configured from the run config, starting from the shared initial model."""
    # a built-in model's shape comes from the shipped dataset's layout; a user factory knows its own
    model = make_model(cfg, site_of(cfg, 0, 1) if needs_site_for_model(cfg) else None)
    init = [v.detach().cpu().numpy() for v in model.state_dict().values()]
    local_steps = int(cfg["local-steps"])
    evaluate = dp_evaluation(cfg)
    return DPReleaseFedAvg(
        fraction_fit=float(cfg["fraction-fit"]),
        fraction_evaluate=1.0 if evaluate else 0.0,  # evaluation stays on the sites unless released with DP
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
