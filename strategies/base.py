"""The one interface between a strategy and the outside world, and the strategy bases.

A strategy decides when to train and with whom to exchange; it never opens a socket or
reads a clock itself. It talks to its neighbours only through :class:`PeerNetwork`,
which has two implementations: the gRPC transport of a real node and the simulator's
virtual network and clock. So the :class:`NodeStrategy` a hospital runs is the very
class the simulator measures.

Two families:

* :class:`NodeStrategy` — one instance per node, decentralized (``AsyncGossip``,
  ``SyncGossip``). A real node calls :meth:`NodeStrategy.step` in a loop and routes
  incoming requests to :meth:`NodeStrategy.handle_exchange` /
  :meth:`NodeStrategy.handle_message`. Round-synchronous strategies also expose the two
  halves of a round (:meth:`NodeStrategy.begin_round`, :meth:`NodeStrategy.finish_round`)
  so the simulator can run every node's first half before any second half.
* :class:`CollectiveStrategy` — one instance for all nodes (centralized FedAvg through
  Flower, all-reduce DP-SGD, periodic / adaptive-period averaging): it sees every
  client and returns every node's new model after one round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.client import NumPyClient

Params = list[np.ndarray]


@dataclass
class ModelMessage:
    """What one node sends another: a model (or a compressed update) and its context.

    ``params`` holds dense arrays; ``payload`` may instead hold a compressed message
    (see ``strategies.compression``) whose ``nbytes`` is its wire size.
    """

    sender: str
    round: int
    kind: str
    params: Params | None = None
    payload: Any = None
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this message carries (what the wire will count)."""
        if self.payload is not None and hasattr(self.payload, "nbytes"):
            return int(self.payload.nbytes)
        return int(sum(a.nbytes for a in self.params or []))


@runtime_checkable
class PeerNetwork(Protocol):
    """What a strategy may do with the outside world (real transport or simulator)."""

    node_id: str

    def neighbors(self) -> list[str]:
        """The peers this node may talk to (its topology neighbours)."""
        ...

    def now(self) -> float:
        """Current time in seconds (wall clock for a node, virtual clock in simulation)."""
        ...

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        """Send ``message`` to ``peer`` and return its reply; None if the peer is unreachable or refused."""
        ...

    def send(self, peer: str, message: ModelMessage) -> bool:
        """Deliver ``message`` one-way to ``peer``; False if it could not be delivered."""
        ...

    def receive(self, round: int, peers: list[str], timeout: float) -> dict[str, ModelMessage]:
        """Messages of ``round`` from ``peers`` that arrived within ``timeout`` seconds."""
        ...


@dataclass
class StepReport:
    """What one :meth:`NodeStrategy.step` did (the driver turns it into metrics and time)."""

    local_steps: int = 0
    peers: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    loss: float = float("nan")
    epsilon: float = float("nan")
    stopped: bool = False
    reason: str = ""


