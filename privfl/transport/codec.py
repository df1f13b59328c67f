"""Tensor codec of the gossip wire: header/body/trailer chunks, never pickle.

Why: everything that arrives from a peer is untrusted. A message is a protobuf ``Header``
(sender, sequence, round, kind, tensor specs), a body of raw little-endian bytes streamed
in ~1 MiB ``Chunk.data`` pieces, and a ``Trailer`` with the model digest; wire version 2
packs the header into the first Chunk with the first piece and the trailer into the last
(``iter_chunks``), so a small message is one gRPC message. The receiver checks declared
sizes before reading the body, expected names/shapes/dtypes, sparse index ranges,
finiteness (piece by piece, as the body arrives) and the digest before anything reaches
the caller; the body lands in one reused buffer (``ReceiveBuffers``) and the tensors are
views of it.

The model digest's hash is named in the header (``Header.digest_algorithm``, signed):
BLAKE3 by default, both when the transport hashes the body itself and for the digest a
node records in its ledger before a model leaves (``model_digest``; ~3.5x SHA-256's speed
on one core: 6 vs 21 ms per 40 MB on the dev box); SHA-256 when a caller asks for it. Each side hashes
every body byte exactly once, overlapped with the stream: the sender as it cuts the chunks (a
client starts while it waits for the server's accept), the receiver as they arrive.
"""

from __future__ import annotations

import hashlib
import math
import queue
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import numpy as np
from google.protobuf.message import DecodeError

from privfl.errors import PrivflError
from privfl.transport.proto import gossip_pb2 as pb

WIRE_VERSION = 3  # 3: the ledger head signed on its own; 2: header packed with the first body piece (1: a Chunk each)
CHUNK_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_SCALARS = 64
MAX_SCALAR_KEY = 64  # characters of a scalar's name
MAX_HEADER_BYTES = 2 << 20  # the serialized header chunk (specs, scalars, certificate)
MAX_CERTIFICATE_BYTES = 16 * 1024
# what a message kind may carry: "model" (tensors required), "empty" (no tensors), "any"
KindRules = Mapping[str, str]
_RULES = ("model", "empty", "any")
# SHA-256 bodies at least this large are hashed on a helper thread (hashlib releases the GIL on
# large updates): the sender's helper hashes each whole tensor buffer in one GIL-free update,
# started before the header leaves (so it also fills the wait for the server's accept); the
# receiver's helper is handed the filled part of the receive buffer in regions of at least
# HASH_BATCH_BYTES (one hand-off each, not one per piece). BLAKE3 (~0.16 ms per MiB) is hashed
# inline, piece by piece while it is in cache, and a client hashes its body ahead while it
# waits for the accept (``_hash_ahead``): on the loaded 2-core dev box a helper thread for BLAKE3
# on both sides cost more CPU than it overlapped (two processes, interleaved, 10 / 40 MB: ratio
# 0.51-0.63 / 0.62-0.72 on helpers vs 0.54-0.73 / 0.73-0.76 inline); a helper on the receiving side
# alone won 4 of 7 interleaved runs at 40 MB, within the +-0.07 that two identical variants differ
# by there, so the simpler inline path stays
PARALLEL_HASH_BYTES = 4 << 20
THREADED_DIGESTS = frozenset({"sha256"})
HASH_BATCH_BYTES = 4 << 20  # the receiver hashes its buffer in regions of at least this size (and the rest at the end)
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]{1,200}$")
_SCALAR_KEY = re.compile(rf"^[A-Za-z0-9_.:\-]{{1,{MAX_SCALAR_KEY}}}$")
# dtypes a tensor may have on the wire (numpy little-endian strings)
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8",
                            "|u1", "<u2", "<u4", "<u8", "|b1"})
_INDEX_DTYPE = np.dtype("<i8")
_DIGEST_DOMAIN = b"privfl-model-v1\n"


class Hasher(Protocol):
    """What the model digest needs of a hash object (hashlib's and blake3's both fit)."""

    def update(self, data: memoryview | bytes, /) -> object: ...  # noqa: D102

    def digest(self) -> bytes: ...  # noqa: D102


# the hashes a model digest may use (32-byte digests), by the name the header carries
DIGEST_ALGORITHMS: dict[str, Callable[[], Hasher]] = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
LEDGER_DIGEST = "blake3"  # ``model_digest``'s default: what a node's ledger records of a sent model
STREAM_DIGEST = "blake3"  # what the transport uses when it hashes a body itself (no digest given)


class TransportError(PrivflError):
    """A message or peer was refused by the transport; the message says why."""


class PeerUnavailable(TransportError):
    """A peer could not be reached (down, handshake refused, deadline, or backing off)."""


class PeerRefused(TransportError):
    """A reachable peer refused our call (not authorized or invalid message)."""


@dataclass(frozen=True)
class SparseTensor:
    """A sparse tensor: strictly increasing flat C-order ``indices`` (int64) and ``values``."""

    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]

    def to_dense(self) -> np.ndarray:
        """The dense array (zeros where no value is stored)."""
        out = np.zeros(int(np.prod(self.shape, dtype=np.int64)), dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)


