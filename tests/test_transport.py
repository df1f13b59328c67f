"""mTLS gossip transport on 127.0.0.1: real handshakes, refusals, validation, replay, 10 MB."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from privfl.pki import (
    NodeIdentity,
    Roster,
    RosterNode,
    fingerprint,
    init_consortium,
    load_certificate,
    load_pki,
    load_private_key,
    make_ca,
    make_node_cert,
    revoke_node,
)
from privfl.transport import (
    WIRE_VERSION,
    AuthenticationFailed,
    DecodedMessage,
    GossipClient,
    GossipServer,
    Message,
    PeerBackoff,
    PeerRefused,
    PeerUnavailable,
    Signer,
    SparseTensor,
    TensorExpectation,
    TransportError,
    encode_message,
    iter_chunks,
    model_digest,
)
from privfl.transport.common import METHOD, grpc_options
from privfl.transport.proto import gossip_pb2 as pb
from tests.helpers import SlowLink
from tests.test_transport_codec import retrail
from tests.test_transport_digest import _prefix_bytes, counted  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(60)

SPEC = {"w": TensorExpectation((64, 8), "<f4"), "b": TensorExpectation((8,), "<f4")}
LOG = "privfl.transport"


def _pem(obj) -> bytes:  # noqa: ANN001
    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class Pki:
    dir: Path
    ca_pem: bytes
    roster: Roster
    crl: bytes
    rogue: dict[str, NodeIdentity]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("demo", ["h1", "h2", "h3", "h4", "h5"], d, base_port=1)
    revoke_node(d, "h4")
    ca_pem, roster, crl = load_pki(d)
    ca_cert, ca_key = load_certificate(ca_pem), load_private_key((d / "ca.key").read_bytes())
    rogue: dict[str, NodeIdentity] = {}
    other_ca, other_key = make_ca("demo")
    c, k = make_node_cert(other_ca, other_key, "demo", "h1")
    rogue["other_ca"] = NodeIdentity("h1", _pem(c), _pem(k), ca_pem)
    now = dt.datetime.now(dt.UTC)
    c, k = make_node_cert(ca_cert, ca_key, "demo", "h6", not_before=now - dt.timedelta(days=10),
                          not_after=now - dt.timedelta(days=1))
    rogue["expired"] = NodeIdentity("h6", _pem(c), _pem(k), ca_pem)
    c, k = make_node_cert(ca_cert, ca_key, "demo", "h9")
    rogue["stranger"] = NodeIdentity("h9", _pem(c), _pem(k), ca_pem)
    c, k = make_node_cert(ca_cert, ca_key, "demo", "h1")
    rogue["twin"] = NodeIdentity("h1", _pem(c), _pem(k), ca_pem)
    # the expired certificate is pinned in the roster: only its validity can refuse it
    nodes = {**roster.nodes, "h6": RosterNode("h6", "127.0.0.1:1", fingerprint(rogue["expired"].cert_pem))}
    return Pki(d, ca_pem, Roster("demo", nodes, roster.policy), crl, rogue)


def ident(pki: Pki, node: str) -> NodeIdentity:
    return NodeIdentity.load(pki.dir / node)


def at(roster: Roster, node: str, port: int) -> Roster:
    nodes = dict(roster.nodes)
    nodes[node] = dataclasses.replace(nodes[node], address=f"127.0.0.1:{port}")
    return dataclasses.replace(roster, nodes=nodes)


def model(seed: int = 0, **changes: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = {"w": rng.standard_normal((64, 8)).astype(np.float32), "b": np.zeros(8, np.float32)}
    m.update(changes)
    return m


class Averager:
    """Pairwise averaging handler: reply with own model, then average."""

    def __init__(self) -> None:
        self.model = model(1)
        self.seen: list[DecodedMessage] = []

    def __call__(self, sender: str, msg: DecodedMessage) -> Message | None:
        self.seen.append(msg)
        if msg.kind == "boom":
            raise RuntimeError("handler bug")
        if msg.kind != "exchange_request":
            return None
        reply = Message("exchange_reply", msg.round, dict(self.model))
        self.model = {k: (self.model[k] + msg.tensors[k]) / 2 for k in self.model}
        return reply


@pytest.fixture()
def server(pki: Pki) -> Iterator[tuple[GossipServer, Roster, Averager]]:
    handler = Averager()
    srv = GossipServer(ident(pki, "h2"), pki.roster, pki.crl, handler, address="127.0.0.1:0",
                       expected_spec=SPEC, max_message_bytes=1 << 20)
    port = srv.start()
    try:
        yield srv, at(pki.roster, "h2", port), handler
    finally:
        srv.stop(grace=0)


def client(pki: Pki, identity: NodeIdentity | str, roster: Roster, **kw) -> GossipClient:  # noqa: ANN003
    idn = ident(pki, identity) if isinstance(identity, str) else identity
    return GossipClient(idn, roster, pki.crl, expected_spec=SPEC, default_timeout=10, **kw)


def assert_serves(pki: Pki, roster: Roster, node: str = "h1") -> None:
    with client(pki, node, roster) as c:
        reply = c.exchange("h2", Message("exchange_request", 1, model(5)), timeout=10)
    assert reply.sender == "h2" and reply.kind == "exchange_reply"
    assert set(reply.tensors) == {"w", "b"}


def signed(pki: Pki, msg: Message, sender: str, recipient: str, seq: int, key_of: str | None = None):  # noqa: ANN201
    """``msg`` encoded and signed as ``sender`` would (with ``key_of``'s certificate and key if given)."""
    idn = ident(pki, key_of or sender)
    signer = Signer(idn.key_pem, idn.cert_pem)
    return encode_message(msg, sender, recipient, seq, certificate=signer.certificate_der,
                          seal=lambda h, d: signer.seal(h, d, None))


def raw_stub(pki: Pki, identity: NodeIdentity, port: int) -> tuple[grpc.Channel, grpc.StreamStreamMultiCallable]:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem, private_key=identity.key_pem,
                                         certificate_chain=identity.cert_pem)
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=grpc_options([
        ("grpc.ssl_target_name_override", "h2.demo.privfl"), ("grpc.use_local_subchannel_pool", 1)]))
    return ch, ch.stream_stream(METHOD)


