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
  sent; with ``subspace-fraction`` > 0 instead one framed tensor: the k values of the
  noised change on the round's public mask, :mod:`privfl_app.subspace`) and a
  ``MetricRecord`` of public values only — ``PUBLIC_FIT_METRICS`` (ε, δ, step
  counts, flags) and ``num-examples``, the public FedAvg weight (1: equal weights);
- ``evaluate``: nothing (an empty reply) unless the run config asks for a DP accuracy
  release; then a ``MetricRecord`` with the noisy accuracy, ``dp`` = 1, its loss
  (1 − accuracy) and the public denominator as ``num-examples``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privfl.clients import DPClient
from privfl.clients.losses import build_loss
from privfl.errors import ConfigError
from privfl.strategies.federated import WEIGHT_KEY, public_fit_metrics, released_evaluation
from privfl.strategies.subspace_transfer import SubspaceReceiver
from privfl_app.subspace import load_receiver, receive, save_receiver, to_wire
from privfl_app.task import (
    dp_config,
    dp_evaluation,
    load_state,
    make_model,
    partition_of,
    save_state,
    settings,
    site_of,
    subspace_on,
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
    """DP-SGD on the received model; reply with the noised model (or its k values), the public weight and
    public metrics."""
    cfg = settings(context.run_config)
    client, fits = build_client(context)
    keys, arrays, config = _received(msg)
    receiver = None
    if subspace_on(cfg):
        receiver = load_receiver(context, cfg)
        keys, arrays = client.parameter_names(), _receive_subspace(receiver, msg, context, cfg, client)
    try:
        params, weight, metrics = client.fit(arrays, config)
    finally:
        save_state(context, client, fits + 1)
    log.info("node %s fit %d: epsilon=%.4f after %d steps", context.node_config.get("partition-id"), fits + 1,
             client.epsilon, client.accountant.steps)
    if receiver is None:
        model = ArrayRecord({k: Array(np.asarray(p)) for k, p in zip(keys, params)})
    else:  # the noised change's k values on the round's public mask, framed (nothing else of the model)
        model = to_wire(receiver.upload([np.asarray(p) for p in params]))
    released = MetricRecord({**public_fit_metrics(metrics), WEIGHT_KEY: int(weight)})
    return Message(RecordDict({"arrays": model, "metrics": released}), reply_to=msg)


def _receive_subspace(receiver: SubspaceReceiver, msg: Message, context: Context, cfg: dict[str, Any],
                      client: DPClient) -> list[np.ndarray]:
    """The global model rebuilt from the server's frame; the receiver is saved in ``context.state`` at once
    (the server counts this node as holding that version from now on)."""
    record = msg.content.array_records["arrays"]
    config = dict(msg.content.config_records.get("config") or {})
    asked = config.get("local_steps")
    if msg.metadata.message_type == MessageType.TRAIN and asked != cfg["local-steps"]:
        raise ConfigError(f"subspace: the server asks for {asked!r} local steps, the round's mask is that of "
                          f"local-steps = {cfg['local-steps']}")
    arrays = receive(receiver, record, config)
    save_receiver(context, receiver)
    taken = getattr(client.optimizer, "steps_taken", None)
    if msg.metadata.message_type == MessageType.TRAIN and taken != receiver.version * int(cfg["local-steps"]):
        log.warning("node %s: its DP optimizer took %s steps, round %d's mask starts at step %d: what it moves off "
                    "the round's mask is not sent", context.node_config.get("partition-id"), taken,
                    receiver.version, receiver.version * int(cfg["local-steps"]))
    return arrays


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Nothing unless a DP accuracy release is configured; its cost is saved before the reply."""
    cfg = settings(context.run_config)
    if not dp_evaluation(cfg):
        return Message(RecordDict(), reply_to=msg)  # evaluation stays on the site
    client, fits = build_client(context)
    _, arrays, config = _received(msg)
    if subspace_on(cfg):
        arrays = _receive_subspace(load_receiver(context, cfg), msg, context, cfg, client)
    try:
        loss, count, metrics = client.evaluate(arrays, config)
    finally:
        save_state(context, client, fits)
    log.info("node %s evaluation release: epsilon=%.4f", context.node_config.get("partition-id"), client.epsilon)
    release = released_evaluation(loss, count, metrics)
    return Message(RecordDict() if release is None else RecordDict({"metrics": release}), reply_to=msg)
