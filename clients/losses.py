"""The loss registry: ``[model].loss`` names a built-in (``cross_entropy``) or the hospital's
own loss by import path: a ``loss(logits, target)`` function, or a factory (a loss class, or a
function of no arguments) returning a loss module or function; a mean over the batch.

The DP engines compute per-sample gradients of this loss; with a mean reduction the
noisy sum is rescaled exactly as for the built-in cross-entropy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from privfl.accounting.errors import ConfigError
from privfl.clients.plugins import is_import_path, resolve_import

__all__ = ["LOSSES", "build_loss"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: built-in losses by name
LOSSES: dict[str, Callable[[], Loss]] = {"cross_entropy": nn.CrossEntropyLoss}


def _is_loss_function(obj: Any) -> bool:
    """A function (not a class) with at least two required positional parameters: ``loss(logits, target)``."""
    if isinstance(obj, type) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in positional and p.default is p.empty) >= 2


def build_loss(name: str, where: str = "[model].loss") -> Loss:
    """The loss ``name``: a built-in, a user's ``loss(logits, target)`` function, or what the user's
    factory (a loss class, or a function of no arguments) returns (a module or a function)."""
    if is_import_path(name):
        factory = resolve_import(name, where)
    elif name in LOSSES:
        factory = LOSSES[name]
    else:
        raise ConfigError(f"{where}: unknown loss {name!r}; choose one of {', '.join(LOSSES)} "
                          "or give 'package.module:name'")
    if _is_loss_function(factory):
        loss = factory  # a plain ``loss(logits, target)`` function
    else:
        try:
            loss = factory()
        except TypeError as exc:
            raise ConfigError(f"{where}: {name} must be a loss function (logits, target) or callable with no "
                              f"arguments, returning one ({exc})") from None
    if not callable(loss):
        raise ConfigError(f"{where}: {name} returned {type(loss).__name__}, not a loss")
    reduction = getattr(loss, "reduction", "mean")
    if reduction != "mean":
        raise ConfigError(f"{where}: {name} has reduction={reduction!r}; privfl's DP engines need 'mean'")
    return loss