Tensor = np.ndarray | SparseTensor


@dataclass(frozen=True)
class TensorExpectation:
    """What a received tensor must look like: dense shape, dtype, and whether sparse is OK.

    ``bounded``: ``shape`` is the largest size of each dimension rather than the exact
    shape (same number of dimensions), for tensors whose length varies per message
    (the byte frame of a compressed update).
    """

    shape: tuple[int, ...]
    dtype: str
    allow_sparse: bool = True
    bounded: bool = False

    def shape_ok(self, shape: tuple[int, ...]) -> bool:
        """Whether a received tensor of ``shape`` fits this expectation."""
        if not self.bounded:
            return tuple(shape) == tuple(self.shape)
        return len(shape) == len(self.shape) and all(0 <= s <= m for s, m in zip(shape, self.shape))


Layout = Mapping[str, TensorExpectation]


@dataclass(frozen=True)
class SpecChoice:
    """Alternative layouts: a message's tensors must match exactly one of them.

    Why: a node accepts either its dense model (its parameter names) or a compressed
    update (one bounded 1-D byte frame); the layout is chosen by the first tensor's name, and
    then every name, shape and dtype is checked against that layout alone.
    """

    layouts: tuple[Layout, ...]

    def layout_for(self, names: Iterable[str]) -> Layout | None:
        """The layout that holds the first of ``names`` (None if there are no names)."""
        first = next(iter(names), None)
        if first is None:
            return None
        for layout in self.layouts:
            if first in layout:
                return layout
        raise TransportError(f"unexpected tensor name {first!r}")


ExpectedSpec = Layout | SpecChoice


def _layout(expected: ExpectedSpec | None, specs: Iterable[pb.TensorSpec]) -> Layout | None:
    """The single layout that ``specs`` must match (resolving a SpecChoice by tensor name)."""
    if isinstance(expected, SpecChoice):
        return expected.layout_for(s.name for s in specs)
    return expected


def spec_of(tensors: Mapping[str, Tensor], allow_sparse: bool = True) -> dict[str, TensorExpectation]:
    """An expected spec that matches ``tensors`` (convenient from a model's parameters)."""
    out = {}
    for name, t in tensors.items():
        arr = t.values if isinstance(t, SparseTensor) else np.asarray(t)
        shape = t.shape if isinstance(t, SparseTensor) else arr.shape
        out[name] = TensorExpectation(tuple(int(s) for s in shape),
                                      arr.dtype.newbyteorder("<").str, allow_sparse)
    return out


@dataclass(frozen=True)
class Message:
    """A message to send: kind, round and named tensors (dense arrays or SparseTensor).

    ``sequence`` None lets the client assign the next sequence number. ``digest`` is the
    ``model_digest(tensors, digest_algorithm)`` when the caller already computed it (e.g.
    for its ledger): it is sent as is instead of hashing the body a second time, and a
    verifying receiver refuses the message if it does not match the bytes.
    ``digest_algorithm`` None: ``LEDGER_DIGEST`` for a given digest, else ``STREAM_DIGEST``
    (computed while the body streams); both BLAKE3.
    """

    kind: str
    round: int = 0
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)
    sequence: int | None = None
    digest: bytes | None = None
    digest_algorithm: str | None = None


@dataclass(frozen=True)
class DecodedMessage:
    """A received, authenticated and validated message."""

    sender: str
    recipient: str
    sequence: int
    round: int
    kind: str
    tensors: dict[str, Tensor]
    scalars: dict[str, float]
    digest: bytes
    in_reply_to: int
    wire_bytes: int
    ledger_head: tuple[int, bytes] | None = None  # the sender's signed (index, entry hash), verified
    head_signature: bytes = b""  # the sender's own signature of ledger_head (64 bytes), verified
    digest_algorithm: str = LEDGER_DIGEST  # the hash of ``digest`` (a DIGEST_ALGORITHMS name)


Seal = Callable[[pb.Header, bytes], pb.Trailer]  # (header, digest) -> signed trailer


@dataclass
class EncodedMessage:
    """A message ready to stream: its header and body buffers (zero-copy views).

    ``digest`` is computed while the body is streamed by ``iter_chunks`` (so hashing
    overlaps sending) and is set once the trailer is produced; ``compute_digest`` forces it.
    """

    header: pb.Header
    buffers: list[memoryview]
    digest: bytes | None = None
    seal: Seal | None = None  # signs the trailer once the digest is known (transport/signing.py)

    def compute_digest(self) -> bytes:
        """The model digest (hashing the body now if it has not been streamed yet)."""
        if self.digest is None:
            h = _digest_start(self.header.tensors, self.header.digest_algorithm)
            for b in self.buffers:
                h.update(b)
            self.digest = h.digest()
        return self.digest

    @property
    def body_bytes(self) -> int:
        """Total body length in bytes."""
        return sum(b.nbytes for b in self.buffers)


