"""A hospital's own Flower client (``[client].app = "pkg.module:client_fn"``), kept differentially private.

:func:`load_client_app` accepts what ``[client].app`` names: a ``client_fn(context)``
returning a ``flwr`` ``NumPyClient`` or ``Client``, or a ``flwr.clientapp.ClientApp``
(legacy ``ClientApp(client_fn=...)``, or the Message API with ``@app.train()`` /
``@app.evaluate()``; both are driven with real Flower ``Message`` objects).
:class:`AppClient` wraps it for privfl's strategies, which drive it as they drive
:class:`~clients.DPClient`. Every call into the user's code runs under the site's
:class:`~clients.session.SiteSession`, so the ``privfl.PrivacyEngine()`` it builds binds to
the site's accountant, budget, ledger hook, randomness and ``[dp]``.

The contract of a user's fit (what privfl checks, and what it releases)
------------------------------------------------------------------------
* Train with ``privfl.PrivacyEngine().make_private(module=, optimizer=, data_loader=)``
  (a new engine per fit on the same model is fine). Take its σ, C, q, clipping and budget
  from the site: pass none of them, or exactly the site's ``[dp]`` values (others are
  refused). Do not pass a seed or an accountant.
* Honour ``config["local_steps"]`` (also ``context.run_config["local-steps"]``) as DP
  optimizer steps: at most that many (a step beyond it is refused); report fewer as
  ``metrics["steps"]``.
* The truth is privfl's, never the client's report: the steps taken are the DP steps
  the site's engines accounted during the fit; ε is the site accountant's. Reported
  ``steps`` that differ from the accounted steps are refused.
* Fail closed: with ``[dp].enabled``, a fit that changed the model without any accounted
  DP step is refused and nothing is released; so is a fit whose DP steps were taken but
  whose returned model is not the current state of a model a ``privfl.PrivacyEngine``
  of this site made private. When fewer than ``local_steps`` steps fit in the budget, the
  fit is asked for the steps that fit (``config["local_steps"]``), so a loop that honours
  it ends by itself; the next fit raises ``BudgetExhausted`` outside your code, which
  stops the node. A step beyond ``local_steps`` in one fit is refused before it is
  accounted (ConfigError naming ``[client].app``; the node stops): the steps per fit are
  public, and a loop over the site's records would make them follow its size.
* Released: the returned model, the public weight (``[dp].declared_size``, else 1) and
  privfl's public metrics (steps, total_steps, ε, δ, dp, budget_exhausted) only. The
  client's ``num_examples``, loss, accuracy and every other metric stay on the site.
  ``evaluate`` releases nothing; the client's own evaluation is local
  (:meth:`AppClient.evaluate_local`).
* Before the first fit the released model is the one privfl was given (``[model].factory``)
  or, failing that, your client's ``get_parameters()``: it must not have been fitted to
  the site's records outside ``privfl.PrivacyEngine``.
* privfl cannot see inside your fit: un-noised updates mixed into a model that also took
  DP steps, or record statistics written into returned arrays, are not detectable; do
  neither. Train only in the thread that calls fit (a session is per thread).
* With ``[dp].enabled = false`` the client runs as written: ``make_private`` returns
  its inputs unchanged, metrics say ``dp = 0``, ``epsilon = -1``, and steps are the
  reported ones, else ``local_steps``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    EvaluateIns,
    FitIns,
    GetParametersIns,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from torch import nn

from privfl.accounting import BudgetExhausted, PrivacyAccountant
from privfl.accounting.errors import ConfigError, PrivflError, error_summary
from privfl.accounting.releases import build_public_fit_metrics
from privfl.clients.dp_client import DPConfig
from privfl.clients.engine import mechanism_description
from privfl.clients.session import SiteSession

NDArrays = list[np.ndarray]
log = logging.getLogger("privfl.clients")
DpEventHook = Callable[[dict[str, Any]], None]
AppKind = Literal["client_fn", "client_app", "message_app"]

__all__ = ["AppClient", "ClientAppError", "UserApp", "load_client_app"]

_LOSS_KEYS = ("loss", "train_loss")
_EVAL_LOSS_KEYS = ("eval_loss", "loss")
_ACCURACY_KEYS = ("accuracy", "eval_acc", "eval_accuracy", "acc")


class ClientAppError(ConfigError):
    """A user's ``[client].app`` cannot be used, or did something privfl refuses to release."""


