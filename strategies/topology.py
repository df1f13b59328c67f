"""Gossip topologies and their Metropolis–Hastings mixing weights (pure numpy).

A :class:`Topology` is an undirected, connected graph over the consortium's node ids.
It gives each node its neighbours, the symmetric doubly stochastic mixing matrix W
(Metropolis–Hastings weights, which need only local degree knowledge), the spectral
gap 1 − ρ that governs how fast gossip averaging converges (``‖x_t − x̄‖ ≤ ρ^t ‖x_0 − x̄‖``),
and, for AD-PSGD's deadlock-free exchange, an active/passive two-colouring when the
graph is bipartite. See ``shared/research/communication-algorithms.md`` §10.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from privfl.accounting.errors import ConfigError

__all__ = [
    "TOPOLOGY_KINDS",
    "Bipartition",
    "Topology",
    "TopologyError",
    "build_topology",
    "canonical_kind",
]


class TopologyError(ConfigError, ValueError):
    """A topology cannot be built as asked; the message names the field and the problem."""


class Bipartition(NamedTuple):
    """AD-PSGD's split: active nodes initiate exchanges, passive nodes only answer."""

    active: tuple[str, ...]
    passive: tuple[str, ...]


Edge = tuple[str, str]


def _check_node_ids(node_ids: Iterable[str]) -> tuple[str, ...]:
    """Node ids as a tuple; refuse empties, non-strings and duplicates."""
    if isinstance(node_ids, str):
        raise TopologyError("node_ids must be a list of node id strings, got a single string")
    ids = tuple(node_ids)
    if not ids:
        raise TopologyError("node_ids is empty: a topology needs at least one node")
    seen: set[str] = set()
    for nid in ids:
        if not isinstance(nid, str) or not nid:
            raise TopologyError(f"node_ids: every node id must be a non-empty string, got {nid!r}")
        if nid in seen:
            raise TopologyError(f"node_ids: duplicate node id {nid!r}")
        seen.add(nid)
    return ids


def _components(n: int, adjacency: Sequence[set[int]]) -> list[list[int]]:
    """Connected components (node indices), each in BFS order from its smallest index."""
    seen = [False] * n
    comps: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [start], deque([start])
        while queue:
            u = queue.popleft()
            for v in sorted(adjacency[u]):
                if not seen[v]:
                    seen[v] = True
                    comp.append(v)
                    queue.append(v)
        comps.append(comp)
    return comps


def _joined(adjacency: Sequence[set[int]], left: Sequence[int], right: Sequence[int]) -> bool:
    """Whether the (disjoint) node sets ``left`` and ``right`` lie in one component: a bidirectional
    BFS that always grows the smaller frontier and stops when the two sides meet (about √n nodes
    visited on an expander) or when one side's component is exhausted without meeting (False)."""
    side = {v: 0 for v in left}
    side.update({v: 1 for v in right})
    frontiers: list[list[int]] = [list(left), list(right)]
    while frontiers[0] and frontiers[1]:
        k = 0 if len(frontiers[0]) <= len(frontiers[1]) else 1
        grown: list[int] = []
        for u in frontiers[k]:
            for v in adjacency[u]:
                s = side.get(v)
                if s is None:
                    side[v] = k
                    grown.append(v)
                elif s != k:
                    return True
        frontiers[k] = grown
    return False


