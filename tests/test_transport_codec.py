"""Tensor codec without a network: round trips, digest, and every refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.transport import (
    WIRE_VERSION,
    Message,
    SparseTensor,
    TensorExpectation,
    TransportError,
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


# --------------------------------------------------------------------------- wire version 2 framing
def test_packed_framing_and_message_counts() -> None:
    """A small message is one Chunk; a large one has no Chunk beyond its body pieces; the header
    goes alone only when asked (a client's request, whose body waits for the accept)."""
    small = encode_message(Message("model", 1, {"w": np.ones(10, np.float32)}), "a", "b", 3)
    (one,) = iter_chunks(small)
    c = pb.Chunk.FromString(one)
    assert c.HasField("header") and len(c.data) == 40 and c.HasField("trailer")
    head, rest = iter_chunks(small, header_alone=True)
    assert pb.Chunk.FromString(head) == pb.Chunk(header=small.header)
    assert pb.Chunk.FromString(rest).HasField("trailer") and not pb.Chunk.FromString(rest).HasField("header")
    t = {"w": np.arange(100, dtype=np.float32)}
    ch = _chunks(t, chunk_bytes=64)  # 400 body bytes: 7 pieces
    assert len(ch) == 7
    assert [pb.Chunk.FromString(x).HasField("header") for x in ch] == [True] + [False] * 6
    assert [pb.Chunk.FromString(x).HasField("trailer") for x in ch] == [False] * 6 + [True]
    assert sum(len(pb.Chunk.FromString(x).data) for x in ch) == 400
    np.testing.assert_array_equal(decode_stream(ch, spec_of(t), 1 << 20).tensors["w"], t["w"])
    empty = encode_message(Message("ack"), "a", "b", 4)
    (ack,) = iter_chunks(empty)
    assert decode_stream([ack], None, 1 << 20).kind == "ack"


@pytest.mark.parametrize("raw", [
    b"",  # empty
    b"\x12\x01x\x12\x01y",  # data twice
    b"\x1a\x00\x0a\x00",  # trailer before header
    b"\x22\x00",  # unknown field 4
    b"\x12\x09abc",  # a field running past the end
    b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a length that never ends
])
def test_malformed_chunks_refused(raw: bytes) -> None:
    from privfl.transport.codec import split_chunk
    with pytest.raises(TransportError, match="malformed chunk"):
        split_chunk(raw)


def test_old_wire_version_refused_with_one_line() -> None:
    ch = _chunks({"w": np.ones(3, np.float32)})
    c = pb.Chunk.FromString(ch[0])
    c.header.version = 2  # what a node of the previous release sends (its heads are not signed alone)
    with pytest.raises(TransportError) as info:
        decode_stream([c.SerializeToString(), *ch[1:]], None, 1 << 20)
    assert str(info.value) == ("peer speaks wire version 2, this node speaks 3: run the same privfl "
                               "release on every node")
    assert WIRE_VERSION == 3


# --------------------------------------------------------------------------- receive side
@pytest.mark.parametrize("chunk_bytes", [64, 6])  # 6: float values straddle the pieces
def test_non_finite_refused_in_the_piece_it_arrives_in(chunk_bytes: int) -> None:
    """Finiteness is checked piece by piece: the stream is refused at the piece that completes
    the bad value, before the rest of the body or the trailer arrives."""
    from privfl.transport.codec import MessageAssembler
    for bad in (np.nan, np.inf, -np.inf):
        w = np.arange(60, dtype=np.float32)
        w[37] = bad  # bytes 148..151 of the body
        t = {"i": np.arange(3, dtype=np.uint8), "w": w}  # w starts at byte 3: unaligned
        ch = _chunks(t, chunk_bytes)
        asm = MessageAssembler(None, 1 << 20, verify_digest=False)
        fed = 0
        with pytest.raises(TransportError, match="tensor w: non-finite values"):
            for raw in ch:
                fed += 1
                asm.feed(raw)
        assert fed == 1 + (3 + 37 * 4 + 4 - 1) // chunk_bytes  # the piece holding the value's last byte
    s = {"s": SparseTensor(np.array([1, 5]), np.array([1.0, np.nan], np.float64), (8,))}
    with pytest.raises(TransportError, match="tensor s: non-finite values"):
        decode_stream(_chunks(s, 8), None, 1 << 20)


def test_receive_buffers_reused_only_when_nothing_decoded_is_alive() -> None:
    """Bodies land in reused buffers, but never in one that a decoded tensor still views: a
    tensor a caller holds keeps its values while later messages of the same size arrive."""
    import gc

    from privfl.transport.codec import MessageAssembler, ReceiveBuffers
    pool = ReceiveBuffers(max_buffers=2, min_bytes=1)

    def receive(seed: int) -> np.ndarray:
        t = {"w": np.random.default_rng(seed).standard_normal(512).astype(np.float32)}
        asm = MessageAssembler(spec_of(t), 1 << 20, buffers=pool)
        for raw in _chunks(t, 500):
            asm.feed(raw)
        got = asm.message().tensors["w"]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, t["w"])  # decoded tensors identical to what was sent
        return got

    first = receive(0)
    kept = first.copy()
    second = receive(1)  # `first` is alive: a second buffer
    assert not np.shares_memory(first, second)
    third = receive(2)  # both alive and the pool is full: a buffer of its own
    assert not np.shares_memory(third, first) and not np.shares_memory(third, second)
    np.testing.assert_array_equal(first, kept)
    address = first.__array_interface__["data"][0]
    del first, third
    gc.collect()
    again = receive(3)  # `first`'s buffer is idle now: reused
    assert again.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(second, receive(1))  # `second` untouched throughout
