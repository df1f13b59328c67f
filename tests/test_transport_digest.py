"""Digest paths of the codec: helper-thread hashing, precomputed digests, clean-up, buffers,
one hash pass per side with either digest algorithm, tampering refused, identical decoding."""

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
    """Hash every SHA-256 body of 1 KiB or more on the helper thread (small, fast test data)."""
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


@pytest.mark.parametrize("algorithm", sorted(codec.DIGEST_ALGORITHMS))
def test_background_hash_equals_inline_hash(algorithm: str) -> None:
    data = np.arange(300_000, dtype=np.uint8)
    h = BackgroundHash(codec._digest_start([], algorithm))
    for i in range(0, data.size, 70_001):
        h.update(memoryview(data)[i:i + 70_001])
    ref = codec._digest_start([], algorithm)
    ref.update(data)
    assert h.digest() == ref.digest()
    assert _no_digest_threads()


SHA = "sha256"  # the hash that goes to a helper thread (BLAKE3 is hashed inline)


def test_threaded_round_trip_digest_and_writable_arrays(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t, digest_algorithm=SHA))
    m = decode_stream(ch, spec_of(t), 1 << 20)
    assert m.digest == model_digest(t, SHA)
    np.testing.assert_array_equal(m.tensors["w"], t["w"])
    assert m.tensors["w"].flags.writeable  # callers may average in place
    assert _no_digest_threads()


def test_threaded_tampered_body_refused_and_helper_stops(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t, digest_algorithm=SHA))
    bad = bytearray(ch[3])
    bad[-1] ^= 1  # one flipped bit inside a data chunk
    ch[3] = bytes(bad)
    with pytest.raises(TransportError, match="digest mismatch"):
        decode_stream(ch, spec_of(t), 1 << 20)
    assert _no_digest_threads()


def test_abandoned_streams_release_helper_threads(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t, digest_algorithm=SHA))
    asm = MessageAssembler(spec_of(t), 1 << 20)
    for raw in ch[:4]:  # stream cut off mid-body (deadline, peer gone)
        assert not asm.feed(raw)
    assert _digest_threads()
    asm.close()
    gen = iter_chunks(encode_message(Message("model", 1, t, digest_algorithm=SHA), "a", "b", 6), 1000)
    next(gen), next(gen)  # the sender's helper is running
    gen.close()  # gRPC stops consuming the request iterator
    assert _no_digest_threads()


def test_body_longer_than_declared_refused(threaded_hash: None) -> None:
    t = _model()
    ch = _chunks(Message("model", 1, t, digest_algorithm=SHA))
    with pytest.raises(TransportError, match="longer than the declared"):
        decode_stream(ch[:-1] + [ch[1]] + ch[-1:], spec_of(t), 1 << 20)
    assert _no_digest_threads()


@pytest.mark.parametrize("threaded", [False, True])
def test_precomputed_digest_is_sent_and_checked(monkeypatch: pytest.MonkeyPatch,
                                                threaded: bool) -> None:
    if threaded:
        monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)
    t = _model()
    good = model_digest(t, SHA)  # SHA-256 hashes large bodies on the helper thread
    enc = encode_message(Message("model", 1, t, digest=good, digest_algorithm=SHA), "a", "b", 5)
    assert enc.digest == good  # known up front: the body is not hashed again on sending
    m = decode_stream(list(iter_chunks(enc, 1000)), spec_of(t), 1 << 20)
    assert m.digest == good
    wrong = Message("model", 1, t, digest=model_digest({"w": t["w"]}, SHA), digest_algorithm=SHA)
    with pytest.raises(TransportError, match="digest mismatch"):  # a verifying receiver
        decode_stream(_chunks(wrong), spec_of(t), 1 << 20)
    with pytest.raises(TransportError, match="32-byte"):
        encode_message(Message("model", 1, t, digest=b"short"), "a", "b", 5)
    trailer = pb.Chunk.FromString(_chunks(Message("model", 1, t))[-1]).trailer
    assert trailer.model_digest == model_digest(t, "blake3")  # computed on the fly when not given


def test_receive_buffer_is_fully_written_before_use() -> None:
    t = {"w": np.zeros(5000, np.float32)}  # uninitialized memory must never leak out
    ch = _chunks(Message("model", 1, t))
    with pytest.raises(TransportError, match="truncated"):
        decode_stream(ch[:-2] + ch[-1:], None, 1 << 20)
    m = decode_stream(ch, None, 1 << 20)
    assert not m.tensors["w"].any()


# --------------------------------------------------------------------------- one pass per side, either hash

class _Counted:
    """A digest hash that records every byte it is fed (wrapping the real one)."""

    def __init__(self, inner: codec.Hasher) -> None:
        self.inner, self.fed = inner, 0

    def update(self, data: memoryview | bytes, /) -> None:
        self.fed += memoryview(data).nbytes
        self.inner.update(data)

    def digest(self) -> bytes:
        return self.inner.digest()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[_Counted]:
    """Every digest hash made from now on, counting what it is fed."""
    made: list[_Counted] = []
    for name, make in list(codec.DIGEST_ALGORITHMS.items()):
        def counting(make=make) -> _Counted:  # noqa: ANN001
            made.append(_Counted(make()))
            return made[-1]
        monkeypatch.setitem(codec.DIGEST_ALGORITHMS, name, counting)
    return made