def _le(dtype: np.dtype, name: str) -> np.dtype:
    """The little-endian version of ``dtype``; TransportError if it may not go on the wire."""
    le = dtype if dtype.byteorder == "|" else dtype.newbyteorder("<")
    if le.str not in ALLOWED_DTYPES:
        raise TransportError(f"tensor {name}: dtype {dtype} is not allowed on the wire")
    return le


def spec_line(spec: pb.TensorSpec) -> bytes:
    """One tensor spec's canonical line (hashed into the model digest and signed)."""
    shape = ",".join(str(s) for s in spec.shape)
    return f"{spec.name}\0{spec.dtype}\0{shape}\0{int(spec.sparse)}\0{spec.nnz}\n".encode()


def _digest_maker(algorithm: str) -> Callable[[], Hasher]:
    """The hash named ``algorithm``; TransportError if it is not one of DIGEST_ALGORITHMS."""
    make = DIGEST_ALGORITHMS.get(algorithm)
    if make is None:
        raise TransportError(f"digest algorithm {algorithm[:20]!r} is not one of "
                             f"{', '.join(sorted(DIGEST_ALGORITHMS))}")
    return make


def _digest_start(specs: Iterable[pb.TensorSpec], algorithm: str) -> Hasher:
    """A hash of ``algorithm`` fed with the digest's domain and canonical spec lines (the body follows)."""
    h = _digest_maker(algorithm)()
    h.update(_DIGEST_DOMAIN)
    for s in specs:
        h.update(spec_line(s))
    h.update(b"\n")
    return h


def _hash_worker(q: queue.SimpleQueue, h: Hasher, out: list[bytes]) -> None:
    while (item := q.get()) is not None:
        h.update(item)
    out.append(h.digest())


class BackgroundHash:
    """A hash fed in order and computed on a helper thread, overlapping the stream.

    Why: hashlib and blake3 release the GIL while they hash a large buffer, so the helper uses a
    second core while the caller copies and streams the next chunk; the digest is the
    same as hashing inline. Buffers passed to ``update`` must not change until ``digest``
    returns. ``close`` (or garbage collection) stops the helper without a digest.
    """

    def __init__(self, h: Hasher) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._out: list[bytes] = []
        self._thread = threading.Thread(target=_hash_worker, args=(self._q, h, self._out),
                                        name="privfl-digest", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._q.put, None)

    def update(self, data: memoryview | bytes) -> None:
        """Queue ``data`` to be hashed after everything queued before it."""
        self._q.put(data)

    def digest(self) -> bytes:
        """Wait for the helper to hash everything queued and return the digest."""
        self._stop()
        self._thread.join()
        return self._out[0]

    def close(self) -> None:
        """Stop the helper (whatever is still queued is hashed and dropped)."""
        self._stop()


def _hasher(specs: Iterable[pb.TensorSpec], body_bytes: int, algorithm: str) -> Hasher | BackgroundHash:
    h = _digest_start(specs, algorithm)
    return BackgroundHash(h) if algorithm in THREADED_DIGESTS and body_bytes >= PARALLEL_HASH_BYTES else h


def encode_tensors(tensors: Mapping[str, Tensor]) -> tuple[list[pb.TensorSpec], list[memoryview]]:
    """Tensor specs and zero-copy little-endian body buffers for named dense/sparse tensors."""
    if len(tensors) > MAX_TENSORS:
        raise TransportError(f"too many tensors: {len(tensors)} > {MAX_TENSORS}")
    specs: list[pb.TensorSpec] = []
    buffers: list[memoryview] = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise TransportError(f"tensor name {name!r} is not allowed on the wire")
        if isinstance(t, SparseTensor):
            vals_in = np.asarray(t.values)
            values = np.ascontiguousarray(vals_in, dtype=_le(vals_in.dtype, name)).reshape(-1)
            idx = np.ascontiguousarray(t.indices, dtype=_INDEX_DTYPE).reshape(-1)
            if idx.size != values.size:
                raise TransportError(f"tensor {name}: {idx.size} indices but {values.size} values")
            spec = pb.TensorSpec(name=name, dtype=values.dtype.str, shape=list(t.shape),
                                 sparse=True, nnz=idx.size)
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; arrays export buffers on every Python
            buffers += [memoryview(idx).cast("B"),  # type: ignore[arg-type]
                        memoryview(values.view(np.uint8))]  # type: ignore[arg-type]
        else:
            arr = np.asarray(t)
            arr = np.ascontiguousarray(arr, dtype=_le(arr.dtype, name))
            spec = pb.TensorSpec(name=name, dtype=arr.dtype.str, shape=list(arr.shape))
            buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # (as above)
        specs.append(spec)
    return specs, buffers


def model_digest(tensors: Mapping[str, Tensor], algorithm: str = LEDGER_DIGEST) -> bytes:
    """Model digest of named tensors (BLAKE3 unless ``algorithm`` says), exactly as a trailer carries it."""
    specs, buffers = encode_tensors(tensors)
    h = _digest_start(specs, algorithm)
    for b in buffers:
        h.update(b)
    return h.digest()


