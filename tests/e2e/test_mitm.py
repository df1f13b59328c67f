"""THE ATTACK of the security review: a TCP proxy splices node A's connection to a rogue server.

A man in the middle (a TCP proxy on 127.0.0.1, in this test) sits at the address the
roster gives for B. It first forwards to the genuine B (the exchange works), then drops
the connections and forwards every new one to a rogue gRPC server (a separate process
running a modified privfl) that holds either B's *revoked* old certificate and key, a
fresh CA-signed certificate naming B that is not the roster pin, or the pinned
certificate of B without its key. In every case A's exchange fails with a logged reason
naming the peer, the address and why; the rogue receives A's request header but not one
body byte (A streams its model only after the server's signed accept verified), and A
applies nothing. The reverse direction (B calling A through a proxy to a rogue A) too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from privfl.launch import free_ports
from privfl.peer_network import GrpcPeerNetwork
from privfl.pki import (
    NodeIdentity,
    init_consortium,
    issue_node,
    load_certificate,
    load_pki,
    load_private_key,
    make_node_cert,
)
from privfl.strategies.base import ModelMessage

pytestmark = pytest.mark.timeout(120)

NAMES = ["w"]
REPO = Path(__file__).resolve().parents[2]

ROGUE = r'''
"""A rogue gossip server: modified privfl that answers with its own signature and model."""
import json, sys, time
from concurrent import futures
import grpc, numpy as np
from privfl.transport import Message, Signer, encode_message, iter_chunks
from privfl.transport.common import METHOD, grpc_options
from privfl.transport.proto import gossip_pb2 as pb

cert_pem, key_pem, ca_pem = (open(p, "rb").read() for p in sys.argv[1:4])
port_file, record_file, mode, claimed_cert = sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
signer = Signer(key_pem, cert_pem)
header_cert = open(claimed_cert, "rb").read() if mode == "claims_pin" else signer.certificate_der
seen = {"header": 0, "data": 0, "trailer": 0, "data_bytes": 0, "calls": 0}

def save():
    with open(record_file + ".tmp", "w") as f:
        json.dump(seen, f)
    import os; os.replace(record_file + ".tmp", record_file)

def chunks_of(msg, sender, recipient, seq, in_reply_to):
    enc = encode_message(msg, sender, recipient, seq, in_reply_to, certificate=header_cert,
                         seal=lambda h, d: signer.seal(h, d, (1, b"\x22" * 32)))
    return list(iter_chunks(enc))

def exchange(request_iterator, context):
    seen["calls"] += 1
    req = None
    for raw in request_iterator:
        c = pb.Chunk.FromString(raw)  # wire version 2: one Chunk may carry header, data and trailer
        for part in ("header", "data", "trailer"):
            seen[part] += int(bool(c.data) if part == "data" else c.HasField(part))
        seen["data_bytes"] += len(c.data)
        save()
        if c.HasField("header"):
            req = c.header
            if mode != "no_accept":
                yield from chunks_of(Message("accept"), req.recipient, req.sender, time.time_ns() // 1000, req.sequence)
        if c.HasField("trailer"):
            break
    if req is None:
        return
    rogue = {"w": np.full(4, 7.0, np.float32)}
    yield from chunks_of(Message("exchange_reply", req.round, rogue), req.recipient, req.sender,
                         time.time_ns() // 1000, req.sequence)

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options())
service, method = METHOD.rsplit("/", 1)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    service.lstrip("/"), {method: grpc.stream_stream_rpc_method_handler(exchange)}),))
creds = grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
save()
open(port_file, "w").write(str(port))
server.wait_for_termination()
'''


class Proxy:
    """A TCP man in the middle on 127.0.0.1: forwards each new connection to ``target`` (switchable)."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", port))
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def switch(self, target: int) -> None:
        """Send new connections to ``target`` and cut the current ones (the client reconnects)."""
        self.target = target
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.switch(self.target)


