"""``Released``: the only input type compressors accept — values already DP-noised.

A ``Released`` is an immutable list of float arrays plus a ``source`` string saying where
they came from. There is exactly one public way to make one, :func:`released`, which the
DP side calls on values that are already differentially private (a model updated only
by noised gradients, a noised update, or a public initial model). Everything a
compressor or the innovation gossip derives from a ``Released`` (adding public
estimates, subtracting what was sent) is post-processing, so it is wrapped again with
the module-private :func:`_derive`, never with :func:`released`.

Python cannot make a constructor truly private; this module makes the wrong thing loud
instead: ``Released(...)`` raises, subclassing raises, the arrays are read-only copies,
and every compressor refuses anything whose type is not exactly ``Released``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Released", "released"]

_TOKEN = object()


class Released:
    """Arrays that are already DP-noised (or post-processing of such), read-only."""

    __slots__ = ("_arrays", "_source")
    _arrays: tuple[np.ndarray, ...]
    _source: str

    def __init__(self, *args: Any, _token: object = None, **kwargs: Any) -> None:
        if _token is not _TOKEN:
            raise TypeError(
                "Released values are made only by strategies.compression.released(arrays), "
                "called by the DP code after noise has been added"
            )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("Released cannot be subclassed")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Released is immutable")

    def __reduce__(self) -> Any:
        raise TypeError("Released is not picklable: wrap the arrays again on the other side")

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The read-only arrays, in parameter order."""
        return self._arrays

    @property
    def source(self) -> str:
        """Where the values came from, e.g. ``"dp-sgd"`` or ``"post-processing"``."""
        return self._source

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of every array."""
        return tuple(a.shape for a in self._arrays)

    @property
    def size(self) -> int:
        """Total number of elements."""
        return int(sum(a.size for a in self._arrays))

    def flat(self) -> np.ndarray:
        """All elements concatenated as one float64 vector (a fresh copy)."""
        if not self._arrays:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([a.ravel() for a in self._arrays]).astype(np.float64, copy=False)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"Released(source={self._source!r}, shapes={list(self.shapes)})"


def _make(arrays: Sequence[np.ndarray], source: str) -> Released:
    obj = object.__new__(Released)
    Released.__init__(obj, _token=_TOKEN)
    frozen = []
    for a in arrays:
        a = np.array(a, copy=True)
        a.flags.writeable = False
        frozen.append(a)
    object.__setattr__(obj, "_arrays", tuple(frozen))
    object.__setattr__(obj, "_source", source)
    return obj


def released(arrays: Sequence[np.ndarray] | np.ndarray, source: str = "dp-noised") -> Released:
    """Mark ``arrays`` as DP-released. Call it only on values that are already private.

    Accepts a list of float arrays (a model's parameter list) or one array. Values must be
    finite; they are copied and made read-only, so later in-place edits of the caller's
    buffers cannot change what was released.
    """
    if not isinstance(source, str) or not source:
        raise TypeError("released(): source must be a non-empty string")
    items = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
    out = []
    for i, a in enumerate(items):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"released(): item {i} is {type(a).__name__}, expected a numpy array")
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"released(): item {i} has dtype {a.dtype}, expected a float dtype")
        if not np.isfinite(a).all():
            raise ValueError(f"released(): item {i} holds non-finite values (NaN or inf)")
        out.append(a)
    return _make(out, source)


def _derive(flat: np.ndarray, shapes: Sequence[tuple[int, ...]], source: str = "post-processing") -> Released:
    """Post-processing of released values (module-internal): reshape ``flat`` back to ``shapes``."""
    arrays, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        arrays.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return _make(arrays, source)
