"""Secure noise drawn ahead in a child process, so drawing it never holds the training thread's GIL.

:class:`~privfl.clients.randomness.SecureRandom` draws the noise of the coming steps ahead of
them. On a thread, each of the sampler's numpy calls hands the GIL back and forth with the
training thread (about 5 µs of the training thread per call, ~110 calls per digits-CNN vector,
measured); in a process it costs the training thread two system calls per batch. One
:class:`NoiseWorker` per process serves every secure source of that process:

* the child is ``python -I`` on this file: it loads :mod:`privfl.clients.gaussian` by path
  (numpy and ``cryptography`` only, no torch; it starts in about 0.3 s) and draws from its own
  ChaCha20 keystream keyed from the child's ``os.urandom`` — a key the parent never sees;
* each request carries a fresh ``memfd`` (sent over a Unix socket): the child writes the values
  into it and answers; the parent maps it and serves it once. Nothing touches a disk or a name
  in a file system, and a request's memory is freed with the last tensor that views it;
* a forked child of the parent drops the parent's worker (it never reads the parent's noise)
  and starts its own when it needs one; the worker ends when its socket closes (the parent's
  exit, even a killed one), and :func:`shutdown` closes it at the parent's exit;
* if the worker fails, its error says so and the caller draws in-process (the fallback is the
  same sampler on the source's own keystream).

Linux only (``memfd_create``); elsewhere :func:`worker` returns None and the thread draws ahead.
"""

from __future__ import annotations

import atexit
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["NoiseWorker", "NoiseWorkerError", "Pending", "shutdown", "worker"]

#: a request: ticket, number of values, σ, dtype code; a reply: ticket, status (0: drawn)
_REQUEST = struct.Struct("<qqdq")
_REPLY = struct.Struct("<qq")
_DTYPES: dict[int, Any] = {0: np.float32, 1: np.float64}
#: the longest a caller waits for one batch before the worker counts as failed (16M values take ~1 s)
REPLY_TIMEOUT_S = 120.0


class NoiseWorkerError(RuntimeError):
    """The noise worker could not draw (it ended, timed out or failed): draw in-process instead."""


class Pending:
    """One batch being drawn by the worker: :meth:`result` waits for it and returns its values."""

    __slots__ = ("_map", "_n", "_dtype", "_ticket", "_values", "_worker")

    def __init__(self, worker: NoiseWorker, ticket: int, buffer: mmap.mmap, n: int, dtype: Any) -> None:
        self._worker, self._ticket, self._map, self._n, self._dtype = worker, ticket, buffer, n, dtype
        self._values: np.ndarray | None = None

    def result(self) -> np.ndarray:
        """The batch's values (a view of the shared memory the worker wrote); raises :class:`NoiseWorkerError`."""
        if self._values is None:
            self._worker.wait(self._ticket)
            self._values = np.frombuffer(self._map, dtype=self._dtype, count=self._n)
        return self._values


