"""Bound the ledger entries a peer can cause: at most one anchor per peer per step of our own.

Every verified message a peer sends carries its signed ledger head, and the node records
a head that advances as an ``anchor`` entry (evidence of the peer's history, see
:mod:`privfl.accounting.ledger`). Left alone, a member that sends hello after hello,
each with a higher index, grows our ledger by one signed line per message: a disk and
audit flood. The throttle writes a peer's head only when this node has made progress of
its own (a DP training event, or its close entry) since the last anchor it wrote for that
peer. Releases do not count: a peer causes those by asking. So anchors grow at most
(number of peers) × (our DP events + 1 + ``GOODBYE_WRITES``), whatever a peer sends (the
close, and the goodbye heads written at once, below).
A head that arrives in between is kept, newest only, and written at the next chance or
by :meth:`AnchorThrottle.flush` (before the close entry, and once the network is closed:
the neighbours' goodbye heads are always kept). After the close entry our ledger does
not move, so a peer then gets one late anchor at once and the newest one at the flush.

A goodbye's head is the exception, a few times per peer: the node signs a receipt for it
(:mod:`accounting.receipts`), so :meth:`AnchorThrottle.commit` writes it at once, before
the receipt leaves (the node signs only a head its record now holds as the peer's newest,
so a crash cannot make it the holder of a receipted head it never recorded). After
``GOODBYE_WRITES`` goodbyes from one peer the next are offered like any head (bounded as
above) and get no receipt.

``progress()`` is the node's own progress, e.g. ``(ledger.steps, ledger.ends_with_close)``:
anything comparable that grows with the node's own DP events and its close.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["GOODBYE_WRITES", "AnchorThrottle"]

GOODBYE_WRITES = 2  # goodbye heads per peer written at once (a run's goodbye, and one after a restart)

Head = tuple[int, bytes, bytes]  # index, entry hash, the peer's own signature of the head


class AnchorThrottle:
    """Decides which received heads are written now and keeps the newest of the rest.

    ``progress()``: the node's own progress (see the module docstring); ``write(peer, index,
    hash, signature)`` records one head; ``newest(peer)``: the newest (index, hash) the record
    holds for the peer, and ``sync()`` makes what was written durable (both for :meth:`commit`).
    """

    def __init__(self, progress: Callable[[], Any], write: Callable[[str, int, bytes, bytes], None],
                 newest: Callable[[str], tuple[int, bytes] | None] | None = None,
                 sync: Callable[[], None] | None = None) -> None:
        self._progress = progress
        self._write = write
        self._newest = newest
        self._sync = sync
        self._lock = threading.Lock()
        self._mark: dict[str, Any] = {}  # peer → our own progress when its last head was written
        self._pending: dict[str, Head] = {}
        self._committed: dict[str, int] = {}  # peer → goodbye heads written at once

    def offer(self, peer: str, index: int, entry_hash: bytes, signature: bytes = b"") -> bool:
        """Write the head now when our ledger moved on since the peer's last anchor; else keep
        it (newest only). True when it was written."""
        with self._lock:
            progress = self._progress()
            held = self._pending.get(peer)
            if held is not None and index <= held[0]:
                return False
            if peer in self._mark and self._mark[peer] >= progress:
                self._pending[peer] = (int(index), bytes(entry_hash), bytes(signature))
                return False
            self._pending.pop(peer, None)
            self._record(peer, (int(index), bytes(entry_hash), bytes(signature)), progress)
            return True

    def commit(self, peer: str, index: int, entry_hash: bytes, signature: bytes = b"") -> bool:
        """A goodbye's head, about to be receipted: written now (the newest kept head of the peer if
        that is newer) for the first ``GOODBYE_WRITES`` goodbyes of ``peer``, offered as usual after
        that. True when it may be receipted: the record now holds exactly this head as the peer's
        newest, synced (without ``newest``: when it was written now). A write or sync that fails
        raises: no receipt."""
        head = (int(index), bytes(entry_hash), bytes(signature))
        with self._lock:
            written = self._committed.get(peer, 0) < GOODBYE_WRITES
            if written:
                self._committed[peer] = self._committed.get(peer, 0) + 1
                held = self._pending.pop(peer, None)
                self._record(peer, held if held is not None and held[0] > head[0] else head, self._progress())
        if not written:
            self.offer(peer, index, entry_hash, signature)
        if self._newest is None:
            return written
        if self._newest(peer) != head[:2]:
            return False  # kept back, refused (not advancing, or in conflict) or a newer one held
        if self._sync is not None:
            self._sync()
        return True

    def flush(self) -> int:
        """Write every kept head (before the close entry; once no more heads can arrive)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            for peer, head in sorted(pending.items()):
                self._record(peer, head, self._progress())
            return len(pending)

    def pending(self) -> dict[str, Head]:
        """The heads kept, not yet written (peer → (index, hash, signature))."""
        with self._lock:
            return dict(self._pending)

    def _record(self, peer: str, head: Head, progress: Any) -> None:
        """Write one head (caller holds the lock); the mark is set even if the write raised."""
        self._mark[peer] = progress
        self._write(peer, *head)
