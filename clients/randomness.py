"""Where a node's DP noise and Poisson batches come from.

Two sources, one interface (:class:`RandomSource`):

* :class:`SecureRandom` (the default everywhere a node can be deployed): a ChaCha20
  keystream from ``cryptography`` (OpenSSL), keyed with 32 bytes of operating-system
  entropy (``os.urandom``) when it is built. ChaCha20 is a cryptographically secure
  stream cipher, so its keystream is a CSPRNG: nobody who lacks the key — a peer who
  knows the whole consortium config, σ and every message the node sent — can predict
  it. The key is never written anywhere (not to a checkpoint, not to the ledger), so a
  restart or a second run starts a new, unrelated stream.
  Gaussian samples resist the floating-point attacks on textbook samplers (Mironov 2012;
  Holohan & Braghin 2021; Jin et al. 2022): each released value is the sum of four
  standard normal samples drawn in float64 from 53-bit uniforms, divided by two — the
  defence of Holohan & Braghin §5.1 that Opacus's ``secure_mode`` also applies. The four
  summands come from the Marsaglia polar method (no trigonometric functions); see
  *Why the polar method keeps the defence* below. The keystream for a chunk of values
  comes from one cipher call written straight into a reused array, and both outputs of
  every polar pair are used (in different released values), all vectorised. The noise
  of the coming steps is drawn ahead, in batches of whole vectors, on a background thread
  when a CPU is free (in memory only, each vector used once; see :class:`SecureRandom`).
* :class:`SeededRandom`: ``torch.Generator`` streams from an explicit integer seed, for
  simulations, tests and benchmarks where reproducibility is the point. Its draws are
  exactly those Opacus makes with the same generator (``torch.rand`` for Poisson masks,
  ``torch.normal`` for noise), so seeded runs stay comparable with Opacus's.

Why the polar method keeps the defence. The attacks recover, from one released
floating-point value, which inputs of the base sampler produced it, because a
single Box–Muller or polar output can only take a sparse, structured set of float
values. The defence does not rely on the base sampler's form: it releases the float64
sum of several *independent* exact-law N(0, 1) samples, whose set of reachable values
is dense, and the polar method's outputs are exact-law N(0, 1) pairs just as
Box–Muller's are (both from 53-bit uniforms, both in float64). What the polar method
adds is rejection, and it leaks nothing:

* the rejection test looks only at keystream bits (is u² + v² < 1 for the candidate's
  own two words); it never sees a gradient, a record, σ, C or anything else of the
  site, so how many candidates a step rejects — and so its timing — is a function of
  the keystream alone, and a kept point is uniform on the disc whatever was rejected
  before it (rejection sampling: the kept values are independent of the number tried);
* every candidate takes fresh keystream words, and the keystream is never rewound: a
  word feeds at most one candidate, a candidate at most one pair, a pair's x and y go
  to two different released values, and rejected candidates and the surplus of a batch
  are dropped, not kept for a later draw; a shortfall draws new words (no reuse);
* the number of summands (four) and the float64 arithmetic are unchanged; only the
  final sum is rounded to the model's dtype.

Every source says which it is (``kind``: ``"secure"`` or ``"seeded"``); the node writes
that into its ledger and ``privfl audit`` fails a seeded ledger unless told otherwise.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import Sampler

RandomnessKind = Literal["secure", "seeded"]
RANDOMNESS_KINDS: tuple[str, ...] = ("secure", "seeded")

__all__ = [
    "RANDOMNESS_KINDS",
    "PoissonBatchSampler",
    "RandomSource",
    "RandomnessKind",
    "SecureRandom",
    "SeededRandom",
    "random_source",
]


class RandomSource(ABC):
    """Uniform and Gaussian draws as torch tensors, from one stream."""

    kind: RandomnessKind

    @abstractmethod
    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Independent U[0, 1) values of ``shape``."""

    @abstractmethod
    def normal(self, std: float, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Independent N(0, std²) values of ``shape``."""

    def normal_like(self, std: float, ref: torch.Tensor) -> torch.Tensor:
        """N(0, std²) noise with ``ref``'s shape, device and dtype."""
        return self.normal(std, tuple(ref.shape), ref.device, ref.dtype)

    def normal_like_each(self, std: float, refs: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`normal_like` for each of ``refs``, in order (one noise tensor per parameter)."""
        return [self.normal_like(std, r) for r in refs]

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        """A boolean mask of ``n`` independent coins with P(True) = ``p`` (Poisson sampling)."""
        return self.uniform((n,), dtype=torch.float64 if self.kind == "secure" else torch.float32) < p

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint may keep to continue this stream ({} when it must not be kept)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - a deliberate no-op default, not abstract
        """Continue a stream saved by :meth:`state_dict` (a no-op for a secure source)."""


class SecureRandom(RandomSource):
    """ChaCha20 keystream keyed from ``os.urandom``: unpredictable, never reproducible.

    ``prefetch`` (on by default): while torch leaves a CPU free (its intra-op threads fewer
    than this process's CPUs), a background thread draws the noise of the coming steps —
    after each :meth:`normal_like_each`, the next vectors of the same size and σ, in
    batches of at least :attr:`PREFETCH_BATCH_VALUES` values (one vector if it is that big,
    else as many as fill it), two batches queued (the next drawn while one is served; one
    for vectors over :attr:`PREFETCH_DEEP_VALUES`) — so a step finds its noise ready. One vector per background
    call cost a small model more than drawing it in the step (each numpy call of the
    background thread hands the GIL back and forth with the training thread); a batch
    makes those calls rare per step. Without a free CPU everything is drawn when asked for.
    The noise does not depend on data; it is drawn from this source's own keystream, lives
    only in memory (never in a checkpoint or on disk), and each vector of a batch is served
    once or dropped (a different size or σ drops every batch drawn ahead and draws afresh; a
    step the budget refuses takes none). A forked child re-keys its streams and drops what
    its parent drew ahead (see :func:`_after_fork`).
    """

    kind: RandomnessKind = "secure"
    #: polar-method samples summed per released Gaussian value (2n with n = 2; see module doc)
    GAUSSIAN_SUMMANDS = 4
    #: the least number of values one background call draws ahead (a batch of whole vectors)
    PREFETCH_BATCH_VALUES = 1 << 15
    #: up to this many values a vector, two batches are kept ahead (above it, one: bounded memory)
    PREFETCH_DEEP_VALUES = 1 << 22
    #: noise vectors larger than this (values) are drawn when asked for, never ahead
    PREFETCH_MAX_VALUES = 1 << 24

    def __init__(self, prefetch: bool = True) -> None:
        self.prefetch = bool(prefetch)
        self._rekey()
        _LIVE_SECURE.add(self)

    def _rekey(self) -> None:
        """A fresh key and nonce from the OS, and nothing drawn ahead (at build and in a forked child)."""
        key = os.urandom(32)
        nonce = os.urandom(16)  # ChaCha20 in cryptography: 4-byte counter + 12-byte nonce
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._lock = threading.Lock()  # the keystream is read by the caller and the prefetch thread
        self._ahead_lock = threading.Lock()  # one caller at a time takes what was drawn ahead (used once)
        self._ahead: list[_Batch] = []  # batches drawn ahead, in order: the one being served first

    def _words(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """n uint64 words of keystream (ChaCha20 of zeros, written straight into ``out`` or a new array)."""
        out = np.empty(n, dtype=np.uint64) if out is None else out[:n]
        if n:
            with self._lock:
                self._stream.update_into(_zeros(8 * n), memoryview(out).cast("B"))  # type: ignore[arg-type]
        return out

    def _uniform53(self, n: int) -> torch.Tensor:
        """n float64 values uniform on [0, 1), each k·2⁻⁵³ for 53 bits k of the keystream."""
        k = self._words(n) >> _SHIFT11
        return torch.from_numpy(np.multiply(k, _TWO_M53, dtype=np.float64))

    def _polar_pairs(self, pairs: int, buf: _Scratch) -> tuple[np.ndarray, np.ndarray]:
        """``pairs`` (≤ :data:`_CHUNK_PAIRS`) independent pairs (x, y) of N(0, 1) float64 values (polar method).

        Each candidate point (u, v) takes two fresh 64-bit keystream words; each coordinate
        is a 53-bit uniform on (−1, 1): u = t·2⁻⁵³ with t = 2k + 1 the odd integer made of
        the word's top 53 bits k read as a signed integer (an arithmetic shift, then the
        low bit set; |t| < 2⁵³, so t is exact in float64). A point with s = u² + v² < 1 is
        kept (s > 0 always: t is odd) and gives x = u·√(−2 ln s / s), y = v·√(−2 ln s / s).
        The arithmetic runs on t, T = t² + t'² and powers of two, so every rounding is that
        of the same formula on u and v: (t·2⁻⁵³)² = t²·2⁻¹⁰⁶ and √(a·2⁻¹⁰⁶) = √a·2⁻⁵³
        exactly. Candidates come in one batch with a surplus (π/4 of them are kept on
        average); if that falls short, a further batch of fresh words draws the rest. Kept
        points are used in keystream order, each once; rejected ones and any surplus are
        dropped. Returns views into ``buf`` (this thread's scratch), valid until its next use.
        """
        xs, ys = buf.x[:pairs], buf.y[:pairs]
        spare = buf.spare
        got = 0
        while got < pairs:
            need = pairs - got
            m = _candidates(need)
            t = self._words(2 * m, buf.words).view(np.int64)
            np.right_shift(t, _SHIFT10, out=t)  # the word's top 54 bits, signed
            np.bitwise_or(t, 1, out=t)  # top 53 bits k → t = 2k + 1, odd, |t| < 2⁵³
            u = buf.words.view(np.float64)[:2 * m]
            np.copyto(u, t, casting="unsafe")  # in place, exact (numpy copes with the overlap)
            uu, vv = u[:m], u[m:]
            s = np.square(uu, out=buf.s[:m])
            s += np.square(vv, out=spare[:m])  # T = (u² + v²)·2¹⁰⁶, the same roundings
            keep = np.flatnonzero(np.less(s, _TWO_106, out=buf.keep[:m]))[:need]
            k = keep.size
            ku = np.take(uu, keep, out=spare[:k])
            kv = np.take(vv, keep, out=spare[k:2 * k])
            ks = np.take(s, keep, out=u[:k])  # u is no longer needed (ku, kv are copies)
            ks *= _TWO_M106  # s, exactly
            f = np.log(ks, out=buf.s[:k])  # s (T) is no longer needed
            f /= ks
            f *= _MINUS_TWO_M105  # −2 ln s / s · 2⁻¹⁰⁶: its root is √(−2 ln s / s)·2⁻⁵³, exactly
            np.sqrt(f, out=f)
            np.multiply(ku, f, out=xs[got:got + k])  # t·2⁻⁵³·√(−2 ln s / s) = u·√(−2 ln s / s)
            np.multiply(kv, f, out=ys[got:got + k])
            got += k
        return xs, ys

    def _standard_normal(self, n: int, std: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n N(0, std²) values, each the scaled sum of four polar-method samples drawn in float64.

        In chunks of at most :data:`_CHUNK_VALUES` outputs (bounded scratch, reused per
        thread). A chunk of c outputs, h = ⌈c/2⌉, takes 4h pairs (x_i, y_i) from
        :meth:`_polar_pairs`; its output j < h sums x of pairs j, h+j, 2h+j, 3h+j and
        output h+j sums y of the same pairs: four independent N(0, 1) summands each (a
        pair's x and y are independent and never land in one output), summed in float64,
        times std/√4, then rounded once to ``dtype``.
        """
        k = self.GAUSSIAN_SUMMANDS
        out: np.ndarray = np.empty(n, dtype=_NUMPY_FLOAT.get(dtype, np.float64))
        scale = float(std) / math.sqrt(k)
        buf = _scratch()
        for start in range(0, n, _CHUNK_VALUES):
            c = min(_CHUNK_VALUES, n - start)
            h = (c + 1) // 2
            xs, ys = self._polar_pairs(k * h, buf)
            z = buf.z[:2 * h]
            np.add.reduce(xs.reshape(k, h), axis=0, out=z[:h])
            np.add.reduce(ys.reshape(k, h), axis=0, out=z[h:])
            np.multiply(z[:c], scale, out=out[start:start + c], casting="same_kind")
        t = torch.from_numpy(out)
        return t if dtype in _NUMPY_FLOAT else t.to(dtype)

    def _scaled(self, n: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        """n N(0, std²) values as ``dtype`` on the CPU."""
        return self._standard_normal(n, std, dtype)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        u = self._uniform53(n).view(shape)
        if dtype != torch.float64:
            # rounding to a narrower float may reach 1.0: keep the interval half-open
            u = u.to(dtype).clamp_(max=1.0 - torch.finfo(dtype).eps / 2)
        return u.to(device) if device is not None else u

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        """``n`` coins with P(True) = ``p``: k·2⁻⁵³ < p compared as integers (the same coins, no floats)."""
        threshold = np.uint64(min(1 << 53, math.ceil(float(p) * (1 << 53))))
        return torch.from_numpy((self._words(n) >> _SHIFT11) < threshold)

    def normal(self, std: float, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        z = self._scaled(n, float(std), dtype).view(shape)
        return z.to(device) if device is not None else z

    def normal_like_each(self, std: float, refs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One draw for all of ``refs`` (many small parameters cost one call), prefetched when on."""
        if not refs:
            return []
        dtype = refs[0].dtype
        layout = _layout(tuple(r.shape for r in refs))
        total = layout[-1][2] + math.prod(layout[-1][0])
        if any(r.dtype != dtype for r in refs):
            flat = self._standard_normal(total, std)
            return [flat.as_strided(shape, stride, offset).to(device=r.device, dtype=r.dtype)
                    for (shape, stride, offset), r in zip(layout, refs)]
        key = (total, float(std), dtype)
        with self._ahead_lock:
            flat = self._take(key)
            self._top_up(key)
        base = flat.storage_offset()  # a vector of a batch starts inside the batch's storage
        parts = [flat.as_strided(shape, stride, base + offset) for shape, stride, offset in layout]
        return parts if all(r.device.type == "cpu" for r in refs) else [p.to(r.device) for p, r in zip(parts, refs)]

    def _top_up(self, key: tuple[int, float, torch.dtype]) -> None:
        """Queue background draws for ``key``: two batches (the next drawn while one is served) of as many
        vectors as fill :attr:`PREFETCH_BATCH_VALUES` — one vector each for a model that big; a model over
        :attr:`PREFETCH_DEEP_VALUES` values gets one vector ahead, not two. Holds ``_ahead_lock``."""
        total = key[0]
        if not self.draws_ahead(total):
            return
        count = -(-self.PREFETCH_BATCH_VALUES // total) if total else 1
        while len(self._ahead) < (2 if total <= self.PREFETCH_DEEP_VALUES else 1):
            self._ahead.append(_Batch(key, _executor().submit(self._scaled, total * count, *key[1:]), count))

    def draws_ahead(self, n: int) -> bool:
        """Whether noise vectors of ``n`` values are drawn ahead now (prefetch on, ≤ the maximum size, a CPU free)."""
        return self.prefetch and n <= self.PREFETCH_MAX_VALUES and _spare_cpu()

    def _take(self, key: tuple[int, float, torch.dtype]) -> torch.Tensor:
        """The next vector drawn ahead for ``key`` if there is one, else a fresh draw (a mismatch drops every batch)."""
        if self._ahead:
            first = self._ahead[0]
            batch = first.future.result()
            if first.key == key:
                i, n = first.served, key[0]
                first.served = i + 1
                if i + 1 == first.count:
                    self._ahead.pop(0)
                return batch[i * n:(i + 1) * n]
            self._drop()
        return self._scaled(*key)

    def _drop(self) -> None:
        """Drop every batch drawn ahead, once drawn (waited for: no draw outlives its source's use)."""
        for pending in self._ahead:
            pending.future.result()
        self._ahead.clear()


class _Batch:
    """``count`` noise vectors of (size, σ, dtype) ``key`` being drawn ahead, of which ``served`` were served."""

    __slots__ = ("count", "future", "key", "served")

    def __init__(self, key: tuple[int, float, torch.dtype], future: Future[torch.Tensor], count: int) -> None:
        self.key, self.future, self.count, self.served = key, future, count, 0


#: live secure sources, re-keyed in a forked child (its keystream must not repeat the parent's)
_LIVE_SECURE: weakref.WeakSet[SecureRandom] = weakref.WeakSet()
_EXECUTOR: ThreadPoolExecutor | None = None
_ZEROS = b""
_SHIFT11 = np.uint64(11)  # a 64-bit word's top 53 bits
_SHIFT10 = np.int64(10)  # a 64-bit word's top 54 bits
_TWO_106 = 2.0**106  # s < 1 for T = s·2¹⁰⁶
_TWO_M106 = 2.0**-106
_MINUS_TWO_M105 = -(2.0**-105)
_TWO_M53 = 1.0 / (1 << 53)
#: polar candidates drawn per pair needed: 1/(π/4) kept on average (plus a surplus, see _polar_pairs)
_POLAR_SURPLUS = 4.0 / math.pi
_NUMPY_FLOAT: dict[torch.dtype, type] = {torch.float64: np.float64, torch.float32: np.float32}
#: outputs drawn per chunk (even): bounds the scratch (about 1 MiB per thread) and keeps it in cache
_CHUNK_VALUES = 1 << 13
_CHUNK_PAIRS = 2 * _CHUNK_VALUES  # GAUSSIAN_SUMMANDS / 2 pairs per output


@functools.lru_cache(maxsize=64)
def _layout(shapes: tuple[torch.Size, ...]) -> list[tuple[torch.Size, tuple[int, ...], int]]:
    """(shape, contiguous strides, offset) of each tensor of ``shapes`` laid end to end in one flat vector."""
    out, offset = [], 0
    for shape in shapes:
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        out.append((shape, tuple(reversed(strides)), offset))
        offset += math.prod(shape)
    return out


def _candidates(need: int) -> int:
    """Polar candidates drawn for ``need`` pairs: 4/π·need, plus a surplus of about five standard
    deviations of the kept count (a top-up is then needed in fewer than one chunk in 10⁶)."""
    return int(need * _POLAR_SURPLUS + 3.0 * math.sqrt(need) + 16)


class _Scratch:
    """One thread's reusable work arrays for :meth:`SecureRandom._polar_pairs` (overwritten at every use)."""

    def __init__(self) -> None:
        m = _candidates(_CHUNK_PAIRS)
        self.words = np.empty(2 * m, dtype=np.uint64)
        self.spare = np.empty(2 * m)
        self.s = np.empty(m)
        self.keep = np.empty(m, dtype=bool)
        self.x, self.y = np.empty(_CHUNK_PAIRS), np.empty(_CHUNK_PAIRS)
        self.z = np.empty(_CHUNK_VALUES)


_LOCAL = threading.local()


def _scratch() -> _Scratch:
    """This thread's :class:`_Scratch` (the caller's and the prefetch thread's are distinct)."""
    buf: _Scratch | None = getattr(_LOCAL, "scratch", None)
    if buf is None:
        buf = _LOCAL.scratch = _Scratch()
    return buf


def _zeros(nbytes: int) -> memoryview:
    """``nbytes`` zero bytes (the plaintext whose ChaCha20 ciphertext is the keystream), reused."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = bytes(max(nbytes, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:nbytes]


def _spare_cpu() -> bool:
    """Whether this process may use more CPUs than torch's intra-op threads (room for the prefetch thread)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return cpus > torch.get_num_threads()


def _executor() -> ThreadPoolExecutor:
    """The one background thread that draws secure noise ahead."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privfl-noise")
    return _EXECUTOR


def _after_fork() -> None:
    """In a forked child: new keys for every secure source, nothing drawn ahead, a new thread pool."""
    global _EXECUTOR
    _EXECUTOR = None
    for source in list(_LIVE_SECURE):
        source._rekey()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class SeededRandom(RandomSource):
    """A ``torch.Generator`` stream from an explicit seed (simulations, tests, benchmarks)."""

    kind: RandomnessKind = "seeded"

    def __init__(self, seed: int, device: torch.device | str | None = None) -> None:
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.device, dtype=dtype)
        return u.to(device) if device is not None else u

    def normal(self, std: float, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        z = torch.normal(0.0, float(std), shape, generator=self.generator, device=self.device, dtype=dtype)
        return z.to(device) if device is not None else z

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "state": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == self.kind and "state" in state:
            self.generator.set_state(torch.tensor(state["state"], dtype=torch.uint8))


def random_source(seed: int | None, device: torch.device | str | None = None) -> RandomSource:
    """A seeded stream when ``seed`` is given explicitly, else a secure one."""
    return SecureRandom() if seed is None else SeededRandom(seed, device)


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling: each of ``num_samples`` records joins each batch with probability ``q``.

    ``q`` is the public sampling rate; the batch size is random (possibly 0). Yields one
    batch of indices per step, ``steps_per_epoch`` times (``round(1/q)`` by default), like
    Opacus's ``UniformWithReplacementSampler`` but drawing from a :class:`RandomSource`.
    """

    def __init__(self, num_samples: int, sample_rate: float, source: RandomSource,
                 steps_per_epoch: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.source = source
        self.steps = int(steps_per_epoch) if steps_per_epoch else max(1, int(round(1 / sample_rate)))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.source.bernoulli_mask(self.num_samples, self.sample_rate)
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()
