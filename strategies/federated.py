"""Centralized FedAvg baseline: Flower's Message-API ``FedAvg`` over in-process nodes.

:class:`FederatedAveraging` runs one round the way Flower's ``Strategy.start`` runs each
of its rounds — but one round per call, so privfl's simulator can put its virtual clock
between rounds. Flower's ``flwr.serverapp.strategy.FedAvg`` samples the nodes and builds
their ``Message``\\ s (``configure_train``); an :class:`InProcessGrid` (a
``flwr.serverapp.Grid``) hands each message to the node's Flower ``ClientApp`` in this
process; the same strategy object aggregates the replies (``aggregate_train``,
``aggregate_evaluate``). The weighted average is therefore Flower's, not a copy of it.

Each node's ``ClientApp`` (``@app.train()`` / ``@app.evaluate()``) calls the node's
privfl ``NumPyClient`` through a :class:`NodeEndpoint`, the node's end of the wire.

Privacy: each ``DPClient`` runs record-level DP-SGD on its own data and accounts for
it locally, and only public or DP values reach Flower's strategy (the project rule: a
value leaves a node only if it is DP output or public by declaration):

- the FedAvg weight (``num-examples`` in the reply's ``MetricRecord``) is public: the
  weight the client releases — a privfl ``DPClient`` releases its declared site size,
  or 1 (equal weights) — never its realised record count; ``FedAvgConfig.weighting =
  "equal"`` overrides whatever a client reports with 1;
- a training reply's metrics are cut at the node's end of the wire
  (:class:`NodeEndpoint`, :func:`public_fit_metrics`) to :data:`PUBLIC_FIT_METRICS`
  (ε, δ, step counts, flags): a training loss, a count or any other key is dropped
  before the reply leaves the node, and the server side hands Flower's strategy only
  those keys (and the weight);
- evaluation stays on the sites by default: an evaluation reply carries a release only
  if it is a DP one (``metrics["dp"] == 1`` and a public denominator > 0, e.g.
  ``DPConfig.eval_noise_multiplier``), cut to :data:`DP_EVALUATE_METRICS` plus the
  release's loss (:func:`released_evaluation`); a node that releases nothing replies
  with no record, is left out of ``aggregate_evaluate``, and a round without any
  release gives no loss.

The server then only post-processes already-noised models and public weights, so the
aggregation does not change any site's (ε, δ). (Client-level DP with server-side noise
is not what this baseline does.) A researcher's true test accuracy is the simulator's
business (it reads the models it holds), never a value the nodes release.

Bytes (:class:`~strategies.base.CollectiveRound`): ``bytes_down[node]`` is what the
server sent the node this round (the global model for training; with evaluation on,
the new global model again for evaluation), ``bytes_up[node]`` what the node returned
(its trained model): array data only (shape × item size), no headers, and 0 for a node
not selected. ``FedAvgConfig.upload = "update"`` sends model changes instead of whole
models, framed and optionally compressed (see :mod:`strategies.update_transfer`); the
bytes are then the frames' lengths.

Flower internals: exactly one. In Flower 1.42 ``Message(content, dst_node_id,
message_type)`` — how every Message-API strategy builds its instructions in
``configure_train`` / ``configure_evaluate`` — reads the process's task identity
(``flwr.supercore.task_identity.TaskIdentity``: run id, node id, task id) and raises
``RuntimeError("TaskIdentity.run_id is not set.")`` outside a Flower runtime. Only
Flower's own runtimes set it (the ``flwr-serverapp`` process, the simulation engine,
``flwr.simulation.run_simulation`` — which needs Ray — and the legacy ``start_grid``);
there is no public call that sets it for an in-process driver. :func:`ensure_task_identity`
sets it, only where it is unset (as ``run_simulation`` does for its in-process Python
API). Everything else here — ``Grid``, ``FedAvg``, ``ClientApp``, ``Message``, the
records, ``Context`` — is ``flwr.app`` / ``flwr.serverapp`` / ``flwr.clientapp``.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from privfl.accounting import BudgetExhausted
from privfl.accounting.errors import ConfigError
from privfl.accounting.releases import DP_EVALUATE_METRICS, PUBLIC_FIT_METRICS
from privfl.strategies.base import CollectiveRound, CollectiveStrategy, Params
from privfl.strategies.compression import CLTk, Compressor, compressor_from_config
from privfl.strategies.compression.subspace import SubspaceK
from privfl.strategies.subspace_transfer import VERSION_KEY, SubspaceModelTracker, SubspaceReceiver
from privfl.strategies.update_transfer import (
    COMPRESSED_TENSOR_TYPE,
    GlobalModelTracker,
    UpdateReceiver,
    apply_change,
    is_compressed,
    unframe_parameters,
)

__all__ = [
    "DP_EVALUATE_METRICS",
    "FIRST_NODE_ID",
    "PUBLIC_FIT_METRICS",
    "WEIGHT_KEY",
    "FedAvgConfig",
    "FederatedAveraging",
    "InProcessGrid",
    "NodeEndpoint",
    "arrays_nbytes",
    "ensure_task_identity",
    "is_framed_record",
    "node_client_app",
    "parameters_to_record",
    "public_fit_metrics",
    "record_to_parameters",
    "released_evaluation",
]

log = logging.getLogger("privfl.strategies.federated")

#: where a reply carries its FedAvg weight: Flower FedAvg's default ``weighted_by_key``
WEIGHT_KEY = "num-examples"
#: the key of the one MetricRecord in a node's reply
METRICS_KEY = "metrics"
#: codes of an error reply, as Flower's runtime gives them (``flwr.common.constant.ErrorCode``,
#: which ``flwr.app`` does not export): the ClientApp raised / no such node / refused here
CLIENT_APP_RAISED_EXCEPTION = 2
NODE_UNAVAILABLE = 5
REFUSED = 0
#: Flower's SuperLink is node 1; the nodes of an in-process federation are numbered from here
FIRST_NODE_ID = 101


def ensure_task_identity(run_id: int = 0) -> None:
    """Give this process the task identity Flower's ``Message`` constructor reads, where it has none.

    The one Flower internal privfl touches (see the module docstring): Flower 1.42 has no
    public call for it. Values already set (inside a Flower runtime) are left alone; a
    Flower without a task identity (before 1.42) needs nothing.
    """
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        return

    for name, value in (("task_id", 1), ("run_id", int(run_id)), ("node_id", 1)):  # node 1: the SuperLink
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


# ---- the release rule, at the node's end of the wire -------------------------------------
def _numeric(key: str, value: Any, where: str) -> int | float | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    log.warning("%s: dropped non-numeric metric %r (a MetricRecord holds numbers only)", where, key)
    return None


def public_fit_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """``metrics`` cut down to :data:`PUBLIC_FIT_METRICS` (dropped key names are logged, values never)."""
    return _kept(metrics, PUBLIC_FIT_METRICS, "fit result", "non-public metric(s) {} before it left the node")


def _kept(metrics: Mapping[str, Any], allowed: frozenset[str], where: str, dropped_note: str) -> dict[str, int | float]:
    """The numeric values of ``metrics`` whose keys are ``allowed``; dropped key names are logged, values never."""
    dropped = sorted(k for k in metrics if k not in allowed)
    if dropped:
        log.warning("%s: dropped %s", where, dropped_note.format(", ".join(dropped)))
    out: dict[str, int | float] = {}
    for k in sorted(allowed & set(metrics)):
        v = _numeric(k, metrics[k], where)
        if v is not None:
            out[k] = v
    return out


def released_evaluation(loss: float, num_examples: int, metrics: Mapping[str, Any]) -> MetricRecord | None:
    """The evaluation a node may release, or None (nothing leaves the node).

    A release is a DP one (``dp`` = 1) over a public denominator ``num_examples`` > 0;
    it keeps :data:`DP_EVALUATE_METRICS`, its loss (post-processing of the release, e.g.
    1 − the DP accuracy) and the denominator as its weight. A non-DP evaluation (a raw
    loss, accuracy or test count) never leaves the node.
    """
    if num_examples <= 0:
        return None
    if _numeric("dp", metrics.get("dp", 0), "evaluation") != 1:
        log.warning("evaluation result: not a DP release (no metrics['dp'] = 1); nothing leaves the node")
        return None
    out = _kept(metrics, DP_EVALUATE_METRICS, "evaluation result", "metric(s) {} that are not part of the DP release")
    return MetricRecord({**out, "loss": float(loss), WEIGHT_KEY: int(num_examples)})


# ---- the wire ---------------------------------------------------------------------------
def arrays_nbytes(record: ArrayRecord) -> int:
    """Bytes of the array data in ``record``: shape × item size, no serialisation headers."""
    return int(sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values()))


def is_framed_record(record: ArrayRecord) -> bool:
    """Whether ``record`` carries one framed (compressed) message rather than whole arrays."""
    return list(record) == [COMPRESSED_TENSOR_TYPE]


def parameters_to_record(parameters: Parameters) -> ArrayRecord:
    """privfl's framed change (one byte string, as one uint8 ``Array``) or whole arrays, as the ArrayRecord
    that travels in a Flower ``Message`` (here and in the Flower App of ``examples/flower-app``)."""
    if is_compressed(parameters):
        (frame,) = parameters.tensors
        return ArrayRecord({COMPRESSED_TENSOR_TYPE: Array(np.frombuffer(frame, dtype=np.uint8))})
    return ArrayRecord(parameters_to_ndarrays(parameters))


def record_to_parameters(record: ArrayRecord) -> Parameters:
    """The inverse of :func:`parameters_to_record`: what :class:`~strategies.update_transfer.UpdateReceiver`
    and the trackers read."""
    if is_framed_record(record):
        return Parameters(tensors=[record[COMPRESSED_TENSOR_TYPE].numpy().tobytes()],
                          tensor_type=COMPRESSED_TENSOR_TYPE)
    return ndarrays_to_parameters(record.to_numpy_ndarrays())


class NodeEndpoint:
    """A node's end of the wire: its privfl ``NumPyClient`` behind Flower ``Message``\\ s.

    The release rule is enforced here, where values leave the node: a training reply
    holds the trained (noised) model, the weight the client releases (``num-examples``)
    and its public metrics only (:func:`public_fit_metrics`); an evaluation reply holds
    a DP release (:func:`released_evaluation`) or no record at all. Exceptions of the
    client (e.g. ``BudgetExhausted``) propagate to the ClientApp's runtime.

    With a ``receiver`` (update transfer) it rebuilds whole models from the server's
    framed changes and returns its trained model as a framed, compressed change.
    """

    def __init__(self, client: NumPyClient, receiver: UpdateReceiver | None = None, *,
                 arrays_key: str = "arrays", config_key: str = "config") -> None:
        self.client = client
        self.receiver = receiver
        self.arrays_key = arrays_key
        self.config_key = config_key

    def _model(self, content: RecordDict) -> Params:
        record = content.array_records[self.arrays_key]
        if self.receiver is None:
            return record.to_numpy_ndarrays()
        if isinstance(self.receiver, SubspaceReceiver):  # the round's mask is the server's declared version's
            declared = content.config_records.get(self.config_key, ConfigRecord()).get(VERSION_KEY)
            return self.receiver.receive(record_to_parameters(record), None if declared is None else int(str(declared)))
        return self.receiver.receive(record_to_parameters(record))

    def _config(self, content: RecordDict) -> dict[str, Any]:
        """The instruction's config for the client (the transfer's own version key is the endpoint's)."""
        config = dict(content.config_records.get(self.config_key, ConfigRecord()))
        config.pop(VERSION_KEY, None)
        return config

    def train(self, msg: Message) -> Message:
        """Train on the received model; reply with the release only."""
        arrays, weight, metrics = self.client.fit(self._model(msg.content), self._config(msg.content))
        trained = [np.asarray(a) for a in arrays]
        record = ArrayRecord(trained) if self.receiver is None else parameters_to_record(self.receiver.upload(trained))
        released = MetricRecord({**public_fit_metrics(metrics), WEIGHT_KEY: int(weight)})
        return Message(RecordDict({self.arrays_key: record, METRICS_KEY: released}), reply_to=msg)

    def evaluate(self, msg: Message) -> Message:
        """Evaluate the received model; reply with a DP release, or with nothing."""
        loss, n, metrics = self.client.evaluate(self._model(msg.content), self._config(msg.content))
        release = released_evaluation(float(loss), int(n), metrics)
        return Message(RecordDict() if release is None else RecordDict({METRICS_KEY: release}), reply_to=msg)


