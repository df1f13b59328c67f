"""User code by import path: ``"pkg.module:name"`` resolved to the object it names.

The one resolver every registry uses (models, datasets, losses, optimizers, clients), so
an import path means the same thing and fails with the same one-line error everywhere.
It lives in the clients layer because clients resolve losses and optimizers; the runtime
re-uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

from privfl.accounting.errors import ConfigError

__all__ = ["is_import_path", "resolve_import"]


def is_import_path(name: str) -> bool:
    """Whether ``name`` names user code (``pkg.module:attr``) rather than a built-in entry."""
    return isinstance(name, str) and ":" in name


def resolve_import(path: str, where: str) -> Any:
    """The callable at ``"pkg.module:attr"`` (``attr`` may be dotted); ConfigError naming ``where``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: expected 'package.module:name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is a config error
        raise ConfigError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
                          "is its folder in the config's python_path?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {path!r} is not callable")
    return obj