# ---- what [client].app names ------------------------------------------------------------
class _Backend(Protocol):
    """One way of calling the user's client: fit / evaluate / get_parameters on numpy arrays."""

    def fit(self, params: NDArrays, config: dict[str, Any],
            names: list[str] | None) -> tuple[NDArrays, int, dict[str, Any]]: ...

    def evaluate(self, params: NDArrays, config: dict[str, Any],
                 names: list[str] | None) -> tuple[float, int, dict[str, Any]] | None: ...

    def get_parameters(self) -> NDArrays | None: ...


@dataclass(frozen=True)
class UserApp:
    """What ``[client].app`` named, normalised: a ``client_fn``, a legacy ``ClientApp`` or a Message-API one."""

    kind: AppKind
    where: str
    target: Any
    has_evaluate: bool = True

    def start(self, context: Context) -> _Backend:
        """The user's client for this node (``client_fn`` is called here, once)."""
        if self.kind == "client_fn":
            client = self.target(context)
            if isinstance(client, NumPyClient):
                client = client.to_client()
            if not isinstance(client, Client):
                raise ClientAppError(f"{_named(self.where)}: client_fn returned {type(client).__name__}; "
                                     "it must return a flwr NumPyClient or Client")
            return _ClientBackend(client, self.where)
        if self.kind == "client_app":
            return _LegacyAppBackend(self.target, context, self.where)
        return _MessageAppBackend(self.target, context, self.where, self.has_evaluate)


def _named(where: str) -> str:
    """``where`` as an error prefix that names ``[client].app`` once (a node's ``where`` already does)."""
    return where if "[client].app" in where else f"[client].app: {where}"


def load_client_app(obj: Any, where: str) -> UserApp:
    """Normalise ``obj`` (or the ``"pkg.module:name"`` it spells) into a :class:`UserApp`.

    ``where`` names it in errors (e.g. the ``[client].app`` value).
    """
    if isinstance(obj, str):
        obj = _import(obj, where)
    if isinstance(obj, ClientApp):
        if getattr(obj, "_call", None) is not None:  # ClientApp(client_fn=...): Flower's legacy handler
            return UserApp("client_app", where, obj)
        funcs = getattr(obj, "_registered_funcs", {})
        if "train.default" not in funcs:
            raise ClientAppError(f"{_named(where)}: the ClientApp has neither a client_fn nor an "
                                 "@app.train() function")
        return UserApp("message_app", where, obj, has_evaluate="evaluate.default" in funcs)
    if isinstance(obj, (NumPyClient, Client)) or inspect.isclass(obj):
        raise ClientAppError(f"{_named(where)}: names {_describe(obj)}; name the client_fn(context) that "
                             "builds the client, or a flwr ClientApp")
    if not callable(obj):
        raise ClientAppError(f"{_named(where)}: must name a client_fn(context) or a flwr ClientApp, "
                             f"got {type(obj).__name__}")
    try:
        inspect.signature(obj).bind(None)
    except TypeError:
        raise ClientAppError(f"{_named(where)}: client_fn must take one argument, the flwr Context") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): let the call decide
    return UserApp("client_fn", where, obj)


