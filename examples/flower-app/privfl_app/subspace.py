"""Subspace transfer in the Flower App: the round's k values on the wire, both directions.

With ``subspace-fraction`` > 0 every DP step of a node clips and noises only a public
random mask (``DPConfig.mechanism = "subspace"``), so the change a node's round makes lies
on the round's mask (the union of its steps' masks). The node then uploads only the k
values of its noised change on that mask, and the server broadcasts only the k values of
the aggregate's change: privfl's ``SubspaceK`` frames, built and read by privfl's
``SubspaceReceiver`` (node) and ``SubspaceModelTracker`` (server); both ends derive the
indices from the public seed and the round. This module holds what the app adds around
them: the frame as the ``ArrayRecord`` that crosses Flower's wire, and the node's receiver
kept in ``context.state`` (the ClientApp is rebuilt for every message).

Privacy: the upload is post-processing of the node's DP-SGD output (its noised model
minus the public global model it was sent) on public indices; the server's frames are
post-processing of released uploads. The only other new value on the wire is
``subspace-version`` in the server's ConfigRecord (server → node: the number of global
changes so far, public). Nothing new leaves a node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from privfl.errors import ConfigError

# the frame as privfl's own FedAvg puts it in an ArrayRecord (one uint8 Array), and back
from privfl.strategies.federated import is_framed_record as is_frame
from privfl.strategies.federated import parameters_to_record as to_wire
from privfl.strategies.federated import record_to_parameters as from_wire
from privfl.strategies.subspace_transfer import VERSION_KEY, SubspaceReceiver
from privfl.strategies.update_transfer import COMPRESSED_TENSOR_TYPE
from privfl_app.task import subspace_compressor

__all__ = ["FRAME_KEY", "HELD_KEY", "RECEIVER_KEY", "VERSION_KEY", "from_wire", "is_frame", "load_receiver", "receive",
           "save_receiver", "to_wire"]

#: the key of the one Array a framed message travels as (privfl's own FedAvg uses the same)
FRAME_KEY = COMPRESSED_TENSOR_TYPE
#: where a node keeps its receiver between messages (local to the node, never sent)
HELD_KEY = "privfl.subspace.held"
RECEIVER_KEY = "privfl.subspace.receiver"


def load_receiver(context: Context, cfg: Mapping[str, Any]) -> SubspaceReceiver:
    """This node's receiver (the global model it holds and its version), restored from ``context.state``."""
    receiver = SubspaceReceiver(subspace_compressor(cfg), subspace_compressor(cfg))
    held = context.state.array_records.get(HELD_KEY)
    rec = context.state.config_records.get(RECEIVER_KEY)
    if held is not None and rec is not None:
        receiver.held = [np.array(a, copy=True) for a in held.to_numpy_ndarrays()]
        receiver.version = int(str(rec["version"]))
    return receiver


def save_receiver(context: Context, receiver: SubspaceReceiver) -> None:
    """Keep the receiver's model and version in the node's ``context.state`` (local: never sent)."""
    if receiver.held is None:
        return
    context.state.array_records[HELD_KEY] = ArrayRecord([np.asarray(a) for a in receiver.held])
    context.state.config_records[RECEIVER_KEY] = ConfigRecord({"version": int(receiver.version)})


def receive(receiver: SubspaceReceiver, record: ArrayRecord, config: Mapping[str, Any]) -> list[np.ndarray]:
    """The whole global model the server means (whole arrays, or the held model plus its k values).

    The server declares its version (:data:`VERSION_KEY`); privfl's receiver takes it from a whole
    model and refuses (ValueError: an error reply, after which the server sends the whole model) a
    change that does not lead from the version it holds to the declared one.
    """
    if VERSION_KEY not in config:
        raise ConfigError(f"subspace: the server's instruction has no {VERSION_KEY!r} (a dense ServerApp?)")
    return receiver.receive(from_wire(record), int(str(config[VERSION_KEY])))
