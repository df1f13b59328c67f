"""Tensor codec without a network: round trips, digest, and every refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.transport import (
    Message,
    SparseTensor,
    TensorExpectation,
    TransportError,
    WIRE_VERSION,
    decode_stream,
    encode_message,
    iter_chunks,
    model_digest,
    spec_of,
)
from privfl.transport.proto import gossip_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def retrail(raw: bytes, trailer: pb.Trailer) -> bytes:
    """``raw`` (a message's last Chunk: maybe data too) with its trailer replaced by ``trailer``."""
    c = pb.Chunk.FromString(raw)
    assert c.HasField("trailer")
    c.trailer.CopyFrom(trailer)
    return c.SerializeToString()


def _chunks(tensors, chunk_bytes: int = 64) -> list[bytes]:  # noqa: ANN001
    return list(iter_chunks(encode_message(Message("model", 2, tensors), "a", "b", 9), chunk_bytes))


def test_round_trip_dense_sparse_big_endian() -> None:
    t = {"w": np.arange(40, dtype=">f8").reshape(5, 8), "i": np.arange(7, dtype=np.int32),
         "s": SparseTensor(np.array([2, 9]), np.array([0.5, -1], np.float32), (3, 4))}
    ch = _chunks(t)
    assert len(ch) > 5  # really chunked
    assert ch[1] == pb.Chunk(data=ch[1][2:]).SerializeToString()  # hand-framed = protobuf
    m = decode_stream(ch, spec_of(t), 1 << 20)
    assert m.sender == "a" and m.recipient == "b" and m.sequence == 9 and m.round == 2
    np.testing.assert_array_equal(m.tensors["w"], t["w"])
    assert m.tensors["w"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(m.tensors["s"].to_dense(), t["s"].to_dense())
    assert m.digest_algorithm == "blake3" and m.digest == model_digest(t, "blake3")  # hashed while streaming
    assert model_digest(t) != model_digest({**t, "i": np.arange(7, dtype=np.int64)})


def test_digest_binds_shape() -> None:
    a = np.arange(6, dtype=np.float32)
    assert model_digest({"w": a}) != model_digest({"w": a.reshape(2, 3)})


@pytest.mark.parametrize("indices, reason", [
    ([3, 3], "strictly increasing"), ([5, 2], "strictly increasing"), ([0, 12], "out of range"),
    ([-1, 2], "out of range"),
])
def test_bad_sparse_indices(indices: list[int], reason: str) -> None:
    t = {"s": SparseTensor(np.array(indices), np.array([1.0, 2.0], np.float32), (3, 4))}
    with pytest.raises(TransportError, match=reason):
        decode_stream(_chunks(t), None, 1 << 20)


def test_truncated_and_trailing_and_missing_trailer() -> None:
    t = {"w": np.ones(100, np.float32)}
    ch = _chunks(t)
    with pytest.raises(TransportError, match="truncated"):
        decode_stream(ch[:2] + ch[-1:], None, 1 << 20)
    with pytest.raises(TransportError, match="before the trailer"):
        decode_stream(ch[:-1], None, 1 << 20)
    with pytest.raises(TransportError, match="after the trailer"):
        decode_stream(ch + ch[1:2], None, 1 << 20)
    with pytest.raises(TransportError, match="first chunk"):
        decode_stream(ch[1:], None, 1 << 20)


def test_header_checks() -> None:
    t = {"w": np.ones((2, 3), np.float32)}
    exp = {"w": TensorExpectation((2, 3), "<f4", allow_sparse=False)}
    sparse = {"w": SparseTensor(np.array([1]), np.array([1.0], np.float32), (2, 3))}
    with pytest.raises(TransportError, match="sparse not allowed"):
        decode_stream(_chunks(sparse), exp, 1 << 20)
    with pytest.raises(TransportError, match="missing tensors: y"):
        decode_stream(_chunks(t), {**exp, "y": exp["w"]}, 1 << 20)
    with pytest.raises(TransportError, match="unexpected tensor name 'x'"):
        decode_stream(_chunks({**t, "x": np.ones(1, np.float32)}), exp, 1 << 20)
    with pytest.raises(TransportError, match="too large"):
        decode_stream(_chunks(t), exp, 8)
    bad = pb.Header(version=WIRE_VERSION, sender="a", recipient="b", sequence=1, kind="model",
                    tensors=[pb.TensorSpec(name="w", dtype="|O", shape=[1])], body_bytes=8)
    with pytest.raises(TransportError, match="not allowed"):
        decode_stream([pb.Chunk(header=bad).SerializeToString()], None, 1 << 20)
    lie = pb.Header(version=WIRE_VERSION, sender="a", recipient="b", sequence=1, kind="model",
                    tensors=[pb.TensorSpec(name="w", dtype="<f4", shape=[4])], body_bytes=4)
    with pytest.raises(TransportError, match="body_bytes"):
        decode_stream([pb.Chunk(header=lie).SerializeToString()], None, 1 << 20)


def test_encoder_refuses_unwireable_input() -> None:
    with pytest.raises(TransportError, match="not allowed"):
        encode_message(Message("model", 0, {"o": np.array([object()])}), "a", "b", 1)
    with pytest.raises(TransportError, match="kind"):
        encode_message(Message("Bad Kind", 0, {}), "a", "b", 1)
    with pytest.raises(TransportError, match="indices but"):
        encode_message(Message("model", 0, {"s": SparseTensor(np.array([1, 2]), np.ones(1), (4,))}),
                       "a", "b", 1)


def test_unverified_digest_mode_still_checks_everything_else() -> None:
    from privfl.transport.codec import MessageAssembler
    t = {"w": np.ones(10, np.float32)}
    ch = _chunks(t)
    ch[-1] = retrail(ch[-1], pb.Trailer(model_digest=b"\1" * 32))
    asm = MessageAssembler(None, 1 << 20, verify_digest=False)
    assert [asm.feed(c) for c in ch][-1]
    assert asm.message().digest == b"\1" * 32
    with pytest.raises(TransportError, match="digest mismatch"):
        decode_stream(ch, None, 1 << 20)
