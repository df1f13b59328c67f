"""Compressed gossip messages over the real mTLS gRPC transport, and the node's compressor config.

(a) sparse, quant8 and ternary ``Compressed`` updates sent through ``GrpcPeerNetwork``
travel as one ``Compressed.to_bytes()`` frame, arrive bit-exactly, cost fewer bytes than
the dense model, and the ledger hook sees the real frame length; (b) malformed frames are
refused (logged) and the server keeps serving, and frames off the transport spec (too
long, wrong dtype or shape, foreign names) are refused before decoding; (c)
``[strategy].params`` of a node config: a compressor validates, bad names and unknown
keys are refused naming the field.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privfl.errors import ConfigError
from privfl.launch import dump_toml, free_ports
from privfl.node_config import load_node_config
from privfl.peer_network import (
    COMPRESSED_FRAME,
    AdvertisedPolicy,
    GrpcPeerNetwork,
    compressed_spec_of,
    to_transport,
)
from privfl.pki import NodeIdentity, Policy, init_consortium, load_pki
from privfl.strategies.base import ModelMessage
from privfl.strategies.compression import AdaComp, Compressed, Quantize8, TopK, decompress, released
from privfl.strategies.compression.message import FRAME_HEADER_BYTES, max_frame_bytes
from privfl.transport import Message, PeerRefused, TransportError

NAMES = ["fc.weight", "fc.bias"]
SHAPES = [(40, 50), (40,)]
D = 40 * 50 + 40
T = len(SHAPES)
GOOD = AdvertisedPolicy(noise_multiplier=1.0, target_epsilon=3.0, delta=1e-5)


def _model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _messages() -> dict[str, Compressed]:
    x = released(_model(1), "test: stands for a DP-noised model")
    return {"sparse": TopK(k=50, error_feedback=False).compress(x),
            "quant8": Quantize8().compress(x),
            "ternary": AdaComp(bin_size=20, quantize=True).compress(x)}


class _Pair:
    """Two networks (a, b) over real mTLS on loopback, recording what the ledger hook sees."""

    def __init__(self, root: Path) -> None:
        ids = ["a", "b"]
        ports = free_ports(2)
        init_consortium("ct", ids, root, addresses={n: f"127.0.0.1:{p}" for n, p in zip(ids, ports)},
                        policy=Policy(min_noise_multiplier=0.8, max_epsilon=3.0))
        _ca, roster, crl = load_pki(root)
        self.released: dict[str, list[tuple[Any, ...]]] = {n: [] for n in ids}
        self.nets: dict[str, GrpcPeerNetwork] = {}
        for n in ids:
            net = GrpcPeerNetwork(NodeIdentity.load(root / n), roster, crl, [m for m in ids if m != n], NAMES,
                                  _model(0), policy=GOOD, timeout=5.0,
                                  on_release=lambda *a, n=n: self.released[n].append(a))
            net.start()
            self.nets[n] = net

    def close(self) -> None:
        for net in self.nets.values():
            net.close()


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[_Pair]:
    p = _Pair(tmp_path / "pki")
    try:
        yield p
    finally:
        p.close()


def _frame(kind: int, indices: list[int] = (), values: list[float] = (), codes: list[int] = (),
           scales: list[float] = (), version: int = 1, shared: int = 0,
           counts: tuple[int, int, int, int] | None = None) -> bytes:
    """A hand-framed message, written from the documented layout (not via to_bytes), as a hostile peer could."""
    arrays = [np.array(indices, "<i4"), np.array(values, "<f4"), np.array(codes, "u1"), np.array(scales, "<f4")]
    n = counts if counts is not None else tuple(len(a) for a in arrays)
    return struct.pack("<BBBBIIII", version, kind, shared, 0, *n) + b"".join(a.tobytes() for a in arrays)


def _raw(tensors: dict[str, np.ndarray]) -> Message:
    """A hand-made compressed message (bypassing to_transport), as a hostile peer could send."""
    return Message(kind="innovation", round=0, tensors=tensors, scalars=GOOD.scalars())


def _framed(data: bytes) -> dict[str, np.ndarray]:
    return {COMPRESSED_FRAME: np.frombuffer(data, dtype=np.uint8)}


# ---- (a) bit-exact delivery, fewer bytes ---------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sparse", "quant8", "ternary"])
def test_compressed_message_arrives_bit_exact_and_costs_fewer_bytes(pair: _Pair, kind: str) -> None:
    payload = _messages()[kind]
    assert payload.kind == kind
    a, b = pair.nets["a"], pair.nets["b"]
    assert a.send("b", ModelMessage("a", 3, "innovation", payload=payload))
    got = b.receive(3, ["a"], timeout=5.0)
    msg = got["a"]
    assert msg.params is None and isinstance(msg.payload, Compressed)
    back = msg.payload
    assert back.kind == kind and back.shapes == payload.shapes and back.nbytes == payload.nbytes
    for field in ("indices", "values", "codes", "scales"):
        np.testing.assert_array_equal(getattr(back, field), getattr(payload, field))
    for x, y in zip(decompress(back), decompress(payload)):
        assert x.tobytes() == y.tobytes()
    assert back.to_bytes() == payload.to_bytes()
    assert msg.meta == {}  # no reserved scalars leak into model metadata
    dense = 4 * D
    wire = b.counters.peer("a").bytes_received
    assert 0 < wire < dense, (wire, dense)
    # the ledger hook saw the real bytes: the frame, i.e. the payload plus its 20-byte header
    (peer, seq, rnd, digest, nbytes), = pair.released["a"]
    tensors = to_transport(ModelMessage("a", 3, "innovation", payload=payload), NAMES).tensors
    assert set(tensors) == {COMPRESSED_FRAME} and tensors[COMPRESSED_FRAME].dtype == np.uint8
    assert peer == "b" and rnd == 3 and seq > 0 and len(digest) == 64
    assert nbytes == len(payload.to_bytes()) == payload.nbytes + FRAME_HEADER_BYTES


@pytest.mark.timeout(60)
def test_dense_models_still_travel_as_before(pair: _Pair) -> None:
    a, b = pair.nets["a"], pair.nets["b"]
    model = _model(5)
    assert a.send("b", ModelMessage("a", 1, "model", params=model))
    got = b.receive(1, ["a"], timeout=5.0)["a"]
    assert got.payload is None and got.params is not None
    for x, y in zip(got.params, model):
        np.testing.assert_array_equal(x, y)
    assert pair.released["a"][0][4] == sum(p.nbytes for p in model)


def test_compressed_spec_is_one_frame_bounded_by_the_model_size() -> None:
    spec = compressed_spec_of(_model(0))
    assert set(spec) == {COMPRESSED_FRAME}
    e = spec[COMPRESSED_FRAME]
    assert e.bounded and not e.allow_sparse and e.dtype == "|u1"
    assert e.shape == (max_frame_bytes(SHAPES),) == (20 + 8 * D + D + 8 * T,)
    # the largest valid frame of every kind fits the bound
    every = np.arange(D, dtype=np.int32)
    largest = [Compressed("dense", SHAPES, values=np.zeros(D, np.float32)),
               Compressed("sparse", SHAPES, indices=every, values=np.ones(D, np.float32)),
               Compressed("quant8", SHAPES, codes=np.zeros(D, np.uint8), scales=np.zeros(2 * T, np.float32)),
               Compressed("ternary", SHAPES, indices=every, codes=np.zeros((D + 7) // 8, np.uint8),
                          scales=np.ones(T, np.float32))]
    assert all(len(m.to_bytes()) <= e.shape[0] for m in largest)
    assert _frame(1, [3, 5], [1.0, 2.0]) == Compressed("sparse", SHAPES, indices=np.array([3, 5], np.int32),
                                                       values=np.array([1, 2], np.float32)).to_bytes()


def test_to_transport_refuses_a_foreign_payload() -> None:
    with pytest.raises(ValueError, match="only Compressed payloads"):
        to_transport(ModelMessage("a", 0, "innovation", payload=b"zip"), NAMES)


def test_to_transport_refuses_a_shared_index_message() -> None:
    shared = Compressed("sparse", SHAPES, indices=np.array([3], np.int32), values=np.array([1.0], np.float32),
                        shared_indices=True)
    with pytest.raises(ValueError, match="shared-index .* cannot travel over gRPC"):
        to_transport(ModelMessage("a", 0, "innovation", payload=shared), NAMES)


# ---- (b) malformed frames are refused, the server keeps serving ---------------------------
_GOOD_FRAME = _frame(1, [3, 5], [1.0, 2.0])
MALFORMED = {
    "truncated header": (_GOOD_FRAME[:10], "shorter than the 20-byte header"),
    "truncated body": (_GOOD_FRAME[:-1], "the header announces"),
    "trailing bytes": (_GOOD_FRAME + b"\0", "the header announces"),
    "header lies about lengths": (_frame(1, [3, 5], [1.0, 2.0], counts=(3, 3, 0, 0)), "the header announces"),
    "empty frame": (b"", "shorter than the 20-byte header"),
    "bad version": (_frame(1, [3], [1.0], version=2), "unknown version"),
    "shared flag set": (_frame(1, [3], [1.0], shared=1), "unknown version/flags"),
    "bad kind code": (_frame(9, [3], [1.0]), "unknown kind code"),
    "lengths exceed the model": (_frame(1, counts=(D + 1, D + 1, 0, 0)), "exceed a model"),
    "unsorted indices": (_frame(1, [5, 3], [1.0, 2.0]), "strictly increasing"),
    "repeated index": (_frame(1, [3, 3], [1.0, 2.0]), "strictly increasing"),
    "index out of range": (_frame(1, [3, D], [1.0, 2.0]), "strictly increasing"),
    "negative index": (_frame(1, [-1, 3], [1.0, 2.0]), "strictly increasing"),
    "NaN value": (_frame(1, [3, 5], [1.0, float("nan")]), "non-finite"),
    "infinite scale": (_frame(2, codes=[0] * D, scales=[0.0, 1.0, float("inf"), 1.0]), "non-finite"),
    "values length mismatch": (_frame(1, [3, 5], [1.0]), "lengths"),
    "quant8 with too few codes": (_frame(2, codes=[0] * 7, scales=[0.0] * 4), "lengths"),
    "dense of the wrong size": (_frame(0, values=[1.0] * (D - 1)), "lengths"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_is_refused_and_logged(pair: _Pair, case: str, caplog: pytest.LogCaptureFixture) -> None:
    data, reason = MALFORMED[case]
    a, b = pair.nets["a"], pair.nets["b"]
    with caplog.at_level(logging.WARNING, logger="privfl.node"):
        a.client.send("b", _raw(_framed(data)), timeout=5.0)
    assert b.receive(0, ["a"], timeout=0.2) == {}
    assert any("node b: refused innovation from a" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    _still_serves(pair)


TRANSPORT_REFUSED = {
    "oversize frame beyond the bound": (_framed(bytes(max_frame_bytes(SHAPES) + 1)), "exceeds the bound"),
    "wrong dtype": ({COMPRESSED_FRAME: np.frombuffer(_GOOD_FRAME, dtype="<i4")}, "dtype"),
    "2-D frame": ({COMPRESSED_FRAME: np.frombuffer(_GOOD_FRAME, dtype=np.uint8).reshape(2, -1)}, "shape"),
    "unknown tensor name": ({**_framed(_GOOD_FRAME), "compressed.extra": np.zeros(1, "u1")},
                            "unexpected tensor name"),
    "old four-tensor layout": ({"compressed.indices": np.array([3], "<i4"), "compressed.values": np.ones(1, "<f4")},
                               "unexpected tensor name"),
    "mixed with dense names": ({**_framed(_GOOD_FRAME), "fc.bias": np.zeros(40, "<f4")},
                               "unexpected tensor name"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(TRANSPORT_REFUSED))
def test_frame_off_spec_is_refused_by_the_transport(pair: _Pair, case: str) -> None:
    tensors, reason = TRANSPORT_REFUSED[case]
    with pytest.raises((PeerRefused, TransportError), match=reason):
        pair.nets["a"].client.send("b", _raw(tensors), timeout=5.0)
    assert pair.nets["b"].receive(0, ["a"], timeout=0.2) == {}
    _still_serves(pair)


def _still_serves(pair: _Pair) -> None:
    """b still accepts a good compressed update from a after refusing a bad one."""
    good = _messages()["sparse"]
    assert pair.nets["a"].send("b", ModelMessage("a", 9, "innovation", payload=good))
    got = pair.nets["b"].receive(9, ["a"], timeout=5.0)
    np.testing.assert_array_equal(got["a"].payload.indices, good.indices)


# ---- (c) a node's [strategy].params ----------------------------------------------------------
@pytest.fixture(scope="module")
def node_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("ctc", ["h-a", "h-b"], d, base_port=47320)
    return d


def _node_toml(pki: Path, tmp_path: Path, strategy: dict[str, Any]) -> Path:
    t = {
        "node": {"id": "h-a", "output": str(tmp_path / "out")},
        "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0},
        "model": {"name": "logreg"},
        "dp": {"noise_multiplier": 2.0, "target_epsilon": 3.0, "batch_size": 32, "sample_rate": 0.14},
        "strategy": strategy,
        "stop": {"max_steps": 10},
    }
    p = tmp_path / "node.toml"
    p.write_text(dump_toml(t))
    return p


def test_node_config_with_a_compressor_validates(node_pki: Path, tmp_path: Path) -> None:
    from privfl.node_config import node_strategy_params

    strategy = {"name": "sync_gossip", "local_steps": 1, "params": {"compressor": "topk", "ratio": 0.1, "gamma": 0.5}}
    cfg = load_node_config(_node_toml(node_pki, tmp_path, strategy))
    sp = node_strategy_params(cfg.common.strategy, "x")
    assert sp.compressor == ("topk", {"ratio": 0.1, "error_feedback": False})
    assert sp.gamma == 0.5 and sp.shared_init is None
    nested = {"name": "sync_gossip", "params": {"compressor": "quantize8", "compression_params": {"stochastic": True},
                                                "shared_init": True}}
    sp = node_strategy_params(load_node_config(_node_toml(node_pki, tmp_path, nested)).common.strategy, "x")
    assert sp.compressor == ("quantize8", {"stochastic": True, "error_feedback": False}) and sp.shared_init is True


@pytest.mark.parametrize("strategy,field", [
    ({"name": "sync_gossip", "params": {"compressor": "zstd"}}, r"\[strategy\]\.params\.compressor: unknown"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 0.1, "ratoi": 1}},
     r"\[strategy\]\.params\.ratoi"),
    ({"name": "sync_gossip", "params": {"gama": 0.5}}, r"\[strategy\]\.params\.gama"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 2.0}}, r"\[strategy\]\.params: .*ratio"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 0.1, "gamma": 1.5}},
     r"\[strategy\]\.params\.gamma"),
    ({"name": "sync_gossip", "params": {"compressor": "topk", "ratio": 0.1, "shared_init": "yes"}},
     r"\[strategy\]\.params\.shared_init"),
    ({"name": "sync_gossip", "params": {"compressor": "cltk", "ratio": 0.1}},
     r"\[strategy\]\.params\.compressor: 'cltk'"),
    ({"name": "sync_gossip", "params": {"timeout": 3}}, r"\[strategy\]\.params\.timeout: .*\[node\]\.sync_timeout"),
    ({"name": "async_gossip", "params": {"compressor": "topk", "ratio": 0.1}},
     r"\[strategy\]\.params\.compressor: async_gossip cannot compress"),
    ({"name": "async_gossip", "params": {"bogus": 1}}, r"\[strategy\]\.params\.bogus"),
])
def test_node_config_strategy_params_errors_name_the_field(node_pki: Path, tmp_path: Path,
                                                           strategy: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_node_config(_node_toml(node_pki, tmp_path, strategy))


@pytest.mark.timeout(120)
def test_node_builds_compressed_sync_gossip(node_pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node
    from privfl.strategies.compression import InnovationGossip
    from privfl.strategies.compression import Quantize8 as Q8
    from privfl.strategies.gossip import SyncGossip

    strategy = {"name": "sync_gossip", "local_steps": 1, "params": {"compressor": "quantize8", "gamma": 0.25}}
    node = Node(load_node_config(_node_toml(node_pki, tmp_path, strategy)))
    try:
        assert isinstance(node.strategy, SyncGossip)
        inno = node.strategy.innovation
        assert isinstance(inno, InnovationGossip) and isinstance(inno._compressor, Q8)
        assert inno._gamma == 0.25
        # shared_init (default: every node builds its initial model from model.seed): estimates start there
        for est, p in zip(inno.estimate("h-a"), node.initial_params):
            np.testing.assert_array_equal(est, p)
    finally:
        assert node.ledger is not None
        node.ledger.close()
        assert node.network is not None
        node.network.close()
