"""Running nodes over real mTLS on 127.0.0.1: live revocation, stalled streams, a second bind,
absurd values, refused kinds and scalars, ledger heads and head queries."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privfl.launch import free_ports
from privfl.peer_network import GrpcPeerNetwork
from privfl.pki import NodeIdentity, init_consortium, load_pki, revoke_node
from privfl.strategies.base import ModelMessage
from privfl.transport import GossipServer, Message, PeerRefused, TransportError
from privfl.transport.proto import gossip_pb2 as pb
from privfl.transport.signing import Signer
from tests.helpers import STALLER

pytestmark = pytest.mark.timeout(90)

NAMES = ["w"]
REPO = Path(__file__).resolve().parents[2]
D = 16


class Keeper:
    """A minimal strategy: replies to an exchange with its model, then averages; keeps what it got."""

    def __init__(self, node_id: str, value: float) -> None:
        self.node_id = node_id
        self.params = [np.full(D, value, np.float32)]
        self.seen: list[tuple[str, str]] = []
        self.reply_with: list[np.ndarray] | None = None

    def handle_exchange(self, sender: str, message: ModelMessage) -> ModelMessage:
        self.seen.append((sender, message.kind))
        out = self.reply_with or [p.copy() for p in self.params]
        self.params = [(p + q) / 2 for p, q in zip(self.params, message.params or [])]
        return ModelMessage(self.node_id, message.round, "exchange_reply", params=out)

    def frame_shapes(self, round: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        return shapes  # NodeStrategy's default: frames on the model's shapes

    def handle_message(self, sender: str, message: ModelMessage) -> None:
        self.seen.append((sender, message.kind))


class Cluster:
    """Networks a, b, c on loopback; each with the PKI's CRL and roster files watched."""

    def __init__(self, root: Path, poll: float = 0.2, **kw: object) -> None:
        ids = ["a", "b", "c"]
        ports = free_ports(3)
        self.dir = root
        init_consortium("live", ids, root, addresses={n: f"127.0.0.1:{p}" for n, p in zip(ids, ports)})
        _ca, roster, crl = load_pki(root)
        self.heads: dict[str, list[tuple[str, int, bytes]]] = {n: [] for n in ids}
        self.proofs: dict[tuple[str, str, int], bytes] = {}  # (holder, peer, index) -> the peer's head signature
        self.nets: dict[str, GrpcPeerNetwork] = {}
        self.keepers: dict[str, Keeper] = {}
        for i, n in enumerate(ids):
            net = GrpcPeerNetwork(
                NodeIdentity.load(root / n), roster, crl, [m for m in ids if m != n], NAMES,
                [np.zeros(D, np.float32)], timeout=3.0, crl_path=root / "crl.pem", roster_path=root / "roster.toml",
                trust_poll=poll, ledger_head=lambda i=i: (10 + i, bytes([i]) * 32),
                on_peer_head=lambda p, idx, h, sig, n=n: self._held(n, p, idx, h, sig),
                head_for=lambda p, n=n: next(((idx, h, self.proofs[(n, p, idx)]) for q, idx, h
                                              in reversed(self.heads[n]) if q == p), None),
                **kw)  # type: ignore[arg-type]
            self.keepers[n] = Keeper(n, float(i + 1))
            net.attach(self.keepers[n])  # type: ignore[arg-type]
            net.start()
            self.nets[n] = net

    def _held(self, holder: str, peer: str, idx: int, h: bytes, sig: bytes) -> None:
        self.heads[holder].append((peer, idx, h))
        self.proofs[(holder, peer, idx)] = sig

    def exchange(self, a: str, b: str, value: float = 2.0) -> ModelMessage | None:
        self.nets[a].client.backoff.success(b)
        return self.nets[a].exchange(b, ModelMessage(a, 0, "exchange_request", params=[np.full(D, value, np.float32)]))

    def close(self) -> None:
        for net in self.nets.values():
            net.close()


@pytest.fixture()
def cluster(tmp_path: Path):  # noqa: ANN201
    c = Cluster(tmp_path / "pki")
    yield c
    c.close()


def _wait(pred, timeout: float) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- live revocation


