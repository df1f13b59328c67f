"""Flower ClientApp: privfl's DPClient, unchanged, with its privacy state kept in ``context.state``.

``client_fn`` runs once per message. It rebuilds the node's ``DPClient`` (same data,
model and DP settings, no seed: noise and batches from a fresh secure source), restores
the accountant and optimizer state saved in the node's ``context.state`` and, after
each fit or DP evaluation release, writes them back — before the reply leaves, and
even when the call fails part-way (the steps it reserved stay counted). A node whose
budget is spent raises ``BudgetExhausted``; Flower turns that into an error reply,
which the server's FedAvg counts as a failure and leaves out.

What the reply carries is the DPClient's release, and this node's end of the wire
checks it once more: fit metrics are cut to ``PUBLIC_FIT_METRICS``; an evaluation
reply is empty (0 examples) unless the run config asks for a DP accuracy.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from privfl.clients import DPClient
from privfl.clients.dp_client import PUBLIC_FIT_METRICS
from privfl.clients.losses import build_loss
from privfl_app.task import (
    dp_config,
    load_state,
    make_model,
    partition_of,
    save_state,
    settings,
    site_of,
)

log = logging.getLogger("privfl.flower_app")

NDArrays = list[Any]


class ContextDPClient(NumPyClient):
    """A ``DPClient`` whose accountant/optimizer state persists in the Flower ``Context``."""

    def __init__(self, inner: DPClient, context: Context, fits: int, node: str) -> None:
        self.inner = inner
        self.ctx = context
        self.fits = fits
        self.node = node

    def get_parameters(self, config: dict[str, Any]) -> NDArrays:
        return self.inner.get_parameters(config)

    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """The DPClient's release: noised model, public weight, public metrics only."""
        try:
            params, weight, metrics = self.inner.fit(parameters, config)
        finally:
            save_state(self.ctx, self.inner, self.fits + 1)
        log.info("node %s fit %d: epsilon=%.4f after %d steps", self.node, self.fits + 1,
                 self.inner.epsilon, self.inner.accountant.steps)
        return params, weight, {k: v for k, v in metrics.items() if k in PUBLIC_FIT_METRICS}

    def evaluate(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Nothing (0 examples) unless a DP accuracy release is configured; its cost is saved before the reply."""
        if self.inner.config.eval_noise_multiplier is None:
            return 0.0, 0, {}
        try:
            loss, count, metrics = self.inner.evaluate(parameters, config)
        finally:
            save_state(self.ctx, self.inner, self.fits)
        log.info("node %s evaluation release: epsilon=%.4f", self.node, self.inner.epsilon)
        return loss, count, metrics


def client_fn(context: Context) -> Client:
    """Build this node's DPClient for one message, with its saved privacy state restored."""
    cfg = settings(context.run_config)
    pid, n = partition_of(context)
    site = site_of(cfg, pid, n)
    state, fits = load_state(context)
    client = DPClient(
        make_model(cfg, site),
        site.train,
        site.test,
        dp_config(cfg),
        criterion=build_loss(str(cfg["loss"])),
    )
    if state is not None:
        client.load_state_dict(state)
    return ContextDPClient(client, context, fits, node=f"partition-{pid}").to_client()


app = ClientApp(client_fn=client_fn)
