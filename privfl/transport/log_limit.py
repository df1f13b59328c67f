"""At most one refusal line per source and reason every few seconds.

Why: every refused call logs a warning, and a peer (or anyone who can reach the port)
can make calls as fast as the server refuses them, filling the operator's log and disk.
:class:`LogLimiter` lets the first line of each (reason, source) through, drops the
repeats for ``interval`` seconds, and says on the next line it lets through how many it
dropped, so the log still shows that a flood happened and from where.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["LogLimiter", "source_host"]

MAX_KEYS = 4096  # sources remembered at once (a flood from many addresses cannot grow it without bound)


class LogLimiter:
    """Per-key rate limit for log lines: ``allow(key)`` gives (emit, dropped since the last emit)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (last emitted, dropped since)

    def allow(self, *key: str) -> tuple[bool, int]:
        now = self._clock()
        with self._lock:
            held = self._seen.get(key)
            if held is not None and now - held[0] < self.interval:
                self._seen[key] = (held[0], held[1] + 1)
                return False, 0
            if held is None and len(self._seen) >= MAX_KEYS:
                self._seen.clear()
            self._seen[key] = (now, 0)
            return True, 0 if held is None else held[1]

    def suffix(self, dropped: int) -> str:
        """What to append to an emitted line about the lines dropped before it."""
        return f" ({dropped} more like it in the last {self.interval:g} s not logged)" if dropped else ""


def source_host(peer: str) -> str:
    """gRPC's ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` without the port (a new one every call)."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() else peer
