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
  Box–Muller samples drawn in float64 from 53-bit uniforms, divided by two — the
  defence of Holohan & Braghin §5.1 that Opacus's ``secure_mode`` also applies. The
  keystream for a whole step comes from one cipher call written straight into a numpy
  array, and both outputs of every Box–Muller pair are used (in different released
  values), all vectorised. Noise vectors of a model's size are drawn one step ahead on a
  background thread (in memory only; see :class:`SecureRandom`).
* :class:`SeededRandom`: ``torch.Generator`` streams from an explicit integer seed, for
  simulations, tests and benchmarks where reproducibility is the point. Its draws are
  exactly those Opacus makes with the same generator (``torch.rand`` for Poisson masks,
  ``torch.normal`` for noise), so seeded runs stay comparable with Opacus's.

Every source says which it is (``kind``: ``"secure"`` or ``"seeded"``); the node writes
that into its ledger and ``privfl audit`` fails a seeded ledger unless told otherwise.
"""

from __future__ import annotations

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

    ``prefetch`` (on by default): after each :meth:`normal_like_each` of at least
    :attr:`PREFETCH_MIN_VALUES` values, and while torch leaves a CPU free (its intra-op
    threads fewer than this process's CPUs), a background thread draws the next vector of
    the same size and σ, so the next step finds its noise ready. Smaller vectors cost less
    than handing them to a thread, and a thread competing with torch's own would slow the
    step, so those are drawn when asked for.
    The noise does not depend on data; it is drawn from this source's own keystream, lives
    only in memory (never in a checkpoint or on disk) and is used once or dropped (a
    different size or σ, or a step the budget refuses, draws afresh). A forked child
    re-keys its streams and drops what its parent prefetched (see :func:`_after_fork`).
    """

    kind: RandomnessKind = "secure"
    #: Box–Muller samples summed per released Gaussian value (2n with n = 2; see module doc)
    GAUSSIAN_SUMMANDS = 4
    #: the range of noise-vector sizes (values) drawn ahead; others are drawn when asked for
    PREFETCH_MIN_VALUES = 1 << 14
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
        self._ahead: tuple[tuple[int, float, torch.dtype], Future[torch.Tensor]] | None = None

    def _words(self, n: int) -> np.ndarray:
        """n uint64 words of keystream (ChaCha20 of zeros, written straight into the array)."""
        out = np.empty(n, dtype=np.uint64)
        if n:
            with self._lock:
                self._stream.update_into(_zeros(8 * n), memoryview(out).cast("B"))  # type: ignore[arg-type]
        return out

    def _uniform53(self, n: int) -> torch.Tensor:
        """n float64 values uniform on [0, 1), each k·2⁻⁵³ for 53 bits k of the keystream."""
        k = self._words(n) >> _SHIFT11
        return torch.from_numpy(np.multiply(k, _TWO_M53, dtype=np.float64))

    def _standard_normal(self, n: int, std: float = 1.0) -> torch.Tensor:
        """n N(0, std²) float64 values, each the scaled sum of four Box–Muller samples.

        Vectorised: 2·⌈n/2⌉ values from 4⌈n/2⌉ Box–Muller pairs. Pair i has radius
        r = √(−2 ln v), v = (k+1)·2⁻⁵³ ∈ (0, 1] (53 keystream bits, the law of 1 − U, so
        the log is finite) and angle θ = 2π·k'·2⁻⁵³ (53 more bits). With h = ⌈n/2⌉, output
        j < h sums r·cos θ of pairs j, h+j, 2h+j, 3h+j, and output h+j sums r·sin θ of the
        same pairs: four independent N(0, 1) summands each (a pair's cos and sin parts are
        independent, and never land in one output), times std/√4.
        """
        k = self.GAUSSIAN_SUMMANDS
        h = (n + 1) // 2
        pairs = k * h
        bits = self._words(2 * pairs)
        bits >>= _SHIFT11
        v = np.multiply(bits[:pairs], _TWO_M53, dtype=np.float64)
        v += _TWO_M53  # (k + 1)·2⁻⁵³, exact: an integer ≤ 2⁵³ times a power of two
        np.log(v, out=v)
        v *= -2.0
        np.sqrt(v, out=v)
        r = torch.from_numpy(v)
        theta = torch.from_numpy(np.multiply(bits[pairs:], _TWO_PI_M53, dtype=np.float64))
        cos = torch.cos(theta).mul_(r).view(k, h)
        sin = theta.sin_().mul_(r).view(k, h)
        z = torch.empty(2 * h, dtype=torch.float64)
        torch.sum(cos, dim=0, out=z[:h])
        torch.sum(sin, dim=0, out=z[h:])
        return z[:n].mul_(float(std) / math.sqrt(k))

    def _scaled(self, n: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        """n N(0, std²) values as ``dtype`` on the CPU."""
        return self._standard_normal(n, std).to(dtype)

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
        sizes = [r.numel() for r in refs]
        if not refs:
            return []
        dtype = refs[0].dtype
        if any(r.dtype != dtype for r in refs):
            flat = self._standard_normal(sum(sizes), std)
            return [part.view(r.shape).to(device=r.device, dtype=r.dtype)
                    for part, r in zip(torch.split(flat, sizes), refs)]
        key = (sum(sizes), float(std), dtype)
        with self._ahead_lock:
            flat = self._take(key)
            if self.draws_ahead(key[0]):
                self._ahead = (key, _executor().submit(self._scaled, *key))
        parts = [part.view(r.shape) for part, r in zip(torch.split(flat, sizes), refs)]
        return parts if all(r.device.type == "cpu" for r in refs) else [p.to(r.device) for p, r in zip(parts, refs)]

    def draws_ahead(self, n: int) -> bool:
        """Whether a noise vector of ``n`` values is drawn ahead now (prefetch on, model-sized, a CPU free)."""
        return self.prefetch and self.PREFETCH_MIN_VALUES <= n <= self.PREFETCH_MAX_VALUES and _spare_cpu()

    def _take(self, key: tuple[int, float, torch.dtype]) -> torch.Tensor:
        """The vector drawn ahead for ``key`` if there is one, else a fresh draw (a mismatch is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead_key, future = ahead
            drawn = future.result()  # waited for even on a mismatch: no draw outlives its source's use
            if ahead_key == key:
                return drawn
        return self._scaled(*key)


#: live secure sources, re-keyed in a forked child (its keystream must not repeat the parent's)
_LIVE_SECURE: weakref.WeakSet[SecureRandom] = weakref.WeakSet()
_EXECUTOR: ThreadPoolExecutor | None = None
_ZEROS = b""
_SHIFT11 = np.uint64(11)  # a 64-bit word's top 53 bits
_TWO_M53 = 1.0 / (1 << 53)
_TWO_PI_M53 = 2.0 * math.pi / (1 << 53)


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
