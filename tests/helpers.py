"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import select
import threading
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
