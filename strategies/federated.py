"""Centralized FedAvg baseline driven through Flower's own ``flwr.server.strategy.FedAvg``.

:class:`FederatedAveraging` does what Flower's ``Server.fit_round`` does, in-process and
without a network: it asks Flower's strategy object to pick clients and build their
``FitIns`` (``configure_fit``), hands each ``FitIns`` to a real Flower ``ClientProxy``
that wraps our ``NumPyClient`` (``InProcessClientProxy``), and lets the same strategy
object aggregate the ``FitRes`` (``aggregate_fit``) and the evaluation results
(``aggregate_evaluate``). The aggregation is therefore Flower's, not a copy of it.

Privacy: each ``DPClient`` runs record-level DP-SGD on its own data and accounts for
it locally, and only public or DP values reach Flower's strategy (the project rule: a
value leaves a node only if it is DP output or public by declaration):

- the FedAvg weight is public: ``FitRes.num_examples`` is the weight the client
  releases — a privfl ``DPClient`` releases its declared site size, or 1 (equal
  weights) — never its realised record count; ``FedAvgConfig.weighting = "equal"``
  overrides whatever a client reports with 1;
- a fit result's metrics are filtered at the client's end of the wire
  (:class:`InProcessClientProxy`) to :data:`PUBLIC_FIT_METRICS` (ε, δ, step counts,
  flags): a training loss, a count or any other key is dropped before the strategy
  sees it;
- evaluation stays on the sites by default: an evaluation result reaches
  ``aggregate_evaluate`` only if it is a DP release (``metrics["dp"] == 1`` and a public
  denominator as ``num_examples`` > 0, e.g. ``DPConfig.eval_noise_multiplier``), with
  its metrics filtered to :data:`DP_EVALUATE_METRICS`; a client that releases nothing
  (``num_examples == 0``) gives no result, and a round without any gives no loss.

The server then only post-processes already-noised models and public weights, so the
aggregation does not change any site's (ε, δ). (Client-level DP with server-side noise
is not what this baseline does.) A researcher's true test accuracy is the simulator's
business (it reads the models it holds), never a value the nodes release.

``FedAvgConfig.upload = "update"`` sends model changes instead of whole models, framed
and optionally compressed (see :mod:`strategies.update_transfer`); the default
``"model"`` sends whole models both ways.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from privfl.accounting import BudgetExhausted
from privfl.accounting.errors import ConfigError
from privfl.accounting.releases import DP_EVALUATE_METRICS, PUBLIC_FIT_METRICS
from privfl.strategies.base import CollectiveRound, CollectiveStrategy, Params
from privfl.strategies.compression import CLTk, Compressor, compressor_from_config
from privfl.strategies.update_transfer import (
    GlobalModelTracker,
    UpdateReceiver,
    apply_change,
    parameters_nbytes,
    unframe_parameters,
)

__all__ = [
    "DP_EVALUATE_METRICS",
    "PUBLIC_FIT_METRICS",
    "FedAvgConfig",
    "FederatedAveraging",
    "InProcessClientProxy",
    "SeededClientManager",
    "no_evaluation",
    "public_fit_res",
    "released_evaluate_res",
    "weighted_average",
]

log = logging.getLogger("privfl.strategies.federated")



def no_evaluation() -> EvaluateRes:
    """What a client that releases no evaluation gives the server: Flower's "no result" (0 examples)."""
    return EvaluateRes(Status(Code.OK, "nothing released"), 0.0, 0, {})


def public_fit_res(res: FitRes) -> FitRes:
    """``res`` with its metrics cut down to :data:`PUBLIC_FIT_METRICS` (dropped key names are logged)."""
    dropped = sorted(k for k in res.metrics if k not in PUBLIC_FIT_METRICS)
    if not dropped:
        return res
    log.warning("fit result: dropped non-public metric(s) %s before the server", ", ".join(dropped))
    metrics = {k: v for k, v in res.metrics.items() if k in PUBLIC_FIT_METRICS}
    return FitRes(res.status, res.parameters, res.num_examples, metrics)