def _prefix_bytes(t: dict[str, np.ndarray]) -> int:
    specs, _ = codec.encode_tensors(t)
    return len(codec._DIGEST_DOMAIN) + sum(len(codec.spec_line(s)) for s in specs) + 1


@pytest.mark.parametrize("algorithm, given, threaded", [
    ("blake3", False, False), ("sha256", False, False), ("sha256", False, True), ("sha256", True, True)])
def test_each_side_hashes_the_body_exactly_once(counted: list[_Counted], monkeypatch: pytest.MonkeyPatch,
                                                algorithm: str, given: bool, threaded: bool) -> None:
    if threaded:
        monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)
    t = _model()
    body = sum(a.nbytes for a in t.values())
    digest = model_digest(t, algorithm) if given else None  # the caller's own pass (its ledger)
    del counted[:]
    m = decode_stream(_chunks(Message("model", 1, t, digest=digest, digest_algorithm=algorithm)),
                      spec_of(t), 1 << 20)
    assert m.digest_algorithm == algorithm and m.digest == model_digest(t, algorithm)
    # one hash per side (only the receiver's when the sender was given the digest), each fed
    # the domain, the spec lines and every body byte exactly once
    assert [c.fed for c in counted[:1 if given else 2]] == [_prefix_bytes(t) + body] * (1 if given else 2)
    assert len(counted) == (2 if given else 3)  # + the model_digest of the assertion above


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_tampered_chunk_refused_with_either_hash(monkeypatch: pytest.MonkeyPatch, algorithm: str) -> None:
    monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)  # SHA-256 on its helper thread too
    t = _model()
    ch = _chunks(Message("model", 1, t, digest_algorithm=algorithm))
    assert len(ch) > 4
    for i in (0, 1, len(ch) // 2, len(ch) - 2, len(ch) - 1):  # the piece packed with the header, ..., with the trailer
        bad = list(ch)
        flipped = bytearray(bad[i])
        data = pb.Chunk.FromString(bad[i]).data
        assert data
        flipped[bad[i].index(data) + len(data) // 2] ^= 0x10  # a body byte, wherever the piece sits
        bad[i] = bytes(flipped)
        with pytest.raises(TransportError, match="digest mismatch"):
            decode_stream(bad, spec_of(t), 1 << 20)
    assert decode_stream(ch, spec_of(t), 1 << 20).digest == model_digest(t, algorithm)
    assert _no_digest_threads()


def test_fast_digest_decodes_identical_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    from privfl.transport import SparseTensor
    rng = np.random.default_rng(9)
    t = {"w": rng.standard_normal((300, 7)).astype(">f4"), "h": rng.standard_normal(33).astype("<f2"),
         "i": rng.integers(-9, 9, 50).astype(np.int16),
         "s": SparseTensor(np.array([1, 40, 299]), np.array([0.5, -2.0, 7.0]), (300,))}
    monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)
    runs = {"blake3": decode_stream(_chunks(Message("model", 1, t)), spec_of(t), 1 << 20),
            "sha256_given": decode_stream(
                _chunks(Message("model", 1, t, digest=model_digest(t, SHA), digest_algorithm=SHA)),
                spec_of(t), 1 << 20)}
    assert runs["blake3"].digest_algorithm == "blake3" and runs["sha256_given"].digest_algorithm == "sha256"
    assert runs["blake3"].digest != runs["sha256_given"].digest
    for m in runs.values():
        assert set(m.tensors) == set(t)
        for k in ("w", "h", "i"):
            got = m.tensors[k]
            assert isinstance(got, np.ndarray) and got.dtype == np.asarray(t[k]).dtype.newbyteorder("<")
            assert got.shape == np.asarray(t[k]).shape
            np.testing.assert_array_equal(got, t[k])
        s = m.tensors["s"]
        assert isinstance(s, SparseTensor)
        np.testing.assert_array_equal(s.to_dense(), t["s"].to_dense())  # type: ignore[union-attr]
    for k in ("w", "h", "i"):  # bit for bit the same bytes whichever hash guarded them
        assert runs["blake3"].tensors[k].tobytes() == runs["sha256_given"].tensors[k].tobytes()  # type: ignore[union-attr]


def test_unknown_digest_algorithm_refused() -> None:
    t = _model()
    with pytest.raises(TransportError, match="digest algorithm 'md5' is not one of blake3, sha256"):
        encode_message(Message("model", 1, t, digest_algorithm="md5"), "a", "b", 5)
    for name in ("md5", ""):
        ch = _chunks(Message("model", 1, t))
        c = pb.Chunk.FromString(ch[0])
        c.header.digest_algorithm = name
        ch[0] = c.SerializeToString()
        with pytest.raises(TransportError, match="is not one of blake3, sha256"):
            decode_stream(ch, spec_of(t), 1 << 20)
