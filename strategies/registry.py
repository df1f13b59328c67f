"""One table of strategies for every driver: ``privfl node`` / ``launch`` and ``simulate`` / ``compare``.

Each strategy name has one :class:`StrategyEntry`: its kind (``node``: one instance per
node; ``collective``: one instance for all nodes), the ``[strategy].params`` keys it
takes, the drivers that can run it and a builder taking one :class:`StrategyBuild`.
A driver fills a StrategyBuild with what it knows (its node, topology, seeds, how long a
round waits) and passes ``[strategy].params`` as written; it never reads them itself.
So a config is checked and built the same way everywhere, and a refusal is one line
naming ``[strategy].name`` or ``[strategy].params.<key>``, the same under every driver
(a node puts its config file in front).

What differs by driver is declared here too: a real node sets some settings from
elsewhere in its config (:data:`NODE_OWNED`: ``local_steps`` from ``[strategy].local_steps``,
``timeout`` from ``[node].sync_timeout`` ...) and refuses them in ``[strategy].params``,
naming where they go; the simulator takes them there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from flwr.client import NumPyClient

from privfl.accounting.errors import ConfigError
from privfl.strategies.base import CollectiveStrategy, NodeStrategy, Params, PeerNetwork
from privfl.strategies.cocod import CoCoDGossip
from privfl.strategies.compression.params import (
    SYNC_GOSSIP_KEYS,
    build_compressor,
    check_strategy_keys,
    sync_compression_params,
)
from privfl.strategies.compression.subspace import SubspaceK
from privfl.strategies.compression.subspace_exchange import ASYNC_SUBSPACE_KEYS, async_subspace_params
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging
from privfl.strategies.gossip import AsyncGossip, SyncGossip, async_settings
from privfl.strategies.iterate_average import ema_decay_setting
from privfl.strategies.periodic import AdaptivePeriod, AllReduce, PeriodicAveraging
from privfl.strategies.topology import Topology

__all__ = ["DRIVERS", "NODE_OWNED", "STRATEGIES", "WHERE", "Driver", "Kind", "StrategyBuild", "StrategyEntry",
           "SyncGossipSettings", "build_collective_strategy", "build_node_strategy", "build_strategy",
           "check_strategy", "register_strategy", "strategy_entry", "sync_gossip_settings"]

Kind = Literal["node", "collective"]
Driver = Literal["node", "simulate"]
DRIVERS: tuple[Driver, ...] = ("node", "simulate")
#: how refusals name the params table
WHERE = "[strategy].params"
#: the commands behind each driver, for messages
_COMMANDS: dict[str, tuple[str, ...]] = {"node": ("node", "launch"), "simulate": ("simulate", "compare")}

#: settings a real node takes from elsewhere in its config, never from [strategy].params
NODE_OWNED: Mapping[str, str] = {
    "local_steps": "[strategy].local_steps", "seed": "[node].seed",
    "mixing": "[topology] (the node's Metropolis–Hastings row)", "timeout": "[node].sync_timeout",
    "consensus_exchanges": "[node].consensus_exchanges",
}
_OWNED: dict[str, tuple[str, Mapping[str, str]]] = {"node": ("a node", NODE_OWNED), "simulate": ("", {})}


@dataclass(frozen=True)
class StrategyBuild:
    """One request to build a strategy: what the driver knows, and ``[strategy].params`` as written.

    Node strategies use ``node_id``, ``topology``, ``client``, ``network`` and ``initial``
    (the node's starting model); collective ones ``initial`` (every node's starting model).
    ``seed`` seeds post-processing randomness (peer choice) and ``compressor_seed`` a
    compressor's masks; ``timeout`` is how long a round waits for neighbours (the
    simulator: ``inf``, it waits for every live one); ``shared_init`` is the driver's
    default for compressed sync_gossip (every node starts from the same public model);
    ``planned_steps`` the most DP steps a node is planned to take (``[dp].planned_steps``, else
    ``[stop].max_steps``; None: unknown), which async subspace gossip checks its fixed mask against;
    ``public_initial`` the shared public initial model when ``initial`` is a resumed one (None: ``initial``).
    """

    name: str
    driver: Driver
    params: Mapping[str, Any] = field(default_factory=dict)
    local_steps: int = 1
    seed: int = 0
    compressor_seed: int = 0
    timeout: float = math.inf
    shared_init: bool = True
    node_id: str | None = None
    topology: Topology | None = None
    client: NumPyClient | None = None
    network: PeerNetwork | None = None
    initial: Params | None = None
    planned_steps: int | None = None
    public_initial: Params | None = None


Builder = Callable[[StrategyBuild], NodeStrategy | CollectiveStrategy]
Checker = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: kind, ``[strategy].params`` keys (None: its builder checks them), drivers, builder.

    ``check``, when given, validates ``params`` in full, names and values (sync_gossip also
    takes its compressor's settings); without it only the names are checked. It raises a
    one-line :class:`ConfigError` naming ``[strategy].params.<key>``.
    """

    name: str
    kind: Kind
    params: frozenset[str] | None
    drivers: frozenset[str]
    build: Builder
    check: Checker | None = None


STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(name: str, kind: Kind, build: Builder, *, params: Iterable[str] | None = None,
                      drivers: Iterable[str] | None = None, check: Checker | None = None) -> StrategyEntry:
    """Make ``name`` a strategy (replaces an existing entry); ``drivers`` default: every driver of its kind."""
    if kind not in ("node", "collective"):
        raise ValueError(f"strategy kind must be 'node' or 'collective', got {kind!r}")
    runs = frozenset(drivers) if drivers is not None else frozenset(DRIVERS if kind == "node" else ("simulate",))
    if not runs or runs - set(DRIVERS):
        raise ValueError(f"strategy drivers must be some of {', '.join(DRIVERS)}, got {sorted(runs)}")
    if kind == "collective" and "node" in runs:
        raise ValueError(f"strategy {name!r}: a node runs only node strategies")
    entry = StrategyEntry(name, kind, None if params is None else frozenset(params), runs, build, check)
    STRATEGIES[name] = entry
    return entry


# ---- refusals ----------------------------------------------------------------------------
def _commands(drivers: Iterable[str]) -> str:
    """The commands that run ``drivers``, e.g. ``privfl simulate / compare``."""
    return "privfl " + " / ".join(c for d in DRIVERS if d in drivers for c in _COMMANDS[d])


def _choices() -> str:
    """Every strategy name, grouped by the commands that run it."""
    groups: dict[frozenset[str], list[str]] = {}
    for n, e in sorted(STRATEGIES.items()):
        groups.setdefault(e.drivers, []).append(n)
    ordered = sorted(groups.items(), key=lambda g: (-len(g[0]), g[1]))
    return " or ".join(f"{', '.join(names)} ({_commands(runs)})" for runs, names in ordered)


def strategy_entry(name: Any, driver: Driver) -> StrategyEntry:
    """The entry of ``name`` if ``driver`` runs it; else a one-line ConfigError naming ``[strategy].name``."""
    entry = STRATEGIES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"[strategy].name: unknown strategy name {name!r}; choose one of {_choices()}")
    if driver not in entry.drivers:
        runs = " or ".join(sorted(n for n, e in STRATEGIES.items() if driver in e.drivers))
        raise ConfigError(f"[strategy].name: {name!r} is a {entry.kind} strategy ({_commands(entry.drivers)}); "
                          f"{_commands([driver])} run {runs}")
    return entry


#: compressors the simulator runs but a node's transport cannot carry yet (none: subspace frames
#: travel as ordinary Compressed frames, rebuilt with the round's mask counts)
SIMULATE_ONLY_COMPRESSORS: frozenset[str] = frozenset()


def check_strategy(name: Any, params: Mapping[str, Any], driver: Driver) -> StrategyEntry:
    """Refuse what ``driver`` cannot run or ``params`` that strategy ``name`` does not take; returns its entry."""
    entry = strategy_entry(name, driver)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{WHERE}: must be a table, got {params!r}")
    owner, owned = _OWNED[driver]
    takes = set(params) if entry.params is None else entry.params
    clash = sorted(set(params) & takes & set(owned))
    if clash:
        raise ConfigError(f"{WHERE}.{clash[0]}: {owner} sets this from {owned[clash[0]]}, not from {WHERE}")
    if entry.check is not None:
        entry.check(entry.name, params)
    elif entry.params is not None:
        check_strategy_keys(entry.name, params, entry.params, where=WHERE)
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{WHERE}.seed: must be an integer, got {seed!r}")
    if driver == "node" and params.get("compressor") in SIMULATE_ONLY_COMPRESSORS:
        raise ConfigError(f"{WHERE}.compressor: {params['compressor']!r} runs under {_commands(['simulate'])} "
                          "only: its frames are not on a node's wire yet")
    return entry