def released_evaluate_res(res: EvaluateRes) -> EvaluateRes:
    """``res`` if it is a DP release (``dp`` = 1, public denominator > 0), else :data:`no_evaluation`.

    A non-DP evaluation (a raw loss, accuracy or test count) never reaches the server;
    a DP one keeps only :data:`DP_EVALUATE_METRICS`.
    """
    if res.status.code != Code.OK or res.num_examples <= 0:
        return no_evaluation()
    if int(res.metrics.get("dp", 0)) != 1:  # type: ignore[arg-type]
        log.warning("evaluation result: not a DP release (no metrics['dp'] = 1); nothing goes to the server")
        return no_evaluation()
    dropped = sorted(k for k in res.metrics if k not in DP_EVALUATE_METRICS)
    if dropped:
        log.warning("evaluation result: dropped metric(s) %s that are not part of the DP release", ", ".join(dropped))
    metrics = {k: v for k, v in res.metrics.items() if k in DP_EVALUATE_METRICS}
    return EvaluateRes(res.status, res.loss, res.num_examples, metrics)



def weighted_average(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Mean of every numeric metric the clients report, weighted by their public weights (Flower's hook)."""
    total = sum(n for n, _ in metrics)
    if total <= 0:
        return {}
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out: dict[str, Scalar] = {}
    for k in sorted(keys):
        pairs = [(n, float(m[k])) for n, m in metrics if k in m]  # type: ignore[arg-type]
        weight = sum(n for n, _ in pairs)
        if weight > 0:
            out[k] = sum(n * v for n, v in pairs) / weight
    return out


class InProcessClientProxy(ClientProxy):
    """A Flower ``ClientProxy`` whose client lives in this process.

    Flower's ``GridClientProxy`` turns each call into a network message; this one calls
    the wrapped ``NumPyClient`` through Flower's own ``NumPyClient.to_client()`` adapter,
    so ``FitIns``/``FitRes`` and ``Parameters`` take exactly the shapes they take on the
    wire. Exceptions of the client (e.g. ``BudgetExhausted``) propagate to the caller.

    The proxy is the client's end of the wire, so it enforces the release rule there:
    a fit result leaves with public metrics only (:func:`public_fit_res`), an evaluation
    result only if it is a DP release (:func:`released_evaluate_res`).

    With a ``receiver`` (update transfer) the proxy is the client's end of the wire: it
    rebuilds whole models from the server's framed changes and returns its trained
    model as a framed, compressed change.
    """

    def __init__(self, cid: str, client: NumPyClient, receiver: UpdateReceiver | None = None) -> None:
        super().__init__(cid)
        self.numpy_client = client
        self.client = client.to_client()
        self.receiver = receiver

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None,
                       group_id: int | None) -> GetPropertiesRes:
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns, timeout: float | None,
                       group_id: int | None) -> GetParametersRes:
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        if self.receiver is None:
            return public_fit_res(self.client.fit(ins))
        whole = FitIns(ndarrays_to_parameters(self.receiver.receive(ins.parameters)), ins.config)
        res = self.client.fit(whole)
        if res.status.code == Code.OK:
            res = FitRes(res.status, self.receiver.upload(parameters_to_ndarrays(res.parameters)),
                         res.num_examples, res.metrics)
        return public_fit_res(res)

    def evaluate(self, ins: EvaluateIns, timeout: float | None, group_id: int | None) -> EvaluateRes:
        if self.receiver is not None:
            ins = EvaluateIns(ndarrays_to_parameters(self.receiver.receive(ins.parameters)), ins.config)
        return released_evaluate_res(self.client.evaluate(ins))

    def reconnect(self, ins: ReconnectIns, timeout: float | None, group_id: int | None) -> DisconnectRes:
        return DisconnectRes(reason="")


