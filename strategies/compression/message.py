"""``Compressed``: one compressed message, its exact wire size, validation and decoding.

Wire payload (what ``nbytes`` counts exactly; little-endian on the wire):

=========  ===============================  ===============================================
kind       arrays                           bytes
=========  ===============================  ===============================================
dense      values f32[d]                    4d
sparse     indices i32[k], values f32[k]    8k (4k when ``shared_indices``: the index set
                                            travels once, in the CLT-k leader's broadcast)
quant8     codes u8[d], scales f32[2T]      d + 8T   (per tensor: low, step)
quantB     codes u8[⌈dB/8⌉], scales f32[2T] ⌈dB/8⌉ + 8T (B = 4, 2 or 1 bits per code, packed
                                            little-end first within each byte)
ternary    indices i32[k], codes u8[⌈k/8⌉]  4k + ⌈k/8⌉ + 4T (sign bits packed; one scale
           scales f32[T]                    per tensor)
=========  ===============================  ===============================================

d is the total element count, T the number of tensors; ``shapes`` are fixed by the model
schema both sides share, so they are not counted. :meth:`Compressed.to_bytes` frames a
message as one byte string (a 20-byte header — version, kind, shared flag, four array
lengths — then the arrays); :meth:`Compressed.from_bytes` checks the framing against the
receiver's own shapes before building the message. Indices are flat positions into the
concatenation of all tensors, strictly increasing. A message built from network bytes is
validated in full (dtypes, lengths, index range and order, finiteness) before anything
is decoded, and a bad one raises :class:`MalformedMessage`.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from privfl.accounting.errors import PrivflError

__all__ = ["FRAME_HEADER_BYTES", "Compressed", "MalformedMessage", "check_neighbour_message", "decompress",
           "max_frame_bytes"]

_FRAME_VERSION = 1
_FRAME = np.dtype([("version", "u1"), ("kind", "u1"), ("shared", "u1"), ("pad", "u1"),
                   ("n_indices", "<u4"), ("n_values", "<u4"), ("n_codes", "<u4"), ("n_scales", "<u4")])
_FIELDS = (("indices", "<i4"), ("values", "<f4"), ("codes", "u1"), ("scales", "<f4"))
FRAME_HEADER_BYTES = _FRAME.itemsize  # version, kind, shared flag, pad, four u32 array lengths

Kind = Literal["dense", "sparse", "quant8", "ternary", "quant4", "quant2", "quant1"]
KINDS: tuple[str, ...] = ("dense", "sparse", "quant8", "ternary", "quant4", "quant2", "quant1")
QUANT_BITS: dict[str, int] = {"quant8": 8, "quant4": 4, "quant2": 2, "quant1": 1}
_MAX_ELEMENTS = 2**31 - 1  # int32 indices

_EMPTY_I32 = np.zeros(0, dtype=np.int32)
_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


class MalformedMessage(PrivflError, ValueError):
    """A compressed message is inconsistent (bad dtype, length, index or value)."""


def _frozen(a: np.ndarray, dtype: type, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise MalformedMessage(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype) or a.ndim != 1:
        raise MalformedMessage(f"{name}: expected a 1-D {np.dtype(dtype)} array, got {a.ndim}-D {a.dtype}")
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Compressed:
    """One compressed message; see the module docstring for each kind's payload."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    indices: np.ndarray = field(default_factory=lambda: _EMPTY_I32)
    values: np.ndarray = field(default_factory=lambda: _EMPTY_F32)
    codes: np.ndarray = field(default_factory=lambda: _EMPTY_U8)
    scales: np.ndarray = field(default_factory=lambda: _EMPTY_F32)
    shared_indices: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MalformedMessage(f"kind: unknown message kind {self.kind!r} (known: {', '.join(KINDS)})")
        try:
            shapes = tuple(tuple(int(s) for s in shape) for shape in self.shapes)
        except (TypeError, ValueError):
            raise MalformedMessage(f"shapes: expected a list of integer tuples, got {self.shapes!r}") from None
        if any(s < 0 for shape in shapes for s in shape):
            raise MalformedMessage(f"shapes: negative dimension in {shapes!r}")
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "indices", _frozen(self.indices, np.int32, "indices"))
        object.__setattr__(self, "values", _frozen(self.values, np.float32, "values"))
        object.__setattr__(self, "codes", _frozen(self.codes, np.uint8, "codes"))
        object.__setattr__(self, "scales", _frozen(self.scales, np.float32, "scales"))
        if not isinstance(self.shared_indices, bool):
            raise MalformedMessage("shared_indices must be a bool")
        d, t = self.size, len(shapes)
        if d > _MAX_ELEMENTS:
            raise MalformedMessage(f"shapes: {d} elements exceed int32 indexing")
        n_idx, n_val, n_code, n_scale = (len(self.indices), len(self.values), len(self.codes), len(self.scales))
        expect: dict[str, tuple[int, int, int, int]] = {
            "dense": (0, d, 0, 0),
            "sparse": (n_idx, n_idx, 0, 0),
            "ternary": (n_idx, 0, (n_idx + 7) // 8, t),
            **{k: (0, 0, (d * b + 7) // 8, 2 * t) for k, b in QUANT_BITS.items()},
        }
        want = expect[self.kind]
        got = (n_idx, n_val, n_code, n_scale)
        if got != want:
            raise MalformedMessage(
                f"{self.kind} message: (indices, values, codes, scales) lengths {got} should be {want} "
                f"for shapes {list(shapes)}"
            )
        if self.shared_indices and self.kind != "sparse":
            raise MalformedMessage("shared_indices is only meaningful for sparse messages")
        if n_idx:
            idx = self.indices
            if idx[0] < 0 or idx[-1] >= d or (n_idx > 1 and not (np.diff(idx) > 0).all()):
                raise MalformedMessage(f"indices must be strictly increasing within [0, {d})")
        for name in ("values", "scales"):
            if not np.isfinite(getattr(self, name)).all():
                raise MalformedMessage(f"{name}: non-finite value in message")
        if self.kind in QUANT_BITS and t and (self.scales[1::2] < 0).any():
            raise MalformedMessage("scales: quantisation step must be ≥ 0")

    @property
    def size(self) -> int:
        """Number of elements of the dense tensors this message stands for (d)."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    @property
    def nbytes(self) -> int:
        """Exact payload bytes on the wire (shapes excluded: both sides know the model)."""
        idx = 0 if self.shared_indices else self.indices.nbytes
        return int(idx + self.values.nbytes + self.codes.nbytes + self.scales.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same tensors sent dense as float32 (for compression ratios)."""
        return 4 * self.size

    def __repr__(self) -> str:
        return f"Compressed({self.kind}, d={self.size}, nbytes={self.nbytes})"

    def to_bytes(self) -> bytes:
        """The message framed for the wire: header, then indices, values, codes, scales (little-endian).

        Shared indices are not framed (the receiver has them from the leader's broadcast),
        so a shared-index message cannot be framed on its own.
        """
        if self.shared_indices:
            raise ValueError("a shared-index message travels without its indices; frame the leader's broadcast")
        head = np.zeros((), dtype=_FRAME)
        head["version"], head["kind"] = _FRAME_VERSION, KINDS.index(self.kind)
        for name, _ in _FIELDS:
            head[f"n_{name}"] = len(getattr(self, name))
        parts = [head.tobytes()] + [getattr(self, name).astype(dt, copy=False).tobytes() for name, dt in _FIELDS]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview,
                   shapes: Sequence[tuple[int, ...]]) -> Compressed:
        """Rebuild a framed message for a model of ``shapes`` (the receiver's own); MalformedMessage if bad.

        Lengths are checked against the frame size and the model size before any array is
        read, and the message is then validated in full by the constructor.
        """
        buf = memoryview(data).cast("B")
        if len(buf) < _FRAME.itemsize:
            raise MalformedMessage(f"frame: {len(buf)} bytes is shorter than the {_FRAME.itemsize}-byte header")
        head = np.frombuffer(buf[:_FRAME.itemsize], dtype=_FRAME)[0]
        if int(head["version"]) != _FRAME_VERSION or int(head["pad"]) != 0 or int(head["shared"]) != 0:
            raise MalformedMessage(f"frame: unknown version/flags {int(head['version'])}/{int(head['shared'])}")
        if int(head["kind"]) >= len(KINDS):
            raise MalformedMessage(f"frame: unknown kind code {int(head['kind'])}")
        d = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
        counts = [int(head[f"n_{name}"]) for name, _ in _FIELDS]
        if any(n > max(d, 2 * len(shapes)) for n in counts):
            raise MalformedMessage(f"frame: array lengths {counts} exceed a model of {d} elements")
        want = _FRAME.itemsize + sum(n * np.dtype(dt).itemsize for n, (_, dt) in zip(counts, _FIELDS))
        if len(buf) != want:
            raise MalformedMessage(f"frame: {len(buf)} bytes, the header announces {want}")
        arrays, offset = {}, _FRAME.itemsize
        for n, (name, dt) in zip(counts, _FIELDS):
            size = n * np.dtype(dt).itemsize
            arrays[name] = np.frombuffer(buf[offset:offset + size], dtype=dt)
            offset += size
        return cls(KINDS[int(head["kind"])], tuple(tuple(s) for s in shapes),
                   indices=arrays["indices"].astype(np.int32), values=arrays["values"].astype(np.float32),
                   codes=arrays["codes"].astype(np.uint8), scales=arrays["scales"].astype(np.float32))


def check_neighbour_message(node_id: str, neighbours: Container[str], sender: str, msg: object) -> None:
    """Refuse a message from a node that is not a neighbour, or one that is not a :class:`Compressed`."""
    if sender not in neighbours:
        raise MalformedMessage(f"node {node_id}: message from {sender!r}, which is not a neighbour")
    if not isinstance(msg, Compressed):
        raise MalformedMessage(f"node {node_id}: expected a Compressed message from {sender!r}")


def max_frame_bytes(shapes: Sequence[tuple[int, ...]]) -> int:
    """An upper bound on a valid :meth:`Compressed.to_bytes` frame for a model of ``shapes``.

    The header plus every array at its largest: d indices, d values, d codes and 2·T
    scales (no kind reaches all of them at once; the largest real frame is sparse with
    k = d). A receiver can refuse anything longer before reading it.
    """
    d = int(_offsets(shapes)[-1])
    most = {"indices": d, "values": d, "codes": d, "scales": 2 * len(shapes)}
    return FRAME_HEADER_BYTES + sum(most[name] * np.dtype(dt).itemsize for name, dt in _FIELDS)


def _offsets(shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes < 2**bits (bits dividing 8) into bytes, the first code in the low bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    padded = np.zeros(-(-len(codes) // per) * per, dtype=np.uint8)
    padded[: len(codes)] = codes
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of :func:`pack_codes` output."""
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]


def decode_flat(msg: Compressed) -> np.ndarray:
    """The message as one dense float64 vector of length d."""
    if not isinstance(msg, Compressed):
        raise TypeError(f"expected a Compressed message, got {type(msg).__name__}")
    d = msg.size
    if msg.kind == "dense":
        return msg.values.astype(np.float64)
    out = np.zeros(d, dtype=np.float64)
    if msg.kind == "sparse":
        out[msg.indices] = msg.values.astype(np.float64)
    elif msg.kind in QUANT_BITS:
        offsets = _offsets(msg.shapes)
        codes = unpack_codes(msg.codes, QUANT_BITS[msg.kind], d).astype(np.float64)
        for t in range(len(msg.shapes)):
            lo, step = np.float64(msg.scales[2 * t]), np.float64(msg.scales[2 * t + 1])
            sl = slice(offsets[t], offsets[t + 1])
            out[sl] = lo + codes[sl] * step
    elif msg.kind == "ternary":
        k = len(msg.indices)
        signs = np.unpackbits(msg.codes, count=k).astype(np.float64) * 2.0 - 1.0
        tensor_of = np.searchsorted(_offsets(msg.shapes), msg.indices, side="right") - 1
        out[msg.indices] = signs * msg.scales.astype(np.float64)[tensor_of]
    return out


def split_flat(flat: np.ndarray, shapes: Sequence[tuple[int, ...]], dtype: type = np.float32) -> list[np.ndarray]:
    """Cut a flat vector back into arrays of ``shapes``."""
    offsets = _offsets(shapes)
    return [flat[offsets[t] : offsets[t + 1]].astype(dtype).reshape(shape) for t, shape in enumerate(shapes)]


def decompress(msg: Compressed) -> list[np.ndarray]:
    """The dense float32 arrays a message stands for, in parameter order."""
    return split_flat(decode_flat(msg), msg.shapes)