def node_client_app(endpoints: Mapping[int, NodeEndpoint]) -> ClientApp:
    """A Flower ClientApp serving every in-process node: the message's node id picks the endpoint."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return endpoints[context.node_id].train(msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return endpoints[context.node_id].evaluate(msg)

    return app


class InProcessGrid(Grid):
    """A ``flwr.serverapp.Grid`` whose nodes are Flower ClientApp calls in this process.

    Each node has its own ``Context`` (``contexts``, by node id), whose ``state``
    persists for as long as the grid does, as a SuperNode's does. ``push_messages``
    delivers each message to ``client_app`` at once — on a copy of its content, as if it
    had crossed the wire (Flower's strategies send every node the same ``RecordDict``
    object) — and keeps the reply for ``pull_messages``; one call at a time. A ClientApp
    that raises gets an error reply, as a SuperNode gives it; the exception is kept in
    ``raised[node_id]`` for a driver that wants it. ``available`` (None: every node)
    narrows the nodes a strategy samples from.

    ``set_run`` / ``run`` are abstract in Flower's ``Grid`` with a type Flower does not
    export (``flwr.supercore.run.Run``); Message-API strategies never read them (only
    the legacy ``start_grid`` does), so this grid keeps whatever it is given.
    """

    def __init__(self, client_app: ClientApp, contexts: Mapping[int, Context] | None = None,
                 run_id: int = 0) -> None:
        ensure_task_identity(run_id)
        self.client_app = client_app
        self.contexts: dict[int, Context] = dict(contexts or {})
        self.available: set[int] | None = None
        self.raised: dict[int, Exception] = {}
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        if self._run is None:
            raise RuntimeError("InProcessGrid has no Run: Flower's Message-API strategies do not read one")
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        ids = set(self.contexts) if self.available is None else self.available & set(self.contexts)
        return sorted(ids)

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        ctx = self.contexts.get(node)
        if ctx is None:
            return Message(Error(NODE_UNAVAILABLE, f"no node {node}"), reply_to=msg)
        delivered = Message(copy.deepcopy(msg.content), dst_node_id=node, message_type=msg.metadata.message_type,
                            group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)
        try:
            return self.client_app(delivered, ctx)
        except Exception as exc:  # what a SuperNode does with a ClientApp that raises
            self.raised[node] = exc
            log.warning("node %s: ClientApp raised %s: %s", node, type(exc).__name__, exc)
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            message_id = uuid4().hex
            with self._lock:
                self._replies[message_id] = self._deliver(msg)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def _sampling_on(rng: random.Random) -> Iterator[None]:
    """Run Flower's node sampling on ``rng``'s stream, leaving the global one as it was.

    Flower's FedAvg samples with the process-global ``random`` module and a run must be
    reproducible for its seed, so the global state is swapped for ``rng``'s around a
    ``configure_*`` call and put back after.
    """
    outer = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(outer)


#: FedAvgConfig.weighting choices (both public: never a realised record count)
WEIGHTINGS = ("public", "equal")


@dataclass
class FedAvgConfig:
    """Settings of the FedAvg baseline.

    The field names are the ones configs have always used (Flower's legacy ``FedAvg``
    arguments); they map to the Message-API ``FedAvg``'s ``fraction_train``,
    ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes`` and
    ``min_available_nodes``.
    """

    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    min_fit_clients: int = 1
    min_evaluate_clients: int = 1
    min_available_clients: int = 1
    local_steps: int = 10
    evaluate: bool = True
    seed: int = 0
    upload: str = "model"
    compressor: str = "exact"
    compression_params: dict[str, Any] | None = None
    downlink_compressor: str = "exact"
    downlink_params: dict[str, Any] | None = None
    #: the FedAvg weight of a result: "public" = the weight the client releases (a privfl
    #: DPClient: its declared site size, or 1), "equal" = 1 for every result, whatever it says
    weighting: str = "public"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"fedavg.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.upload not in ("model", "update"):
            raise ConfigError(f"fedavg.upload must be 'model' (whole models) or 'update' (model changes), "
                              f"got {self.upload!r}")
        for name, params in (("compressor", self.compression_params), ("downlink_compressor", self.downlink_params)):
            if self.upload == "model" and (getattr(self, name) != "exact" or params):
                raise ConfigError(f"fedavg.{name}: compression applies to model changes; "
                                  "set fedavg.upload = 'update'")
        if self.upload == "update":
            up, down = self.make_compressor(), self.make_compressor(downlink=True)
            if isinstance(down, SubspaceK) and not isinstance(up, SubspaceK):
                raise ConfigError("fedavg.downlink_compressor: 'subspace' sends the aggregate's k values on the "
                                  "clients' round mask; set fedavg.compressor = 'subspace' too")
            if isinstance(up, SubspaceK) and self.fraction_fit != 1:
                raise ConfigError(f"fedavg.fraction_fit: must be 1 with the 'subspace' compressor (every client "
                                  f"trains every round, so all hold the same round's mask), got {self.fraction_fit!r}")
            for name, comp in (("compression_params", up), ("downlink_params", down)):
                if isinstance(comp, SubspaceK) and comp.local_steps != self.local_steps:
                    raise ConfigError(f"fedavg.{name}.local_steps: must equal fedavg.local_steps "
                                      f"({self.local_steps}): a round's mask is the union of its steps' masks, "
                                      f"got {comp.local_steps}")
        for name in ("fraction_fit", "fraction_evaluate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"fedavg.{name} must be in (0, 1], got {v!r}")
        for name in ("min_fit_clients", "min_evaluate_clients", "min_available_clients", "local_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"fedavg.{name} must be a positive integer, got {v!r}")
        if self.min_fit_clients > self.min_available_clients:
            raise ConfigError(
                f"fedavg.min_fit_clients={self.min_fit_clients} exceeds "
                f"fedavg.min_available_clients={self.min_available_clients}"
            )

    def make_compressor(self, downlink: bool = False) -> Compressor:
        """A fresh upload compressor (one per client: they keep per-client memory), or the server's."""
        name, field = ("downlink_compressor", "downlink_params") if downlink else ("compressor", "compression_params")
        params = getattr(self, field) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"fedavg.{field} must be a table, got {params!r}")
        try:
            comp = compressor_from_config(getattr(self, name), **params)
        except ConfigError as exc:
            raise ConfigError(f"fedavg.{name}: {exc}") from None
        if isinstance(comp, CLTk):
            raise ConfigError(f"fedavg.{name}: 'cltk' needs the leader's index set broadcast before each "
                              "upload, which this FedAvg round does not do; use topk, randomk, quantize8, "
                              "adacomp or exact")
        return comp