@dataclass(frozen=True)
class Topology:
    """An undirected connected graph over node ids.

    ``nodes`` fixes the order used by every matrix; ``edges`` holds each undirected edge
    once, as a pair ordered by that node order. Build one with the class-method
    constructors or :func:`build_topology`; the constructor validates everything.
    """

    nodes: tuple[str, ...]
    edges: frozenset[Edge]
    name: str = "explicit"

    def __post_init__(self) -> None:
        nodes = _check_node_ids(self.nodes)
        object.__setattr__(self, "nodes", nodes)
        index = {nid: i for i, nid in enumerate(nodes)}
        canonical: set[Edge] = set()
        for edge in self.edges:
            if not isinstance(edge, tuple) or len(edge) != 2:
                raise TopologyError(f"edges: each edge must be a pair of node ids, got {edge!r}")
            a, b = edge
            for end in (a, b):
                if end not in index:
                    raise TopologyError(f"edges: edge {edge!r} names unknown node id {end!r}")
            if a == b:
                raise TopologyError(f"edges: self-loop on node {a!r} is not allowed")
            canonical.add((a, b) if index[a] < index[b] else (b, a))
        object.__setattr__(self, "edges", frozenset(canonical))
        comps = _components(len(nodes), self._adjacency_sets())
        if len(comps) > 1:
            parts = "; ".join(
                "{" + ", ".join(nodes[i] for i in comp[:5]) + (", …" if len(comp) > 5 else "") + "}"
                for comp in comps[:4]
            )
            raise TopologyError(
                f"topology {self.name!r} is disconnected: {len(comps)} components ({parts}); "
                "gossip could never reach consensus"
            )

    # -- constructors -------------------------------------------------------------

    @classmethod
    def ring(cls, node_ids: Sequence[str]) -> Topology:
        """Cycle in the given order (a path for n = 2, no edge for n = 1)."""
        ids = _check_node_ids(node_ids)
        n = len(ids)
        edges = {(ids[i], ids[(i + 1) % n]) for i in range(n)} if n > 1 else set()
        return cls(ids, frozenset(edges), "ring")

    @classmethod
    def torus(
        cls,
        node_ids: Sequence[str],
        rows: int | None = None,
        cols: int | None = None,
        allow_degenerate: bool = False,
    ) -> Topology:
        """2-D torus, node k at (k // cols, k % cols), linked to its 4 wrap-around neighbours.

        Without ``rows``/``cols`` the most square factorisation rows ≤ cols is chosen; a
        prime n > 3 only factors as 1 × n (a ring), refused unless ``allow_degenerate``.
        """
        ids = _check_node_ids(node_ids)
        n = len(ids)
        if rows is None and cols is None:
            rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
            cols = n // rows
            if rows == 1 and n > 3 and not allow_degenerate:
                raise TopologyError(
                    f"torus: n={n} nodes is prime, so the only grid is 1×{n} (a ring); "
                    "choose another topology, or pass allow_degenerate=true"
                )
        elif rows is None or cols is None:
            if rows is not None:
                _positive_int("rows", rows)
            if cols is not None:
                _positive_int("cols", cols)
            given = rows if rows is not None else cols
            assert given is not None
            if n % given:
                raise TopologyError(f"torus: {given} does not divide the node count {n}")
            rows, cols = (given, n // given) if rows is not None else (n // given, given)
        else:
            _positive_int("rows", rows)
            _positive_int("cols", cols)
            if rows * cols != n:
                raise TopologyError(f"torus: rows×cols = {rows}×{cols} = {rows * cols} ≠ n = {n} nodes")
        edges: set[Edge] = set()
        for r in range(rows):
            for c in range(cols):
                here = r * cols + c
                for other in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                    if other != here:
                        edges.add((ids[here], ids[other]))
        return cls(ids, frozenset(edges), f"torus{rows}x{cols}")

    @classmethod
    def exponential(cls, node_ids: Sequence[str]) -> Topology:
        """Static exponential graph: node i linked to i ± 2^k (mod n) for every 2^k < n."""
        ids = _check_node_ids(node_ids)
        n = len(ids)
        edges: set[Edge] = set()
        hop = 1
        while hop < n:
            for i in range(n):
                j = (i + hop) % n
                if j != i:
                    edges.add((ids[i], ids[j]))
            hop *= 2
        return cls(ids, frozenset(edges), "exponential")

    @classmethod
    def random_regular(cls, node_ids: Sequence[str], degree: int, seed: int = 0) -> Topology:
        """Connected random ``degree``-regular graph, the same for the same ids and seed.

        Starts from a connected circulant d-regular graph and applies seeded random
        double-edge swaps (which keep every degree), rejecting swaps that would create a
        multi-edge or disconnect the graph.
        """
        ids = _check_node_ids(node_ids)
        n = len(ids)
        d = _positive_int("degree", degree)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TopologyError(f"seed must be an integer, got {seed!r}")
        if d >= n:
            raise TopologyError(f"random_regular: degree={d} must be < n={n} nodes")
        if (n * d) % 2:
            raise TopologyError(f"random_regular: n·degree = {n}·{d} is odd; no such graph exists")
        if d == 1 and n > 2:
            raise TopologyError(f"random_regular: degree=1 on n={n} > 2 nodes is a matching, never connected")
        adj: list[set[int]] = [set() for _ in range(n)]
        offsets = list(range(1, d // 2 + 1)) + ([n // 2] if d % 2 else [])
        for i in range(n):
            for off in offsets:
                j = (i + off) % n
                adj[i].add(j)
                adj[j].add(i)
        rng = np.random.default_rng(int(seed))
        edge_list = sorted({(min(i, j), max(i, j)) for i in range(n) for j in adj[i]})
        for _ in range(10 * len(edge_list)):
            e1, e2 = rng.choice(len(edge_list), size=2, replace=False)
            (a, b), (c, dd) = edge_list[e1], edge_list[e2]
            if rng.random() < 0.5:
                c, dd = dd, c
            # swap a-b, c-dd  ->  a-c, b-dd
            if len({a, b, c, dd}) < 4 or c in adj[a] or dd in adj[b]:
                continue
            for u, v in ((a, b), (c, dd)):
                adj[u].discard(v)
                adj[v].discard(u)
            for u, v in ((a, c), (b, dd)):
                adj[u].add(v)
                adj[v].add(u)
            # the graph was connected, so every node still reaches a, b, c or dd, and a-c, b-dd are
            # edges now: the swapped graph is connected iff {a, c} and {b, dd} are joined
            if not _joined(adj, (a, c), (b, dd)):  # undo
                for u, v in ((a, c), (b, dd)):
                    adj[u].discard(v)
                    adj[v].discard(u)
                for u, v in ((a, b), (c, dd)):
                    adj[u].add(v)
                    adj[v].add(u)
                continue
            edge_list[e1] = (min(a, c), max(a, c))
            edge_list[e2] = (min(b, dd), max(b, dd))
        edges = frozenset((ids[i], ids[j]) for i, j in edge_list)
        return cls(ids, edges, f"random_regular(d={d},seed={int(seed)})")

    @classmethod
    def complete(cls, node_ids: Sequence[str]) -> Topology:
        """Every pair of nodes linked."""
        ids = _check_node_ids(node_ids)
        edges = frozenset((ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))
        return cls(ids, edges, "complete")

    @classmethod
    def from_edges(
        cls, node_ids: Sequence[str], edges: Iterable[Sequence[str]], name: str = "explicit"
    ) -> Topology:
        """An explicit undirected edge list, e.g. ``[["a", "b"], ["b", "c"]]`` from a config."""
        ids = _check_node_ids(node_ids)
        if isinstance(edges, (str, bytes)) or not isinstance(edges, Iterable):
            raise TopologyError(f"edges must be a list of [node, node] pairs, got {edges!r}")
        pairs: set[Edge] = set()
        for edge in edges:
            if isinstance(edge, (str, bytes)) or not isinstance(edge, Sequence) or len(edge) != 2:
                raise TopologyError(f"edges: each edge must be a pair of node ids, got {edge!r}")
            pairs.add((edge[0], edge[1]))
        return cls(ids, frozenset(pairs), name)

    # -- queries -------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def index(self, node_id: str) -> int:
        """Position of ``node_id`` in :attr:`nodes` (the row of W that is its own)."""
        try:
            return self.nodes.index(node_id)
        except ValueError:
            raise TopologyError(f"node id {node_id!r} is not in topology {self.name!r}") from None

    def neighbors(self, node_id: str) -> list[str]:
        """The neighbours of ``node_id``, in node order."""
        i = self.index(node_id)
        return [self.nodes[j] for j in sorted(self._adjacency_sets()[i])]

    def degree(self, node_id: str) -> int:
        """Number of neighbours of ``node_id``."""
        return len(self._adjacency_sets()[self.index(node_id)])

    def degrees(self) -> np.ndarray:
        """Degree of every node, in node order."""
        return np.array([len(s) for s in self._adjacency_sets()], dtype=np.int64)

    def adjacency(self) -> np.ndarray:
        """0/1 symmetric adjacency matrix in node order."""
        a = np.zeros((self.n, self.n), dtype=np.int64)
        for i, nbrs in enumerate(self._adjacency_sets()):
            a[i, list(nbrs)] = 1
        return a

    def metropolis_hastings_weights(self) -> np.ndarray:
        """Symmetric doubly stochastic W: w_ij = 1/(1 + max(d_i, d_j)) on edges, w_ii = 1 − Σ_j w_ij."""
        deg = self.degrees()
        w = np.zeros((self.n, self.n), dtype=np.float64)
        for i, nbrs in enumerate(self._adjacency_sets()):
            for j in nbrs:
                w[i, j] = 1.0 / (1.0 + max(deg[i], deg[j]))
        np.fill_diagonal(w, 1.0 - w.sum(axis=1))
        return w

    def mixing_row(self, node_id: str) -> dict[str, float]:
        """``node_id``'s row of W over its neighbours (its own weight is 1 − the sum)."""
        w = self.metropolis_hastings_weights()
        i = self.index(node_id)
        return {self.nodes[j]: float(w[i, j]) for j in sorted(self._adjacency_sets()[i])}

    def spectral_gap(self) -> float:
        """1 − ρ, ρ = the second largest |eigenvalue| of W (1.0 for a single node)."""
        if self.n == 1:
            return 1.0
        eig = np.sort(np.abs(np.linalg.eigvalsh(self.metropolis_hastings_weights())))[::-1]
        return float(max(0.0, 1.0 - eig[1]))

    def two_coloring(self) -> Bipartition | None:
        """Active/passive split for AD-PSGD, or None when the graph is not bipartite.

        The colour class holding the first node is the active one; every edge joins an
        active node to a passive node, so no two nodes ever wait on each other.
        """
        adj = self._adjacency_sets()
        colour = [-1] * self.n
        for start in range(self.n):
            if colour[start] != -1:
                continue
            colour[start] = 0
            queue = deque([start])
            while queue:
                u = queue.popleft()
                for v in adj[u]:
                    if colour[v] == -1:
                        colour[v] = 1 - colour[u]
                        queue.append(v)
                    elif colour[v] == colour[u]:
                        return None
        active = tuple(nid for nid, c in zip(self.nodes, colour) if c == 0)
        passive = tuple(nid for nid, c in zip(self.nodes, colour) if c == 1)
        return Bipartition(active, passive)

    def is_bipartite(self) -> bool:
        """Whether the nodes split into two sides with every edge across."""
        return self.two_coloring() is not None

    def summary(self) -> str:
        """One line for the node's start-up log: name, size, degree range, spectral gap."""
        deg = self.degrees()
        lo, hi = (int(deg.min()), int(deg.max())) if self.n else (0, 0)
        return (
            f"topology {self.name}: n={self.n}, edges={len(self.edges)}, degree {lo}..{hi}, "
            f"spectral gap {self.spectral_gap():.5f} (Metropolis-Hastings), "
            f"bipartite={'yes' if self.is_bipartite() else 'no'}"
        )

    def _adjacency_sets(self) -> list[set[int]]:
        """Neighbour index sets, built once per topology (read-only: callers never mutate them)."""
        cached: list[set[int]] | None = self.__dict__.get("_adj")
        if cached is not None:
            return cached
        index = {nid: i for i, nid in enumerate(self.nodes)}
        adj: list[set[int]] = [set() for _ in self.nodes]
        for a, b in self.edges:
            adj[index[a]].add(index[b])
            adj[index[b]].add(index[a])
        object.__setattr__(self, "_adj", adj)
        return adj


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TopologyError(f"{field} must be a positive integer, got {value!r}")
    return int(value)


_BUILDERS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    # kind: (constructor name, required params, optional params)
    "ring": ("ring", frozenset(), frozenset()),
    "torus": ("torus", frozenset(), frozenset({"rows", "cols", "allow_degenerate"})),
    "exponential": ("exponential", frozenset(), frozenset()),
    "random_regular": ("random_regular", frozenset({"degree"}), frozenset({"seed"})),
    "complete": ("complete", frozenset(), frozenset()),
    "explicit": ("from_edges", frozenset({"edges"}), frozenset({"name"})),
}
_ALIASES: dict[str, str] = {
    "cycle": "ring",
    "torus2d": "torus",
    "grid": "torus",
    "exp": "exponential",
    "d_regular": "random_regular",
    "regular": "random_regular",
    "full": "complete",
    "fully_connected": "complete",
    "edges": "explicit",
    "edge_list": "explicit",
}
TOPOLOGY_KINDS: tuple[str, ...] = tuple(_BUILDERS)


def canonical_kind(kind: str) -> str:
    """The registered name of a topology kind or alias (``grid`` → ``torus``); TopologyError if unknown."""
    if not isinstance(kind, str):
        raise TopologyError(f"topology kind must be a string, got {kind!r}")
    key = kind.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise TopologyError(f"unknown topology kind {kind!r}; choose one of: {', '.join(TOPOLOGY_KINDS)}")
    return key


def build_topology(kind: str, node_ids: Sequence[str], **params: Any) -> Topology:
    """Build a topology by name (``ring``, ``torus``, ``exponential``, ``random_regular``,
    ``complete``, ``explicit``); unknown kinds, unknown or missing parameters are refused."""
    key = canonical_kind(kind)
    method, required, optional = _BUILDERS[key]
    unknown = sorted(set(params) - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise TopologyError(
            f"topology {key!r} does not take parameter(s) {', '.join(unknown)} (allowed: {allowed})"
        )
    missing = sorted(required - set(params))
    if missing:
        raise TopologyError(f"topology {key!r} needs parameter(s) {', '.join(missing)}")
    return getattr(Topology, method)(node_ids, **params)

