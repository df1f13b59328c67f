"""Errors privfl raises for bad input or refused actions (defined in :mod:`accounting.errors`,
the lowest layer, so that ``clients`` and ``strategies`` raise the very same classes).

Every error a user can cause derives from :class:`PrivflError`; the CLI prints its
message on one line and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

from privfl.accounting.errors import ConfigError, DataError, PrivflError, error_summary

__all__ = ["ConfigError", "DataError", "PrivflError", "error_summary"]