def test_revoked_peer_is_refused_within_seconds_in_both_directions(cluster: Cluster,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert cluster.exchange("a", "b") is not None and cluster.exchange("b", "a") is not None
    revoke_node(cluster.dir, "b")  # `privfl pki revoke b`: the CRL file changes, nobody restarts
    t0 = time.monotonic()
    # a's client re-checks b's last certificate under the new CRL: no new call goes to b
    _wait(lambda: "b" in cluster.nets["a"].client.blocked(), 5.0)
    assert cluster.exchange("a", "b") is None
    # a's server refuses b's next call
    n = len(cluster.keepers["a"].seen)
    assert cluster.exchange("b", "a") is None
    assert len(cluster.keepers["a"].seen) == n
    assert time.monotonic() - t0 < 8.0
    # a and c still gossip
    assert cluster.exchange("a", "c") is not None and cluster.exchange("c", "a") is not None
    for _ in range(3):
        cluster.exchange("b", "a")
        cluster.exchange("a", "b")
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("node a: peer b refused from now on" in m for m in msgs) == 1, msgs
    assert sum(m.startswith("node a: refused ipv4:127.0.0.1") and "revoked" in m for m in msgs) == 1, msgs
    assert any("node a: trust reloaded" in m for m in msgs)


def test_a_bad_crl_file_keeps_the_previous_one(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="privfl.transport")
    from cryptography.hazmat.primitives import serialization

    from privfl.pki import make_ca, make_crl
    other, other_key = make_ca("live")  # a CRL signed by another CA must not replace ours
    (cluster.dir / "crl.pem").write_bytes(make_crl(other, other_key).public_bytes(serialization.Encoding.PEM))
    _wait(lambda: any("cannot reload the crl" in r.getMessage() and "not signed by the consortium CA"
                      in r.getMessage() for r in caplog.records), 5.0)
    assert cluster.exchange("a", "b") is not None
    assert cluster.nets["a"].reload_trust() is False


# --------------------------------------------------------------------------- ledger heads


def test_ledger_heads_travel_signed_and_head_query_answers(cluster: Cluster) -> None:
    assert cluster.exchange("a", "b") is not None
    assert ("a", 10, bytes([0]) * 32) in cluster.heads["b"]  # the request's head, at b
    assert ("b", 11, bytes([1]) * 32) in cluster.heads["a"]  # the reply's head, at a
    assert cluster.nets["c"].notify("hello", ["a"]) == {"a"}
    assert ("c", 12, bytes([2]) * 32) in cluster.heads["a"]  # notifications too
    # b holds a's head (10, 0x00..): a asks b for it
    assert cluster.nets["a"].query_head("b") == (10, bytes([0]) * 32)
    assert cluster.nets["b"].query_head("c") is None  # c holds nothing of b


def test_a_made_up_head_in_a_head_reply_is_ignored(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The restart DoS: c, a member gone rogue, answers a's head query with a head of a's that
    a never sent (a huge index, to make a believe its ledger was cut short and refuse to
    train), with no signature, with c's own signature, or a's real signature moved to
    another index. a must see each as made up (None, one warning), and still accept the
    head it really sent, with its own signature."""
    assert cluster.exchange("a", "c") is not None  # c now holds a's real head (10, 0x00..) and its proof
    real_idx, real_hash, real_sig = cluster.nets["c"].head_for("a")  # type: ignore[misc]
    assert (real_idx, real_hash) == (10, bytes([0]) * 32) and len(real_sig) == 64
    assert cluster.nets["a"].query_head("c") == (10, bytes([0]) * 32)
    c_key = NodeIdentity.load(cluster.dir / "c")
    forged_by_c = Signer(c_key.key_pem, c_key.cert_pem).head_signature("a", (10**6, b"\x07" * 32))
    forgeries = {
        "unsigned": (10**6, b"\x07" * 32, b""),
        "signed by c": (10**6, b"\x07" * 32, forged_by_c),
        "a's signature moved": (10**6, real_hash, real_sig),
        "random bytes": (10**6, b"\x07" * 32, os.urandom(64)),
    }
    for name, forged in forgeries.items():
        cluster.nets["c"].head_for = lambda p, f=forged: f  # type: ignore[assignment, misc]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="privfl.node"):
            assert cluster.nets["a"].query_head("c") is None, name
        assert any("never signed" in r.getMessage() and "1000000" in r.getMessage() for r in caplog.records), name


def test_reply_sequences_reveal_neither_the_start_time_nor_the_replies_served(cluster: Cluster) -> None:
    """A curious peer a reads b's reply sequence numbers: they were b's start time in µs plus
    the count of replies b had served (to c too). Now each is the clock when it is sent."""
    from privfl.peer_network import HEAD_QUERY_KIND, HEAD_SPEC

    def reply_seq() -> int:
        cluster.nets["a"].client.backoff.success("b")
        return cluster.nets["a"].client.exchange("b", Message(kind=HEAD_QUERY_KIND), expected=HEAD_SPEC).sequence

    time.sleep(0.3)
    before = time.time_ns() // 1000
    first = reply_seq()
    assert first >= before  # not b's start time (0.3 s earlier)
    for _ in range(20):  # b serves c twenty times between a's two queries
        assert cluster.nets["c"].notify("hello", ["b"]) == {"b"}
    second = reply_seq()
    assert second - first != 21 and second - first > 1000  # no count of b's replies, only time passed


# --------------------------------------------------------------------------- values, kinds, scalars


def test_absurd_values_are_refused_and_a_legitimate_model_accepted(cluster: Cluster,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="privfl.node")
    before = [p.copy() for p in cluster.keepers["b"].params]
    assert cluster.exchange("a", "b", value=3e38) is None  # request direction
    np.testing.assert_array_equal(cluster.keepers["b"].params[0], before[0])
    assert "a" in cluster.nets["b"].refused_values
    assert any("node b: refused exchange_request from a" in r.getMessage() and "max_abs_value" in r.getMessage()
               for r in caplog.records)
    cluster.keepers["b"].reply_with = [np.full(D, 3e38, np.float32)]  # reply direction
    assert cluster.exchange("a", "b") is None
    assert "b" in cluster.nets["a"].refused_values
    cluster.keepers["b"].reply_with = [np.full(D, 5e3, np.float32)]  # finite, below max_abs, norm far too big
    assert cluster.exchange("a", "b") is None
    assert "L2 norm" in cluster.nets["a"].refused_values["b"]
    cluster.keepers["b"].reply_with = None
    legit = np.random.default_rng(0).normal(0, 3.0, D).astype(np.float32)  # a noisy DP-sized model
    got = cluster.exchange("a", "b", value=0.0)
    assert got is not None
    cluster.keepers["b"].reply_with = [legit]
    got = cluster.exchange("a", "b")
    assert got is not None and got.params is not None
    np.testing.assert_array_equal(got.params[0], legit)


def _raw_signed(sender: Path, header: pb.Header) -> list[bytes]:
    idn = NodeIdentity.load(sender)
    signer = Signer(idn.key_pem, idn.cert_pem)
    header.sender_certificate = signer.certificate_der
    import hashlib
    digest = hashlib.sha256(b"privfl-model-v1\n\n").digest()
    return [pb.Chunk(header=header).SerializeToString(),
            pb.Chunk(trailer=signer.seal(header, digest, None)).SerializeToString()]


@pytest.mark.parametrize("case, reason", [
    ("unknown_kind", "unknown message kind"),
    ("model_without_tensors", "carries no tensors"),
    ("huge_scalar_key", "exceeds"),
    ("long_scalar_key", "invalid scalar name"),
    ("many_scalars", "too many scalars"),
])
def test_bad_kinds_and_scalars_are_refused_not_acked(cluster: Cluster, caplog: pytest.LogCaptureFixture,
                                                     case: str, reason: str) -> None:
    import grpc

    from privfl.transport import WIRE_VERSION
    from privfl.transport.common import METHOD, grpc_options
    caplog.set_level(logging.WARNING, logger="privfl.transport")
    a = cluster.nets["a"]
    if case in ("unknown_kind", "model_without_tensors"):
        kind = "gimme" if case == "unknown_kind" else "model"
        with pytest.raises(PeerRefused, match="INVALID_ARGUMENT"):
            a.client.send("b", Message(kind=kind), timeout=3.0)
    else:
        h = pb.Header(version=WIRE_VERSION, sender="a", recipient="b", sequence=time.time_ns() // 1000, kind="hello")
        if case == "huge_scalar_key":
            h.scalars["k" * (4 << 20)] = 1.0
        elif case == "long_scalar_key":
            h.scalars["k" * 65] = 1.0
        else:
            for i in range(65):
                h.scalars[f"s{i}"] = 1.0
        idn = NodeIdentity.load(cluster.dir / "a")
        creds = grpc.ssl_channel_credentials(idn.ca_pem, idn.key_pem, idn.cert_pem)
        with grpc.secure_channel(cluster.nets["b"].server.address, creds, options=grpc_options([
                ("grpc.ssl_target_name_override", "b.live.privfl")])) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(ch.stream_stream(METHOD)(iter(_raw_signed(cluster.dir / "a", h)), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not cluster.keepers["b"].seen and not cluster.nets["b"].heard("hello")
    assert any("node b: refused message from a" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# --------------------------------------------------------------------------- second bind


SECOND = r'''
import sys
from privfl.pki import NodeIdentity, load_pki
from privfl.transport import GossipServer, TransportError
ca, roster, crl = load_pki(sys.argv[1])
srv = GossipServer(NodeIdentity.load(sys.argv[1] + "/a"), roster, crl, lambda s, m: None)
try:
    srv.start()
except TransportError as exc:
    print("REFUSED", exc)
    sys.exit(3)
print("BOUND")
srv.stop(0)
'''


def test_the_same_identity_started_twice_cannot_bind(cluster: Cluster) -> None:
    addr = cluster.nets["a"].server.address
    with pytest.raises(TransportError, match=f"cannot bind {addr}"):  # same process
        GossipServer(NodeIdentity.load(cluster.dir / "a"), cluster.nets["a"].roster,
                     (cluster.dir / "crl.pem").read_bytes(), lambda s, m: None).start()
    proc = subprocess.run([sys.executable, "-c", SECOND, str(cluster.dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert f"cannot bind {addr}" in proc.stdout
    assert cluster.exchange("b", "a") is not None  # the first one still serves


# --------------------------------------------------------------------------- stalled streams




@pytest.mark.parametrize("cap", [4, 16])
def test_ten_stalled_streams_do_not_starve_a_legitimate_peer(tmp_path: Path, cap: int,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="privfl.transport")
    cluster = Cluster(tmp_path / "pki", stream_timeout=2.0, max_calls_per_peer=cap)
    proc = subprocess.Popen([sys.executable, "-c", STALLER, str(cluster.dir / "c"), str(cluster.dir / "ca.pem"),
                             cluster.nets["a"].server.address, "a", "live", "c", "10"], cwd=REPO,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(1.0)  # the stalled streams are open (python start-up + handshakes)
        t0 = time.monotonic()
        for i in range(5):  # b's calls complete within their deadline meanwhile
            assert cluster.exchange("b", "a") is not None, i
        assert time.monotonic() - t0 < 3.0
        out, err = proc.communicate(timeout=30)
        cancelled = cluster.nets["a"].server.deadline_cancellations
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        cluster.close()
    lines = [ln.split() for ln in out.splitlines() if ln and ln != "DONE"]
    assert "DONE" in out, (out, err)
    codes = [c for c, _ in lines]
    admitted = min(cap, 10)
    assert codes.count("CANCELLED") == admitted, (codes, err)  # ended by the server deadline
    assert codes.count("RESOURCE_EXHAUSTED") == 10 - admitted, codes  # the per-peer cap
    assert all(float(t) < 6.0 for c, t in lines if c == "CANCELLED"), lines
    assert cancelled == admitted
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("node a: call from c" in m and "exceeded the server deadline of 2.0 s" in m for m in msgs) == admitted
    if admitted < 10:
        assert any("node a: refused a call from c" in m and f"(cap {cap})" in m for m in msgs)
