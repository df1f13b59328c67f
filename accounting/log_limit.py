"""At most one refusal line per source and reason every few seconds.

Why: every refused call logs a warning, and a peer (or anyone who can reach the port)
can make calls as fast as the server refuses them, filling the operator's log and disk.
It lives in the lowest layer (like :mod:`accounting.errors`) so that the transport, the
peer network and the strategies all use the one limiter class (one instance per server,
network or strategy). Keys are fixed reason codes and
authenticated sources, never text a peer chose (else each new text is a new key).
:class:`LogLimiter` lets the first line of each (reason, source) through, drops the
repeats for ``interval`` seconds, and says on the next line it lets through how many it
dropped, so the log still shows that a flood happened and from where.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GROUP_LINES", "LogLimiter", "reason_code", "source_host", "warn_limited"]

MAX_KEYS = 4096  # sources remembered at once (a flood from many addresses cannot grow it without bound)
GROUP_LINES = 5  # lines per group (reason class and source) per interval, whatever the text


def reason_code(text: str) -> str:
    """A refusal's fixed part: its text up to the first quote, colon, digit or bracket (what
    follows is often the peer's own kind, name or value)."""
    return re.split(r"[:'\"\d(\[{]", text, maxsplit=1)[0].strip()[:60]


class LogLimiter:
    """Per-key rate limit for log lines: ``allow(key)`` gives (emit, dropped since the last emit)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (last emitted, dropped since)
        self._groups: dict[tuple[str, ...], tuple[float, int]] = {}  # group -> (interval start, lines emitted)

    def allow(self, *key: str, group: tuple[str, ...] | None = None) -> tuple[bool, int]:
        """Whether to emit the line of ``key`` now, and how many of its lines were dropped before.
        ``group`` (e.g. the reason class and the peer): at most :data:`GROUP_LINES` lines of all
        its keys per interval, so a peer that varies the text it controls gets no more lines."""
        now = self._clock()
        with self._lock:
            held = self._seen.get(key)
            if held is not None and now - held[0] < self.interval:
                self._seen[key] = (held[0], held[1] + 1)
                return False, 0
            if group is not None:
                start, lines = self._groups.get(group, (now, 0))
                if now - start >= self.interval:
                    start, lines = now, 0
                if lines >= GROUP_LINES:
                    self._groups[group] = (start, lines)
                    return False, 0
                self._groups[group] = (start, lines + 1)
                if len(self._groups) > MAX_KEYS:
                    self._groups.pop(next(iter(self._groups)))
            if held is None and len(self._seen) >= MAX_KEYS:  # forget the oldest source, not all of them
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = (now, 0)
            return True, 0 if held is None else held[1]

    def suffix(self, dropped: int) -> str:
        """What to append to an emitted line about the lines dropped before it."""
        return f" ({dropped} more like it in the last {self.interval:g} s not logged)" if dropped else ""


def source_host(peer: str) -> str:
    """gRPC's ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` without the port (a new one every call)."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() else peer



def warn_limited(logger: Any, limiter: LogLimiter, key: tuple[str, ...], fmt: str, *args: object,
                 group: tuple[str, ...] | None = None) -> None:
    """Log ``fmt % args`` as a warning at most once per ``key`` and interval (and
    :data:`GROUP_LINES` per ``group``); the repeats at debug, counted on the next warning."""
    lim = limiter
    emit, dropped = lim.allow(*key, group=group)
    if emit:
        logger.warning(fmt + lim.suffix(dropped), *args)
    else:
        logger.debug(fmt, *args)
