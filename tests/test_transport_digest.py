"""Digest paths of the codec: helper-thread hashing, precomputed digests, clean-up, buffers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import privfl.transport.codec as codec
from privfl.transport import (
    Message,
    TransportError,
    decode_stream,
    encode_message,
    iter_chunks,
    model_digest,
    spec_of,
)
from privfl.transport.codec import BackgroundHash, MessageAssembler
from privfl.transport.proto import gossip_pb2 as pb

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def threaded_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash every body of 1 KiB or more on the helper thread (small, fast test data)."""
    monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)


def _digest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "privfl-digest"]


def _no_digest_threads(timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while _digest_threads() and time.monotonic() < end:
        time.sleep(0.01)
    return not _digest_threads()


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32),
            "b": rng.standard_normal(17).astype("<f8")}


def _chunks(msg: Message) -> list[bytes]:
    return list(iter_chunks(encode_message(msg, "a", "b", 5), 1000))


def test_background_hash_equals_inline_sha256() -> None:
    data = np.arange(300_000, dtype=np.uint8)
    h = BackgroundHash(codec._digest_start([]))
    for i in range(0, data.size, 70_001):
        h.update(memoryview(data)[i:i + 70_001])
    ref = codec._digest_start([])
    ref.update(data)
    assert h.digest() == ref.digest()
    assert _no_digest_threads()


def test_threaded_round_trip_digest_and_writable_arrays(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t))
    m = decode_stream(ch, spec_of(t), 1 << 20)
    assert m.digest == model_digest(t)
    np.testing.assert_array_equal(m.tensors["w"], t["w"])
    assert m.tensors["w"].flags.writeable  # callers may average in place
    assert _no_digest_threads()


def test_threaded_tampered_body_refused_and_helper_stops(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t))
    bad = bytearray(ch[3])
    bad[-1] ^= 1  # one flipped bit inside a data chunk
    ch[3] = bytes(bad)
    with pytest.raises(TransportError, match="digest mismatch"):
        decode_stream(ch, spec_of(t), 1 << 20)
    assert _no_digest_threads()


def test_abandoned_streams_release_helper_threads(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t))
    asm = MessageAssembler(spec_of(t), 1 << 20)
    for raw in ch[:4]:  # stream cut off mid-body (deadline, peer gone)
        assert not asm.feed(raw)
    assert _digest_threads()
    asm.close()
    gen = iter_chunks(encode_message(Message("model", 1, t), "a", "b", 6), 1000)
    next(gen), next(gen)  # the sender's helper is running
    gen.close()  # gRPC stops consuming the request iterator
    assert _no_digest_threads()


def test_body_longer_than_declared_refused(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t))
    with pytest.raises(TransportError, match="longer than the declared"):
        decode_stream(ch[:-1] + [ch[1]] + ch[-1:], spec_of(t), 1 << 20)
    assert _no_digest_threads()


@pytest.mark.parametrize("threaded", [False, True])
def test_precomputed_digest_is_sent_and_checked(monkeypatch: pytest.MonkeyPatch,
                                                threaded: bool) -> None:
    if threaded:
        monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)
    t = _model()
    good = model_digest(t)
    enc = encode_message(Message("model", 1, t, digest=good), "a", "b", 5)
    assert enc.digest == good  # known up front: the body is not hashed again on sending
    m = decode_stream(list(iter_chunks(enc, 1000)), spec_of(t), 1 << 20)
    assert m.digest == good
    wrong = Message("model", 1, t, digest=model_digest({"w": t["w"]}))
    with pytest.raises(TransportError, match="digest mismatch"):  # a verifying receiver
        decode_stream(_chunks(wrong), spec_of(t), 1 << 20)
    with pytest.raises(TransportError, match="32-byte"):
        encode_message(Message("model", 1, t, digest=b"short"), "a", "b", 5)
    trailer = pb.Chunk.FromString(_chunks(Message("model", 1, t))[-1]).trailer
    assert trailer.model_digest == good  # computed on the fly when not given


def test_receive_buffer_is_fully_written_before_use() -> None:
    t = {"w": np.zeros(5000, np.float32)}  # uninitialized memory must never leak out
    ch = _chunks(Message("model", 1, t))
    with pytest.raises(TransportError, match="truncated"):
        decode_stream(ch[:-2] + ch[-1:], None, 1 << 20)
    m = decode_stream(ch, None, 1 << 20)
    assert not m.tensors["w"].any()