class FederatedAveraging(CollectiveStrategy):
    """Centralized FedAvg: Flower's Message-API ``FedAvg`` over in-process nodes.

    Each round the server's global model goes to every selected node (``bytes_down`` =
    model bytes, or the framed change with ``upload = "update"``), each trains
    ``local_steps`` DP-SGD steps and returns its model (``bytes_up`` = model bytes, or the
    framed, compressed change), Flower's ``FedAvg.aggregate_train`` averages them
    weighted by ``num-examples`` — the public weight each node releases (or 1 each with
    ``weighting = "equal"``), never a realised record count — and every node's model
    becomes the new global model. A result with a weight below 1 is a failure (Flower's
    mean would divide by zero).

    With evaluation on, the new global model is also sent to the evaluating nodes
    (counted in ``bytes_down``). A privfl ``DPClient`` releases nothing by default, so
    the round has no loss; one configured to release a DP accuracy (its cost in its own
    accountant) gives it over its public denominator, and ``aggregate_evaluate``
    averages those releases (``global_accuracy``, per node ``released_accuracy``).

    ``strategy`` may be any ``flwr.serverapp.strategy.FedAvg`` (or subclass: a
    recording one in the tests, FedProx, …); its sampling runs on this baseline's seeded
    stream (``FedAvgConfig.seed``). Node ids on the grid are :attr:`node_ids`.

    Only public values reach the strategy: see the module docstring.

    A node whose client raises ``BudgetExhausted`` is a failure of that round (left out
    of the aggregate), reported in ``stopped`` and never selected again; a node whose
    fit reports ``budget_exhausted`` trained its last allowed steps, is aggregated this
    round, and is reported in ``stopped`` too. If fewer than ``min_available_clients``
    nodes remain, the federation cannot go on and every remaining node is stopped. Any
    other exception of a client propagates to the caller.
    """

    def __init__(self, config: FedAvgConfig | None = None, *,
                 strategy: FedAvg | None = None,
                 initial_parameters: Params | None = None,
                 on_fit_config_fn: Callable[[int], Mapping[str, Any]] | None = None) -> None:
        self.config = config or FedAvgConfig()
        self.config.validate()
        c = self.config
        if strategy is not None and not isinstance(strategy, FedAvg):
            raise ConfigError(f"fedavg: strategy must be a flwr.serverapp.strategy.FedAvg (Flower's Message API), "
                              f"got {type(strategy).__module__}.{type(strategy).__qualname__}")
        self.strategy: FedAvg = strategy or FedAvg(
            fraction_train=float(c.fraction_fit),
            fraction_evaluate=float(c.fraction_evaluate) if c.evaluate else 0.0,
            min_train_nodes=c.min_fit_clients,
            min_evaluate_nodes=c.min_evaluate_clients,
            min_available_nodes=c.min_available_clients,
        )
        self._initial = None if initial_parameters is None else [np.asarray(a) for a in initial_parameters]
        self._fit_config = on_fit_config_fn or self._default_fit_config
        self._rng = random.Random(c.seed)
        self._eval_rng = random.Random(c.seed + 1)
        self._clients: dict[str, NumPyClient] = {}
        self._endpoints: dict[int, NodeEndpoint] = {}
        #: node name → its node id on the grid (kept for the whole run)
        self.node_ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self.grid = InProcessGrid(node_client_app(self._endpoints))
        self.global_arrays: ArrayRecord | None = None
        self.tracker: GlobalModelTracker | None = None  # update transfer only
        self.stopped: set[str] = set()
        self.history: list[dict[str, Any]] = []

    def _default_fit_config(self, server_round: int) -> dict[str, Any]:
        return {"local_steps": int(self.config.local_steps), "server_round": int(server_round)}

    # ---- node registration ------------------------------------------------------------
    def _sync_clients(self, clients: Mapping[str, NumPyClient]) -> None:
        s = self.strategy
        for node, client in clients.items():
            if self._clients.get(node) is client:
                continue
            nid = self.node_ids.setdefault(node, FIRST_NODE_ID + len(self.node_ids))
            self._names[nid] = node
            receiver = self._receiver() if self.config.upload == "update" else None
            self._endpoints[nid] = NodeEndpoint(client, receiver, arrays_key=s.arrayrecord_key,
                                                config_key=s.configrecord_key)
            self._clients[node] = client
            self.grid.contexts[nid] = Context(run_id=0, node_id=nid, node_config={"node": node},
                                              state=RecordDict(), run_config={})
            if self.tracker is not None:
                self.tracker.forget(node)
        for node in [n for n in self._clients if n not in clients]:
            nid = self.node_ids[node]
            del self._clients[node]
            self._endpoints.pop(nid, None)
            self.grid.contexts.pop(nid, None)

    def _receiver(self) -> UpdateReceiver:
        """A client's end of update transfer (the k values of the round's mask with 'subspace')."""
        up = self.config.make_compressor()
        if isinstance(up, SubspaceK):
            down = self.config.make_compressor(downlink=True)
            return SubspaceReceiver(up, down if isinstance(down, SubspaceK) else None)
        return UpdateReceiver(up)

    def _stop(self, node: str, reason: str, metrics: dict[str, dict[str, Any]]) -> None:
        if node in self.stopped:
            return
        self.stopped.add(node)
        metrics.setdefault(node, {})["stop_reason"] = reason
        log.info("node %s stopped: %s", node, reason)

    # ---- one round ----------------------------------------------------------------------
    def run_round(self, clients: Mapping[str, NumPyClient], params: Mapping[str, Params],
                  round: int) -> CollectiveRound:
        """One FedAvg round through Flower's strategy; every node ends with the global model."""
        if not clients:
            raise ConfigError("fedavg: no clients given")
        self._sync_clients(clients)
        c, s = self.config, self.strategy
        if self.global_arrays is None:
            if len(clients) < c.min_available_clients:
                raise ConfigError(
                    f"fedavg.min_available_clients={c.min_available_clients} exceeds "
                    f"the number of nodes ({len(clients)})"
                )
            init = self._initial
            if init is None:
                first = sorted(params)[0] if params else sorted(clients)[0]
                init = [np.asarray(a) for a in (params[first] if first in params else
                                                 clients[first].get_parameters({}))]
            self.global_arrays = ArrayRecord([np.array(a, copy=True) for a in init])
            if c.upload == "update":
                up, down = c.make_compressor(), c.make_compressor(downlink=True)
                self.tracker = (SubspaceModelTracker(init, up, down) if isinstance(up, SubspaceK)
                                else GlobalModelTracker(init, down))
        nodes = sorted(clients)
        bytes_up = {n: 0 for n in nodes}
        bytes_down = {n: 0 for n in nodes}
        local_steps = {n: 0 for n in nodes}
        metrics: dict[str, dict[str, Any]] = {n: {"selected": False} for n in nodes}
        newly_stopped: set[str] = set()
        global_nd = self.global_arrays.to_numpy_ndarrays()

        active = [n for n in nodes if n not in self.stopped]
        # Flower's sampling waits (forever, in-process) for its minimum of nodes: never ask it for more than exist
        need = max(c.min_available_clients, s.min_available_nodes, s.min_train_nodes)
        config = dict(self._fit_config(round))
        if len(active) < need:
            for n in active:
                self._stop(n, f"too few clients left ({len(active)} < min_available_clients={need})", metrics)
                newly_stopped.add(n)
            instructions: list[Message] = []
        else:
            self.grid.available = {self.node_ids[n] for n in active}
            with _sampling_on(self._rng):
                instructions = list(s.configure_train(round, self.global_arrays, ConfigRecord(config), self.grid))

        sent = self._send(instructions, bytes_down, metrics)
        replies = self.grid.send_and_receive(sent.values())
        failures = 0
        ok: list[tuple[int, ArrayRecord, dict[str, Any], int]] = []
        errors: list[Message] = []
        for reply in replies:
            nid = reply.metadata.src_node_id
            node = self._names[nid]
            if reply.has_error():
                failures += 1
                errors.append(reply)
                exc = self.grid.raised.pop(nid, None)
                if isinstance(exc, BudgetExhausted):
                    self._stop(node, f"budget exhausted: {exc}", metrics)
                    newly_stopped.add(node)
                elif exc is not None:
                    raise exc
                continue
            record = reply.content.array_records[s.arrayrecord_key]
            m: dict[str, Any] = dict(reply.content.metric_records[METRICS_KEY])
            bytes_up[node] += arrays_nbytes(record)
            weight = 1 if c.weighting == "equal" else int(m.pop(WEIGHT_KEY))
            m.pop(WEIGHT_KEY, None)
            local_steps[node] = int(m.get("steps", config.get("local_steps", 0)))
            metrics[node].update(m)
            metrics[node]["weight"] = weight
            if weight < 1:
                log.warning("node %s: fit result with weight %d left out (weights must be >= 1)", node, weight)
                failures += 1
                errors.append(Message(Error(REFUSED, f"weight {weight} < 1"), reply_to=sent[nid]))
                continue
            ok.append((nid, self._uplink(record), m, weight))
            if int(m.get("budget_exhausted", 0)):
                self._stop(node, "budget exhausted after this round's last allowed steps", metrics)
                newly_stopped.add(node)

        # what Flower's strategy receives: the model, the public weight and the public keys every result has
        # (its consistency check refuses replies whose MetricRecords differ in their keys)
        common = sorted(set.intersection(*(set(m) for _, _, m, _ in ok))) if ok else []
        to_strategy = errors + [
            Message(RecordDict({s.arrayrecord_key: arrays,
                                METRICS_KEY: MetricRecord({**{k: m[k] for k in common}, s.weighted_by_key: weight})}),
                    reply_to=sent[nid])
            for nid, arrays, m, weight in ok]
        aggregated, fit_metrics = s.aggregate_train(round, to_strategy)
        if aggregated is not None:
            global_nd = aggregated.to_numpy_ndarrays()
            if self.tracker is not None:
                global_nd = self.tracker.advance(global_nd)
                aggregated = ArrayRecord([a.copy() for a in global_nd])
            self.global_arrays = aggregated
        log.info("fedavg round %d: %d/%d nodes aggregated, %d failures", round, len(ok), len(sent), failures)

        server: dict[str, Any] = {"round": round, "aggregated": len(ok), "failures": failures,
                                  "fit": dict(fit_metrics or {})}
        if c.evaluate and ok:
            loss, eval_metrics = self._evaluate(round, nodes, bytes_down, metrics)
            server["loss"] = loss
            server.update({f"eval_{k}": v for k, v in eval_metrics.items()})
            for n in nodes:
                if loss is not None:
                    metrics[n]["global_loss"] = loss
                if "accuracy" in eval_metrics:
                    metrics[n]["global_accuracy"] = eval_metrics["accuracy"]
        self.history.append(server)

        new_params = {n: [a.copy() for a in global_nd] for n in nodes}
        return CollectiveRound(params=new_params, local_steps=local_steps, bytes_up=bytes_up,
                               bytes_down=bytes_down, metrics=metrics, stopped=newly_stopped)

    # ---- the server's end of the wire ---------------------------------------------------
    def _send(self, instructions: Iterable[Message], bytes_down: dict[str, int],
              metrics: dict[str, dict[str, Any]]) -> dict[int, Message]:
        """The strategy's messages as they go out (a change instead of the model with update
        transfer), by node id, with what each costs counted in ``bytes_down``."""
        s = self.strategy
        sent: dict[int, Message] = {}
        for msg in instructions:
            nid = msg.metadata.dst_node_id
            node = self._names[nid]
            metrics[node]["selected"] = True
            if self.tracker is not None:
                content = RecordDict(dict(msg.content.items()))
                content[s.arrayrecord_key] = parameters_to_record(self.tracker.downlink(node))
                if isinstance(self.tracker, SubspaceModelTracker):  # public: the version the node will hold
                    config = content.config_records.get(s.configrecord_key, ConfigRecord())
                    content[s.configrecord_key] = ConfigRecord({**dict(config), VERSION_KEY: int(self.tracker.version)})
                msg = Message(content, dst_node_id=nid, message_type=msg.metadata.message_type,
                              group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)
            bytes_down[node] += arrays_nbytes(msg.content.array_records[s.arrayrecord_key])
            sent[nid] = msg
        return sent

    def _uplink(self, record: ArrayRecord) -> ArrayRecord:
        """A node's model as Flower's ``aggregate_train`` needs it: whole arrays (rebuilt from a change)."""
        if self.tracker is None:
            return record
        if isinstance(self.tracker, SubspaceModelTracker):
            return ArrayRecord(self.tracker.rebuild_upload(record_to_parameters(record)))
        base = self.tracker.model
        rebuilt = apply_change(base, unframe_parameters(record_to_parameters(record), [a.shape for a in base]))
        return ArrayRecord(rebuilt)

    def _evaluate(self, round: int, nodes: list[str], bytes_down: dict[str, int],
                  metrics: dict[str, dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
        """Flower's configure_evaluate / aggregate_evaluate over every node, on DP releases only.

        A node that releases nothing (the default of a DPClient) replies with no record and
        is left out, so Flower's weighted mean never divides by zero and a round where no
        one releases gives ``(None, {})``.
        """
        assert self.global_arrays is not None
        s = self.strategy
        # evaluation may use every node there is (stopped ones too: a node's DP release is
        # accounted, and budget-checked, by the node itself); Flower's FedAvg would wait for
        # its minimums, so clamp them to the nodes that exist for this call only
        self.grid.available = {self.node_ids[n] for n in nodes}
        saved = s.min_evaluate_nodes, s.min_available_nodes
        s.min_evaluate_nodes = min(saved[0], len(nodes))
        s.min_available_nodes = min(saved[1], len(nodes))
        try:
            with _sampling_on(self._eval_rng):
                instructions = list(s.configure_evaluate(round, self.global_arrays,
                                                         ConfigRecord({"server_round": int(round)}), self.grid))
        finally:
            s.min_evaluate_nodes, s.min_available_nodes = saved
        sent = self._send(instructions, bytes_down, {n: {} for n in nodes})
        releases: list[tuple[int, dict[str, Any]]] = []
        errors: list[Message] = []
        for reply in self.grid.send_and_receive(sent.values()):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                exc = self.grid.raised.pop(nid, None)
                if exc is not None and not isinstance(exc, BudgetExhausted):
                    raise exc
                errors.append(reply)
                continue
            if METRICS_KEY not in reply.content.metric_records:  # nothing released: evaluation stayed on the site
                continue
            release = dict(reply.content.metric_records[METRICS_KEY])
            releases.append((nid, release))
            if "accuracy" in release:
                metrics[self._names[nid]]["released_accuracy"] = release["accuracy"]
        keys = sorted(set.intersection(*(set(r) for _, r in releases)) - {WEIGHT_KEY}) if releases else []
        to_strategy = errors + [
            Message(RecordDict({METRICS_KEY: MetricRecord({**{k: r[k] for k in keys if k in DP_EVALUATE_METRICS
                                                                 or k == "loss"},
                                                           s.weighted_by_key: int(r[WEIGHT_KEY])})}),
                    reply_to=sent[nid])
            for nid, r in releases]
        aggregated = dict(s.aggregate_evaluate(round, to_strategy) or {})
        loss = aggregated.pop("loss", None)
        return (None if loss is None else float(loss)), aggregated  # type: ignore[arg-type]
