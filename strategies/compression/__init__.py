"""Compression of gossip messages — only ever of values that are already DP-noised.

Why the API has this shape
--------------------------
Compressing a DP release is post-processing and costs no privacy. Two things would
break that: choosing coordinates from un-noised gradients, and an error-feedback memory
that holds un-noised values (its contents leak into later messages). Both are made
impossible to do by accident:

* **Only ``Released`` goes in.** Every compressor entry point (``compress``,
  ``select_indices``, ``compress_with_indices``, the innovation gossip) checks that its
  input's type is exactly :class:`Released` and raises ``TypeError`` for anything else,
  raw ``numpy`` arrays and lists included. A ``Released`` can only be made by
  :func:`released`, which the DP code calls right after noise (e.g. on the model that
  ``DPClient.fit`` returns, which was updated only by noised gradients); ``Released(...)``
  raises, it cannot be subclassed, and its arrays are read-only copies.
* **The memory is private and written in one place.** The error-feedback memory lives
  in a name-mangled attribute of :class:`Compressor`, starts at zero, and is changed only
  inside ``compress`` (and ``compress_with_indices``), from the released input and the
  message that was sent: m ← (1 − β)m + β(m + x − sent). Zero, released values and public
  messages are all post-noise, so by induction the memory is too. It can be read
  (``residual_norm``, a read-only ``residual_snapshot``) or cleared (``reset``), never set.
* **Selection sees only what it is given.** Top-k, AdaComp bins and the CLT-k leader's
  index set are functions of released values and the memory, never of raw gradients.

Values derived inside this package from released ones (x − x̂, the mixed model) are
wrapped again by a module-private helper, so the innovation gossip's output is itself a
``Released``. Messages are :class:`Compressed` (sparse, dense, 8-bit or ternary) with an
exact ``nbytes``; :func:`decompress` turns one back into float32 arrays after validating
it, so it is safe on bytes that came from the network.
"""

from privfl.strategies.compression.compressors import (
    COMPRESSORS,
    AdaComp,
    CLTk,
    CompressionError,
    Compressor,
    Exact,
    Identity,
    Quantize8,
    RandomK,
    TopK,
    check_gamma,
    compressor_from_config,
)
from privfl.strategies.compression.innovation import InnovationGossip
from privfl.strategies.compression.message import Compressed, MalformedMessage, decompress
from privfl.strategies.compression.release import Released, released

__all__ = [
    "COMPRESSORS",
    "AdaComp",
    "CLTk",
    "Compressed",
    "CompressionError",
    "Compressor",
    "Exact",
    "Identity",
    "InnovationGossip",
    "MalformedMessage",
    "Quantize8",
    "RandomK",
    "Released",
    "TopK",
    "check_gamma",
    "compressor_from_config",
    "decompress",
    "released",
]
