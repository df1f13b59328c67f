"""Compressors for already-released (DP-noised) values, with private error feedback.

Every compressor takes a :class:`~strategies.compression.release.Released` and returns a
:class:`~strategies.compression.message.Compressed`. ``compress`` is the only code that
reads or writes the error-feedback memory; the memory starts at zero and is only ever
updated from the released input and the (public) message that was sent, so it holds
post-noise values by construction.
"""

from __future__ import annotations

import inspect
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from privfl.accounting.errors import ConfigError
from privfl.strategies.compression.message import Compressed, MalformedMessage, _offsets, decode_flat, pack_codes
from privfl.strategies.compression.release import Released

__all__ = [
    "COMPRESSORS",
    "AdaComp",
    "CLTk",
    "CompressionError",
    "check_gamma",
    "Compressor",
    "Exact",
    "Identity",
    "Quantize8",
    "RandomK",
    "TopK",
    "compressor_from_config",
]

log = logging.getLogger("privfl.compression")

Shapes = tuple[tuple[int, ...], ...]


class CompressionError(ConfigError, ValueError):
    """A compressor is configured or used wrongly; the message names the field."""


def check_gamma(gamma: Any, who: str) -> float:
    """A consensus step size in (0, 1] (every compressed gossip's ``gamma``); CompressionError naming ``who``."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise CompressionError(f"{who}: gamma must be in (0, 1], got {gamma!r}")
    return float(gamma)


def _require_released(update: Any, where: str) -> Released:
    if type(update) is not Released:
        raise TypeError(
            f"{where} accepts only Released values (made by released() after DP noise), got "
            f"{type(update).__name__}; raw arrays may be un-noised and must never be compressed or "
            "enter an error-feedback memory"
        )
    return update


def _k_from(k: int | None, ratio: float | None, owner: str) -> tuple[int | None, float | None]:
    """Validate the (k xor ratio) pair of a sparsifier."""
    if (k is None) == (ratio is None):
        raise CompressionError(f"{owner}: give exactly one of k or ratio")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise CompressionError(f"{owner}: k must be a positive integer, got {k!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise CompressionError(f"{owner}: ratio must be in (0, 1], got {ratio!r}")
    return (int(k) if k is not None else None), (float(ratio) if ratio is not None else None)


class Compressor(ABC):
    """Base class: shape binding, the Released-only gate and the error-feedback memory.

    With error feedback the message encodes p = m + x and the memory becomes
    m ← (1 − β)·m + β·(p − sent); β = 1 is classic error feedback, β < 1 ScaleCom's
    low-pass filter.
    """

    name: str = "compressor"

    def __init__(self, error_feedback: bool, beta: float = 1.0) -> None:
        if not isinstance(error_feedback, bool):
            raise CompressionError(f"{self.name}: error_feedback must be true or false, got {error_feedback!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
            raise CompressionError(f"{self.name}: beta must be in (0, 1], got {beta!r}")
        self._error_feedback = error_feedback
        self._beta = float(beta)
        self.__memory: np.ndarray | None = None
        self._shapes: Shapes | None = None
        self._lock = threading.Lock()

    @property
    def error_feedback(self) -> bool:
        """Whether what is not sent is kept and added to the next input."""
        return self._error_feedback

    def compress(self, update: Released) -> Compressed:
        """Compress released values (plus the error memory when enabled) into one message."""
        return self._run(_require_released(update, f"{self.name}.compress()"))

    def _run(self, update: Released, **encode_args: Any) -> Compressed:
        """The one place the memory is read and written: encode m + x, keep what was not sent."""
        with self._lock:
            x = self._bind(update)
            p = x + self.__memory if self.__memory is not None else x
            msg = self._encode(p, x, self._shapes_or_fail(), **encode_args)
            if self._error_feedback:
                sent = decode_flat(msg)
                self.__memory = (1.0 - self._beta) * (self.__memory if self.__memory is not None else 0.0) + (
                    self._beta * (p - sent)
                )
            return msg

    def residual_norm(self) -> float:
        """L2 norm of the error-feedback memory (0 when empty or disabled)."""
        with self._lock:
            return 0.0 if self.__memory is None else float(np.linalg.norm(self.__memory))

    def residual_snapshot(self) -> np.ndarray:
        """A read-only flat copy of the error-feedback memory, for inspection and tests."""
        with self._lock:
            d = 0 if self._shapes is None else int(_offsets(self._shapes)[-1])
            out = np.zeros(d) if self.__memory is None else self.__memory.copy()
        out.flags.writeable = False
        return out

    def reset(self) -> None:
        """Forget the error memory and the bound shapes (e.g. after a model re-sync)."""
        with self._lock:
            self.__memory = None
            self._shapes = None

    def describe(self) -> str:
        """Short description for logs."""
        return f"{self.name}(error_feedback={'on' if self._error_feedback else 'off'})"

    # -- for subclasses --------------------------------------------------------------

    @abstractmethod
    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        """Encode the error-compensated vector ``p`` (``fresh`` is this call's input alone)."""

    def _compensated(self, update: Released) -> np.ndarray:
        """p = m + x without changing any state (CLT-k's leader selection)."""
        with self._lock:
            x = self._bind(update)
            return x + self.__memory if self.__memory is not None else x

    def _bind(self, update: Released) -> np.ndarray:
        shapes = tuple(update.shapes)
        if self._shapes is None:
            if sum(int(np.prod(s, dtype=np.int64)) for s in shapes) > 2**31 - 1:
                raise CompressionError(f"{self.name}: more than 2^31 − 1 elements cannot use int32 indices")
            self._shapes = shapes
        elif shapes != self._shapes:
            raise CompressionError(
                f"{self.name}: input shapes {list(shapes)} differ from the bound shapes {list(self._shapes)}; "
                "call reset() if the model changed"
            )
        return update.flat()

    def _shapes_or_fail(self) -> Shapes:
        assert self._shapes is not None
        return self._shapes


class Identity(Compressor):
    """No compression: dense float32 (the baseline for byte counts)."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(error_feedback=False)

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        return Compressed("dense", shapes, values=p.astype(np.float32))


class Exact(Compressor):
    """Lossless: the non-zero entries as (int32 index, float32 value), or dense float32 if smaller.

    For updates that are sparse already (TopAgg's ternary steps, a top-k step's change),
    this sends them sparse at no loss: what arrives is bit-for-bit the float32 update.
    """

    name = "exact"

    def __init__(self) -> None:
        super().__init__(error_feedback=False)

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        v = p.astype(np.float32)
        idx = np.flatnonzero(v)
        if 8 * len(idx) < 4 * len(v):
            return Compressed("sparse", shapes, indices=idx.astype(np.int32), values=v[idx])
        return Compressed("dense", shapes, values=v)


class _Sparsifier(Compressor):
    def __init__(self, k: int | None, ratio: float | None, error_feedback: bool, beta: float = 1.0) -> None:
        self._k, self._ratio = _k_from(k, ratio, self.name)
        super().__init__(error_feedback, beta)

    def k_for(self, d: int) -> int:
        """Number of coordinates kept out of ``d``."""
        if self._k is not None:
            if self._k > d:
                raise CompressionError(f"{self.name}: k={self._k} exceeds the {d} elements of the model")
            return self._k
        assert self._ratio is not None
        return min(d, max(1, int(self._ratio * d))) if d else 0

    def describe(self) -> str:
        size = f"k={self._k}" if self._k is not None else f"ratio={self._ratio:g}"
        return f"{self.name}({size}, error_feedback={'on' if self._error_feedback else 'off'})"


def _top_indices(p: np.ndarray, k: int) -> np.ndarray:
    d = len(p)
    if k >= d:
        return np.arange(d, dtype=np.int32)
    if k == 0:
        return np.zeros(0, dtype=np.int32)
    idx = np.argpartition(np.abs(p), d - k)[d - k :]
    return np.sort(idx).astype(np.int32)


class TopK(_Sparsifier):
    """Keep the k largest-magnitude coordinates (δ = k/d contraction), with error feedback."""

    name = "topk"

    def __init__(self, k: int | None = None, ratio: float | None = None, error_feedback: bool = True) -> None:
        super().__init__(k, ratio, error_feedback)

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        idx = _top_indices(p, self.k_for(len(p)))
        return Compressed("sparse", shapes, indices=idx, values=p[idx].astype(np.float32))


class RandomK(_Sparsifier):
    """Keep k coordinates drawn uniformly without replacement from a seeded generator.

    Unscaled it is a contraction in expectation (E‖x − C(x)‖² = (1 − k/d)‖x‖²) and works
    with error feedback; ``unbiased=True`` scales by d/k (E C(x) = x), which is not a
    contraction, so it cannot be combined with error feedback.
    """

    name = "randomk"

    def __init__(
        self,
        k: int | None = None,
        ratio: float | None = None,
        seed: int = 0,
        unbiased: bool = False,
        error_feedback: bool | None = None,
    ) -> None:
        if not isinstance(unbiased, bool):
            raise CompressionError(f"randomk: unbiased must be true or false, got {unbiased!r}")
        if error_feedback is None:
            error_feedback = not unbiased
        if unbiased and error_feedback:
            raise CompressionError(
                "randomk: unbiased=true scales kept values by d/k, which is not a contraction; "
                "set error_feedback=false with it"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise CompressionError(f"randomk: seed must be an integer, got {seed!r}")
        super().__init__(k, ratio, error_feedback)
        self._unbiased = unbiased
        self._rng = np.random.default_rng(int(seed))

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        d = len(p)
        k = self.k_for(d)
        idx = np.sort(self._rng.choice(d, size=k, replace=False)).astype(np.int32)
        vals = p[idx] * (d / k) if (self._unbiased and k) else p[idx]
        return Compressed("sparse", shapes, indices=idx, values=vals.astype(np.float32))


class Quantize8(Compressor):
    """Uniform quantisation per tensor between its min and max, 8 bits per element by default.

    ``bits`` may be 8, 4, 2 or 1 (codes packed into bytes). Deterministic rounding errs by
    at most step/2 per element, step = (max − min)/(2**bits − 1); ``stochastic=True``
    rounds up with probability equal to the fractional part, which is unbiased with
    error below one step.
    """

    name = "quantize8"

    def __init__(self, stochastic: bool = False, seed: int = 0, error_feedback: bool = False,
                 bits: int = 8) -> None:
        if isinstance(bits, bool) or bits not in (8, 4, 2, 1):
            raise CompressionError(f"quantize8: bits must be 8, 4, 2 or 1, got {bits!r}")
        self._bits = int(bits)
        if not isinstance(stochastic, bool):
            raise CompressionError(f"quantize8: stochastic must be true or false, got {stochastic!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise CompressionError(f"quantize8: seed must be an integer, got {seed!r}")
        super().__init__(error_feedback)
        self._stochastic = stochastic
        self._rng = np.random.default_rng(int(seed))

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        offsets = _offsets(shapes)
        codes = np.zeros(len(p), dtype=np.uint8)
        scales = np.zeros(2 * len(shapes), dtype=np.float32)
        top = float((1 << self._bits) - 1)
        for t in range(len(shapes)):
            seg = p[offsets[t] : offsets[t + 1]]
            if seg.size == 0:
                continue
            lo32 = np.float32(seg.min())
            if np.float64(lo32) > seg.min():  # round the low end down so codes stay ≥ 0
                lo32 = np.nextafter(lo32, np.float32(-np.inf))
            lo = np.float64(lo32)
            step32 = np.float32((seg.max() - lo) / top)
            if np.float64(lo) + top * np.float64(step32) < seg.max():
                step32 = np.nextafter(step32, np.float32(np.inf))
            step = np.float64(step32)
            if step > 0:
                t_ = (seg - lo) / step
                if self._stochastic:
                    base = np.floor(t_)
                    q = base + (self._rng.random(seg.size) < (t_ - base))
                else:
                    q = np.rint(t_)
                codes[offsets[t] : offsets[t + 1]] = np.clip(q, 0, top).astype(np.uint8)
            scales[2 * t], scales[2 * t + 1] = lo32, step32
        return Compressed(f"quant{self._bits}", shapes, codes=pack_codes(codes, self._bits), scales=scales)

    def describe(self) -> str:
        mode = "stochastic" if self._stochastic else "nearest"
        return f"{self.name}(bits={self._bits}, {mode}, error_feedback={'on' if self._error_feedback else 'off'})"


class AdaComp(Compressor):
    """AdaComp (Chen et al., AAAI 2018): binned, self-adjusting residual selection.

    Per tensor: G = residue + ΔW, H = G + ΔW; split G into bins of ``bin_size``
    consecutive elements; send element j iff |H_j| ≥ max |G| of its bin (and G_j ≠ 0).
    With ``quantize`` the sent values become sign(G_j) × one scale per tensor (the mean
    |G| of the tensor's sent elements, the L2-best common scale: the paper's exact scale
    rule is unverified); residue ← G − sent. The residue is intrinsic: always on.
    """

    name = "adacomp"

    def __init__(self, bin_size: int = 50, quantize: bool = True) -> None:
        if isinstance(bin_size, bool) or not isinstance(bin_size, (int, np.integer)) or bin_size < 1:
            raise CompressionError(f"adacomp: bin_size must be a positive integer, got {bin_size!r}")
        if not isinstance(quantize, bool):
            raise CompressionError(f"adacomp: quantize must be true or false, got {quantize!r}")
        super().__init__(error_feedback=True)
        self._bin = int(bin_size)
        self._quantize = quantize

    def _encode(self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes) -> Compressed:
        offsets = _offsets(shapes)
        chosen: list[np.ndarray] = []
        scales = np.zeros(len(shapes), dtype=np.float32)
        for t in range(len(shapes)):
            g = p[offsets[t] : offsets[t + 1]]
            n = g.size
            if n == 0:
                continue
            h = g + fresh[offsets[t] : offsets[t + 1]]
            nb = -(-n // self._bin)
            pad = nb * self._bin - n
            absg = np.abs(np.pad(g, (0, pad)))
            gmax = absg.reshape(nb, self._bin).max(axis=1)
            thresh = np.repeat(gmax, self._bin)[:n]
            local = np.flatnonzero((np.abs(h) >= thresh) & (g != 0))
            chosen.append(local + offsets[t])
            if local.size:
                scales[t] = np.float32(np.abs(g[local]).mean())
        idx = np.concatenate(chosen).astype(np.int32) if chosen else np.zeros(0, dtype=np.int32)
        if not self._quantize:
            return Compressed("sparse", shapes, indices=idx, values=p[idx].astype(np.float32))
        bits = np.packbits((p[idx] > 0).astype(np.uint8))
        return Compressed("ternary", shapes, indices=idx, codes=bits, scales=scales)

    def describe(self) -> str:
        return f"{self.name}(bin_size={self._bin}, {'ternary' if self._quantize else 'float32'} values)"


class CLTk(_Sparsifier):
    """ScaleCom's cyclic local top-k: every node sends its values at the leader's indices.

    The round's leader (:meth:`leader_of`) calls :meth:`select_indices` on its own
    error-compensated released update and broadcasts the int32 index set (4k bytes);
    every node, the leader included, then calls :meth:`compress_with_indices`, whose
    messages carry values only (``shared_indices``, 4k bytes). With one shared mask,
    averaging commutes with compression. Memory: m ← (1 − β)m + β(p − sent).
    :meth:`compress` alone behaves as local top-k with the indices on the wire.
    """

    name = "cltk"

    def __init__(self, k: int | None = None, ratio: float | None = None, beta: float = 1.0) -> None:
        super().__init__(k, ratio, error_feedback=True, beta=beta)

    @staticmethod
    def leader_of(round_index: int, node_ids: Sequence[str]) -> str:
        """The cyclic leader of a round: node_ids[round mod n]."""
        if not node_ids:
            raise CompressionError("cltk: node_ids is empty")
        return node_ids[int(round_index) % len(node_ids)]

    def select_indices(self, update: Released) -> np.ndarray:
        """Leader side: top-k indices of |memory + update| (read-only int32, increasing)."""
        update = _require_released(update, "cltk.select_indices()")
        p = self._compensated(update)
        idx = _top_indices(p, self.k_for(len(p)))
        idx.flags.writeable = False
        return idx

    def compress_with_indices(self, update: Released, indices: np.ndarray) -> Compressed:
        """Every node: the error-compensated values at the leader's ``indices``."""
        update = _require_released(update, "cltk.compress_with_indices()")
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise MalformedMessage(f"cltk: leader indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        return self._run(update, indices=idx)

    def _encode(
        self, p: np.ndarray, fresh: np.ndarray, shapes: Shapes, indices: np.ndarray | None = None
    ) -> Compressed:
        if indices is None:
            idx = _top_indices(p, self.k_for(len(p)))
            return Compressed("sparse", shapes, indices=idx, values=p[idx].astype(np.float32))
        if len(indices) and (indices.min() < 0 or indices.max() >= len(p)):
            raise MalformedMessage(f"cltk: leader indices out of range for {len(p)} elements")
        idx = indices.astype(np.int32)
        return Compressed("sparse", shapes, indices=idx, values=p[idx].astype(np.float32), shared_indices=True)


COMPRESSORS: dict[str, type[Compressor]] = {
    "none": Identity,
    "exact": Exact,
    "topk": TopK,
    "randomk": RandomK,
    "quantize8": Quantize8,
    "adacomp": AdaComp,
    "cltk": CLTk,
}
_ALIASES = {
    "identity": "none",
    "dense": "none",
    "lossless": "exact",
    "top_k": "topk",
    "random_k": "randomk",
    "randk": "randomk",
    "q8": "quantize8",
    "quantize": "quantize8",
    "int8": "quantize8",
    "clt_k": "cltk",
    "scalecom": "cltk",
}


def canonical_name(name: str) -> str:
    """The registry key a compressor name or alias stands for (may not be registered)."""
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def compressor_from_config(name: str, **params: Any) -> Compressor:
    """Build a compressor by name (none, exact, topk, randomk, quantize8, adacomp, cltk)."""
    if not isinstance(name, str):
        raise CompressionError(f"compression: name must be a string, got {name!r}")
    key = canonical_name(name)
    if key not in COMPRESSORS:
        raise CompressionError(f"compression: unknown compressor {name!r}; choose one of: {', '.join(COMPRESSORS)}")
    cls = COMPRESSORS[key]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CompressionError(
            f"compression: {key} does not take parameter(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(allowed) or 'none'})"
        )
    comp = cls(**params)
    log.debug("compressor %s", comp.describe())
    return comp

