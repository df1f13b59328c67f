"""The client registry: who trains at a site, built the same way by ``node``, ``launch``,
``simulate`` and ``compare``.

``[client].app`` empty means privfl's own :class:`~privfl.clients.DPClient` (entry
``"dp"`` of :data:`CLIENTS`) over the site's inputs; an import path
``"pkg.module:client_fn"`` means the hospital's own Flower client, wrapped by
:class:`~privfl.clients.app_client.AppClient` under the site's DP session (its contract is
in that module). A user's client loads its own records: privfl then reads no site data
unless ``[data].factory`` is given too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privfl.accounting import PrivacyAccountant
from privfl.clients import DPClient, DPConfig
from privfl.clients.app_client import AppClient
from privfl.clients.losses import build_loss
from privfl.clients.plugins import is_import_path
from privfl.data import SiteInputs
from privfl.errors import ConfigError, error_summary

__all__ = ["CLIENTS", "ClientBuild", "SiteClient", "build_client", "client_kind", "preflight", "reads_site_data"]

DpEventHook = Callable[[dict[str, Any]], None]
#: what a site trains with: both drive training the same way (fit, epsilon, state_dict, evaluate_local, ...)
SiteClient = DPClient | AppClient


@dataclass
class ClientBuild:
    """Everything a site's client is built from (one request, whoever builds it)."""

    dp: DPConfig
    site_index: int
    num_sites: int
    local_steps: int
    model: nn.Module | None = None  # the site's model ([model]); None: the user's client holds its own
    site: SiteInputs | None = None  # privfl-loaded records; None: the user's client loads its own
    loss: str = "cross_entropy"
    app: str = ""
    run_config: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    device: torch.device | str | None = None
    accountant: PrivacyAccountant | None = None
    on_dp_event: DpEventHook | None = None
    where: str = "[client]"


#: records the pre-flight pass runs through the model and loss
PREFLIGHT_RECORDS = 8


def _first_records(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` training records as (inputs, labels) tensors, converted as DPClient does."""
    if isinstance(data, tuple):
        x, y = torch.as_tensor(np.asarray(data[0][:n])), torch.as_tensor(np.asarray(data[1][:n]))
    else:
        xs, ys = zip(*(data[i] for i in range(min(n, len(data)))))
        x = torch.stack([torch.as_tensor(v) for v in xs])
        y = torch.as_tensor([int(torch.as_tensor(v)) for v in ys])
    return x.float(), y.long()


def preflight(model: nn.Module, site: SiteInputs, loss: Any, where: str) -> None:
    """Run a few of the site's records through the model and loss once, before any DP step, so a
    model that does not fit the data, labels outside ``0..C-1`` or non-finite records fail as one
    line naming ``[model]`` / ``[data]`` instead of a traceback after budget was spent. Nothing is
    trained, and nothing leaves the node."""
    data_where, model_where = where.replace("[client]", "[data]"), where.replace("[client]", "[model]")
    if site.num_classes > 0 and isinstance(site.train, tuple):
        for split, (_, labels) in (("training", site.train), ("test", site.test)):
            arr = np.asarray(labels)
            if arr.size and (arr.min() < 0 or arr.max() >= site.num_classes):
                raise ConfigError(f"{data_where}: {split} labels must be 0..{site.num_classes - 1} "
                                  f"(num_classes = {site.num_classes}); found a label outside that range")
    try:
        x, y = _first_records(site.train, PREFLIGHT_RECORDS)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(f"{data_where}: a training record is not an (input, label) pair of numbers "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{data_where}: the training records contain NaN or infinite values")
    if site.num_classes > 0 and bool(((y < 0) | (y >= site.num_classes)).any()):
        raise ConfigError(f"{data_where}: labels must be 0..{site.num_classes - 1} "
                          f"(num_classes = {site.num_classes}); found {int(y.min())}..{int(y.max())}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
            width = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
            if site.num_classes > 0 and width is not None and width not in (1, site.num_classes):
                raise ConfigError(f"{model_where}: the model gives {width} outputs per record but "
                                  f"[data].num_classes = {site.num_classes}: make them agree (one output per class)")
            value = loss(out, y.to(device))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's model or loss raises, named in one line
        raise ConfigError(f"{model_where}: the model and [model].loss cannot take the site's records "
                          f"(inputs {tuple(x.shape[1:])}, labels 0..{int(y.max())}): "
                          f"{type(exc).__name__}: {_first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
        raise ConfigError(f"{model_where}: [model].loss must return one number (a mean over the batch), "
                          f"got {type(value).__name__}")


def _first_line(exc: BaseException) -> str:
    return error_summary(exc)


def _dp_client(b: ClientBuild) -> SiteClient:
    if b.model is None or b.site is None:
        raise ConfigError(f"{b.where}: privfl's DPClient needs the site's model and data")
    criterion = build_loss(b.loss)
    preflight(b.model, b.site, criterion, b.where)
    try:
        return DPClient(b.model, b.site.train, b.site.test, b.dp, seed=b.seed, device=b.device,
                        accountant=b.accountant, on_dp_event=b.on_dp_event, criterion=criterion)
    except ValueError as exc:
        raise ConfigError(f"{b.where.replace('[client]', '[dp]')}: {exc}") from None


def _app_client(b: ClientBuild) -> SiteClient:
    names: Sequence[str] | None = None
    init: list[np.ndarray] | None = None
    if b.model is not None and b.site is not None:  # privfl evaluates this model on the site: it must fit
        preflight(b.model, b.site, build_loss(b.loss), b.where)
    if b.model is not None:
        state = b.model.state_dict()
        names = list(state)
        init = [v.detach().cpu().numpy().copy() for v in state.values()]
    return AppClient(b.app, b.dp, where=f"{b.where}.app: {b.app}", accountant=b.accountant, seed=b.seed,
                     device=b.device, on_dp_event=b.on_dp_event, site_index=b.site_index, num_sites=b.num_sites,
                     run_config=b.run_config, local_steps=b.local_steps, parameter_names=names,
                     initial_parameters=init)


#: built-in clients by name; ``[client].app`` = ``"pkg.module:client_fn"`` is the user's own
CLIENTS: dict[str, Callable[[ClientBuild], SiteClient]] = {"dp": _dp_client}


def client_kind(app: str) -> str:
    """The registry entry ``[client].app`` selects: ``"dp"`` (empty), ``"app"`` (an import path)."""
    if not app:
        return "dp"
    if is_import_path(app):
        return "app"
    raise ConfigError(f"[client].app: expected 'package.module:client_fn', got {app!r}")


def reads_site_data(app: str, data_factory: str) -> bool:
    """Whether privfl loads the site's records itself (its own client, or a declared data factory)."""
    return client_kind(app) == "dp" or bool(data_factory)


def build_client(b: ClientBuild) -> SiteClient:
    """The site's client for ``b``: privfl's DPClient, or the user's Flower client under DP."""
    if client_kind(b.app) == "app":
        return _app_client(b)
    return CLIENTS["dp"](b)