def raw_refused(pki: Pki, identity: NodeIdentity, port: int, chunks: list[bytes]) -> grpc.RpcError:
    """Send raw ``chunks`` on one stream from ``identity``; the RpcError the server ends it with."""
    ch, call = raw_stub(pki, identity, port)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter(chunks), timeout=5))
    finally:
        ch.close()
    return info.value


# --------------------------------------------------------------------------- happy path


def test_exchange_averages_and_counts_bytes(pki: Pki, server) -> None:  # noqa: ANN001
    srv, roster, handler = server
    before = dict(handler.model)
    mine = model(7)
    with client(pki, "h1", roster) as c:
        reply = c.exchange("h2", Message("exchange_request", 3, mine, scalars={"weight": 0.5}))
        got = handler.seen[-1]
        assert got.sender == "h1" and got.round == 3 and got.scalars == {"weight": 0.5}
        assert got.digest == model_digest(mine, "blake3")
        assert reply.in_reply_to == got.sequence
        for k in mine:
            np.testing.assert_array_equal(reply.tensors[k], before[k])
            np.testing.assert_allclose(handler.model[k], (before[k] + mine[k]) / 2)
        d = c.send("h2", Message("model", 4, mine))
        assert d.sequence > got.sequence and d.digest == model_digest(mine, "blake3")
        sent = c.counters.peer("h2")
    srv_side = srv.counters.peer("h1")
    assert sent.messages_sent == 2 and sent.bytes_sent == srv_side.bytes_received
    assert sent.bytes_received == srv_side.bytes_sent
    assert sent.bytes_sent > 2 * (64 * 8 + 8) * 4  # two model bodies at least


def test_an_exchange_hashes_each_body_once_per_side(pki: Pki, server, counted) -> None:  # noqa: ANN001, F811
    srv, roster, _ = server
    mine = model(7)
    with client(pki, "h1", roster) as c:
        del counted[:]
        reply = c.exchange("h2", Message("exchange_request", 3, mine))
        assert reply.digest_algorithm == "blake3"
        hashed = sorted(h.fed for h in counted)
    empty, full = _prefix_bytes({}), _prefix_bytes(mine) + sum(a.nbytes for a in mine.values())
    # the signed accept (server seals, client verifies), request and reply: two hashes each,
    # each over its message's digest prefix and body exactly once -- no second pass anywhere
    assert hashed == [empty] * 2 + [full] * 4