def encode_message(msg: Message, sender: str, recipient: str, sequence: int,
                   in_reply_to: int = 0, certificate: bytes = b"",
                   seal: Seal | None = None) -> EncodedMessage:
    """Build the header and body of ``msg`` (its digest is computed while it streams).

    ``certificate``: the sender's DER certificate for the header; ``seal``: builds the
    signed trailer from (header, digest) -- without it the trailer carries the digest only.
    """
    if not _KIND.match(msg.kind):
        raise TransportError(f"message kind {msg.kind!r} is invalid")
    if msg.digest is not None and (not isinstance(msg.digest, bytes) or len(msg.digest) != 32):
        raise TransportError("message digest must be the 32-byte model_digest of its tensors")
    algorithm = msg.digest_algorithm or (LEDGER_DIGEST if msg.digest is not None else STREAM_DIGEST)
    _digest_maker(algorithm)
    if len(msg.scalars) > MAX_SCALARS:
        raise TransportError(f"too many scalars: {len(msg.scalars)} > {MAX_SCALARS}")
    for k in msg.scalars:
        if not isinstance(k, str) or not _SCALAR_KEY.match(k):
            raise TransportError(f"scalar name {str(k)[:80]!r} is not allowed on the wire")
    specs, buffers = encode_tensors(msg.tensors)
    header = pb.Header(version=WIRE_VERSION, sender=sender, recipient=recipient,
                       sequence=sequence, round=msg.round, kind=msg.kind, tensors=specs,
                       body_bytes=sum(b.nbytes for b in buffers), in_reply_to=in_reply_to,
                       sender_certificate=certificate, digest_algorithm=algorithm)
    for k, v in msg.scalars.items():
        header.scalars[k] = float(v)
    return EncodedMessage(header, buffers, msg.digest, seal)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_HEADER_TAG = b"\x0a"  # field 1 (Chunk.header), wire type 2 (length-delimited)
_DATA_TAG = b"\x12"  # field 2 (Chunk.data)
_TRAILER_TAG = b"\x1a"  # field 3 (Chunk.trailer)
_FIELDS = {0x0A: 0, 0x12: 1, 0x1A: 2}  # first byte of a Chunk field -> its slot in ``split_chunk``


def _body_pieces(enc: EncodedMessage, chunk_bytes: int, h: Hasher | None,
                 hashed: int = 0) -> Iterator[tuple[int, list[memoryview]]]:
    """The body as (size, views) groups of ``chunk_bytes`` (the last may be shorter), each hashed
    into ``h`` as it is cut, while it is still in cache; the first ``hashed`` body bytes are
    not hashed again (``_hash_ahead`` fed them)."""
    pending: list[memoryview] = []
    size = at = 0  # bytes in ``pending``; body offset of the next piece
    for buf in enc.buffers:
        off = 0
        while off < buf.nbytes:
            take = min(chunk_bytes - size, buf.nbytes - off)
            piece = buf[off:off + take]
            if h is not None and at + take > hashed:
                h.update(piece[max(0, hashed - at):])
            pending.append(piece)
            size += take
            off += take
            at += take
            if size == chunk_bytes:
                yield size, pending
                pending, size = [], 0
    if size:
        yield size, pending


def _hash_ahead(enc: EncodedMessage, h: Hasher, chunk_bytes: int, ready: threading.Event) -> int:
    """Feed ``h`` the body from its start, ``chunk_bytes`` at a time, until ``ready`` is set or
    the whole body is fed; the number of body bytes fed.

    Why: a client's body may leave only after the server's signed accept, and that round trip
    is time its thread waits anyway; the pieces hashed in it are not hashed on the stream."""
    fed = 0
    for buf in enc.buffers:
        for off in range(0, buf.nbytes, chunk_bytes):
            if ready.is_set():
                return fed
            piece = buf[off:off + chunk_bytes]
            h.update(piece)
            fed += piece.nbytes
    return fed


