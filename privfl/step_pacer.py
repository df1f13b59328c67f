"""Fixed-time DP steps: no model leaves before the run's start + steps × ``[node].step_seconds``.

Why: a DP step over a Poisson batch of expected size q·N takes time that grows with the
site's record count N, and every model a node releases says how many steps it has taken
(its round) and when. Without pacing, a curious peer reads the step rate off the message
timing and learns N, which ε does not cover. With pacing, a model computed after k steps
of this run leaves no earlier than ``start + k × step_seconds``: as long as the steps keep
up with that schedule, when a model leaves depends on k and the public setting alone.
A node that falls behind the schedule logs it once (the timing then says something about
the record count again: raise ``step_seconds``). The schedule is cumulative, so a slow
evaluation or a slow exchange is absorbed by the steps that follow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PacedClient", "StepPacer"]

log = logging.getLogger("privfl.node")

BEHIND_TOLERANCE = 0.05  # seconds behind the schedule before the node says so


class StepPacer:
    """Holds each release back to its step's slot on a schedule that starts at :meth:`start`."""

    def __init__(self, node_id: str, step_seconds: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.node_id = node_id
        self.step_seconds = float(step_seconds)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._origin: float | None = None
        self._base_steps = 0
        self._warned = False

    @property
    def active(self) -> bool:
        return self.step_seconds > 0

    def start(self, steps_before: int) -> None:
        """The schedule starts now, at the node's step count so far (a restart starts afresh)."""
        with self._lock:
            self._origin = self._clock()
            self._base_steps = int(steps_before)

    def slot(self, steps: int) -> float | None:
        """When a model computed after ``steps`` steps may leave (None: no schedule)."""
        with self._lock:
            if not self.active or self._origin is None:
                return None
            return self._origin + max(0, int(steps) - self._base_steps) * self.step_seconds

    def wait(self, steps: int) -> float:
        """Sleep until the slot of ``steps``; the seconds slept (0 when behind, logged once)."""
        slot = self.slot(steps)
        if slot is None:
            return 0.0
        now = self._clock()
        if now <= slot:
            self._sleep(slot - now)
            return slot - now
        if now - slot > BEHIND_TOLERANCE and not self._warned:
            self._warned = True
            log.warning("node %s: the DP steps run %.2f s behind [node].step_seconds = %g at step %d: "
                        "message timing now says something about this site's record count; raise it",
                        self.node_id, now - slot, self.step_seconds, steps)
        return 0.0


class PacedClient:
    """The site's client as the node's strategy sees it: ``fit`` returns no earlier than the slot
    of the steps it took. The wait happens in the training thread, where the compute happens,
    never under the strategy's lock: a peer probing the node sees the same thing (served, with
    the model from before the fit) whether the steps are still running or already done, and
    the model leaves when the fit returns, at its slot. Everything else is the client's own."""

    def __init__(self, client: Any, pacer: StepPacer, steps: Callable[[], int]) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_pacer", pacer)
        object.__setattr__(self, "_steps", steps)

    def fit(self, parameters: Any, config: Any) -> Any:
        out = self._client.fit(parameters, config)
        self._pacer.wait(self._steps())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client, name, value)
