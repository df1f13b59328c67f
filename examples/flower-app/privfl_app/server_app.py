"""Flower ServerApp (Message API): Flower's own FedAvg over privfl DPClients.

Each site does record-level DP-SGD inside its ClientApp and accounts for it there. What
reaches this server is public or DP: noised models, a public FedAvg weight
(``num-examples`` = 1 per site: equal weights, never a site's record count) and public fit
metrics (ε, δ, steps, flags). The server asks for no evaluation (``fraction_evaluate =
0``) unless the run config sets a DP evaluation release (``eval-noise-multiplier``,
``eval-denominator``); then each site releases a noisy accuracy over the public
denominator, its cost in its own accountant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from privfl.strategies.federated import WEIGHT_KEY
from privfl_app.task import dp_evaluation, make_model, needs_site_for_model, settings, site_of

app = ServerApp()


def _is_release(msg: Message) -> bool:
    """Whether an evaluation reply carries a DP release (``dp`` = 1 over a public denominator > 0)."""
    return any(int(rec.get("dp", 0)) == 1 and int(rec.get(WEIGHT_KEY, 0)) > 0  # type: ignore[call-overload]
               for rec in msg.content.metric_records.values())


class DPReleaseFedAvg(FedAvg):
    """Flower's FedAvg that aggregates DP evaluation releases only, and reports the largest ε.

    A site that releases nothing (an empty reply: no release configured, or its budget
    could not pay for one) is left out, so Flower's weighted mean never divides by zero;
    a round with no release gives no evaluation result. ``epsilon_max`` (the largest ε a
    site reports: public) is added to each round's training metrics. Aggregation itself
    is Flower's.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        eps = [float(rec["epsilon"]) for msg in replies if not msg.has_error()  # type: ignore[arg-type]
               for rec in msg.content.metric_records.values() if "epsilon" in rec]
        if metrics is not None and eps:
            metrics["epsilon_max"] = max(eps)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        released = [msg for msg in replies if msg.has_error() or _is_release(msg)]
        return super().aggregate_evaluate(server_round, released)


def build_strategy(cfg: dict[str, Any]) -> FedAvg:
    """Flower's FedAvg configured from the run config."""
    evaluate = dp_evaluation(cfg)
    return DPReleaseFedAvg(
        fraction_train=float(cfg["fraction-fit"]),
        fraction_evaluate=1.0 if evaluate else 0.0,  # evaluation stays on the sites unless released with DP
        min_train_nodes=int(cfg["min-fit-clients"]),
        min_evaluate_nodes=int(cfg["min-fit-clients"]),
        min_available_nodes=int(cfg["min-available-clients"]),
    )


def initial_arrays(cfg: dict[str, Any]) -> ArrayRecord:
    """The shared initial model (every node builds the same one from the same seed)."""
    # a built-in model's shape comes from the shipped dataset's layout; a user factory knows its own
    model = make_model(cfg, site_of(cfg, 0, 1) if needs_site_for_model(cfg) else None)
    return ArrayRecord(model.state_dict())


def run(grid: Grid, context: Context,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
    """FedAvg for ``num-server-rounds`` rounds of ``local-steps`` DP-SGD steps per site."""
    cfg = settings(context.run_config)
    result = build_strategy(cfg).start(
        grid=grid,
        initial_arrays=initial_arrays(cfg),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"local_steps": int(cfg["local-steps"])}),
        evaluate_fn=evaluate_fn,
    )
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        if "epsilon_max" in metrics:
            print(f"[privfl] round {rnd}: epsilon_max={float(metrics['epsilon_max']):.4f} "  # type: ignore[arg-type]
                  f"(delta={cfg['delta']})")
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point (``flwr run``)."""
    run(grid, context)