def iter_chunks(enc: EncodedMessage, chunk_bytes: int = CHUNK_BYTES,
                header_alone: bool = False, ready: threading.Event | None = None) -> Iterator[bytes]:
    """Serialized ``Chunk`` messages (wire version 2): the header packed with the first body
    piece (<= chunk_bytes), the pieces, and the trailer packed with the last one.

    Why: every gRPC message costs a round through gRPC's queues, so a small message is one
    Chunk and a large one has no Chunk beyond its body pieces. ``header_alone``: the header
    goes in a Chunk of its own (a client's request: its body may leave only after the
    server's signed accept); with ``ready`` too, the generator, resumed after the header,
    hashes the body ahead (inline hashes) until ``ready`` is set -- the accept verified -- and
    only then cuts the first body piece. Chunks are written as their protobuf encoding directly (tag,
    length, bytes), byte-identical to ``Chunk(header=..., data=..., trailer=...)
    .SerializeToString()``, with one copy per Chunk. The digest (if not known yet) is computed
    while the body streams: on a helper thread for large bodies (``PARALLEL_HASH_BYTES``, see
    ``BackgroundHash``), inline piece by piece otherwise. The tensors must not change while the message
    streams (if they do, a verifying receiver refuses it: digest mismatch).
    """
    head = enc.header.SerializeToString()
    lead: list[bytes] = [_HEADER_TAG, _varint(len(head)), head]
    h: Hasher | BackgroundHash | None = None
    if enc.digest is None:  # started before the header leaves: a helper hashes during the accept wait
        h = _hasher(enc.header.tensors, enc.body_bytes, enc.header.digest_algorithm)
        if isinstance(h, BackgroundHash):
            for buf in enc.buffers:  # whole buffers: one GIL-free update each
                h.update(buf)
    try:
        ahead = 0
        if header_alone:
            yield b"".join(lead)
            lead = []
            if ready is not None and h is not None and not isinstance(h, BackgroundHash):
                ahead = _hash_ahead(enc, h, chunk_bytes, ready)
        last: tuple[int, list[memoryview]] | None = None
        for group in _body_pieces(enc, chunk_bytes, None if isinstance(h, BackgroundHash) else h, ahead):
            if last is not None:  # not the last piece: no trailer to pack with it
                yield b"".join([*lead, _DATA_TAG, _varint(last[0]), *last[1]])
                lead = []
            last = group
        if h is not None:
            enc.digest = h.digest()
    finally:
        if isinstance(h, BackgroundHash):
            h.close()
    assert enc.digest is not None
    trailer = enc.seal(enc.header, enc.digest) if enc.seal is not None else pb.Trailer(model_digest=enc.digest)
    tail = trailer.SerializeToString()
    data: list[bytes | memoryview] = [_DATA_TAG, _varint(last[0]), *last[1]] if last is not None else []
    yield b"".join([*lead, *data, _TRAILER_TAG, _varint(len(tail)), tail])


def split_chunk(raw: bytes) -> tuple[memoryview | None, memoryview | None, memoryview | None]:
    """Zero-copy views of the header, data and trailer fields of one serialized ``Chunk``.

    Each field may appear at most once and in field order (what protobuf and ``iter_chunks``
    write); anything else (unknown fields, repeats, overruns, an empty Chunk) is refused.
    """
    out: list[memoryview | None] = [None, None, None]
    mv = memoryview(raw)
    n, i, prev = len(raw), 0, -1
    while i < n:
        slot = _FIELDS.get(raw[i], -1)
        if slot <= prev:
            raise TransportError("malformed chunk: unknown, repeated or out-of-order field")
        length, shift, i = 0, 0, i + 1
        while True:  # the field's length, a varint of at most 10 bytes
            if i >= n or shift > 63:
                raise TransportError("malformed chunk: bad field length")
            b = raw[i]
            length |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                break
            shift += 7
        if i + length > n:
            raise TransportError("malformed chunk: a field runs past the end")
        out[slot] = mv[i:i + length]
        i += length
        prev = slot
    if prev < 0:
        raise TransportError("malformed chunk: empty")
    return out[0], out[1], out[2]


def _expected_nbytes(spec: pb.TensorSpec) -> int:
    itemsize = np.dtype(spec.dtype).itemsize
    if spec.sparse:
        return spec.nnz * (_INDEX_DTYPE.itemsize + itemsize)
    return math.prod(spec.shape) * itemsize


def check_header(header: pb.Header, expected: ExpectedSpec | None, max_body_bytes: int,
                 kinds: KindRules | None = None) -> None:
    """Validate a header before any body byte is accepted; TransportError with the reason.

    ``kinds``: the message kinds accepted here and what each carries ("model": tensors
    required, "empty": none allowed, "any"); None accepts any well-formed kind.
    """
    if header.version != WIRE_VERSION:
        raise TransportError(f"peer speaks wire version {header.version}, this node speaks {WIRE_VERSION}: "
                             "run the same privfl release on every node")
    if not _KIND.match(header.kind):
        raise TransportError(f"invalid message kind {header.kind[:40]!r}")
    if kinds is not None:
        rule = kinds.get(header.kind)
        if rule is None:
            raise TransportError(f"unknown message kind {header.kind!r}")
        if rule == "model" and not header.tensors:
            raise TransportError(f"{header.kind} message carries no tensors")
        if rule == "empty" and header.tensors:
            raise TransportError(f"{header.kind} message must not carry tensors")
    if len(header.sender_certificate) > MAX_CERTIFICATE_BYTES:
        raise TransportError(f"sender certificate of {len(header.sender_certificate)} bytes is too large")
    if len(header.tensors) > MAX_TENSORS:
        raise TransportError(f"too many tensors: {len(header.tensors)}")
    if len(header.scalars) > MAX_SCALARS:
        raise TransportError(f"too many scalars: {len(header.scalars)} > {MAX_SCALARS}")
    for k, v in header.scalars.items():
        if not _SCALAR_KEY.match(k):
            raise TransportError(f"invalid scalar name ({len(k)} characters, starts {k[:20]!r})")
        if not math.isfinite(v):
            raise TransportError(f"scalar {k!r} is not finite")
    expected = _layout(expected, header.tensors)
    names: set[str] = set()
    total = 0
    for spec in header.tensors:
        if not _NAME.match(spec.name):
            raise TransportError(f"invalid tensor name {spec.name!r}")
        if spec.name in names:
            raise TransportError(f"duplicate tensor name {spec.name!r}")
        names.add(spec.name)
        if spec.dtype not in ALLOWED_DTYPES:
            raise TransportError(f"tensor {spec.name}: dtype {spec.dtype!r} not allowed")
        if len(spec.shape) > MAX_NDIM:
            raise TransportError(f"tensor {spec.name}: {len(spec.shape)} dimensions > {MAX_NDIM}")
        numel = math.prod(spec.shape)
        if spec.sparse and spec.nnz > numel:
            raise TransportError(f"tensor {spec.name}: nnz {spec.nnz} > {numel} elements")
        if not spec.sparse and spec.nnz:
            raise TransportError(f"tensor {spec.name}: dense tensor declares nnz")
        total += _expected_nbytes(spec)
        if total > max_body_bytes:
            raise TransportError(f"message too large: body exceeds {max_body_bytes} bytes")
        if expected is not None:
            exp = expected.get(spec.name)
            if exp is None:
                raise TransportError(f"unexpected tensor name {spec.name!r}")
            if not exp.shape_ok(tuple(spec.shape)):
                relation = "exceeds the bound" if exp.bounded else "!= expected"
                raise TransportError(f"tensor {spec.name}: shape {tuple(spec.shape)} {relation} "
                                     f"{tuple(exp.shape)}")
            if spec.dtype != exp.dtype:
                raise TransportError(f"tensor {spec.name}: dtype {spec.dtype} != expected {exp.dtype}")
            if spec.sparse and not exp.allow_sparse:
                raise TransportError(f"tensor {spec.name}: sparse not allowed here")
    if total != header.body_bytes:
        raise TransportError(f"declared body_bytes {header.body_bytes} != {total} from tensor specs")
    if expected is not None and names and names != set(expected):
        missing = sorted(set(expected) - names)
        raise TransportError(f"missing tensors: {', '.join(missing[:5])}")
    _digest_maker(header.digest_algorithm)


