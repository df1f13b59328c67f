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
  of the coming steps is drawn ahead, in batches of whole vectors, by a noise worker process
  (or a background thread) when a CPU is free (in memory only, each vector used once; see
  :class:`SecureRandom`). The sampler itself is :mod:`privfl.clients.gaussian` (no torch).
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
import logging
import math
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from privfl.clients import noise_process
from privfl.clients.gaussian import GAUSSIAN_SUMMANDS, KeyStream, polar_pairs, standard_normal

log = logging.getLogger(__name__)

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
    than this process's CPUs), the noise of the coming steps is drawn ahead — after each
    :meth:`normal_like_each`, the next vectors of the same size and σ, in batches of at least
    :attr:`PREFETCH_BATCH_VALUES` values (one vector if it is that big, else as many as fill
    it), two batches queued (the next drawn while one is served; one for vectors over
    :attr:`PREFETCH_DEEP_VALUES`) — so a step finds its noise ready. On Linux the batches are
    drawn by this process's noise worker (:mod:`~privfl.clients.noise_process`: a child
    process with its own ChaCha20 key from its own ``os.urandom``, the same sampler, writing
    into shared memory), because a background *thread*'s numpy calls hand the GIL back and
    forth with the training thread at every call (measured: 0.2× of a digits-CNN step; in the
    process, nothing). Elsewhere, or if the worker fails (logged once), a background thread
    draws them from this source's own keystream. Without a free CPU everything is drawn when
    asked for, from this source's keystream. The noise does not depend on data, lives only in
    memory (never in a checkpoint or on disk), and each vector of a batch is served once or
    dropped (a different size or σ drops every batch drawn ahead and draws afresh; a step the
    budget refuses takes none). A forked child re-keys its streams, drops what its parent drew
    ahead and never uses its parent's worker (see :func:`_after_fork`).
    """

    kind: RandomnessKind = "secure"
    #: polar-method samples summed per released Gaussian value (2n with n = 2; see module doc)
    GAUSSIAN_SUMMANDS = GAUSSIAN_SUMMANDS
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
        self._stream = KeyStream()
        self._ahead_lock = threading.Lock()  # one caller at a time takes what was drawn ahead (used once)
        self._ahead: list[_Batch] = []  # batches drawn ahead, in order: the one being served first

    def _words(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """n uint64 words of this source's keystream."""
        return self._stream.words(n, out)

    def _uniform53(self, n: int) -> torch.Tensor:
        """n float64 values uniform on [0, 1), each k·2⁻⁵³ for 53 bits k of the keystream."""
        k = self._words(n) >> _SHIFT11
        return torch.from_numpy(np.multiply(k, _TWO_M53, dtype=np.float64))

    def _polar_pairs(self, pairs: int, buf: Any) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~privfl.clients.gaussian.polar_pairs` on this source's keystream."""
        return polar_pairs(self._stream, pairs, buf)

    def _standard_normal(self, n: int, std: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n N(0, std²) values (:func:`~privfl.clients.gaussian.standard_normal`), rounded once to ``dtype``."""
        t = torch.from_numpy(standard_normal(self._stream, n, std, _NUMPY_FLOAT.get(dtype, np.float64)))
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
            self._ahead.append(_Batch(key, self._draw_ahead(total * count, *key[1:]), count))

    def _draw_ahead(self, n: int, std: float, dtype: torch.dtype) -> _Drawing:
        """Start drawing ``n`` values in the background: in this process's noise worker (its own keystream,
        no GIL shared with training; :mod:`~privfl.clients.noise_process`), else on the prefetch thread."""
        worker = noise_process.worker() if dtype in _NUMPY_FLOAT else None
        if worker is not None:
            try:
                pending = worker.submit(n, std, _NUMPY_FLOAT[dtype])
                return _WorkerDraw(pending, functools.partial(self._scaled, n, std, dtype))
            except noise_process.NoiseWorkerError as exc:
                _log_worker_failure(exc)
        return _executor().submit(self._scaled, n, std, dtype)

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

    def __init__(self, key: tuple[int, float, torch.dtype], future: _Drawing, count: int) -> None:
        self.key, self.future, self.count, self.served = key, future, count, 0


class _Drawing(Protocol):
    """A batch being drawn ahead (a thread's ``Future`` or a :class:`_WorkerDraw`)."""

    def result(self) -> torch.Tensor: ...


class _WorkerDraw:
    """A batch the noise worker draws; if the worker fails, the same values' law drawn here instead (logged once)."""

    __slots__ = ("_fallback", "_pending", "_value")

    def __init__(self, pending: noise_process.Pending, fallback: Callable[[], torch.Tensor]) -> None:
        self._pending, self._fallback = pending, fallback
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self._value is None:
            try:
                self._value = torch.from_numpy(self._pending.result())
            except noise_process.NoiseWorkerError as exc:
                _log_worker_failure(exc)
                self._value = self._fallback()
        return self._value


def _log_worker_failure(exc: Exception) -> None:
    """One warning per process when the noise worker fails (noise is then drawn in this process)."""
    global _WORKER_FAILURE_LOGGED
    if not _WORKER_FAILURE_LOGGED:
        _WORKER_FAILURE_LOGGED = True
        log.warning("%s; secure noise is drawn in this process from now on", exc)


#: live secure sources, re-keyed in a forked child (its keystream must not repeat the parent's)
_LIVE_SECURE: weakref.WeakSet[SecureRandom] = weakref.WeakSet()
_EXECUTOR: ThreadPoolExecutor | None = None
_WORKER_FAILURE_LOGGED = False
_SHIFT11 = np.uint64(11)  # a 64-bit word's top 53 bits
_TWO_M53 = 1.0 / (1 << 53)
_NUMPY_FLOAT: dict[torch.dtype, type] = {torch.float64: np.float64, torch.float32: np.float32}


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
