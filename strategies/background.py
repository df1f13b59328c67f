"""One call run on a background thread while the caller computes: how a real node overlaps
communication with training (CoCoD-SGD's exchange of the round-start model, AD-PSGD's
communication thread in :class:`~privfl.strategies.gossip.AsyncGossip` with ``overlap``).

Why one helper: the overlap must be bounded and lose nothing — the caller joins the call
before it starts the next one, its result comes back from :meth:`Background.join`, and an
exception raised on the thread is raised again there, in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Background"]

T = TypeVar("T")


class Background(Generic[T]):
    """Run ``fn()`` on a daemon thread now; :meth:`join` waits for it and returns its result
    (or raises what it raised). Joining twice returns the same result."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # raised again in the joining thread
            self._error = exc

    @property
    def running(self) -> bool:
        """Whether the call has not returned yet."""
        return self._thread.is_alive()

    def join(self) -> T:
        """Wait for the call; its result, or its exception raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set by _run when no error was raised