def _import(path: str, where: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ClientAppError(f"{_named(where)}: must be 'pkg.module:name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code, on one line
        raise ClientAppError(f"{_named(where)}: cannot import {module_name}: "
                             f"{type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ClientAppError(f"{_named(where)}: module {module_name} has no {attr!r}") from None


def _describe(obj: Any) -> str:
    return f"the class {obj.__name__}" if inspect.isclass(obj) else f"a {type(obj).__name__} instance"


# ---- the three ways of calling a user's client ----------------------------------------------
class _ClientBackend:
    """A ``client_fn``'s client, built once: Flower's ``Client`` interface (FitIns / FitRes)."""

    def __init__(self, client: Client, where: str) -> None:
        self.client = client
        self.where = where

    def fit(self, params: NDArrays, config: dict[str, Any],
            names: list[str] | None) -> tuple[NDArrays, int, dict[str, Any]]:
        res = self.client.fit(FitIns(ndarrays_to_parameters(params), config))
        _check_status(res.status, self.where, "fit")
        return parameters_to_ndarrays(res.parameters), int(res.num_examples), dict(res.metrics or {})

    def evaluate(self, params: NDArrays, config: dict[str, Any],
                 names: list[str] | None) -> tuple[float, int, dict[str, Any]] | None:
        res = self.client.evaluate(EvaluateIns(ndarrays_to_parameters(params), config))
        if res.status.code != Code.OK:
            return None
        return float(res.loss), int(res.num_examples), dict(res.metrics or {})

    def get_parameters(self) -> NDArrays | None:
        res = self.client.get_parameters(GetParametersIns(config={}))
        if res.status.code != Code.OK:
            return None
        return parameters_to_ndarrays(res.parameters)


class _Messenger:
    """Real Flower messages to a ``ClientApp``, one node ``Context`` for the whole run."""

    def __init__(self, app: ClientApp, context: Context, where: str) -> None:
        self.app, self.context, self.where = app, context, where
        self._seq = 0

    def send(self, content: RecordDict, kind: str) -> RecordDict:
        self._seq += 1
        md = Metadata(run_id=self.context.run_id, message_id=f"privfl-{self._seq}", src_node_id=0,
                      dst_node_id=self.context.node_id, reply_to_message_id="", group_id=str(self._seq),
                      created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind)
        reply = self.app(Message(content=content, metadata=md), self.context)  # type: ignore[call-overload]
        if reply.has_error():
            raise ClientAppError(f"{_named(self.where)}: its {kind} reply is an error: {reply.error.reason}")
        return reply.content


class _LegacyAppBackend(_Messenger):
    """``ClientApp(client_fn=...)``: legacy-compat messages (Flower calls client_fn for each one)."""

    def fit(self, params: NDArrays, config: dict[str, Any],
            names: list[str] | None) -> tuple[NDArrays, int, dict[str, Any]]:
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(params), config), keep_input=True)
        res = compat.recorddict_to_fitres(self.send(content, MessageType.TRAIN), keep_input=False)
        _check_status(res.status, self.where, "fit")
        return parameters_to_ndarrays(res.parameters), int(res.num_examples), dict(res.metrics or {})

    def evaluate(self, params: NDArrays, config: dict[str, Any],
                 names: list[str] | None) -> tuple[float, int, dict[str, Any]] | None:
        content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(params), config),
                                                   keep_input=True)
        res = compat.recorddict_to_evaluateres(self.send(content, MessageType.EVALUATE))
        if res.status.code != Code.OK:
            return None
        return float(res.loss), int(res.num_examples), dict(res.metrics or {})

    def get_parameters(self) -> NDArrays | None:
        content = compat.getparametersins_to_recorddict(GetParametersIns(config={}))
        res = compat.recorddict_to_getparametersres(self.send(content, "get_parameters"), keep_input=False)
        if res.status.code != Code.OK:
            return None
        return parameters_to_ndarrays(res.parameters)


