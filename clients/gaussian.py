"""The secure Gaussian kernel: a ChaCha20 keystream, the polar method, four summands per value.

numpy and ``cryptography`` only (no torch), so that the noise worker process
(:mod:`privfl.clients.noise_process`) can load this file alone and start in a fraction of a
second. :class:`~privfl.clients.randomness.SecureRandom` draws with it in-process; the module
documentation there says why this sampler keeps the floating-point defence.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["CHUNK_VALUES", "GAUSSIAN_SUMMANDS", "KeyStream", "polar_pairs", "scratch", "standard_normal"]

#: polar-method samples summed per released Gaussian value (2n with n = 2)
GAUSSIAN_SUMMANDS = 4
#: outputs drawn per chunk (even): bounds the scratch (about 1 MiB per thread) and keeps it in cache
CHUNK_VALUES = 1 << 13
_CHUNK_PAIRS = 2 * CHUNK_VALUES  # GAUSSIAN_SUMMANDS / 2 pairs per output
_ZEROS = b""
_SHIFT10 = np.int64(10)  # a 64-bit word's top 54 bits
_TWO_106 = 2.0**106  # s < 1 for T = s·2¹⁰⁶
_TWO_M106 = 2.0**-106
_MINUS_TWO_M105 = -(2.0**-105)
#: polar candidates drawn per pair needed: 1/(π/4) kept on average (plus a surplus, see polar_pairs)
_POLAR_SURPLUS = 4.0 / math.pi


class KeyStream:
    """ChaCha20 of zeros under a key and nonce from ``os.urandom``: read once, in order, never rewound."""

    def __init__(self) -> None:
        key = os.urandom(32)
        nonce = os.urandom(16)  # ChaCha20 in cryptography: 4-byte counter + 12-byte nonce
        self._cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._lock = threading.Lock()  # one reader at a time (a caller and a prefetch thread may share it)

    def words(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """n uint64 words of keystream (written straight into ``out`` or a new array)."""
        out = np.empty(n, dtype=np.uint64) if out is None else out[:n]
        if n:
            with self._lock:
                self._cipher.update_into(_zeros(8 * n), memoryview(out).cast("B"))  # type: ignore[arg-type]
        return out


def polar_pairs(stream: KeyStream, pairs: int, buf: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """``pairs`` (≤ 2·:data:`CHUNK_VALUES`) independent pairs (x, y) of N(0, 1) float64 values (polar method).

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
        t = stream.words(2 * m, buf.words).view(np.int64)
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


def standard_normal(stream: KeyStream, n: int, std: float = 1.0, dtype: type = np.float64,
                    out: np.ndarray | None = None) -> np.ndarray:
    """n N(0, std²) values (``dtype`` float64 or float32), each the scaled sum of four polar-method samples.

    In chunks of at most :data:`CHUNK_VALUES` outputs (bounded scratch, reused per
    thread). A chunk of c outputs, h = ⌈c/2⌉, takes 4h pairs (x_i, y_i) from
    :func:`polar_pairs`; its output j < h sums x of pairs j, h+j, 2h+j, 3h+j and
    output h+j sums y of the same pairs: four independent N(0, 1) summands each (a
    pair's x and y are independent and never land in one output), summed in float64,
    times std/√4, then rounded once to ``dtype``. ``out``: an array of n ``dtype`` values to fill.
    """
    k = GAUSSIAN_SUMMANDS
    out = np.empty(n, dtype=dtype) if out is None else out
    scale = float(std) / math.sqrt(k)
    buf = scratch()
    for start in range(0, n, CHUNK_VALUES):
        c = min(CHUNK_VALUES, n - start)
        h = (c + 1) // 2
        xs, ys = polar_pairs(stream, k * h, buf)
        z = buf.z[:2 * h]
        np.add.reduce(xs.reshape(k, h), axis=0, out=z[:h])
        np.add.reduce(ys.reshape(k, h), axis=0, out=z[h:])
        np.multiply(z[:c], scale, out=out[start:start + c], casting="same_kind")
    return out


def _candidates(need: int) -> int:
    """Polar candidates drawn for ``need`` pairs: 4/π·need, plus a surplus of about five standard
    deviations of the kept count (a top-up is then needed in fewer than one chunk in 10⁶)."""
    return int(need * _POLAR_SURPLUS + 3.0 * math.sqrt(need) + 16)


class _Scratch:
    """One thread's reusable work arrays for :func:`polar_pairs` (overwritten at every use)."""

    def __init__(self) -> None:
        m = _candidates(_CHUNK_PAIRS)
        self.words = np.empty(2 * m, dtype=np.uint64)
        self.spare = np.empty(2 * m)
        self.s = np.empty(m)
        self.keep = np.empty(m, dtype=bool)
        self.x, self.y = np.empty(_CHUNK_PAIRS), np.empty(_CHUNK_PAIRS)
        self.z = np.empty(CHUNK_VALUES)


_LOCAL = threading.local()


def scratch() -> _Scratch:
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