class SeededClientManager(SimpleClientManager):
    """Flower's ``SimpleClientManager`` with seeded sampling and no blocking wait.

    Flower samples with the process-global ``random`` module and blocks up to a day
    waiting for clients; in-process every client is registered up front, so waiting is
    pointless and a run must be reproducible for a seed.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        return len(self.clients) >= num_clients

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        if min_num_clients is not None and not self.wait_for(min_num_clients):
            return []
        cids = sorted(self.clients)
        if criterion is not None:
            cids = [c for c in cids if criterion.select(self.clients[c])]
        if num_clients > len(cids):
            return []
        return [self.clients[c] for c in self._rng.sample(cids, num_clients)]


#: FedAvgConfig.weighting choices (both public: never a realised record count)
WEIGHTINGS = ("public", "equal")


@dataclass
class FedAvgConfig:
    """Settings of the FedAvg baseline (names follow Flower's ``FedAvg`` arguments)."""

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
            self.make_compressor()
            self.make_compressor(downlink=True)
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
    """Centralized FedAvg: Flower's ``FedAvg`` strategy object over in-process clients.

    Each round the server's global model goes to every selected client
    (``bytes_down`` = model bytes, or the framed change with ``upload = "update"``), each
    trains ``local_steps`` DP-SGD steps and returns its model (``bytes_up`` = model bytes,
    or the framed, compressed change), Flower's ``FedAvg.aggregate_fit`` averages
    them weighted by ``num_examples`` — the public weight each client releases (or 1
    each with ``weighting = "equal"``), never a realised record count — and every
    node's model becomes the new global model. A result with a weight below 1 is a
    failure (Flower's mean would divide by zero).

    With evaluation on, the new global model is also sent to the evaluating clients
    (counted in ``bytes_down``). A privfl ``DPClient`` releases nothing by default, so
    the round has no loss; one configured to release a DP accuracy (its cost in its own
    accountant) gives it over its public denominator, and ``aggregate_evaluate``
    averages those releases (``global_accuracy``, per node ``released_accuracy``).

    Only public values reach the strategy: see the module docstring.

    A client that raises ``BudgetExhausted`` is a failure of that round (left out of
    the aggregate), reported in ``stopped`` and never selected again; a client whose fit
    reports ``budget_exhausted`` trained its last allowed steps, is aggregated this
    round, and is reported in ``stopped`` too. If fewer than ``min_available_clients``
    clients remain, the federation cannot go on and every remaining node is stopped.
    """

    def __init__(self, config: FedAvgConfig | None = None, *,
                 strategy: FedAvg | None = None,
                 initial_parameters: Params | None = None,
                 on_fit_config_fn: Callable[[int], dict[str, Scalar]] | None = None) -> None:
        self.config = config or FedAvgConfig()
        self.config.validate()
        c = self.config
        self.strategy = strategy or FedAvg(
            fraction_fit=float(c.fraction_fit),
            fraction_evaluate=float(c.fraction_evaluate) if c.evaluate else 0.0,
            min_fit_clients=c.min_fit_clients,
            min_evaluate_clients=c.min_evaluate_clients,
            min_available_clients=c.min_available_clients,
            on_fit_config_fn=on_fit_config_fn or self._fit_config,
            initial_parameters=None if initial_parameters is None else ndarrays_to_parameters(initial_parameters),
            fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=weighted_average,
        )
        self.client_manager = SeededClientManager(c.seed)
        self._eval_manager = SeededClientManager(c.seed + 1)
        self._proxies: dict[str, InProcessClientProxy] = {}
        self.global_parameters: Parameters | None = None
        self.tracker: GlobalModelTracker | None = None  # update transfer only
        self.stopped: set[str] = set()
        self.history: list[dict[str, Any]] = []

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {"local_steps": int(self.config.local_steps), "server_round": int(server_round)}

    # ---- client registration ------------------------------------------------------
    def _sync_clients(self, clients: Mapping[str, NumPyClient]) -> None:
        for node, client in clients.items():
            proxy = self._proxies.get(node)
            if proxy is None or proxy.numpy_client is not client:
                if proxy is not None:
                    self.client_manager.unregister(proxy)
                    self._eval_manager.unregister(proxy)
                receiver = UpdateReceiver(self.config.make_compressor()) if self.config.upload == "update" else None
                proxy = InProcessClientProxy(node, client, receiver)
                self._proxies[node] = proxy
                if self.tracker is not None:
                    self.tracker.forget(node)
                self._eval_manager.register(proxy)
                if node not in self.stopped:
                    self.client_manager.register(proxy)
        for node in list(self._proxies):
            if node not in clients:
                self.client_manager.unregister(self._proxies[node])
                self._eval_manager.unregister(self._proxies.pop(node))

    def _stop(self, node: str, reason: str, metrics: dict[str, dict[str, Any]]) -> None:
        if node in self.stopped:
            return
        self.stopped.add(node)
        proxy = self._proxies.get(node)
        if proxy is not None:
            self.client_manager.unregister(proxy)
        metrics.setdefault(node, {})["stop_reason"] = reason
        log.info("node %s stopped: %s", node, reason)

    # ---- one round ----------------------------------------------------------------
    def run_round(self, clients: Mapping[str, NumPyClient], params: Mapping[str, Params],
                  round: int) -> CollectiveRound:
        """One FedAvg round through Flower's strategy; every node ends with the global model."""
        if not clients:
            raise ConfigError("fedavg: no clients given")
        self._sync_clients(clients)
        if self.global_parameters is None:
            if len(clients) < self.config.min_available_clients:
                raise ConfigError(
                    f"fedavg.min_available_clients={self.config.min_available_clients} exceeds "
                    f"the number of nodes ({len(clients)})"
                )
            self.global_parameters = self.strategy.initialize_parameters(self.client_manager)
            if self.global_parameters is None:
                first = sorted(params)[0] if params else sorted(clients)[0]
                init = params[first] if first in params else clients[first].get_parameters({})
                self.global_parameters = ndarrays_to_parameters([np.asarray(a) for a in init])
            if self.config.upload == "update":
                self.tracker = GlobalModelTracker(parameters_to_ndarrays(self.global_parameters),
                                                  self.config.make_compressor(downlink=True))
        nodes = sorted(clients)
        bytes_up = {n: 0 for n in nodes}
        bytes_down = {n: 0 for n in nodes}
        local_steps = {n: 0 for n in nodes}
        metrics: dict[str, dict[str, Any]] = {n: {"selected": False} for n in nodes}
        newly_stopped: set[str] = set()
        global_nd = parameters_to_ndarrays(self.global_parameters)

        active = self.client_manager.num_available()
        if active < self.config.min_available_clients:
            for n in nodes:
                if n not in self.stopped:
                    self._stop(n, f"too few clients left ({active} < min_available_clients="
                                  f"{self.config.min_available_clients})", metrics)
                    newly_stopped.add(n)
            instructions: list[tuple[ClientProxy, FitIns]] = []
        else:
            instructions = self.strategy.configure_fit(round, self.global_parameters, self.client_manager)

        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
        for proxy, ins in instructions:
            node = proxy.cid
            metrics[node]["selected"] = True
            ins = FitIns(self._downlink(node, ins.parameters), ins.config)
            bytes_down[node] += parameters_nbytes(ins.parameters)
            try:
                res = proxy.fit(ins, timeout=None, group_id=round)
            except BudgetExhausted as exc:
                failures.append(exc)
                self._stop(node, f"budget exhausted: {exc}", metrics)
                newly_stopped.add(node)
                continue
            if res.status.code != Code.OK:
                failures.append((proxy, res))
                continue
            bytes_up[node] += parameters_nbytes(res.parameters)
            res = self._weighted(res)
            m = dict(res.metrics)
            local_steps[node] = int(m.get("steps", ins.config.get("local_steps", 0)))
            metrics[node].update(m)
            metrics[node]["weight"] = res.num_examples
            if res.num_examples < 1:
                log.warning("node %s: fit result with weight %d left out (weights must be >= 1)",
                            node, res.num_examples)
                failures.append((proxy, res))
                continue
            results.append((proxy, self._uplink(res)))
            if int(m.get("budget_exhausted", 0)):
                self._stop(node, "budget exhausted after this round's last allowed steps", metrics)
                newly_stopped.add(node)

        aggregated, fit_metrics = self.strategy.aggregate_fit(round, results, failures)
        if aggregated is not None:
            global_nd = parameters_to_ndarrays(aggregated)
            if self.tracker is not None:
                global_nd = self.tracker.advance(global_nd)
                aggregated = ndarrays_to_parameters(global_nd)
            self.global_parameters = aggregated
        log.info("fedavg round %d: %d/%d clients aggregated, %d failures",
                 round, len(results), len(instructions), len(failures))

        server: dict[str, Any] = {"round": round, "aggregated": len(results),
                                  "failures": len(failures), "fit": dict(fit_metrics)}
        if self.config.evaluate and results:
            loss, eval_metrics = self._evaluate(round, bytes_down, metrics)
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

    # ---- the wire ---------------------------------------------------------------------
    def _weighted(self, res: FitRes) -> FitRes:
        """``res`` with the FedAvg weight :attr:`FedAvgConfig.weighting` asks for (both public)."""
        if self.config.weighting == "equal" and res.num_examples != 1:
            return FitRes(res.status, res.parameters, 1, res.metrics)
        return res

    def _downlink(self, node: str, parameters: Parameters) -> Parameters:
        """What the server sends ``node``: the global model, or its change when update transfer is on."""
        return parameters if self.tracker is None else self.tracker.downlink(node)

    def _uplink(self, res: FitRes) -> FitRes:
        """A client's result as Flower's ``aggregate_fit`` needs it: whole arrays (rebuilt from a change)."""
        if self.tracker is None:
            return res
        base = self.tracker.model
        rebuilt = apply_change(base, unframe_parameters(res.parameters, [a.shape for a in base]))
        return FitRes(res.status, ndarrays_to_parameters(rebuilt), res.num_examples, res.metrics)

    def _evaluate(self, round: int, bytes_down: dict[str, int],
                  metrics: dict[str, dict[str, Any]]) -> tuple[float | None, dict[str, Scalar]]:
        """Flower's configure_evaluate / aggregate_evaluate over every node, on DP releases only.

        A client that releases nothing (``num_examples == 0``: the default of a DPClient)
        is simply not in ``results``, so Flower's weighted mean never divides by zero and
        a round where no one releases gives ``(None, {})``.
        """
        assert self.global_parameters is not None
        n_eval = self._eval_manager.num_available()
        # Flower's FedAvg samples nobody when fewer than its minimums exist; evaluation may use
        # every node there is (stopped ones too), so clamp for this call only. A node's DP
        # release is accounted (and budget-checked) by the node itself.
        saved = self.strategy.min_evaluate_clients, self.strategy.min_available_clients
        self.strategy.min_evaluate_clients = min(saved[0], n_eval)
        self.strategy.min_available_clients = min(saved[1], n_eval)
        try:
            instructions = self.strategy.configure_evaluate(round, self.global_parameters, self._eval_manager)
        finally:
            self.strategy.min_evaluate_clients, self.strategy.min_available_clients = saved
        results: list[tuple[ClientProxy, EvaluateRes]] = []
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException] = []
        for proxy, ins in instructions:
            ins = EvaluateIns(self._downlink(proxy.cid, ins.parameters), ins.config)
            bytes_down[proxy.cid] += parameters_nbytes(ins.parameters)
            res = proxy.evaluate(ins, timeout=None, group_id=round)
            if res.status.code != Code.OK:
                failures.append((proxy, res))
                continue
            if res.num_examples == 0:  # nothing released: evaluation stayed on the site
                continue
            results.append((proxy, res))
            if "accuracy" in res.metrics:
                metrics[proxy.cid]["released_accuracy"] = res.metrics["accuracy"]
        return self.strategy.aggregate_evaluate(round, results, failures)