_FINITE_BLOCK = 1 << 18  # values per ``isfinite`` call, into a reused per-thread scratch of bools
_SCRATCH = threading.local()


def _all_finite(arr: np.ndarray) -> bool:
    """Whether a (float) array holds no NaN or infinity (other dtypes always do).

    One vectorised pass per block of values into a reused per-thread scratch, so no temporary
    of the piece's size is allocated (a fresh 256 KiB one per 1 MiB piece cost a third of the
    check: 52 vs 35 us per MiB on the dev box)."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return True
    flat = arr.reshape(-1)
    scratch: np.ndarray | None = getattr(_SCRATCH, "bools", None)
    if scratch is None:
        scratch = _SCRATCH.bools = np.empty(_FINITE_BLOCK, dtype=bool)
    for i in range(0, flat.size, _FINITE_BLOCK):
        part = flat[i:i + _FINITE_BLOCK]
        if not np.isfinite(part, out=scratch[:part.size]).all():
            return False
    return True


def decode_tensors(specs: Iterable[pb.TensorSpec], body: bytes | bytearray | memoryview | np.ndarray,
                   expected: ExpectedSpec | None = None, check_finite: bool = True) -> dict[str, Tensor]:
    """Arrays (views of ``body``) for validated specs; checks sizes, sparse indices, finiteness.

    ``check_finite=False``: the caller already checked every float value (the assembler does,
    piece by piece, as the body arrives)."""
    specs = list(specs)
    expected = _layout(expected, specs)
    out: dict[str, Tensor] = {}
    off = 0
    mv = memoryview(body)  # type: ignore[arg-type]  # (numpy's stubs: ndarray __buffer__ only for Python >= 3.12)
    for spec in specs:
        if expected is not None and spec.name not in expected:
            raise TransportError(f"unexpected tensor name {spec.name!r}")
        dtype = np.dtype(spec.dtype)
        n = _expected_nbytes(spec)
        if off + n > mv.nbytes:
            raise TransportError(f"tensor {spec.name}: body too short")
        shape = tuple(int(s) for s in spec.shape)
        if spec.sparse:
            k = spec.nnz
            idx = np.frombuffer(mv, dtype=_INDEX_DTYPE, count=k, offset=off)
            vals = np.frombuffer(mv, dtype=dtype, count=k, offset=off + 8 * k)
            numel = math.prod(shape)
            if k and (idx[0] < 0 or idx[-1] >= numel or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
                raise TransportError(f"tensor {spec.name}: sparse indices out of range or not "
                                     "strictly increasing")
            if check_finite and not _all_finite(vals):
                raise TransportError(f"tensor {spec.name}: non-finite values (NaN/inf)")
            out[spec.name] = SparseTensor(idx, vals, shape)
        else:
            arr = np.frombuffer(mv, dtype=dtype, count=math.prod(shape), offset=off).reshape(shape)
            if check_finite and not _all_finite(arr):
                raise TransportError(f"tensor {spec.name}: non-finite values (NaN/inf)")
            out[spec.name] = arr
        off += n
    if off != mv.nbytes:
        raise TransportError(f"body has {mv.nbytes - off} trailing bytes")
    return out


class ReceiveBuffers:
    """A few receive buffers, reused once nothing decoded from them is alive any more.

    Why: a body copied into freshly allocated pages pays a page fault and the kernel's
    zero-fill per page on top of the copy (about half the copy's time for 40 MB on the
    dev box). Decoded tensors are views of their buffer, and every view (numpy array,
    memoryview, torch tensor made from one) holds a reference to it, so a buffer whose
    only reference is this pool's holds nothing anyone can still read: it is handed out
    again, for a body of exactly its size. Bodies below ``min_bytes`` are not pooled.
    """

    def __init__(self, max_buffers: int = 4, max_bytes: int = 256 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_buffers, self.max_bytes, self.min_bytes = max_buffers, max_bytes, min_bytes
        self._lock = threading.Lock()
        self._buffers: list[np.ndarray] = []
        probe = [np.empty(0, np.uint8)]
        self._idle_refs = sys.getrefcount(probe[0])  # a buffer only the pool's list holds

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of ``nbytes`` (contents undefined): an idle pooled one, or a new one."""
        if nbytes < self.min_bytes or nbytes > self.max_bytes:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            bufs = self._buffers
            for i in range(len(bufs)):
                if bufs[i].nbytes == nbytes and sys.getrefcount(bufs[i]) == self._idle_refs:
                    return bufs[i]
            # np.empty, not bytearray: no zero-fill pass, and numpy asks the kernel for huge
            # pages on large buffers (far fewer page faults)
            new = np.empty(nbytes, dtype=np.uint8)
            idle = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) == self._idle_refs]
            if len(bufs) >= self.max_buffers or sum(b.nbytes for b in bufs) + nbytes > self.max_bytes:
                if not idle:
                    return new  # every pooled buffer is in use: this one is not pooled
                bufs.pop(idle[0])  # drop the oldest idle buffer (of another size)
            bufs.append(new)
            return new


