"""Shared pieces of the gossip transport: method name, gRPC options, byte counters, backoff."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privfl.pki import PKIError, Roster, load_crl, load_roster, verify_crl
from privfl.transport.codec import CHUNK_BYTES

log = logging.getLogger("privfl.transport")

METHOD = "/privfl.transport.v1.Gossip/Exchange"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CONNECT_TIMEOUT_MS = 20_000  # one connection attempt, handshake included (gRPC's own default)


def grpc_options(extra: list[tuple[str, object]] | None = None) -> list[tuple[str, object]]:
    """Channel/server options: per-chunk message limits (the body is streamed), no sharing."""
    limit = max(8 * 1024 * 1024, 4 * CHUNK_BYTES)  # one chunk or a header with many specs
    opts: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # reconnect soon after a refused connection (a peer still starting): gRPC's default
        # backoff (1 s, growing to 120 s) kept failing a channel after the peer was up
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # not a backoff: gRPC core reads it as the minimum *connect timeout*, the time one connection
        # attempt (TCP, TLS handshake, HTTP/2 settings) may take. At 100-200 ms a peer over a long link,
        # or a busy one, had its handshake cut every time ("Handshake read failed (Endpoint closing)")
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
    ]
    return opts + (extra or [])


@dataclass
class PeerTraffic:
    """Serialized bytes and messages exchanged with one peer (gRPC message payloads)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


class TrafficCounters:
    """Thread-safe per-peer counters of real serialized bytes sent and received.

    Counts the protobuf bytes of every chunk (header, body, trailer) -- what the
    application puts on the wire, excluding HTTP/2 and TLS framing. Share one instance
    between a node's server and client to get the node's totals.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, PeerTraffic] = {}

    def add_sent(self, peer: str, nbytes: int, messages: int = 0) -> None:
        """Record ``nbytes`` (and ``messages`` whole messages) sent to ``peer``."""
        with self._lock:
            t = self._peers.setdefault(peer, PeerTraffic())
            t.bytes_sent += nbytes
            t.messages_sent += messages

    def add_received(self, peer: str, nbytes: int, messages: int = 0) -> None:
        """Record ``nbytes`` (and ``messages`` whole messages) received from ``peer``."""
        with self._lock:
            t = self._peers.setdefault(peer, PeerTraffic())
            t.bytes_received += nbytes
            t.messages_received += messages

    def peer(self, peer: str) -> PeerTraffic:
        """A copy of the counters for one peer (zeros if never seen)."""
        with self._lock:
            t = self._peers.get(peer, PeerTraffic())
            return PeerTraffic(t.bytes_sent, t.bytes_received, t.messages_sent, t.messages_received)

    def snapshot(self) -> dict[str, PeerTraffic]:
        """A copy of all per-peer counters."""
        with self._lock:
            return {p: PeerTraffic(t.bytes_sent, t.bytes_received, t.messages_sent,
                                   t.messages_received) for p, t in self._peers.items()}

    def total(self) -> PeerTraffic:
        """Sum over all peers."""
        out = PeerTraffic()
        for t in self.snapshot().values():
            out.bytes_sent += t.bytes_sent
            out.bytes_received += t.bytes_received
            out.messages_sent += t.messages_sent
            out.messages_received += t.messages_received
        return out


class PeerBackoff:
    """Exponential backoff per peer, so a node skips a peer that keeps failing.

    After ``n`` consecutive failures the peer is skipped for
    ``min(max_delay, base * factor**(n-1))`` seconds; one success resets it.
    """

    def __init__(self, base: float = 0.5, factor: float = 2.0, max_delay: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base, self.factor, self.max_delay, self.clock = base, factor, max_delay, clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def available(self, peer: str) -> bool:
        """True if ``peer`` may be tried now."""
        with self._lock:
            return self.clock() >= self._until.get(peer, float("-inf"))

    def remaining(self, peer: str) -> float:
        """Seconds until ``peer`` may be tried again (0 if now)."""
        with self._lock:
            return max(0.0, self._until.get(peer, float("-inf")) - self.clock())

    def failure(self, peer: str) -> float:
        """Record a failure; returns the delay before the peer is tried again."""
        with self._lock:
            n = self._failures.get(peer, 0) + 1
            self._failures[peer] = n
            delay = min(self.max_delay, self.base * self.factor ** (n - 1))
            self._until[peer] = self.clock() + delay
            return delay

    def success(self, peer: str) -> None:
        """Record a success: forget the peer's failures."""
        with self._lock:
            self._failures.pop(peer, None)
            self._until.pop(peer, None)

    def failures(self, peer: str) -> int:
        """Consecutive failures recorded for ``peer``."""
        with self._lock:
            return self._failures.get(peer, 0)


