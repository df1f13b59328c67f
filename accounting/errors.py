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


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """An exception from user code on one line: its first line, and the next ones while the
    first ends with ":" (torch's "Error(s) in loading state_dict for Net:" says what only
    below); at most ``limit`` characters; the class name for an empty message."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    if not lines:
        return type(exc).__name__
    out = lines[0]
    for more in lines[1:]:
        if not out.endswith(":") or len(out) >= limit:
            break
        out = f"{out} {more}"
    return out if len(out) <= limit else out[: limit - 1] + "…"


__all__ = ["ConfigError", "DataError", "PrivflError", "error_summary"]