def test_ten_megabyte_exchange_round_trips_exactly(pki: Pki) -> None:
    rng = np.random.default_rng(3)
    big = {"w": rng.standard_normal(2_500_000).astype(np.float32),
           "s": SparseTensor(np.array([0, 17, 99_999], np.int64), np.array([1.5, -2, 3], np.float64),
                             (100_000,))}
    big_spec = {"w": TensorExpectation((2_500_000,), "<f4"), "s": TensorExpectation((100_000,), "<f8")}
    echo = GossipServer(ident(pki, "h2"), pki.roster, pki.crl,
                        lambda s, m: Message("exchange_reply", m.round, m.tensors),
                        address="127.0.0.1:0", expected_spec=big_spec, max_message_bytes=16 << 20)
    port = echo.start()
    try:
        with GossipClient(ident(pki, "h1"), at(pki.roster, "h2", port), pki.crl,
                          expected_spec=big_spec) as c:
            reply = c.exchange("h2", Message("exchange_request", 1, big), timeout=30)
            assert c.counters.peer("h2").bytes_sent > 10_000_000
    finally:
        echo.stop(grace=0)
    assert reply.digest == model_digest(big, "blake3")
    np.testing.assert_array_equal(reply.tensors["w"], big["w"])
    s = reply.tensors["s"]
    assert isinstance(s, SparseTensor)
    np.testing.assert_array_equal(s.to_dense(), big["s"].to_dense())


# --------------------------------------------------------------------------- refused peers


def test_no_client_certificate_refused_at_handshake(pki: Pki, server) -> None:  # noqa: ANN001
    srv, roster, handler = server
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{srv.port}", creds, options=[
            ("grpc.ssl_target_name_override", "h2.demo.privfl")]) as ch:
        call = ch.stream_stream(METHOD)
        enc = encode_message(Message("exchange_request", 0, model()), "h1", "h2", 1)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter_chunks(enc), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not handler.seen
    assert_serves(pki, roster)