class TrustState:
    """The roster and verified CRL that a server or client checks peers against; swappable at run time.

    ``generation`` increases on every change, so caches of verified certificates know
    when to drop what they hold. ``reload_from_files`` picks up a changed CRL or roster
    from disk (a running node refuses a newly revoked peer without a restart); a file
    that does not verify or parse is logged and the previous one stays in force.
    """

    def __init__(self, ca_pem: bytes, roster: Roster, crl: bytes, node_id: str = "?") -> None:
        self.ca_pem = ca_pem
        self.node_id = node_id
        self._lock = threading.Lock()
        self._roster = roster
        self._crl_pem = crl
        self._crl = verify_crl(load_crl(crl), ca_pem)
        self.generation = 0
        self._last_error: dict[str, str] = {}

    def current(self) -> tuple[Roster, object]:
        """The roster and CRL in force now."""
        with self._lock:
            return self._roster, self._crl

    @property
    def roster(self) -> Roster:
        """The roster in force now."""
        with self._lock:
            return self._roster

    def crl_fresh(self, now: dt.datetime | None = None) -> bool:
        """Whether the CRL in force is still before its next update (fail closed after)."""
        with self._lock:
            nxt = self._crl.next_update_utc
        return nxt is None or (now or dt.datetime.now(dt.UTC)) <= nxt

    def update(self, roster: Roster | None = None, crl: bytes | None = None) -> bool:
        """Swap the roster and/or the CRL (verified against the CA before it is used).

        Returns True if anything changed. PKIError (nothing swapped) if the CRL does not verify.
        """
        verified = verify_crl(load_crl(crl), self.ca_pem) if crl is not None else None
        with self._lock:
            changed = False
            if roster is not None and roster != self._roster:
                self._roster, changed = roster, True
            if verified is not None and crl is not None and crl != self._crl_pem:
                self._crl, self._crl_pem, changed = verified, crl, True
            if changed:
                self.generation += 1
            return changed

    def reload_from_files(self, crl_path: str | os.PathLike[str] | None,
                          roster_path: str | os.PathLike[str] | None) -> bool:
        """Re-read the CRL and roster files; swap whichever verifies (CRL) or parses (roster).

        A file that fails is logged (once per distinct error) and its previous version stays
        in force. Returns True if the trust in force changed.
        """
        roster: Roster | None = None
        crl: bytes | None = None
        if roster_path is not None:
            try:
                roster = load_roster(roster_path)
                if roster.consortium != self._roster.consortium:
                    raise PKIError(f"{roster_path}: consortium {roster.consortium!r} differs from "
                                   f"{self._roster.consortium!r}")
                self._last_error.pop("roster", None)
            except PKIError as exc:
                self._failed("roster", roster_path, exc)
                roster = None
        if crl_path is not None:
            try:
                crl = Path(crl_path).read_bytes()
                verify_crl(load_crl(crl), self.ca_pem)
                self._last_error.pop("crl", None)
            except (OSError, PKIError) as exc:
                self._failed("crl", crl_path, exc)
                crl = None
        changed = self.update(roster, crl)
        if changed:
            log.info("node %s: trust reloaded (roster %s, CRL %s), generation %d", self.node_id,
                     roster_path, crl_path, self.generation)
        return changed

    def _failed(self, what: str, path: object, exc: Exception) -> None:
        msg = str(exc)
        if self._last_error.get(what) != msg:
            log.error("node %s: cannot reload the %s from %s, keeping the previous one: %s",
                      self.node_id, what, path, msg)
        self._last_error[what] = msg
