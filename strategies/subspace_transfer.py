"""FedAvg on a public coordinate mask, both directions: only the k values of the round's mask travel.

With ``[dp].subspace`` every DP step of a client moves only the coordinates of a mask drawn
from a public seed and the step index, so the change a client returns after a round lies on
that round's mask (the union of its steps' masks), and so does the average of those
changes. With ``FedAvgConfig.compressor = "subspace"`` (and ``downlink_compressor =
"subspace"``) a client uploads only the k values of its noised change on the round's mask,
and the server broadcasts only the k values of the aggregate's change on the same mask:
``SubspaceK`` frames (``strategies.compression.subspace``), whose indices both ends derive.

The round of a mask is the version of the global model: the client that holds version v
trained on round v's masks and uploads round v's values; the server's change v → v + 1 is
round v's. Both ends count versions from the changes they applied, so they agree as long
as every client trains every round (``fraction_fit = 1``; :class:`FedAvgConfig` refuses
anything else with a subspace compressor). Everything here is post-processing of released
changes with public indices.
"""

from __future__ import annotations

from flwr.common import Parameters

from privfl.strategies.base import Params
from privfl.strategies.compression import Compressed, Compressor, MalformedMessage
from privfl.strategies.compression.subspace import SubspaceK
from privfl.strategies.update_transfer import (
    GlobalModelTracker,
    UpdateReceiver,
    apply_change,
    change_message,
    frame_parameters,
    is_compressed,
)

__all__ = ["VERSION_KEY", "SubspaceModelTracker", "SubspaceReceiver", "unframe_subspace"]

#: the instruction's ConfigRecord key of the global model version the server sends (public: how many
#: changes it applied), read by the client's :class:`SubspaceReceiver`
VERSION_KEY = "subspace-version"


def _shapes(params: Params) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(s) for s in a.shape) for a in params)


def unframe_subspace(parameters: Parameters, compressor: SubspaceK, round_index: int,
                     shapes: tuple[tuple[int, ...], ...]) -> Compressed:
    """Round ``round_index``'s framed k values as a ``sparse`` change over the model (indices derived).

    An empty ``sparse`` frame (the tracker's "nothing changed") is returned as it is.
    MalformedMessage if the frame is not on that round's mask.
    """
    if not is_compressed(parameters) or len(parameters.tensors) != 1:
        raise MalformedMessage("subspace change: expected one framed compressed tensor")
    blob = parameters.tensors[0]
    msg = Compressed.from_bytes(blob, compressor.frame_shapes(round_index, shapes))
    if msg.kind == "sparse" and not len(msg.indices):
        return Compressed("sparse", shapes)
    return compressor.expand(msg, round_index, shapes)


class SubspaceReceiver(UpdateReceiver):
    """A client's side: rebuild the global model from round-v k values; upload round v's k values.

    ``version`` is the number of global changes applied (the first whole model is version
    0): the round whose mask the next upload and the next received change use. ``downlink``
    is the server's compressor settings when it sends k values too (None: its frames are
    ordinary ones, unframed with the model's shapes).
    """

    def __init__(self, compressor: Compressor, downlink: SubspaceK | None = None) -> None:
        if not isinstance(compressor, SubspaceK):
            raise TypeError(f"subspace receiver: upload compressor must be SubspaceK, got {type(compressor).__name__}")
        super().__init__(compressor)
        self._sub: SubspaceK = compressor
        self._down = downlink
        self.version = 0

    def receive(self, parameters: Parameters, version: int | None = None) -> Params:
        """The whole model the server means: from whole arrays, or the held model plus round-v values.

        ``version``: the global version the server declares it is sending (:data:`VERSION_KEY` in
        its instruction; public). A whole model then sets this client's version, so a client that
        joins late (or was replaced) frames its next upload on the round the server expects, and
        a change is refused (ValueError) unless it leads from the version held to the declared
        one. Without it only a subspace downlink's own frames advance the version; a receiver
        whose downlink is an ordinary compressor needs it (ValueError), as nothing else tells it
        the round.
        """
        if version is not None and is_compressed(parameters) and \
                (self.held is None or self.version not in (version - 1, version)):
            held = self.version if self.held is not None else None
            raise ValueError(f"subspace: this client holds global version {held}, the server's change leads to "
                             f"version {version}; it needs the whole model")
        if not is_compressed(parameters) or self._down is None:
            if version is None and self._down is None:
                raise ValueError("subspace receiver: the server must declare its model version "
                                 f"({VERSION_KEY!r}) when its downlink is not a subspace one")
            arrays = super().receive(parameters)
            if version is not None:
                self.version = int(version)
            return arrays
        if self.held is None:
            raise ValueError("received a model change but this client holds no model to apply it to")
        msg = unframe_subspace(parameters, self._down, self.version, _shapes(self.held))
        if msg.size and len(msg.indices):
            self.version += 1
        self.held = apply_change(self.held, msg)
        if version is not None and self.version != version:
            raise ValueError(f"subspace: rebuilt global version {self.version}, the server declared {version}")
        return [a.copy() for a in self.held]

    def upload(self, trained: Params) -> Parameters:
        """The trained model's change on round ``version``'s mask: k values, framed."""
        if self.held is None:
            raise ValueError("no base model held: receive() must come first")
        self._sub.rounds = self.version
        return frame_parameters(change_message(trained, self.held, self._sub, "dp-sgd model change"))


class SubspaceModelTracker(GlobalModelTracker):
    """The server's side: rebuild uploads from round-v k values; broadcast the aggregate's on the same mask.

    ``upload_compressor`` is the clients' (its settings derive the uploads' masks); the
    downlink compressor may be a ``SubspaceK`` (k values) or any other (its own frames).
    """

    def __init__(self, initial: Params, upload_compressor: SubspaceK, compressor: Compressor | None = None) -> None:
        super().__init__(initial, compressor)
        self._up = upload_compressor
        self._down = compressor if isinstance(compressor, SubspaceK) else None

    def rebuild_upload(self, parameters: Parameters) -> Params:
        """A client's model: the current global model plus its round-``version`` k values."""
        return apply_change(self.model, unframe_subspace(parameters, self._up, self.version, _shapes(self.model)))

    def advance(self, aggregated: Params) -> Params:
        """Make ``aggregated`` the next version; with a subspace downlink its change goes on round v's mask."""
        if self._down is None:
            return super().advance(aggregated)
        self._down.rounds = self.version
        msg = change_message(aggregated, self.model, self._down, "aggregate of released updates")
        self.model = apply_change(self.model, self._down.expand(msg, self.version, _shapes(self.model)))
        self._last_change = frame_parameters(msg)
        self.version += 1
        return [a.copy() for a in self.model]
