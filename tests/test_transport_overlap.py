"""Hashing overlapped with the stream: a client hashes its body ahead while it waits for the
server's accept, a helper's hash is fed the receive buffer in regions, finiteness without
temporaries -- every body byte still hashed exactly once per side, tampering still refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import privfl.transport.codec as codec
from privfl.transport import Message, TransportError, decode_stream, encode_message, iter_chunks, model_digest
from privfl.transport.codec import MessageAssembler
from privfl.transport.proto import gossip_pb2 as pb
from tests.test_transport_digest import _prefix_bytes, counted  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(30)


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"w": rng.standard_normal((50, 41)).astype(np.float32), "b": rng.standard_normal(9)}


class _ReadyAfter(threading.Event):
    """An event that reports itself set from its ``n``-th look on (the accept arriving mid-way)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n or super().is_set()


@pytest.mark.parametrize("looks", [0, 1, 3, 10_000])  # accept at once, after 1 / 3 pieces, never
def test_hash_ahead_feeds_every_byte_once_and_stops_at_the_accept(
        counted: list, looks: int) -> None:  # noqa: F811
    t = _model()
    body = sum(a.nbytes for a in t.values())
    enc = encode_message(Message("model", 1, t), "a", "b", 7)
    ready = _ReadyAfter(looks)
    gen = iter_chunks(enc, 1000, header_alone=True, ready=ready)
    head = next(gen)
    assert pb.Chunk.FromString(head) == pb.Chunk(header=enc.header)  # the header leaves alone, first
    assert counted[0].fed == _prefix_bytes(t)  # nothing of the body hashed before the header left
    first = next(gen)  # resumed after the header: hashes ahead until ``ready``, then cuts pieces
    ahead = min(body, looks * 1000)  # one 1000-byte piece per look before ``ready``
    # the stream cuts (and hashes, past what was hashed ahead) one piece beyond the one it sends
    assert counted[0].fed == _prefix_bytes(t) + max(ahead, 2000)
    rest = list(gen)
    assert counted[0].fed == _prefix_bytes(t) + body  # every body byte exactly once
    assert len(counted) == 1
    m = decode_stream([head, first, *rest], codec.spec_of(t), 1 << 20)
    assert m.digest == enc.digest == model_digest(t)
    np.testing.assert_array_equal(m.tensors["w"], t["w"])


def test_hashed_ahead_body_tampered_in_flight_is_refused() -> None:
    t = _model()
    enc = encode_message(Message("model", 1, t), "a", "b", 8)
    ch = list(iter_chunks(enc, 1000, header_alone=True, ready=_ReadyAfter(2)))
    bad = bytearray(ch[1])  # a piece the sender hashed ahead, before the accept
    bad[-7] ^= 0x01
    with pytest.raises(TransportError, match="digest mismatch"):
        decode_stream([ch[0], bytes(bad), *ch[2:]], codec.spec_of(t), 1 << 20)


@pytest.mark.parametrize("batch", [1, 3000, 1 << 30])
def test_helper_hash_fed_in_regions_hashes_each_byte_once(counted: list, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                         batch: int) -> None:
    monkeypatch.setattr(codec, "PARALLEL_HASH_BYTES", 1024)  # SHA-256 on the helper thread
    monkeypatch.setattr(codec, "HASH_BATCH_BYTES", batch)
    t = _model()
    body = sum(a.nbytes for a in t.values())
    ch = list(iter_chunks(encode_message(Message("model", 1, t, digest_algorithm="sha256"), "a", "b", 9), 1000))
    del counted[:]
    asm = MessageAssembler(codec.spec_of(t), 1 << 20)
    assert not any(asm.feed(raw) for raw in ch[:-1])
    assert asm.feed(ch[-1])
    assert [c.fed for c in counted] == [_prefix_bytes(t) + body]
    assert asm.message().digest == model_digest(t, "sha256")
    bad = list(ch)
    flipped = bytearray(bad[2])
    flipped[-3] ^= 0x40
    bad[2] = bytes(flipped)
    with pytest.raises(TransportError, match="digest mismatch"):
        decode_stream(bad, codec.spec_of(t), 1 << 20)


def test_finiteness_check_spans_blocks_without_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_FINITE_BLOCK", 7)  # several blocks per piece, a short last one
    a = np.arange(50, dtype=np.float32)
    assert codec._all_finite(a) and codec._all_finite(a.reshape(5, 10))
    for bad in (np.nan, np.inf, -np.inf):
        for i in (0, 6, 7, 49):
            b = a.copy()
            b[i] = bad
            assert not codec._all_finite(b)
    assert codec._all_finite(np.array([np.nan], np.float32)[:0]) and codec._all_finite(np.arange(3))
    assert not codec._all_finite(np.array([1.0, np.nan], np.float16))
