"""The optimizer registry: ``[dp].optimizer`` names a built-in (``sgd``, ``adam``, ``adamw``)
or the hospital's own factory by import path.

DP-SGD's privacy comes from the clipped, noised gradient the DP optimizer writes before
the wrapped optimizer's step, so any first-order optimizer keeps the guarantee: its step
is post-processing of the noised gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from privfl.accounting.errors import ConfigError
from privfl.clients.plugins import is_import_path, resolve_import

__all__ = ["OPTIMIZERS", "build_optimizer", "check_optimizer"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _sgd(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, **kw)


def _adam(params: Iterable[torch.nn.Parameter], lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, **kw)


def _adamw(params: Iterable[torch.nn.Parameter], lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, **kw)


#: built-in optimizers; ``momentum`` applies to ``sgd`` only
OPTIMIZERS: dict[str, OptimizerFactory] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def check_optimizer(name: str, momentum: float, where: str = "dp") -> None:
    """Refuse an unknown optimizer, or momentum given to one that does not take it."""
    if is_import_path(name):
        resolve_import(name, f"{where}.optimizer")
        return
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}.optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)} "
                          "or give 'package.module:name'")
    if name != "sgd" and momentum:
        raise ConfigError(f"{where}.momentum: applies to 'sgd' only; give {name}'s settings in "
                          f"{where}.optimizer_args (e.g. betas)")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                    args: Mapping[str, Any] | None = None, where: str = "dp") -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (a built-in, or ``factory(params, lr=lr, **args)``)."""
    kw = dict(args or {})
    for key in ("lr", "params"):
        if key in kw:
            raise ConfigError(f"{where}.optimizer_args.{key}: set [dp].lr, not optimizer_args")
    if "betas" in kw and isinstance(kw["betas"], list):
        kw["betas"] = tuple(kw["betas"])  # TOML has no tuples
    if is_import_path(name):
        factory = resolve_import(name, f"{where}.optimizer")
    else:
        check_optimizer(name, momentum, where)
        factory = OPTIMIZERS[name]
        if name == "sgd":
            kw["momentum"] = momentum
    try:
        opt = factory(params, lr=lr, **kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.optimizer_args: {name} refused them ({exc})") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"{where}.optimizer: {name} returned {type(opt).__name__}, not a torch Optimizer")
    return opt