def build_strategy(b: StrategyBuild) -> NodeStrategy | CollectiveStrategy:
    """Check ``b.params`` for ``b.driver`` and build strategy ``b.name`` (one node's, or the collective one)."""
    entry = check_strategy(b.name, b.params, b.driver)
    needs = ("node_id", "topology", "client", "network", "initial") if entry.kind == "node" else ("initial",)
    missing = [n for n in needs if getattr(b, n) is None]
    if missing:
        raise ValueError(f"building {entry.kind} strategy {b.name!r} needs {', '.join(missing)}")
    return entry.build(b)


def build_node_strategy(b: StrategyBuild) -> NodeStrategy:
    """:func:`build_strategy` for a node strategy (one node's instance)."""
    s = build_strategy(b)
    if not isinstance(s, NodeStrategy):
        raise TypeError(f"strategy {b.name!r} built a {type(s).__name__}, not a NodeStrategy")
    return s


def build_collective_strategy(b: StrategyBuild) -> CollectiveStrategy:
    """:func:`build_strategy` for a collective strategy (one instance for all nodes)."""
    s = build_strategy(b)
    if not isinstance(s, CollectiveStrategy):
        raise TypeError(f"strategy {b.name!r} built a {type(s).__name__}, not a CollectiveStrategy")
    return s


# ---- async_gossip ------------------------------------------------------------------------
_ASYNC_KEYS = frozenset({"local_steps", "seed", "consensus_exchanges", "compressor", "exchanges_per_step",
                         "train_seconds", "overlap", "gradient_peers", "compression_params", "ema_decay"}
                        ) | ASYNC_SUBSPACE_KEYS


def _check_async_gossip(name: str, params: Mapping[str, Any]) -> None:
    async_subspace_params(params, WHERE)  # only "subspace" (a fixed public mask's k values)
    check_strategy_keys(name, params, _ASYNC_KEYS, where=WHERE)
    async_settings(params, WHERE)
    ema_decay_setting(params, WHERE)


def _build_async_gossip(b: StrategyBuild) -> NodeStrategy:
    assert b.topology is not None and b.node_id is not None and b.network is not None and b.initial is not None
    cfg: dict[str, Any] = {"local_steps": b.local_steps, "seed": b.seed, **b.params}
    cfg.update(AsyncGossip.roles(b.topology, b.node_id))
    subspace = async_subspace_params(b.params, WHERE)
    if subspace is not None:
        if not b.shared_init:
            raise ConfigError("[node].init_seed: async_gossip with compressor 'subspace' needs every node to start "
                              "from the shared public initial model (off the mask the models stay there)")
        cfg = {k: v for k, v in cfg.items() if k not in ASYNC_SUBSPACE_KEYS | {"compression_params"}}
        cfg.update(compressor=SubspaceK(**subspace), planned_steps=b.planned_steps,
                   public_initial=b.public_initial)  # None: AsyncGossip takes ``initial``
    return AsyncGossip(b.client, b.network, b.initial, cfg)  # type: ignore[arg-type]


# ---- sync_gossip -------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncGossipSettings:
    """sync_gossip's validated compression settings: the compressor (name, settings) or None, gamma, shared_init.

    ``shared_init`` None: the driver's default (:attr:`StrategyBuild.shared_init`).
    """

    compressor: tuple[str, dict[str, Any]] | None = None
    gamma: float = 0.5
    shared_init: bool | None = None


