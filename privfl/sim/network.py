"""The simulator's side of :class:`strategies.base.PeerNetwork`: virtual clocks and links.

All nodes live in one process; a :class:`SimWorld` holds every node's virtual clock,
the strategies (so an exchange calls the peer's ``handle_exchange`` directly) and the
mailboxes of round-synchronous messages. Message sizes are the real ones
(``ModelMessage.nbytes``) plus the link's fixed header.
"""

from __future__ import annotations

from collections.abc import Sequence

from privfl.sim.profiles import LinkSpec
from privfl.strategies.base import ModelMessage, NodeStrategy

__all__ = ["SimNetwork", "SimWorld"]


class SimWorld:
    """Shared state of a simulation: clocks, links, strategies, mailboxes, byte counters."""

    def __init__(self, node_ids: Sequence[str], neighbors: dict[str, list[str]], links: LinkSpec) -> None:
        self.node_ids = list(node_ids)
        self.index = {nid: i for i, nid in enumerate(self.node_ids)}
        self.neighbors = {nid: list(neighbors.get(nid, [])) for nid in self.node_ids}
        self.links = links.bind(len(self.node_ids))
        self.clocks = [0.0] * len(self.node_ids)
        self.strategies: dict[str, NodeStrategy] = {}
        # (receiver, round) -> {sender: (arrival time, message)}
        self.mailboxes: dict[tuple[str, int], dict[str, tuple[float, ModelMessage]]] = {}
        # per node, wire bytes incl. headers: what the node sent (to peers or to a server) and
        # what it received (from peers or from a server); a server is not a node and has no counter
        self.bytes_sent = [0] * len(self.node_ids)
        self.bytes_received = [0] * len(self.node_ids)
        self.messages_sent = [0] * len(self.node_ids)

    def network(self, node_id: str) -> SimNetwork:
        """The PeerNetwork handed to ``node_id``'s strategy."""
        return SimNetwork(self, node_id)

    def charge(self, i: int, j: int | None, nbytes: int) -> float:
        """Count one message of ``nbytes`` payload from node i to node j (j=None: to a server,
        an upload), in i's ``bytes_sent`` / ``messages_sent`` and j's ``bytes_received``;
        return its transfer time."""
        wire = nbytes + self.links.header_bytes
        self.bytes_sent[i] += wire
        self.messages_sent[i] += 1
        if j is not None:
            self.bytes_received[j] += wire
        return self.links.transfer_time(i, j, nbytes)

    def download(self, j: int, nbytes: int) -> float:
        """Count one message of ``nbytes`` payload from a server (or the all-reduce) to node j,
        a download, in j's ``bytes_received``; return its transfer time over j's own link."""
        self.bytes_received[j] += nbytes + self.links.header_bytes
        return self.links.transfer_time(j, None, nbytes)


class SimNetwork:
    """One node's view of the simulated network; implements ``PeerNetwork``."""

    def __init__(self, world: SimWorld, node_id: str) -> None:
        self.world = world
        self.node_id = node_id
        self.i = world.index[node_id]

    def neighbors(self) -> list[str]:
        return list(self.world.neighbors[self.node_id])

    def now(self) -> float:
        return self.world.clocks[self.i]

    def exchange(self, peer: str, message: ModelMessage) -> ModelMessage | None:
        """Call the peer's ``handle_exchange`` now; the round trip costs this node's clock
        ``2·latency + (request + reply bytes)/bandwidth`` (a refusal still costs a header back)."""
        w = self.world
        target = w.strategies.get(peer)
        if target is None or peer == self.node_id:
            return None
        j = w.index[peer]
        t = w.charge(self.i, j, message.nbytes)
        reply = target.handle_exchange(self.node_id, message)
        if reply is not None:
            reply.sender = peer
        t += w.charge(j, self.i, reply.nbytes if reply is not None else 0)
        w.clocks[self.i] += t
        return reply

    def send(self, peer: str, message: ModelMessage) -> bool:
        """Queue ``message`` for ``peer``; it arrives at send time + transfer time."""
        w = self.world
        if peer not in w.index or peer == self.node_id:
            return False
        j = w.index[peer]
        arrival = w.clocks[self.i] + w.charge(self.i, j, message.nbytes)
        w.mailboxes.setdefault((peer, message.round), {})[self.node_id] = (arrival, message)
        return True

    def receive(self, round: int, peers: list[str], timeout: float) -> dict[str, ModelMessage]:
        """Messages of ``round`` from ``peers`` that arrive within ``timeout`` of now; the clock
        advances to the last arrival taken (or by ``timeout`` if one is missing)."""
        w = self.world
        box = w.mailboxes.pop((self.node_id, round), {})
        now = w.clocks[self.i]
        deadline = now + timeout
        out: dict[str, ModelMessage] = {}
        latest = now
        for peer in peers:
            if peer in box and box[peer][0] <= deadline:
                arrival, msg = box[peer]
                out[peer] = msg
                latest = max(latest, arrival)
        if len(out) < len(peers) and timeout != float("inf"):
            latest = deadline
        w.clocks[self.i] = latest
        return out