RECEIVE_BUFFERS = ReceiveBuffers()  # shared by every assembler in the process


class MessageAssembler:
    """Reassemble one streamed message from raw ``Chunk`` bytes, validating as it goes.

    The body is copied straight into one buffer (``RECEIVE_BUFFERS``) as the chunks arrive
    (its one copy); each piece's float values are checked for finiteness right after its
    copy, while it is in cache, and the piece is hashed then too (inline hashes) or handed to
    the helper thread in regions of ``HASH_BATCH_BYTES`` (SHA-256 on large bodies), so nothing
    but the last region's hash is left after the stream ends; the decoded tensors are views of
    the buffer.

    ``verify_digest=False`` trusts the sender's declared digest (TLS already protects the
    bytes in transit); it saves the receiver's one hash pass over the body.

    ``on_header`` runs on the parsed header before any body is accepted (authorization,
    replay checks); every problem raises TransportError with the reason. ``trailer`` holds
    the received trailer (signature, ledger head) once ``feed`` returned True.
    """

    def __init__(self, expected: ExpectedSpec | None, max_body_bytes: int,
                 verify_digest: bool = True, kinds: KindRules | None = None,
                 on_header: Callable[[pb.Header], None] | None = None,
                 buffers: ReceiveBuffers = RECEIVE_BUFFERS) -> None:
        self.expected = expected
        self.max_body_bytes = max_body_bytes
        self.verify_digest = verify_digest
        self.kinds = kinds
        self.on_header = on_header
        self.trailer: pb.Trailer | None = None
        self.header: pb.Header | None = None
        self.wire_bytes = 0
        self._buffers = buffers
        self._body: np.ndarray | None = None  # uint8, written in place as chunks arrive
        self._body_view = memoryview(b"")  # ``_body``'s bytes
        self._filled = 0
        self._hashed = 0  # body bytes fed to the hash so far
        self._hash_batch = 0  # feed the hash once this many filled bytes wait (0: every piece)
        self._hash: Hasher | BackgroundHash | None = None
        self._floats: list[tuple[int, int, np.dtype, str]] = []  # (start, end, dtype, tensor) of float values
        self._next_float = 0  # the first entry of ``_floats`` not checked to its end yet
        self._checked = 0  # body bytes whose float values passed the finiteness check
        self.digest: bytes | None = None

    def close(self) -> None:
        """Release the digest helper thread, if any (idempotent; call when abandoning)."""
        if isinstance(self._hash, BackgroundHash):
            self._hash.close()

    def feed(self, raw: bytes) -> bool:
        """Consume one serialized chunk; True once the trailer has been accepted."""
        try:
            return self._feed(raw)
        except TransportError:
            self.close()
            raise

    def _feed(self, raw: bytes) -> bool:
        if self.digest is not None:
            raise TransportError("data after the trailer")
        self.wire_bytes += len(raw)
        head, data, tail = split_chunk(raw)
        if self.header is None:
            if head is None:
                part = "data" if data is not None else "trailer"
                raise TransportError(f"malformed stream: first chunk is {part}, not header")
            self._start(head)
        elif head is not None:
            raise TransportError("malformed stream: second header")
        if data is not None:
            self._take(data)
        if tail is None:
            return False
        try:
            self.trailer = pb.Trailer.FromString(tail)
        except DecodeError as exc:
            raise TransportError(f"malformed trailer: {exc}") from None
        return self._finish(self.trailer.model_digest)

    def _start(self, raw_header: memoryview) -> None:
        if raw_header.nbytes > MAX_HEADER_BYTES:
            raise TransportError(f"header of {raw_header.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            header = pb.Header.FromString(raw_header)
        except DecodeError as exc:
            raise TransportError(f"malformed header: {exc}") from None
        check_header(header, self.expected, self.max_body_bytes, self.kinds)
        if self.on_header is not None:
            self.on_header(header)
        self.header = header
        # every byte is written by a chunk before it can be read (``_finish`` checks the fill)
        self._body = self._buffers.take(header.body_bytes)
        self._body_view = memoryview(self._body)  # type: ignore[arg-type]  # (numpy's stubs: no __buffer__ before 3.12)
        off = 0
        for spec in header.tensors:
            n = _expected_nbytes(spec)
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f" and n:
                start = off + (spec.nnz * _INDEX_DTYPE.itemsize if spec.sparse else 0)
                self._floats.append((start, off + n, dtype, spec.name))
            off += n
        self._hash = (_hasher(header.tensors, header.body_bytes, header.digest_algorithm)
                      if self.verify_digest else None)
        # a helper thread gets regions of HASH_BATCH_BYTES (one hand-off each); inline, each piece is
        # hashed right after its copy, while it is in cache
        self._hash_batch = HASH_BATCH_BYTES if isinstance(self._hash, BackgroundHash) else 0

    def _take(self, view: memoryview) -> None:
        """Copy one body piece into place, hash it, and check the float values it completes."""
        assert self._body is not None
        n = view.nbytes
        if self._filled + n > self._body.nbytes:
            raise TransportError(f"body longer than the declared {self._body.nbytes} bytes")
        # a plain memcpy into the buffer (as fast as numpy's assignment, without its per-call set-up)
        self._body_view[self._filled:self._filled + n] = view
        self._filled += n
        self._check_floats()
        if self._filled - self._hashed >= self._hash_batch:
            self._hash_filled()

    def _hash_filled(self) -> None:
        """Feed the hash the part of the buffer filled since the last feed (our copy: it stays
        unchanged until the digest is taken)."""
        if self._hash is not None and self._filled > self._hashed:
            assert self._body is not None
            # (numpy's stubs lack __buffer__ before Python 3.12)
            self._hash.update(memoryview(self._body[self._hashed:self._filled]))  # type: ignore[arg-type]
        self._hashed = self._filled

    def _check_floats(self) -> None:
        """Finiteness of every float value that arrived completely since the last check."""
        assert self._body is not None
        while self._next_float < len(self._floats):
            start, end, dtype, name = self._floats[self._next_float]
            lo = max(start, self._checked)
            hi = start + (min(end, self._filled) - start) // dtype.itemsize * dtype.itemsize
            if hi > lo and not _all_finite(self._body[lo:hi].view(dtype)):
                raise TransportError(f"tensor {name}: non-finite values (NaN/inf)")
            self._checked = max(self._checked, hi)
            if hi < end:
                return
            self._next_float += 1

    def _finish(self, digest: bytes) -> bool:
        assert self._body is not None
        if self._filled != self._body.nbytes:
            raise TransportError(f"body truncated: {self._filled} of {self._body.nbytes} bytes")
        if len(digest) != 32:
            raise TransportError(f"model digest has {len(digest)} bytes, not 32")
        self._hash_filled()
        if self._hash is not None and self._hash.digest() != digest:
            raise TransportError("model digest mismatch")
        self.digest = digest
        return True

    def message(self, ledger_head: tuple[int, bytes] | None = None, head_signature: bytes = b"") -> DecodedMessage:
        """The decoded, validated message (after ``feed`` returned True); ``ledger_head`` and
        ``head_signature``: the sender's verified head, as the caller's signature check returned it."""
        if self.header is None or self.digest is None or self._body is None:
            raise TransportError("stream ended before the message was complete")
        h = self.header
        tensors = decode_tensors(h.tensors, self._body, self.expected, check_finite=False)
        return DecodedMessage(sender=h.sender, recipient=h.recipient, sequence=h.sequence,
                              round=h.round, kind=h.kind, tensors=tensors,
                              scalars=dict(h.scalars), digest=self.digest,
                              in_reply_to=h.in_reply_to, wire_bytes=self.wire_bytes,
                              ledger_head=ledger_head, head_signature=head_signature if ledger_head else b"",
                              digest_algorithm=h.digest_algorithm)


def decode_stream(chunks: Iterable[bytes], expected: ExpectedSpec | None,
                  max_body_bytes: int) -> DecodedMessage:
    """Decode a complete chunk stream (convenience for tests and offline use)."""
    asm = MessageAssembler(expected, max_body_bytes)
    done = False
    for raw in chunks:
        done = asm.feed(raw)
    if not done:
        raise TransportError("stream ended before the trailer")
    return asm.message()