def sync_gossip_settings(params: Mapping[str, Any]) -> SyncGossipSettings:
    """Validate sync_gossip's ``[strategy].params`` (keys, compressor and its settings, gamma, shared_init)."""
    gamma = params.get("gamma", 0.5)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ConfigError(f"{WHERE}.gamma: must be a number in (0, 1], got {gamma!r}")
    shared = params.get("shared_init")
    if shared is not None and not isinstance(shared, bool):
        raise ConfigError(f"{WHERE}.shared_init: must be true or false, got {shared!r}")
    return SyncGossipSettings(sync_compression_params(params, WHERE), float(gamma), shared)


def _check_sync_gossip(name: str, params: Mapping[str, Any]) -> None:
    sync_gossip_settings(params)


def _build_sync_gossip(b: StrategyBuild) -> NodeStrategy:
    assert b.topology is not None and b.node_id is not None and b.network is not None and b.initial is not None
    s = sync_gossip_settings(b.params)
    cfg: dict[str, Any] = {"local_steps": b.local_steps, "seed": b.seed, "mixing": b.topology.mixing_row(b.node_id),
                           "timeout": b.timeout}
    # sync_gossip's own keys as given (the simulator may set mixing, timeout ...); compressor settings are not
    cfg.update({k: v for k, v in b.params.items() if k in SYNC_GOSSIP_KEYS - {"compressor", "compression_params"}})
    if s.compressor is not None:  # one compressor per node: per-node state and random stream
        name, kwargs = s.compressor
        cfg.update(compressor=build_compressor(name, kwargs, b.compressor_seed), gamma=s.gamma,
                   shared_init=b.shared_init if s.shared_init is None else s.shared_init)
    return SyncGossip(b.client, b.network, b.initial, cfg)  # type: ignore[arg-type]


# ---- cocod ---------------------------------------------------------------------------------
#: CoCoD-SGD: sync_gossip's dense keys and consensus_exchanges (a node sets all of them from elsewhere: no params)
_COCOD_KEYS = frozenset({"local_steps", "seed", "mixing", "timeout", "consensus_exchanges"})


def _build_cocod(b: StrategyBuild) -> NodeStrategy:
    assert b.topology is not None and b.node_id is not None and b.network is not None and b.initial is not None
    cfg: dict[str, Any] = {"local_steps": b.local_steps, "seed": b.seed, "mixing": b.topology.mixing_row(b.node_id),
                           "timeout": b.timeout, **b.params}
    return CoCoDGossip(b.client, b.network, b.initial, cfg)  # type: ignore[arg-type]


# ---- collective strategies -----------------------------------------------------------------
_FEDAVG_KEYS = frozenset(f.name for f in fields(FedAvgConfig)) - {"local_steps", "seed", "evaluate"}


def _build_fedavg(b: StrategyBuild) -> CollectiveStrategy:
    cfg = FedAvgConfig(**{"local_steps": b.local_steps, "seed": b.seed, "evaluate": False,
                          "min_available_clients": 1, **b.params})
    return FederatedAveraging(cfg, initial_parameters=b.initial)


def _keywords(cls: type) -> frozenset[str]:
    """The keyword arguments of ``cls``: what it takes in ``[strategy].params``."""
    return frozenset(p for p in inspect.signature(cls.__init__).parameters if p != "self")  # type: ignore[misc]


def _construct(cls: type[CollectiveStrategy]) -> Builder:
    """A builder calling ``cls(**params)`` (its values are checked by the class, naming the field)."""

    def build(b: StrategyBuild) -> CollectiveStrategy:
        return cls(**b.params)

    return build


register_strategy("async_gossip", "node", _build_async_gossip, params=_ASYNC_KEYS, check=_check_async_gossip)
register_strategy("sync_gossip", "node", _build_sync_gossip, params=SYNC_GOSSIP_KEYS, check=_check_sync_gossip)
register_strategy("cocod", "node", _build_cocod, params=_COCOD_KEYS)
register_strategy("fedavg", "collective", _build_fedavg, params=_FEDAVG_KEYS)
register_strategy("allreduce", "collective", _construct(AllReduce), params=_keywords(AllReduce))
register_strategy("periodic", "collective", _construct(PeriodicAveraging), params=_keywords(PeriodicAveraging))
register_strategy("adaptive_period", "collective", _construct(AdaptivePeriod), params=_keywords(AdaptivePeriod))