class NoiseWorker:
    """The child process that draws this process's secure noise ahead (see the module doc)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.settimeout(REPLY_TIMEOUT_S)
        self._sock = parent
        self._lock = threading.Lock()  # one request or reply on the socket at a time
        self._next = 0
        self._replies: dict[int, int] = {}  # replies read while waiting for another ticket
        self.failed: str | None = None

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def submit(self, n: int, std: float, dtype: Any) -> Pending:
        """Ask for ``n`` N(0, std²) values of ``dtype`` (float32 or float64); returns at once."""
        code = next((c for c, d in _DTYPES.items() if np.dtype(d) == np.dtype(dtype)), None)
        if code is None:
            raise NoiseWorkerError(f"the noise worker draws float32 or float64, not {np.dtype(dtype)}")
        nbytes = max(1, n * np.dtype(dtype).itemsize)
        with self._lock:
            self._check()
            try:
                fd = os.memfd_create("privfl-noise", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, nbytes)
                    buffer = mmap.mmap(fd, nbytes)
                    ticket, self._next = self._next, self._next + 1
                    socket.send_fds(self._sock, [_REQUEST.pack(ticket, n, float(std), code)], [fd])
                finally:
                    os.close(fd)
            except OSError as exc:
                raise self._fail(f"request failed: {exc}") from exc
        return Pending(self, ticket, buffer, n, dtype)

    def wait(self, ticket: int) -> None:
        """Block (the GIL released) until ``ticket`` is drawn; raises :class:`NoiseWorkerError`."""
        with self._lock:
            while ticket not in self._replies:
                self._check()
                try:
                    data = self._sock.recv(_REPLY.size)
                except OSError as exc:  # socket.timeout is an OSError
                    raise self._fail(f"no answer: {exc}") from exc
                if len(data) != _REPLY.size:
                    raise self._fail(f"ended (exit status {self._proc.poll()})")
                got, status = _REPLY.unpack(data)
                self._replies[got] = status
            if self._replies.pop(ticket):
                raise NoiseWorkerError("the noise worker could not draw one batch")

    def _check(self) -> None:
        if self.failed is not None:
            raise NoiseWorkerError(self.failed)

    def _fail(self, why: str) -> NoiseWorkerError:
        self.failed = f"the secure noise worker (pid {self.pid}) {why}"
        return NoiseWorkerError(self.failed)

    def close(self, timeout: float = 2.0) -> None:
        """End the worker: close its socket (it exits on end of file), then wait for it, killing it if late."""
        self.failed = self.failed or "was closed"
        self._sock.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def forget(self) -> None:
        """In a forked child: drop the parent's worker without touching it (only this copy of its socket closes)."""
        self.failed = "belongs to the parent process"
        self._sock.close()
        self._proc.returncode = 0  # not this process's child: never waited for here


_WORKER: NoiseWorker | None = None  # this process's own (a forked child drops its parent's: _after_fork)
_START_LOCK = threading.Lock()
_AVAILABLE = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def worker() -> NoiseWorker | None:
    """This process's noise worker, started on first use; None where unavailable or after it failed."""
    global _WORKER
    if not _AVAILABLE:
        return None
    with _START_LOCK:
        if _WORKER is None:
            try:
                _WORKER = NoiseWorker()
            except OSError:
                return None
        return None if _WORKER.failed is not None else _WORKER


def shutdown() -> None:
    """Close this process's worker, if it started one (at exit)."""
    global _WORKER
    with _START_LOCK:
        w, _WORKER = _WORKER, None
    if w is not None:
        w.close()


def _after_fork() -> None:
    """In a forked child: the parent's worker is not ours; a new one starts when needed."""
    global _WORKER, _START_LOCK
    _START_LOCK = threading.Lock()
    w, _WORKER = _WORKER, None
    if w is not None:
        w.forget()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def serve(fd: int) -> None:
    """The worker's loop (in the child): each request's values into its memfd, then the reply, until end of file."""
    import importlib.util
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    spec = importlib.util.spec_from_file_location("privfl_noise_kernel",
                                                  os.path.join(os.path.dirname(__file__), "gaussian.py"))
    assert spec is not None and spec.loader is not None
    kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel)
    stream = kernel.KeyStream()
    sock = socket.socket(fileno=fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _REQUEST.size, 1)
        except OSError:
            return
        if not msg:
            return  # the parent closed its end
        status, ticket = 1, -1
        try:
            ticket, n, std, code = _REQUEST.unpack(msg)
            dtype = _DTYPES[code]
            with mmap.mmap(fds[0], max(1, n * np.dtype(dtype).itemsize)) as buffer:
                out = np.frombuffer(buffer, dtype=dtype, count=n)
                kernel.standard_normal(stream, n, std, dtype, out=out)
                del out
            status = 0
        except Exception as exc:  # answered, not fatal: the parent draws this batch itself
            print(f"privfl noise worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            for f in fds:
                os.close(f)
        try:
            sock.sendall(_REPLY.pack(ticket, status))
        except OSError:
            return


if __name__ == "__main__":
    serve(int(sys.argv[1]))
