"""Errors privfl raises for bad input or refused actions.

They live in the lowest layer (``accounting`` depends on nothing of ours) so that every
layer above — ``clients``, ``strategies`` and the ``privfl`` runtime — raises the same
classes; ``privfl.errors`` re-exports them. Every error a user can cause derives from
:class:`PrivflError`; the CLI prints its message on one line and exits with code 2
instead of showing a traceback.
"""

from __future__ import annotations


class PrivflError(Exception):
    """Base class of every user-facing privfl error."""


class ConfigError(PrivflError):
    """A configuration value or input file is invalid; the message names it."""


class DataError(ConfigError):
    """A dataset could not be loaded or split as asked."""


__all__ = ["ConfigError", "DataError", "PrivflError"]