class NodeStrategy(ABC):
    """One node's decentralized training policy over a :class:`PeerNetwork`.

    What a driver (a real node, the simulator) reads is declared here with its default,
    so drivers read attributes, never probe for them: ``synchronous`` (round-synchronous:
    drive :meth:`begin_round` / :meth:`finish_round`), ``mixing`` (the neighbours a round
    waits for, with their weights; None: every neighbour), ``timeout`` (seconds a round
    waits), ``consensus_exchanges`` (pure averaging rounds after training, see
    :meth:`consensus_round`; a synchronous strategy's in two halves,
    :meth:`begin_consensus_round` / :meth:`finish_consensus_round`), ``last_loss`` (the site's own last training loss),
    ``exchanges`` / ``served`` (pairwise exchanges initiated / answered) and
    :meth:`snapshot` (a consistent copy of the model), ``overlaps_communication`` (a
    synchronous strategy that sends its round-start model while it trains, CoCoD-SGD: the
    simulator runs :meth:`begin_round` at the round start and charges max(compute, comm);
    an asynchronous one whose :meth:`step` leaves its exchanges running beside the next
    step's training, AD-PSGD's communication thread: the simulator calls :meth:`settle`
    after each step and charges max(next compute, those exchanges)), :meth:`settle` and
    :meth:`begin_compute` (the simulator asks it when a step's compute begins).
    """

    synchronous: bool = False
    overlaps_communication: bool = False
    mixing: Mapping[str, float] | None = None
    timeout: float = math.inf
    consensus_exchanges: int = 0
    last_loss: float = math.nan
    exchanges: int = 0
    served: int = 0

    def __init__(self, client: NumPyClient, network: PeerNetwork, params: Params,
                 config: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self.network = network
        self.params = [np.array(p, copy=True) for p in params]
        self.config = dict(config or {})
        self.round = 0
        self.stopped = False
        self.stop_reason = ""

    @abstractmethod
    def step(self) -> StepReport:
        """One iteration: local training and communication (blocking in a real node)."""

    def begin_round(self) -> StepReport:
        """First half of a synchronous round (train, send); only for ``synchronous`` strategies."""
        raise NotImplementedError(f"{type(self).__name__} is not round-synchronous")

    def finish_round(self, received: dict[str, ModelMessage]) -> StepReport:
        """Second half of a synchronous round (mix what arrived)."""
        raise NotImplementedError(f"{type(self).__name__} is not round-synchronous")

    def consensus_round(self) -> StepReport:
        """One pure averaging exchange after training (``consensus_exchanges`` of them); default: none."""
        return StepReport()

    def begin_consensus_round(self) -> StepReport:
        """First half of a synchronous strategy's pure mixing round after training (send, no local
        steps); default: nothing."""
        return StepReport()

    def finish_consensus_round(self, received: dict[str, ModelMessage]) -> StepReport:  # noqa: ARG002
        """Second half: mix what arrived (post-processing of released models); default: nothing."""
        return StepReport()

    def begin_compute(self, t: float) -> bool:  # noqa: ARG002 - a hook: the default trains whenever not stopped
        """A driver that charges a step's compute *before* calling :meth:`step` (the simulator) says the
        compute of the next step would begin at ``t``: whether that step trains (False: charge no compute;
        the next :meth:`step`, at ``t``, stops the node). A real node trains inside :meth:`step` and never
        calls it. Default: every step trains until the strategy stops."""
        return not self.stopped

    def settle(self) -> StepReport:
        """Wait for communication a step left in flight and raise its error (drivers call it at
        stop, before a checkpoint, and the simulator after each overlapped step); what it
        joined. Default: nothing is ever in flight."""
        return StepReport()

    def snapshot(self) -> Params:
        """A consistent copy of the current model (for evaluation and checkpoints)."""
        return [np.array(p, copy=True) for p in self.params]

    def frame_shapes(self, round: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """The shapes a compressed frame of round ``round`` (request, reply or one-way) is rebuilt with:
        the model's ``shapes``, unless the strategy frames on something public it derives (a subspace
        mask's per-tensor counts). A node's transport asks this for every frame it receives."""
        return shapes

    def handle_exchange(self, sender: str, message: ModelMessage) -> ModelMessage | None:
        """Serve a peer's exchange request (passive side); None refuses it."""
        return None

    def handle_message(self, sender: str, message: ModelMessage) -> None:  # noqa: B027 - optional hook, not abstract
        """Accept a one-way message from a peer (default: ignore it)."""


class CollectiveStrategy(ABC):
    """A strategy that sees all nodes at once (centralized or all-reduce)."""

    @abstractmethod
    def run_round(self, clients: Mapping[str, NumPyClient], params: Mapping[str, Params],
                  round: int) -> CollectiveRound:
        """Run one round over ``clients`` starting from each node's ``params``."""


@dataclass
class CollectiveRound:
    """Outcome of one collective round: every node's new model and what it cost."""

    params: dict[str, Params]
    local_steps: dict[str, int]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