class Keeper:
    """A minimal strategy: replies to an exchange with its model, then averages (records what it saw)."""

    def __init__(self, node_id: str, value: float) -> None:
        self.node_id = node_id
        self.params = [np.full(4, value, np.float32)]
        self.seen: list[str] = []

    def handle_exchange(self, sender: str, message: ModelMessage) -> ModelMessage:
        self.seen.append(sender)
        reply = ModelMessage(self.node_id, message.round, "exchange_reply", params=[p.copy() for p in self.params])
        self.params = [(p + q) / 2 for p, q in zip(self.params, message.params or [])]
        return reply

    def frame_shapes(self, round: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        return shapes  # NodeStrategy's default: frames on the model's shapes

    def handle_message(self, sender: str, message: ModelMessage) -> None:
        self.seen.append(sender)


def _pem(obj) -> bytes:  # noqa: ANN001
    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


def _rogue_identity(d: Path, victim: str, kind: str, out: Path) -> tuple[Path, Path]:
    """Certificate and key files the rogue holds for ``victim``."""
    out.mkdir(parents=True, exist_ok=True)
    if kind in ("revoked_old", "claims_pin"):
        return d / f"{victim}.old" / "node.pem", d / f"{victim}.old" / "node.key"
    ca = load_certificate((d / "ca.pem").read_bytes())
    cert, key = make_node_cert(ca, load_private_key((d / "ca.key").read_bytes()), "mitm", victim)
    (out / "node.pem").write_bytes(_pem(cert))
    (out / "node.key").write_bytes(_pem(key))
    return out / "node.pem", out / "node.key"


@pytest.fixture()
def consortium(tmp_path: Path):  # noqa: ANN201
    """PKI with A and B behind proxy addresses; each node's old certificate kept, then revoked by re-issue."""
    d = tmp_path / "pki"
    pa, pb_, la, lb = free_ports(4)
    init_consortium("mitm", ["a", "b"], d, addresses={"a": f"127.0.0.1:{pa}", "b": f"127.0.0.1:{pb_}"})
    for n in ("a", "b"):
        old = d / f"{n}.old"
        old.mkdir()
        for f in ("node.pem", "node.key"):
            (old / f).write_bytes((d / n / f).read_bytes())
        issue_node(d, n, f"127.0.0.1:{pa if n == 'a' else pb_}")  # the old certificate is now revoked
    ca, roster, crl = load_pki(d)
    nets, keepers = {}, {}
    for n, listen, v in (("a", la, 1.0), ("b", lb, 3.0)):
        net = GrpcPeerNetwork(NodeIdentity.load(d / n), roster, crl, ["b" if n == "a" else "a"], NAMES,
                              [np.zeros(4, np.float32)], listen=f"127.0.0.1:{listen}", timeout=5.0)
        keepers[n] = Keeper(n, v)
        net.attach(keepers[n])  # type: ignore[arg-type]
        net.start()
        nets[n] = net
    proxies = {"a": Proxy(pa, la), "b": Proxy(pb_, lb)}
    yield d, nets, keepers, proxies
    for p in proxies.values():
        p.close()
    for net in nets.values():
        net.close()


def _start_rogue(d: Path, tmp: Path, victim: str, kind: str) -> tuple[subprocess.Popen, int, Path]:
    cert, key = _rogue_identity(d, victim, kind, tmp / "rogue-id")
    port_file, record = tmp / "rogue.port", tmp / "rogue.json"
    script = tmp / "rogue.py"
    script.write_text(ROGUE)
    mode = kind if kind in ("claims_pin", "no_accept") else "own"
    pinned_der = load_certificate((d / victim / "node.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
    (tmp / "pinned.der").write_bytes(pinned_der)
    proc = subprocess.Popen([sys.executable, str(script), str(cert), str(key), str(d / "ca.pem"), str(port_file),
                             str(record), mode, str(tmp / "pinned.der")], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "rogue did not start"
        time.sleep(0.05)
    return proc, int(port_file.read_text()), record


REASONS = {"revoked_old": ("is revoked",), "unpinned": ("does not match the roster pin",),
           "claims_pin": ("does not verify",),
           # the client's deadline, or -- when the rogue answers after A gave up waiting -- its reply in place
           # of an accept
           "no_accept": ("DEADLINE_EXCEEDED", "unknown message kind 'exchange_reply'")}


@pytest.mark.parametrize("caller, victim", [("a", "b"), ("b", "a")])
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_proxy_to_a_rogue_server_gets_nothing_and_nothing_is_applied(
        consortium, tmp_path: Path, caplog: pytest.LogCaptureFixture,  # noqa: ANN001
        caller: str, victim: str, kind: str) -> None:
    d, nets, keepers, proxies = consortium
    caplog.set_level(logging.INFO, logger="privfl.transport")
    net = nets[caller]
    net.timeout = 3.0
    mine = [np.full(4, 5.0, np.float32)]
    # through the proxy to the genuine peer: works
    got = net.exchange(victim, ModelMessage(caller, 0, "exchange_request", params=mine))
    assert got is not None and keepers[victim].seen == [caller]
    proc, port, record = _start_rogue(d, tmp_path, victim, kind)
    try:
        proxies[victim].switch(port)
        for attempt in range(5):  # the first call may hit the connection the proxy just cut
            net.client.backoff.success(victim)
            got = net.exchange(victim, ModelMessage(caller, 1 + attempt, "exchange_request", params=mine))
            assert got is None  # nothing to apply
            seen = json.loads(record.read_text())
            if seen["calls"]:
                break
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert seen["calls"] >= 1 and seen["header"] >= 1, seen  # the attack really reached the rogue
    assert seen["data"] == 0 and seen["data_bytes"] == 0 and seen["trailer"] == 0, seen  # no model sent
    assert keepers[victim].seen == [caller]  # the genuine peer saw only the first exchange
    lines = [r.getMessage() for r in caplog.records if f"node {caller}:" in r.getMessage()
             and victim in r.getMessage()]
    assert any(any(r in m for r in REASONS[kind]) and f"127.0.0.1:{proxies[victim].sock.getsockname()[1]}" in m
               for m in lines), lines
    # the rogue holds B's name, not B's identity: A does not block the genuine peer for it
    assert victim not in net.client.blocked()
