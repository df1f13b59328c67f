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
  defence of Holohan & Braghin §5.1 that Opacus's ``secure_mode`` also applies.
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
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import Sampler

RandomnessKind = Literal["secure", "seeded"]
RANDOMNESS_KINDS: tuple[str, ...] = ("secure", "seeded")
_MASK53 = (1 << 53) - 1

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
    """ChaCha20 keystream keyed from ``os.urandom``: unpredictable, never reproducible."""

    kind: RandomnessKind = "secure"
    #: Box–Muller samples summed per released Gaussian value (2n with n = 2; see module doc)
    GAUSSIAN_SUMMANDS = 4

    def __init__(self) -> None:
        key = os.urandom(32)
        nonce = os.urandom(16)  # ChaCha20 in cryptography: 4-byte counter + 12-byte nonce
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _uniform53(self, n: int) -> torch.Tensor:
        """n float64 values uniform on [0, 1), each from 53 bits of the keystream."""
        words = torch.frombuffer(bytearray(self._stream.update(bytes(8 * n))), dtype=torch.int64)
        return ((words >> 11) & _MASK53).to(torch.float64).mul_(1.0 / (1 << 53))

    def _standard_normal(self, n: int) -> torch.Tensor:
        """n N(0, 1) float64 values, each the scaled sum of four Box–Muller samples."""
        k = self.GAUSSIAN_SUMMANDS
        m = n * k
        pairs = (m + 1) // 2
        u = self._uniform53(2 * pairs)
        r = torch.log1p(-u[:pairs]).mul_(-2.0).sqrt_()  # 1 − u ∈ (0, 1]: the log is finite
        theta = u[pairs:].mul_(2.0 * math.pi)
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:m]
        return z.view(n, k).sum(dim=1).div_(math.sqrt(k))

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        u = self._uniform53(n).view(shape)
        if dtype != torch.float64:
            # rounding to a narrower float may reach 1.0: keep the interval half-open
            u = u.to(dtype).clamp_(max=1.0 - torch.finfo(dtype).eps / 2)
        return u.to(device) if device is not None else u

    def normal(self, std: float, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        z = self._standard_normal(n).mul_(float(std)).view(shape).to(dtype)
        return z.to(device) if device is not None else z

    def normal_like_each(self, std: float, refs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One keystream draw for all of ``refs`` (many small parameters cost one call, not many)."""
        sizes = [r.numel() for r in refs]
        flat = self._standard_normal(sum(sizes)).mul_(float(std)) if sizes else torch.zeros(0, dtype=torch.float64)
        return [part.view(r.shape).to(device=r.device, dtype=r.dtype)
                for part, r in zip(torch.split(flat, sizes), refs)]


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
