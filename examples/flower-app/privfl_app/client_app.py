"""Flower ClientApp (Message API): privfl's DPClient, with its privacy state kept in ``context.state``.

Flower calls ``train`` / ``evaluate`` once per message (the Deployment Engine even starts
a new process for each), so each call rebuilds the node's ``DPClient`` (same data, model
and DP settings, no seed: noise and batches from a fresh secure source), restores the
accountant and optimizer state saved in the node's ``context.state`` and, after each fit
or DP evaluation release, writes them back — before the reply leaves, and even when the
call fails part-way (the steps it reserved stay counted). A node whose budget is spent
raises ``BudgetExhausted``; Flower turns that into an error reply, which the server's
FedAvg counts as a failure and leaves out.

What a reply carries is the DPClient's release, and this node's end of the wire checks it
once more:

- ``train``: an ``ArrayRecord`` (the model after DP-SGD steps, under the keys the server
  sent) and a ``MetricRecord`` of public values only — ``PUBLIC_FIT_METRICS`` (ε, δ, step
  counts, flags) and ``num-examples``, the public FedAvg weight (1: equal weights);
- ``evaluate``: nothing (an empty reply) unless the run config asks for a DP accuracy
  release; then a ``MetricRecord`` with the noisy accuracy, ``dp`` = 1, its loss
  (1 − accuracy) and the public denominator as ``num-examples``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privfl.clients import DPClient
from privfl.clients.losses import build_loss
from privfl.strategies.federated import WEIGHT_KEY, public_fit_metrics, released_evaluation
from privfl_app.task import (
    dp_config,
    dp_evaluation,
    load_state,
    make_model,
    partition_of,
    save_state,
    settings,
    site_of,
)

log = logging.getLogger("privfl.flower_app")

app = ClientApp()


def build_client(context: Context) -> tuple[DPClient, int]:
    """This node's DPClient with its saved privacy state restored, and the number of fits so far."""
    cfg = settings(context.run_config)
    pid, n = partition_of(context)
    site = site_of(cfg, pid, n)
    state, fits = load_state(context)
    client = DPClient(make_model(cfg, site), site.train, site.test, dp_config(cfg),
                      criterion=build_loss(str(cfg["loss"])))
    if state is not None:
        client.load_state_dict(state)
    return client, fits


def _received(msg: Message) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
    """(array keys, arrays, config) of a message from the server."""
    record = msg.content.array_records["arrays"]
    config = msg.content.config_records.get("config")
    return list(record.keys()), record.to_numpy_ndarrays(), dict(config or {})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """DP-SGD on the received model; reply with the noised model, the public weight and public metrics."""
    client, fits = build_client(context)
    keys, arrays, config = _received(msg)
    try:
        params, weight, metrics = client.fit(arrays, config)
    finally:
        save_state(context, client, fits + 1)
    log.info("node %s fit %d: epsilon=%.4f after %d steps", context.node_config.get("partition-id"), fits + 1,
             client.epsilon, client.accountant.steps)
    model = ArrayRecord({k: Array(np.asarray(p)) for k, p in zip(keys, params)})
    released = MetricRecord({**public_fit_metrics(metrics), WEIGHT_KEY: int(weight)})
    return Message(RecordDict({"arrays": model, "metrics": released}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Nothing unless a DP accuracy release is configured; its cost is saved before the reply."""
    if not dp_evaluation(settings(context.run_config)):
        return Message(RecordDict(), reply_to=msg)  # evaluation stays on the site
    client, fits = build_client(context)
    _, arrays, config = _received(msg)
    try:
        loss, count, metrics = client.evaluate(arrays, config)
    finally:
        save_state(context, client, fits)
    log.info("node %s evaluation release: epsilon=%.4f", context.node_config.get("partition-id"), client.epsilon)
    release = released_evaluation(loss, count, metrics)
    return Message(RecordDict() if release is None else RecordDict({"metrics": release}), reply_to=msg)
