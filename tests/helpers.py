"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner, Result

from privfl.clients import DPClient, DPConfig
from privfl.models import build_model


def dp_clients(sites, target_eps=(50.0, 50.0, 50.0)) -> dict[str, DPClient]:
    """One logreg DPClient per site (σ = 1, batch 32), named h0, h1, …"""
    out = {}
    for i, (s, eps) in enumerate(zip(sites, target_eps)):
        cfg = DPConfig(noise_multiplier=1.0, batch_size=32, sample_rate=32 / len(s.train), lr=0.5, target_epsilon=eps)
        model = build_model("logreg", s.train.x.shape[1:], 2, seed=0)
        out[f"h{i}"] = DPClient(model, (s.train.x, s.train.y), (s.test.x, s.test.y), cfg, seed=i)
    return out


def run_in_threads(targets: Iterable[Callable[[], Any]], timeout: float = 10.0) -> None:
    """Run every target in its own daemon thread at once (as real nodes step), and fail if any is
    still running after ``timeout`` seconds."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)


def run_in_fork(child: Callable[[], bytes], timeout: float = 30.0) -> bytes:
    """Fork; the child runs ``child`` and writes what it returns to a pipe, then exits at once
    (``os._exit``). Returns those bytes; fails if the child exits non-zero or says nothing in time."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            data = child()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            assert ready, "the forked child did not answer"
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert status == 0, f"the forked child exited with status {status}"
    return out


def patched_copy(src: Path, dest: Path, replacements: Iterable[tuple[str, str]]) -> Path:
    """Write ``src`` to ``dest`` with each (old, new) replaced; every ``old`` must occur (so edits can't go stale)."""
    text = src.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


_main_registered = False


def invoke_main(args: list[str], **kwargs: Any) -> Result:
    """Run ``privfl <args>`` in-process through typer's runner (sub-commands registered once)."""
    global _main_registered
    from privfl.cli import _register, app

    if not _main_registered:
        _register()
        _main_registered = True
    return CliRunner().invoke(app, args, **kwargs)


def audit_cli() -> typer.Typer:
    """A typer app with ``privfl audit`` as its only group (what the console entry registers)."""
    from privfl.cli import audit

    main = typer.Typer()
    main.add_typer(audit.app, name="audit")

    @main.command()
    def version() -> None:  # a second command so that `main` stays a group
        typer.echo("0")

    return main


#: ``python -c STALLER NODE_DIR CA ADDRESS TARGET CONSORTIUM SENDER N``: a roster member opens N
#: gRPC streams to TARGET that each send one valid signed header and then stall; prints one
#: status code per stream as it ends, then DONE. For the stalled-stream tests.
STALLER = r'''
import sys, threading, time
import grpc, numpy as np
from privfl.pki import NodeIdentity, node_dns_name
from privfl.transport import Message, Signer, encode_message, iter_chunks
from privfl.transport.common import METHOD, grpc_options

node_dir, ca, address, target, consortium, sender, n = sys.argv[1:8]
idn = NodeIdentity.load(node_dir, ca)
signer = Signer(idn.key_pem, idn.cert_pem)
creds = grpc.ssl_channel_credentials(idn.ca_pem, idn.key_pem, idn.cert_pem)
ch = grpc.secure_channel(address, creds, options=grpc_options([
    ("grpc.ssl_target_name_override", node_dns_name(consortium, target)), ("grpc.use_local_subchannel_pool", 1)]))
grpc.channel_ready_future(ch).result(timeout=20)

def stall(i):
    enc = encode_message(Message("model", 0, {"w": np.zeros(16, np.float32)}), sender, target,
                         time.time_ns() // 1000, certificate=signer.certificate_der,
                         seal=lambda h, d: signer.seal(h, d, None))
    first = next(iter_chunks(enc, header_alone=True))  # the header alone: wire v2 packs the rest with it
    def requests():
        yield first
        time.sleep(3600)  # a valid header, then nothing
    t0 = time.monotonic()
    try:
        for _ in ch.stream_stream(METHOD)(requests()):
            pass
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    print(code, round(time.monotonic() - t0, 2), flush=True)

threads = [threading.Thread(target=stall, args=(i,), daemon=True) for i in range(int(n))]
for t in threads:
    t.start()
    time.sleep(0.05)
for t in threads:
    t.join()
print("DONE", flush=True)
'''


def fill_disk(filler: Path) -> None:
    """Write ``filler`` until its filesystem is full (unbuffered: nothing is left to flush later)."""
    import errno
    import os

    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


#: a tiny experiment (3 breast-cancer sites, logreg, 12 steps): ``TINY_EXPERIMENT.format(seed=0)``
TINY_EXPERIMENT = """
name = "tiny"

[data]
source = "breast_cancer"
num_sites = 3
partitioning = "iid"
scaling = "public"
seed = {seed}

[model]
name = "logreg"

[dp]
clipping = "flat"
noise_multiplier = 1.0
target_epsilon = 50.0
batch_size = 16
sample_rate = 0.1
lr = 0.2

[topology]
kind = "complete"

[strategy]
name = "async_gossip"
local_steps = 4

[stop]
max_steps = 12
max_seconds = 0

[simulation]
eval_every = 0.01
"""


class SlowLink:
    """A TCP relay on 127.0.0.1 in front of ``target_port`` that holds back every byte the server
    sends by ``delay`` seconds: a long link (a far site, a satellite hop) on one machine. The TLS
    handshake and every reply take that long more; the bytes arrive whole and in order. ``close``
    ends it and every connection it relays (threads are daemons, joined for a bounded time)."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="slow-link-accept")]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                near, _ = self._listener.accept()
            except OSError:  # timeout, or closed
                continue
            far = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [near, far]
            for src, dst, delay in ((near, far, 0.0), (far, near, self.delay)):
                t = threading.Thread(target=self._pump, args=(src, dst, delay), daemon=True, name="slow-link")
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        """Read ``src`` and hand each piece, with its due time, to a writer that sends it to ``dst`` then."""
        pieces: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def deliver() -> None:
            while (item := pieces.get()) is not None:
                due, data = item
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    return

        out = threading.Thread(target=deliver, daemon=True, name="slow-link-deliver")
        out.start()
        while not self._closed.is_set():
            try:
                data = src.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            pieces.put((time.monotonic() + delay, data))
        pieces.put(None)
        out.join(timeout=5 + delay)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> SlowLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
