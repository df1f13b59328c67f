"""FedAvg's model changes on the wire: compressed ``Parameters`` in both directions.

With ``FedAvgConfig.upload = "update"`` a client no longer returns its whole model: it
returns the change from the model it was sent, ``Δ = w_local − w_base``, as one
:class:`~strategies.compression.Compressed` message framed into a Flower ``Parameters``
whose ``tensor_type`` is :data:`COMPRESSED_TENSOR_TYPE`. The server rebuilds
``w_base + decompress(Δ)`` before Flower's ``FedAvg.aggregate_fit`` sees it. The server
likewise sends a client that already holds the previous global model only the global
model's change. Byte counts are the lengths of these framed messages, so the wire sizes
of a TopAgg run (whose local steps change only the coordinates that passed the vote
threshold) are what a deployment would send.

Privacy: ``w_local`` is the output of DP-SGD and ``w_base`` a public (already released)
global model, so Δ is post-processing of a DP release and is wrapped with
:func:`~strategies.compression.released` before any compressor sees it; a compressor's
error-feedback memory therefore only ever holds post-noise values. The downlink change
is a function of released client updates.

Exactness: both sides compute ``base + decompress(Δ)`` in float32 from the same base
arrays, so the server and every up-to-date client hold bit-identical models
(:class:`GlobalModelTracker` defines the global model as exactly what clients rebuild).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from privfl.strategies.base import Params
from privfl.strategies.compression import Compressed, Compressor, Exact, decompress, released

__all__ = [
    "COMPRESSED_TENSOR_TYPE",
    "GlobalModelTracker",
    "UpdateReceiver",
    "apply_change",
    "change_message",
    "frame_parameters",
    "is_compressed",
    "parameters_nbytes",
    "unframe_parameters",
]

COMPRESSED_TENSOR_TYPE = "privfl.compressed.v1"


def is_compressed(parameters: Parameters) -> bool:
    """Whether ``parameters`` hold one framed compressed change rather than whole arrays."""
    return parameters.tensor_type == COMPRESSED_TENSOR_TYPE


def _npy_data_bytes(blob: bytes) -> int:
    """Bytes of array data in one ``.npy`` blob, read from its header (the data is not decoded)."""
    f = io.BytesIO(blob)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of a framed change (the frame's length) or of whole arrays (tensor data only)."""
    if is_compressed(parameters):
        return int(sum(len(t) for t in parameters.tensors))
    return int(sum(_npy_data_bytes(t) for t in parameters.tensors))


def frame_parameters(message: Compressed) -> Parameters:
    """A Flower ``Parameters`` carrying one compressed message as its only tensor."""
    return Parameters(tensors=[message.to_bytes()], tensor_type=COMPRESSED_TENSOR_TYPE)


def unframe_parameters(parameters: Parameters, shapes: Sequence[tuple[int, ...]]) -> Compressed:
    """The compressed message inside ``parameters``, validated against the model's ``shapes``."""
    if not is_compressed(parameters) or len(parameters.tensors) != 1:
        raise ValueError(f"expected one {COMPRESSED_TENSOR_TYPE} tensor, got {len(parameters.tensors)} "
                         f"tensor(s) of type {parameters.tensor_type!r}")
    return Compressed.from_bytes(parameters.tensors[0], shapes)


def change_message(new: Params, base: Params, compressor: Compressor, source: str) -> Compressed:
    """Compress ``new − base`` (both already released: a DP-trained model and a public base)."""
    if len(new) != len(base) or any(np.shape(a) != np.shape(b) for a, b in zip(new, base)):
        raise ValueError("the model and its base have different shapes")
    change = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in zip(new, base)]
    return compressor.compress(released(change, source))


def apply_change(base: Params, message: Compressed) -> Params:
    """``base + decompress(message)`` in the base's dtype (float32 for every privfl model)."""
    parts = decompress(message)
    return [(np.asarray(b) + d.astype(np.asarray(b).dtype)).astype(np.asarray(b).dtype)
            for b, d in zip(base, parts)]


class UpdateReceiver:
    """A client's side of update transfer: the model it holds, and its own upload compressor.

    ``receive`` turns what the server sent (whole arrays or a framed change to the model
    held) into whole arrays; ``upload`` frames the trained model's change from that base.
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.held: Params | None = None

    def receive(self, parameters: Parameters) -> Params:
        """The whole model the server means, rebuilt from a change when that is what came."""
        if is_compressed(parameters):
            if self.held is None:
                raise ValueError("received a model change but this client holds no model to apply it to")
            arrays = apply_change(self.held, unframe_parameters(parameters, [a.shape for a in self.held]))
        else:
            arrays = [np.array(a, copy=True) for a in parameters_to_ndarrays(parameters)]
        self.held = arrays
        return [a.copy() for a in arrays]

    def upload(self, trained: Params) -> Parameters:
        """The trained model's change from the held base, compressed and framed."""
        if self.held is None:
            raise ValueError("no base model held: receive() must come first")
        return frame_parameters(change_message(trained, self.held, self.compressor, "dp-sgd model change"))


class GlobalModelTracker:
    """The server's view of which global model version each client holds, and the downlink.

    The global model of version v is kept as exactly what a client rebuilds from the
    change message of version v−1 → v, so server and clients never drift apart. A client
    holding version v−1 gets that change; one holding v gets an empty change; any other
    client (never selected, or missed a round) gets the whole model.

    ``compressor`` (default :class:`Exact`, lossless) compresses the change; a lossy one
    with error feedback keeps what it did not send in its own memory and sends it later
    (the aggregate's change is post-processing of released updates, so that memory is
    post-noise too).
    """

    def __init__(self, initial: Params, compressor: Compressor | None = None) -> None:
        self.version = 0
        self.model: Params = [np.array(a, copy=True) for a in initial]
        self._last_change: Parameters | None = None
        self._holds: dict[str, int] = {}
        self._compressor = compressor or Exact()

    def advance(self, aggregated: Params) -> Params:
        """Make ``aggregated`` the next version (as clients will rebuild it) and return it."""
        msg = change_message(aggregated, self.model, self._compressor, "aggregate of released updates")
        self.model = apply_change(self.model, msg)
        self._last_change = frame_parameters(msg)
        self.version += 1
        return [a.copy() for a in self.model]

    def downlink(self, node: str) -> Parameters:
        """What to send ``node`` so it holds the current version (and record that it does)."""
        held = self._holds.get(node)
        self._holds[node] = self.version
        if held == self.version:  # nothing changed: an empty sparse message
            return frame_parameters(Compressed("sparse", tuple(a.shape for a in self.model)))
        if held == self.version - 1 and self._last_change is not None:
            return self._last_change
        return ndarrays_to_parameters(self.model)

    def forget(self, node: str) -> None:
        """``node`` lost its model (restarted): it gets the whole model next time."""
        self._holds.pop(node, None)