@pytest.mark.parametrize("who, layer, reason", [
    ("other_ca", "tls", None),
    ("expired", "tls", None),
    ("revoked", "app", "revoked"),
    ("stranger", "app", "h9 is not in the roster"),
    ("twin", "app", "fingerprint"),
])
def test_refused_certificates(pki: Pki, server, caplog: pytest.LogCaptureFixture,  # noqa: ANN001
                              who: str, layer: str, reason: str | None) -> None:
    srv, roster, handler = server
    identity = ident(pki, "h4") if who == "revoked" else pki.rogue[who]
    caplog.set_level(logging.WARNING, logger=LOG)
    with client(pki, identity, roster) as c:
        err = PeerUnavailable if layer == "tls" else PeerRefused
        with pytest.raises(err) as info:
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
    if layer == "tls":
        assert "UNAVAILABLE" in str(info.value)
    else:
        assert "PERMISSION_DENIED" in str(info.value)
        # the client only learns "not authorized"; the server logs the real reason
        assert reason not in str(info.value)
        assert any(reason in r.getMessage() and "node h2: refused" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not handler.seen
    assert_serves(pki, roster)


def test_revocation_applies_to_an_open_connection(pki: Pki, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    init_consortium("demo", ["h1", "h2", "h3"], d)
    ca_pem, roster, crl = load_pki(d)
    srv = GossipServer(NodeIdentity.load(d / "h2"), roster, crl, Averager(), address="127.0.0.1:0",
                       expected_spec=SPEC)
    port = srv.start()
    try:
        r = at(roster, "h2", port)
        with GossipClient(NodeIdentity.load(d / "h3"), r, crl, expected_spec=SPEC) as c:
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
            revoke_node(d, "h3")
            srv.update_trust(crl=(d / "crl.pem").read_bytes())
            with pytest.raises(PeerRefused, match="PERMISSION_DENIED"):
                c.exchange("h2", Message("exchange_request", 1, model()), timeout=5)
        with GossipClient(NodeIdentity.load(d / "h1"), r, crl, expected_spec=SPEC) as c:
            c.exchange("h2", Message("exchange_request", 2, model()), timeout=5)
    finally:
        srv.stop(grace=0)


def test_client_checks_server_identity(pki: Pki, server) -> None:  # noqa: ANN001
    srv, roster, handler = server
    wrong = at(roster, "h3", srv.port)  # the roster says h3 lives where h2 listens
    with client(pki, "h1", wrong) as c:  # gRPC's own hostname check (h3's DNS SAN)
        with pytest.raises(PeerUnavailable):
            c.exchange("h3", Message("exchange_request", 0, model()), timeout=5)
    assert not handler.seen


def test_client_refuses_revoked_server(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    handler = Averager()
    srv = GossipServer(ident(pki, "h4"), pki.roster, pki.crl, handler, address="127.0.0.1:0")
    port = srv.start()
    try:
        with client(pki, "h1", at(pki.roster, "h4", port)) as c:
            with pytest.raises(AuthenticationFailed, match="revoked"):
                c.exchange("h4", Message("exchange_request", 0, model()), timeout=5)
            # its own pinned certificate is revoked: no new call goes to it
            assert "h4" in c.blocked()
            with pytest.raises(PeerRefused, match="is refused"):
                c.exchange("h4", Message("exchange_request", 0, model()), timeout=5)
    finally:
        srv.stop(grace=0)
    assert not handler.seen  # the accept failed: the body was never sent
    assert any("refused reply from h4" in r.getMessage() and "revoked" in r.getMessage()
               for r in caplog.records)


def test_unreachable_peer_fails_fast_and_backs_off(pki: Pki) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens
    clock = [100.0]
    backoff = PeerBackoff(base=1.0, factor=2.0, max_delay=8.0, clock=lambda: clock[0])
    # no first-contact wait here (it is tested below): the very first call fails at once
    with client(pki, "h1", at(pki.roster, "h2", port), backoff=backoff, first_contact_window=0) as c:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert not c.available("h2")
        with pytest.raises(PeerUnavailable, match="backing off"):
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
        clock[0] += 1.0
        assert c.available("h2")
        with pytest.raises(PeerUnavailable):
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
        assert backoff.failures("h2") == 2 and backoff.remaining("h2") == pytest.approx(2.0)
        with pytest.raises(TransportError, match="unknown peer"):
            c.exchange("h8", Message("exchange_request", 0, model()))


def test_first_contact_waits_for_a_peer_still_starting(pki: Pki) -> None:
    """At start-up a neighbour may not listen yet: the first call waits (bounded) for it to come
    up instead of failing and putting it into back-off; later calls do not wait again."""
    import socket
    import threading
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = Averager()
    srv = GossipServer(ident(pki, "h2"), pki.roster, pki.crl, handler, address=f"127.0.0.1:{port}",
                       expected_spec=SPEC, max_message_bytes=1 << 20)
    starter = threading.Timer(0.6, srv.start)  # the peer starts listening while we call it
    backoff = PeerBackoff()
    try:
        with client(pki, "h1", at(pki.roster, "h2", port), backoff=backoff, first_contact_window=3.0) as c:
            starter.start()
            t0 = time.monotonic()
            reply = c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
            assert reply.kind == "exchange_reply" and time.monotonic() - t0 >= 0.5
            assert backoff.failures("h2") == 0 and handler.seen
    finally:
        starter.cancel()
        starter.join()
        srv.stop(grace=0)
    with client(pki, "h1", at(pki.roster, "h2", port), first_contact_window=0.8) as c:  # nobody listens now
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            c.exchange("h2", Message("exchange_request", 0, model()), timeout=5)
        assert 0.6 <= time.monotonic() - t0 < 3.0  # retried for the window, not the call's 5 s
        c.backoff.success("h2")
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            c.exchange("h2", Message("exchange_request", 1, model()), timeout=5)
        assert time.monotonic() - t0 < 0.5  # the window is for the first contact only


@pytest.mark.timeout(60)
def test_a_peer_behind_a_long_link_is_reachable(pki: Pki, server) -> None:  # noqa: ANN001
    """A far site: every byte the server sends arrives 0.4 s late, so the TLS handshake alone takes
    over 0.4 s. gRPC gives each connection attempt ``grpc.min_reconnect_backoff_ms`` to finish (its
    minimum connect timeout); at 200 ms every attempt was cut mid-handshake ("Handshake read failed
    (Endpoint closing)", the CI failure of the trust e2e test on a loaded machine) and the peer was
    never reached. The exchange must complete, with the averaged reply, in about the link's time."""
    srv, roster, handler = server
    with SlowLink(srv.port, delay=0.4) as link:
        with client(pki, "h1", at(roster, "h2", link.port), first_contact_window=0) as c:
            t0 = time.monotonic()
            reply = c.exchange("h2", Message("exchange_request", 0, model()), timeout=30)
            took = time.monotonic() - t0
    assert reply.kind == "exchange_reply" and len(handler.seen) == 1
    np.testing.assert_array_equal(reply.tensors["w"], model(1)["w"])
    assert 0.8 <= took < 15, took  # at least the handshake's and the reply's trip back


# --------------------------------------------------------------------------- refused messages


def _refused(pki: Pki, server, caplog, msg: Message, reason: str) -> None:  # noqa: ANN001
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    n = len(handler.seen)
    with client(pki, "h1", roster) as c:
        with pytest.raises(PeerRefused, match="INVALID_ARGUMENT"):
            c.exchange("h2", msg, timeout=5)
    assert len(handler.seen) == n
    assert any("refused message from h1" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert_serves(pki, roster)


def test_nan_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    w = model()["w"].copy()
    w[3, 4] = np.nan
    _refused(pki, server, caplog, Message("exchange_request", 0, model(w=w)), "non-finite")


def test_inf_in_sparse_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    b = SparseTensor(np.array([1, 2]), np.array([1.0, np.inf], np.float32), (8,))
    _refused(pki, server, caplog, Message("exchange_request", 0, model(b=b)), "non-finite")


def test_wrong_shape_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    _refused(pki, server, caplog,
             Message("exchange_request", 0, model(w=np.zeros((8, 64), np.float32))), "shape")


def test_wrong_dtype_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    _refused(pki, server, caplog,
             Message("exchange_request", 0, model(b=np.zeros(8, np.float64))), "dtype")


def test_wrong_name_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    m = model()
    m["extra"] = np.zeros(2, np.float32)
    _refused(pki, server, caplog, Message("exchange_request", 0, m), "unexpected tensor name")


def test_replay_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    with client(pki, "h1", roster) as c:
        seq = c.next_sequence()
        c.exchange("h2", Message("exchange_request", 0, model(), sequence=seq))
        for again in (seq, seq - 1):
            with pytest.raises(PeerRefused, match="replayed"):
                c.exchange("h2", Message("exchange_request", 0, model(), sequence=again))
    replays = [r for r in caplog.records if "refused message from h1 (" in r.getMessage()
               and "replayed or out-of-order sequence" in r.getMessage()]
    assert len(replays) == 1  # the same refusal again within 10 s is not logged again (it is counted)
    assert len(handler.seen) == 1
    assert_serves(pki, roster)


def test_small_exchange_is_four_grpc_messages(pki: Pki, server) -> None:  # noqa: ANN001
    """Wire version 2 and 3: the request header alone, then body + trailer; the server's accept is one
    Chunk and its reply another (wire version 1 took 8 gRPC messages)."""
    srv, roster, handler = server
    ch, call = raw_stub(pki, ident(pki, "h1"), srv.port)
    try:
        enc = signed(pki, Message("exchange_request", 0, model()), "h1", "h2", time.time_ns() // 1000)
        sent = list(iter_chunks(enc, header_alone=True))
        got = list(call(iter(sent), timeout=5))
    finally:
        ch.close()
    assert len(sent) == 2 and len(got) == 2
    accept, reply = (pb.Chunk.FromString(g) for g in got)
    assert accept.header.kind == "accept" and accept.HasField("trailer") and not accept.data
    assert reply.header.kind == "exchange_reply" and reply.data and reply.HasField("trailer")
    assert len(handler.seen) == 1


def test_old_version_peer_refused_with_a_clear_error(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    """A node of the previous release (wire version 1, signature domain v2) is refused in one line."""
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    idn = ident(pki, "h1")
    signer = Signer(idn.key_pem, idn.cert_pem)
    enc = encode_message(Message("exchange_request", 0, model()), "h1", "h2", time.time_ns() // 1000,
                         certificate=signer.certificate_der)
    enc.header.version = 1
    old = [pb.Chunk(header=enc.header).SerializeToString()]  # v1 framing: one part per Chunk
    old += [pb.Chunk(data=bytes(b)).SerializeToString() for b in enc.buffers]
    old.append(pb.Chunk(trailer=signer.seal(enc.header, enc.compute_digest(), None)).SerializeToString())
    err = raw_refused(pki, idn, srv.port, old)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("peer speaks wire version 1, this node speaks 3: run the same privfl "
                                    "release on every node")
    assert not handler.seen
    assert any("refused message from h1" in r.getMessage() and "wire version 1" in r.getMessage()
               for r in caplog.records)
    assert_serves(pki, roster)


def test_malformed_and_oversized_streams_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    ch, call = raw_stub(pki, ident(pki, "h1"), srv.port)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"\xff\xfe garbage \x00"]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        huge = pb.Header(version=WIRE_VERSION, sender="h1", recipient="h2", sequence=time.time_ns() // 1000,
                         kind="model", tensors=[pb.TensorSpec(name="w", dtype="<f4", shape=[10**9])],
                         body_bytes=4 * 10**9)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([pb.Chunk(header=huge).SerializeToString()]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a well-formed header whose body is longer than it declared
        enc = signed(pki, Message("exchange_request", 0, model()), "h1", "h2", time.time_ns() // 1000)
        head = next(iter_chunks(enc, header_alone=True))
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([head, pb.Chunk(data=b"x" * (enc.body_bytes + 10)).SerializeToString()]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # sender spoofing: h1's certificate, h3's name in the header
        spoof = signed(pki, Message("exchange_request", 0, model()), "h3", "h2", time.time_ns() // 1000)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter_chunks(spoof), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ch.close()
    msgs = [r.getMessage() for r in caplog.records]
    for reason in ("malformed chunk", "message too large", "longer than the declared",
                   "not the authenticated peer"):
        assert any(reason in m for m in msgs), (reason, msgs)
    assert not handler.seen
    assert_serves(pki, roster)


def test_tampered_digest_refused(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    enc = signed(pki, Message("exchange_request", 0, model()), "h1", "h2", time.time_ns() // 1000)
    chunks = list(iter_chunks(enc))
    chunks[-1] = retrail(chunks[-1], pb.Trailer(model_digest=b"\0" * 32))
    assert raw_refused(pki, ident(pki, "h1"), srv.port, chunks).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any("digest mismatch" in r.getMessage() for r in caplog.records)
    assert not handler.seen


def test_handler_failure_does_not_kill_server(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    with client(pki, "h1", roster) as c:
        with pytest.raises(PeerRefused, match="INTERNAL"):
            c.exchange("h2", Message("boom", 0, model()))
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    assert_serves(pki, roster)


# --------------------------------------------------------------------------- TLS version


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def test_tls12_session_is_refused_with_the_peer_address(pki: Pki, server, tmp_path: Path,  # noqa: ANN001
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A real TLS 1.2 client (Python's ssl, a hand-written HTTP/2 request) with h1's valid certificate:
    gRPC completes the handshake (it cannot be told a minimum version), privfl refuses the call."""
    import socket
    import ssl
    srv, roster, handler = server
    caplog.set_level(logging.WARNING, logger=LOG)
    idn = ident(pki, "h1")
    (tmp_path / "c.pem").write_bytes(idn.cert_pem)
    (tmp_path / "c.key").write_bytes(idn.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pki.ca_pem.decode())
    ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    ctx.set_alpn_protocols(["h2"])
    body = list(iter_chunks(signed(pki, Message("hello"), "h1", "h2", time.time_ns() // 1000)))[0]
    headers = b"".join(_hpack_literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "https"), (":path", METHOD), (":authority", "h2.demo.privfl"),
        ("content-type", "application/grpc"), ("te", "trailers")])
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="h2.demo.privfl") as tls:
            assert tls.version() == "TLSv1.2"
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"")
                        + _h2_frame(1, 0x4, 1, headers)
                        + _h2_frame(0, 0x1, 1, b"\0" + len(body).to_bytes(4, "big") + body))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("TLS version" in r.getMessage() for r in caplog.records):
                try:
                    tls.settimeout(0.2)
                    if not tls.recv(65536):
                        break
                except (TimeoutError, ssl.SSLError, OSError):
                    pass
    assert any("node h2: refused ipv4:127.0.0.1" in r.getMessage() and "TLS version TLSv1.2, only TLSv1.3" in
               r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not handler.seen
    assert_serves(pki, roster)


def test_no_copy_of_the_private_key_is_written_anywhere(pki: Pki, server, tmp_path: Path,  # noqa: ANN001
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9: the old TLS probe wrote the node key to a temporary folder. The whole
    exchange (channel, handshake, signed accept, signed reply) must write nothing there."""
    import tempfile

    srv, roster, _ = server
    scratch = tmp_path / "scratch-tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    key = ident(pki, "h1").key_pem
    with client(pki, "h1", roster) as c:
        c.exchange("h2", Message("exchange_request", 1, model(3)))
    written = [p for p in scratch.rglob("*") if p.is_file()]
    assert not written, written
    assert not any(key.strip() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_a_flood_of_refused_calls_logs_one_line_and_counts_the_rest(pki: Pki, server, caplog) -> None:  # noqa: ANN001
    """A member sends malformed models as fast as the server refuses them: the operator's log
    gets one line for the flood, and the next line after the interval says how many it held back."""
    srv, roster, handler = server
    srv._refusal_log.interval = 0.5
    caplog.set_level(logging.WARNING, logger=LOG)
    bad = Message("exchange_request", 0, model(w=np.zeros((8, 64), np.float32)))
    with client(pki, "h1", roster) as c:
        for _ in range(30):
            with pytest.raises(PeerRefused, match="INVALID_ARGUMENT"):
                c.exchange("h2", bad, timeout=5)
        lines = [r.getMessage() for r in caplog.records if "refused message from h1" in r.getMessage()]
        assert len(lines) == 1 and "shape" in lines[0], lines
        time.sleep(0.6)
        with pytest.raises(PeerRefused):
            c.exchange("h2", bad, timeout=5)
    lines = [r.getMessage() for r in caplog.records if "refused message from h1" in r.getMessage()]
    assert len(lines) == 2 and "(29 more like it in the last 0.5 s not logged)" in lines[1], lines
    assert not handler.seen
    assert_serves(pki, roster)


def test_log_limiter_keys_and_bound() -> None:
    from privfl.accounting.log_limit import MAX_KEYS, LogLimiter, source_host

    now = [0.0]
    lim = LogLimiter(10.0, clock=lambda: now[0])
    assert lim.allow("cert", "10.0.0.1") == (True, 0)
    assert lim.allow("cert", "10.0.0.1") == (False, 0)
    assert lim.allow("cert", "10.0.0.2") == (True, 0)  # another source is its own line
    now[0] = 10.0
    assert lim.allow("cert", "10.0.0.1") == (True, 1)
    for i in range(MAX_KEYS + 5):  # a flood from many addresses does not grow the table without bound
        lim.allow("cert", f"h{i}")
    assert len(lim._seen) <= MAX_KEYS
    assert source_host("ipv4:127.0.0.1:50512") == "ipv4:127.0.0.1"
    assert source_host("ipv6:[::1]:443") == "ipv6:[::1]"


def test_refusal_lines_are_keyed_by_reason_not_by_the_text_a_peer_chose() -> None:
    """A peer varying what it controls (a kind, a tensor name) gets no more lines: the key is the
    reason's fixed part, and a source gets a few lines per interval whatever the reason."""
    from privfl.accounting.log_limit import GROUP_LINES, LogLimiter, reason_code

    assert reason_code("unknown kind 'zzaaab'") == reason_code("unknown kind 'zzaaac'") == "unknown kind"
    assert reason_code("replayed or out-of-order sequence 7 (last seen 9)") == "replayed or out-of-order sequence"
    now = [0.0]
    lim = LogLimiter(10.0, clock=lambda: now[0])
    emitted = sum(lim.allow("message", "h1", f"tensor t{i}", group=("message", "h1"))[0] for i in range(300))
    assert emitted == GROUP_LINES  # 300 texts of the attacker's choosing: 5 lines
    assert lim.allow("message", "h2", "x", group=("message", "h2"))[0]  # another peer still gets its line
    now[0] = 10.0
    assert lim.allow("message", "h1", "tensor t0", group=("message", "h1")) == (True, 0)