class _MessageAppBackend(_Messenger):
    """A Message-API ``ClientApp``: ``{"arrays": ArrayRecord, "config": ConfigRecord}`` in, arrays + metrics out."""

    def __init__(self, app: ClientApp, context: Context, where: str, has_evaluate: bool) -> None:
        super().__init__(app, context, where)
        self.has_evaluate = has_evaluate

    def _content(self, params: NDArrays, config: dict[str, Any], names: list[str] | None) -> RecordDict:
        if names is not None and len(names) == len(params):
            arrays = ArrayRecord({n: Array(np.ascontiguousarray(p)) for n, p in zip(names, params)})
        else:
            arrays = ArrayRecord([np.ascontiguousarray(p) for p in params])
        return RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})

    def fit(self, params: NDArrays, config: dict[str, Any],
            names: list[str] | None) -> tuple[NDArrays, int, dict[str, Any]]:
        reply = self.send(self._content(params, config, names), MessageType.TRAIN)
        records = reply.array_records
        record = records.get("arrays") if "arrays" in records else (
            next(iter(records.values())) if len(records) == 1 else None)
        if record is None:
            raise ClientAppError(f"{_named(self.where)}: its train reply must hold one ArrayRecord "
                                 f"(\"arrays\"), got {sorted(records) or 'none'}")
        keys = list(record.keys())
        if names is not None and len(names) == len(params) and set(keys) == set(names):
            keys = list(names)
        elif names is not None and len(names) == len(params):
            raise ClientAppError(f"{_named(self.where)}: its train reply's arrays {keys[:3]}... are not "
                                 f"the model's ({list(names)[:3]}...)")
        metrics = _metrics(reply)
        return [record[k].numpy() for k in keys], int(metrics.get("num-examples", 0) or 0), metrics

    def evaluate(self, params: NDArrays, config: dict[str, Any],
                 names: list[str] | None) -> tuple[float, int, dict[str, Any]] | None:
        if not self.has_evaluate:
            return None
        metrics = _metrics(self.send(self._content(params, config, names), MessageType.EVALUATE))
        loss = next((float(metrics[k]) for k in _EVAL_LOSS_KEYS if k in metrics), math.nan)
        return loss, int(metrics.get("num-examples", 0) or 0), metrics

    def get_parameters(self) -> NDArrays | None:
        return None  # the Message API has no get_parameters: the initial model comes from privfl


def _metrics(content: RecordDict) -> dict[str, Any]:
    """Every metric of a Message-API reply, "metrics" last (so it wins)."""
    out: dict[str, Any] = {}
    records = content.metric_records
    for key in sorted(records, key=lambda k: k == "metrics"):
        out.update(dict(records[key]))
    return out


def _check_status(status: Any, where: str, what: str) -> None:
    if status.code != Code.OK:
        raise ClientAppError(f"{_named(where)}: its {what} failed: {status.message or status.code.name}")


