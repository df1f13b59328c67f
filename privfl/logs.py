"""Logging for privfl's own entry points: one line per event.

Two things made every Flower log line print twice:

* Opacus: ``opacus/utils/module_utils.py``, loaded by any ``import opacus``, runs
  ``logging.basicConfig(format="%(asctime)s:%(levelname)s:%(message)s",
  datefmt="%m/%d/%Y %H:%M:%S", stream=sys.stderr)`` at import. When the root logger has no
  handler yet (a Flower App: Flower's runtime logs through its own ``flwr`` logger), that
  adds a root ``StreamHandler``.
* Flower: the ``flwr`` logger has its own console handler *and* propagates to the root, so
  once the root has a handler (Opacus's, or privfl's own ``basicConfig``) each Flower record
  is printed by both.

:func:`drop_opacus_root_handler` removes the handler Opacus installed (recognised by its
exact format and date format; a handler the user configured is left alone, and when the
user configured the root before Opacus was imported, Opacus's ``basicConfig`` did nothing).
:func:`configure_logging`, for privfl's console entry points, configures the root and
routes Flower's records through it (their level is Flower's console level, so
``FLWR_LOG_LEVEL`` still applies), so they are printed once, in privfl's format, and reach
whatever the root writes to (``run.log`` of ``privfl simulate``).
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["FORMAT", "OPACUS_DATEFMT", "OPACUS_FORMAT", "configure_logging", "drop_opacus_root_handler",
           "route_flower_through_root"]

#: privfl's console format
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: what ``opacus.utils.module_utils`` passes to ``logging.basicConfig`` at import (Opacus 1.5, 1.6)
OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
OPACUS_DATEFMT = "%m/%d/%Y %H:%M:%S"


def _is_opacus_handler(h: logging.Handler) -> bool:
    f = h.formatter
    return (type(h) is logging.StreamHandler and f is not None
            and getattr(f, "_fmt", None) == OPACUS_FORMAT and getattr(f, "datefmt", None) == OPACUS_DATEFMT)


def drop_opacus_root_handler() -> list[logging.Handler]:
    """Remove the root handler Opacus's import-time ``basicConfig`` added, if any; return what was removed."""
    root = logging.getLogger()
    gone = [h for h in root.handlers if _is_opacus_handler(h)]
    for h in gone:
        root.removeHandler(h)
    return gone


def route_flower_through_root() -> None:
    """Flower's records go to the root's handlers only: its own console handler is removed and
    the ``flwr`` logger's level becomes that handler's (INFO, or ``FLWR_LOG_LEVEL``). For an
    entry point that configured the root; does nothing when Flower is not installed."""
    try:
        flwr_logging = importlib.import_module("flwr.common.logger")
    except ImportError:
        return
    console = getattr(flwr_logging, "ConsoleHandler", None)
    flower = logging.getLogger(getattr(flwr_logging, "LOGGER_NAME", "flwr"))
    for h in list(flower.handlers):
        if (console is not None and isinstance(h, console)) or (
                console is None and type(h) is logging.StreamHandler):
            flower.removeHandler(h)
            flower.setLevel(h.level or logging.INFO)


def configure_logging(level: str | int = "INFO", *, force: bool = False) -> None:
    """privfl's console logging: the root at ``level`` in :data:`FORMAT` (``force`` replaces
    handlers already there), no Opacus root handler, Flower's records through the root once."""
    drop_opacus_root_handler()
    logging.basicConfig(level=level, format=FORMAT, force=force)
    route_flower_through_root()
