"""The loss registry: ``[model].loss`` names a built-in (``cross_entropy``) or the hospital's
own factory by import path (a callable returning a loss module or function, mean over the batch).

The DP engines compute per-sample gradients of this loss; with a mean reduction the
noisy sum is rescaled exactly as for the built-in cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from privfl.accounting.errors import ConfigError
from privfl.clients.plugins import is_import_path, resolve_import

__all__ = ["LOSSES", "build_loss"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: built-in losses by name
LOSSES: dict[str, Callable[[], Loss]] = {"cross_entropy": nn.CrossEntropyLoss}


def build_loss(name: str, where: str = "[model].loss") -> Loss:
    """The loss ``name``: a built-in, or what the user's factory returns (a module or a function)."""
    if is_import_path(name):
        factory = resolve_import(name, where)
    elif name in LOSSES:
        factory = LOSSES[name]
    else:
        raise ConfigError(f"{where}: unknown loss {name!r}; choose one of {', '.join(LOSSES)} "
                          "or give 'package.module:name'")
    try:
        loss = factory()
    except TypeError as exc:
        raise ConfigError(f"{where}: {name} must be callable with no arguments ({exc})") from None
    if not callable(loss):
        raise ConfigError(f"{where}: {name} returned {type(loss).__name__}, not a loss")
    reduction = getattr(loss, "reduction", "mean")
    if reduction != "mean":
        raise ConfigError(f"{where}: {name} has reduction={reduction!r}; privfl's DP engines need 'mean'")
    return loss