# ---- the wrapper the strategies drive -----------------------------------------------------
class AppClient(NumPyClient):
    """A user's Flower client under the site's DP session, driven like :class:`~clients.DPClient`.

    ``app``: a :class:`UserApp` or anything :func:`load_client_app` accepts (``where``
    names it in errors). The client is built once, under the session, with a Flower
    ``Context`` whose ``node_config`` is ``{"partition-id": site_index, "num-partitions":
    num_sites}`` and whose ``run_config`` is ``run_config`` plus ``{"local-steps": local_steps}``.
    ``accountant``: the site's (e.g. rebuilt from the ledger); ``seed``: None for secure
    randomness; ``on_dp_event``: the write-ahead hook, read at each event (settable).
    ``parameter_names`` / ``initial_parameters``: the model's, from ``[model].factory``
    (the Message API needs them: it has no ``get_parameters`` and loads by name).
    """

    def __init__(self, app: UserApp | Any, config: DPConfig, *, where: str | None = None,
                 accountant: PrivacyAccountant | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, on_dp_event: DpEventHook | None = None,
                 site_index: int = 0, num_sites: int = 1, run_config: Mapping[str, Any] | None = None,
                 local_steps: int = 1, parameter_names: Sequence[str] | None = None,
                 initial_parameters: Sequence[np.ndarray] | None = None, run_id: int = 0) -> None:
        self.app = app if isinstance(app, UserApp) else load_client_app(app, where or _where_of(app))
        self.where = self.app.where
        self.config = config
        self.on_dp_event = on_dp_event
        self.session = SiteSession(config, accountant or PrivacyAccountant(config.accountant),  # type: ignore[arg-type]
                                   seed=seed, device=device, on_dp_event=self._emit)
        self.accountant = self.session.accountant
        self.local_steps = _steps_value(local_steps, "local_steps")
        self.app_context = Context(run_id=run_id, node_id=site_index,
                                   node_config={"partition-id": site_index, "num-partitions": num_sites},
                                   state=RecordDict(), run_config={**dict(run_config or {}),
                                                                   "local-steps": self.local_steps})
        self._names = list(parameter_names) if parameter_names is not None else None
        self._params = None if initial_parameters is None else [np.array(p, copy=True) for p in initial_parameters]
        self.training_steps = 0  # DP training steps accounted for this client (the node may set a start)
        self.last_loss = math.nan  # the client's own training loss: local, never released
        self.exhausted = False
        self._lock = threading.RLock()  # one call into the user's code at a time
        self._hook_error: BaseException | None = None  # the last exception of the site's event hook
        with self._user_code():
            self._backend = self.app.start(self.app_context)
        self.training_steps += self.session.training_steps

    # ---- public state (what drivers read of a DPClient) ----------------------------------
    @property
    def random_kind(self) -> str:
        """"secure" or "seeded": where the site's engines draw noise and batches from."""
        return self.session.random_kind

    @property
    def noise_multiplier(self) -> float:
        """σ of the site's DP steps (0 when DP is off)."""
        return self.session.noise_multiplier if self.config.enabled else 0.0

    @property
    def sample_rate(self) -> float:
        """The public sampling rate q (0 when DP is off and none is declared)."""
        if self.config.enabled:
            return self.session.sample_rate
        declared = self.config.sample_rate is not None or self.config.declared_size is not None
        return self.config.public_sample_rate() if declared else 0.0

    @property
    def epsilon(self) -> float:
        """ε spent so far at the configured δ (∞ when DP is off)."""
        return self.accountant.get_epsilon(self.config.delta) if self.config.enabled else math.inf

    def steps_allowed(self, requested: int) -> int:
        """How many of ``requested`` steps fit in the remaining budget."""
        return self.session.steps_allowed(requested)

    def mechanism_description(self) -> dict[str, Any]:
        """What an auditor needs to know of the training mechanism (public)."""
        c = self.config
        return mechanism_description(c.mechanism, c.clipping, c.max_grad_norm, c.mechanism_params)

    def _emit(self, event: dict[str, Any]) -> None:
        """Forward a DP event to :attr:`on_dp_event` (read at each event: it may be set later)."""
        if self.on_dp_event is not None:
            try:
                self.on_dp_event(event)
            except BaseException as exc:
                self._hook_error = exc  # the site's own refusal (e.g. its ledger): passed on unchanged
                raise

    @contextmanager
    def _user_code(self) -> Iterator[None]:
        """Run the user's code under the site session, one call at a time.

        A bug in the user's code (any exception but privfl's own refusals and the budget
        stop) becomes one line naming ``[client].app``; its traceback is logged at DEBUG (an operator's
        console gets the one line; ``log_level = "DEBUG"`` shows where it came from)."""
        with self._lock, self.session.active():
            try:
                yield
            except (BudgetExhausted, PrivflError):
                raise
            except Exception as exc:  # noqa: BLE001 - the hospital's own code: report it, do not hide it
                if exc is self._hook_error:
                    raise
                log.debug("[client].app: %s raised %s", self.where, type(exc).__name__, exc_info=True)
                first = error_summary(exc) if str(exc).strip() else ""
                raise ClientAppError(f"{_named(self.where)} raised {type(exc).__name__}: {first} "
                                     "(its traceback is logged at level DEBUG)") from None

    # ---- parameters ------------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        """Names of the arrays: given, else the first privately trained model's, else ``param_<i>``."""
        n = len(self.get_parameters({}))
        for names in (self._names, self.session.first_names):
            if names is not None and len(names) == n:
                return list(names)
        return [f"param_{i}" for i in range(n)]

    def _wire_names(self, n: int) -> list[str] | None:
        for names in (self._names, self.session.first_names):
            if names is not None and len(names) == n:
                return list(names)
        return None

    def get_parameters(self, config: dict[str, Any]) -> NDArrays:
        """The last model set or released; before any, the initial one (given, else the client's)."""
        if self._params is None:
            with self._user_code():
                params = self._backend.get_parameters()
            if params is None:
                raise ClientAppError(f"{_named(self.where)}: the client has no get_parameters (a Message-API "
                                     "ClientApp never has); privfl needs the initial model from [model].factory")
            self._params = [np.array(p, copy=True) for p in params]
        return [p.copy() for p in self._params]

    def set_parameters(self, parameters: NDArrays) -> None:
        """The model the next fit or local evaluation starts from."""
        self._params = [np.array(p, copy=True) for p in parameters]

    # ---- training ----------------------------------------------------------------------------
    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """Run the user's fit under the site session; release its model, a public weight, public metrics."""
        cfg = dict(config or {})
        k = _steps_value(cfg.get("local_steps", self.local_steps), "local_steps")
        cfg["local_steps"] = k
        sent = [np.array(p, copy=True) for p in parameters]
        with self._lock:
            new, steps, metrics = self._fit_locked(sent, cfg, k)
        self.last_loss = next((float(metrics[key]) for key in _LOSS_KEYS if _is_number(metrics.get(key))), math.nan)
        self._params = [np.array(p, copy=True) for p in new]
        return [p.copy() for p in new], self.config.public_weight(), self.public_fit_metrics(steps)

    def _fit_locked(self, sent: NDArrays, cfg: dict[str, Any], k: int) -> tuple[NDArrays, int, dict[str, Any]]:
        """The user's fit and privfl's checks: (arrays to release, steps, the client's metrics — local only)."""
        session = self.session
        if self.config.enabled and session.steps_allowed(1) <= 0:
            self.exhausted = True
            assert session.guard is not None
            raise BudgetExhausted(session.guard.spent, self.config.target_epsilon, self.config.delta,
                                  self.accountant.steps)
        if self.config.enabled:  # the last fit asks for the steps that still fit: the user's loop ends by
            allowed = session.steps_allowed(k)  # itself, BudgetExhausted comes at the next fit, outside it
            if allowed < k:
                log.info("[client].app: the budget allows %d of the %d local steps; this fit asks for %d",
                         allowed, k, allowed)
                k = cfg["local_steps"] = allowed
        before = session.training_steps
        session.exhausted = False
        session.fit_models = []
        session.fit_limit = (before, k) if self.config.enabled else None
        try:
            with self._user_code():
                new, _n, metrics = self._backend.fit([p.copy() for p in sent], cfg, self._wire_names(len(sent)))
            taken = session.training_steps - before
            new = [np.asarray(p) for p in new]
            metrics = dict(metrics or {})
            if self.config.enabled:
                self._check_private(sent, new, taken, metrics.get("steps"), session.fit_models)
        except BudgetExhausted:
            self.exhausted = True
            raise
        finally:
            self.training_steps += session.training_steps - before  # accounted steps count, released or not
            session.fit_models = None
            session.fit_limit = None
        steps = taken if self.config.enabled else _reported_steps(metrics.get("steps"), k)
        if not self.config.enabled:
            self.training_steps += steps
        self.exhausted = session.exhausted  # only a refused step (as DPClient)
        return new, steps, metrics

    def _check_private(self, sent: NDArrays, new: NDArrays, taken: int, reported: Any,
                       fit_models: list[nn.Module]) -> None:
        """Fail closed: a changed model needs accounted DP steps and must be a privately trained model."""
        changed = _changed(sent, new)
        if changed and taken == 0:
            raise ClientAppError(f"{_named(self.where)} trained without privfl.PrivacyEngine (its fit changed "
                                 "the model but no DP step was accounted); make its optimizer private with "
                                 "privfl.PrivacyEngine().make_private(...) or set [dp].enabled = false for a run "
                                 "without DP")
        if changed and not any(_is_state_of(m, new) for m in [*fit_models, *self.session.modules]):
            raise ClientAppError(f"{_named(self.where)}: its fit returned a model that is not the state of the "
                                 "model privfl.PrivacyEngine trained; return that model's parameters")
        if reported is not None and _reported_steps(reported, -1) != taken:
            raise ClientAppError(f"{_named(self.where)} reported steps={reported!r} but privfl accounted "
                                 f"{taken} DP step(s) in this fit; report the DP optimizer steps it took (or no steps)")

    def public_fit_metrics(self, steps: int) -> dict[str, Any]:
        """The metrics a fit result carries: public values only (:data:`PUBLIC_FIT_METRICS`)."""
        c = self.config
        return build_public_fit_metrics(steps, self.training_steps, self.epsilon, c.delta, c.enabled, self.exhausted)

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate_local(self, parameters: NDArrays | None = None) -> tuple[float, float]:
        """(loss, accuracy) from the client's own evaluate, on the site: for the site alone, never released."""
        if parameters is not None:
            self.set_parameters(parameters)
        params = self.get_parameters({})
        with self._user_code():
            res = self._backend.evaluate(params, {}, self._wire_names(len(params)))
        if res is None:
            return math.nan, math.nan
        loss, _n, metrics = res
        acc = next((float(metrics[k]) for k in _ACCURACY_KEYS if _is_number(metrics.get(k))), math.nan)
        return float(loss), acc

    def evaluate(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Releases nothing: Flower's "no result" (the client's evaluation stays local)."""
        return 0.0, 0, {}

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Accountant state, steps and the count of engines made (a restart never reuses a seeded stream)."""
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "training_steps": self.training_steps,
            "engines_made": self.session.engines_made,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the accountant never goes backwards."""
        self.session.engines_made = max(self.session.engines_made, int(state.get("engines_made", 0)))
        restored = PrivacyAccountant()
        restored.load_state_dict(state["accountant"])
        if restored.steps < self.accountant.steps:
            return  # ours already knows more (e.g. rebuilt from the ledger)
        self.accountant.load_state_dict(state["accountant"])
        self.training_steps = max(self.training_steps, int(state.get("training_steps", 0)))


# ---- helpers --------------------------------------------------------------------------------
def _where_of(app: Any) -> str:
    if isinstance(app, str):
        return app
    name = getattr(app, "__qualname__", None) or type(app).__name__
    return f"{getattr(app, '__module__', '?')}:{name}"


def _steps_value(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"strategy.{name} must be a positive integer, got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _reported_steps(value: Any, default: int) -> int:
    """A reported step count as an int (``default`` when absent or not a whole number)."""
    if not _is_number(value) or not float(value).is_integer():
        return default
    return int(value)


def _changed(a: NDArrays, b: NDArrays) -> bool:
    """Whether ``b`` differs from ``a`` in count, shape or any value."""
    return len(a) != len(b) or any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b))


def _is_state_of(module: nn.Module, arrays: NDArrays) -> bool:
    """Whether ``arrays`` are ``module``'s current state (its state_dict, or its parameters)."""
    for values in (list(module.state_dict().values()), list(module.parameters())):
        if len(values) == len(arrays) and not _changed([v.detach().cpu().numpy() for v in values], arrays):
            return True
    return False
