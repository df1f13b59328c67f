"""A node's TOML configuration: the shared sections plus ``[node]`` and ``[identity]``.

Why: a hospital runs exactly one ``privfl node --config node.toml``. The shared sections
(``data``, ``model``, ``dp``, ``topology``, ``strategy``, ``stop``) mean the same as in a
simulation (see :mod:`privfl.config`); this file adds what only a real node has: its id,
listen address, output folder and its identity files (certificate, key, CA, roster, CRL),
whose paths are relative to the config file. ``data.site_index`` says which partition of
the (shared-seed) split this node holds. ``[strategy].params`` may ask sync_gossip for a
compressor (``{ compressor = "topk", ratio = 0.01, gamma = 0.5 }``, read exactly as the
simulator reads it). Every error names the field or the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privfl.config import (
    SHARED_SECTIONS,
    CommonConfig,
    StrategySection,
    apply_python_path,
    check_sections,
    common_from,
    from_table,
    read_toml,
    resolve_device,
    resolve_path,
)
from privfl.errors import ConfigError
from privfl.strategies.registry import SyncGossipSettings, check_strategy, sync_gossip_settings

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class NodeSection:
    """What only a real node has: id, address, output folder and run-time knobs."""

    id: str = ""
    listen: str = ""  # empty: the node's address in the roster
    output: str = "out"
    seed: int = -1  # -1: secure randomness (OS entropy); >= 0: seeded noise, for tests only (the audit fails it)
    init_seed: int = -1  # model initialisation seed; -1: model.seed (every node starts alike)
    log_level: str = "INFO"
    checkpoint_every: float = 10.0  # seconds between checkpoints (and always at the end)
    eval_every: int = 1  # evaluate and write a metrics row every N strategy steps
    peer_timeout: float = 10.0  # deadline of one call to a peer
    wait_for_peers: float = 60.0  # at start, wait at most this long for neighbours to answer (none: refuse; 0: alone)
    consensus_exchanges: int = 20  # pure-averaging exchanges after training (0: none)
    consensus_wait: float = 30.0  # wait at most this long for neighbours to finish training
    linger: float = 30.0  # wait at most this long for neighbours to say goodbye
    #: fixed-time steps: no model leaves before the start + steps × step_seconds, so the step
    #: rate (which grows with the record count) does not show in message timing; 0: off
    step_seconds: float = 0.0
    sync_timeout: float = 10.0  # sync_gossip: wait at most this long for a round's models
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"
    #: processes that train this site as one DP learner (all-reduced clipped sums, noise once, on
    #: rank 0); 1: one process. Under ``torchrun`` its process count is used (privfl.ranks)
    ranks: int = 1

    def validate(self, where: str) -> None:
        if not self.id:
            raise ConfigError(f"{where}.id: required (this node's id in the roster)")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"{where}.log_level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ConfigError(f"{where}.listen: expected 'host:port', got {self.listen!r}")
        for name in ("checkpoint_every", "peer_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("wait_for_peers", "consensus_wait", "linger", "sync_timeout", "step_seconds"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{where}.{name}: must be a finite number >= 0, got {v}")
        if self.eval_every < 1:
            raise ConfigError(f"{where}.eval_every: must be >= 1, got {self.eval_every}")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise ConfigError(f"{where}.ranks: must be an integer >= 1, got {self.ranks!r}")
        if self.consensus_exchanges < 0:
            raise ConfigError(f"{where}.consensus_exchanges: must be >= 0, got {self.consensus_exchanges}")
        resolve_device(self.device, f"{where}.device")  # CUDA asked for and absent: refused at load


@dataclass
class IdentitySection:
    """The node's identity and trust files (paths relative to the config file)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    roster: str = ""
    crl: str = ""

    def validate(self, where: str) -> None:
        for name in ("cert", "key", "ca", "roster", "crl"):
            if not getattr(self, name):
                raise ConfigError(f"{where}.{name}: required (path to the node's {name} file)")


@dataclass
class NodeConfig:
    """A validated node configuration with its identity paths resolved."""

    path: Path
    node: NodeSection
    identity: IdentitySection
    common: CommonConfig
    site_index: int
    cert_path: Path = field(default_factory=Path)
    key_path: Path = field(default_factory=Path)
    ca_path: Path = field(default_factory=Path)
    roster_path: Path = field(default_factory=Path)
    crl_path: Path = field(default_factory=Path)
    output_dir: Path = field(default_factory=Path)
    strategy_params: NodeStrategyParams = field(default_factory=lambda: NodeStrategyParams())

    @property
    def log_level(self) -> int:
        """The node's log level as a :mod:`logging` constant."""
        return int(getattr(logging, self.node.log_level.upper()))

    @property
    def device(self) -> torch.device:
        """Where the node trains: ``[node].device`` resolved ("auto": CUDA when present, else CPU)."""
        return resolve_device(self.node.device, f"{self.path}: [node].device")

    @property
    def seed(self) -> int | None:
        """The explicit seed of the node's noise and sampling; None (the default): secure randomness.

        Nothing in a config reproduces a deployed node's noise: only ``[node].seed >= 0``
        asks for a seeded stream, and the ledger then says "seeded".
        """
        return self.node.seed if self.node.seed >= 0 else None

    @property
    def randomness(self) -> str:
        """"secure" or "seeded": what the ledger records."""
        return "seeded" if self.seed is not None else "secure"

    @property
    def init_seed(self) -> int:
        """The seed of the model's initial weights."""
        return self.node.init_seed if self.node.init_seed >= 0 else self.common.model.seed


#: a node strategy's validated ``[strategy].params`` (sync_gossip's compressor, gamma, shared_init;
#: ``shared_init`` None: every node starts from the same model unless ``[node].init_seed`` is set)
NodeStrategyParams = SyncGossipSettings


def node_strategy_params(strategy: StrategySection, where: str) -> NodeStrategyParams:
    """Validate ``[strategy]`` for a node through the strategy registry; the one-line ConfigError
    names ``[strategy].name`` or ``[strategy].params.<key>``, prefixed with ``where`` (the config file).

    async_gossip takes no params on a node and cannot compress; sync_gossip takes ``compressor``
    (a name, with its settings beside it or in ``compression_params``), ``gamma`` and ``shared_init``.
    """
    try:
        check_strategy(strategy.name, strategy.params, "node")
        return sync_gossip_settings(strategy.params) if strategy.name == "sync_gossip" else NodeStrategyParams()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_TOP_LEVEL = {"node", "identity", *SHARED_SECTIONS}


def node_config_from(table: dict[str, Any], path: str | Path) -> NodeConfig:
    """Validate a parsed node config; ``path`` is where it came from (paths are relative to it)."""
    p = Path(path)
    src = str(p)
    apply_python_path(table, p.parent, src)
    check_sections(table, _TOP_LEVEL, src)
    if "node" not in table:
        raise ConfigError(f"{src}: missing section [node] (at least node.id)")
    if "identity" not in table:
        raise ConfigError(f"{src}: missing section [identity] (cert, key, ca, roster, crl)")
    node = from_table(NodeSection, table["node"], f"{src}: [node]")
    identity = from_table(IdentitySection, table["identity"], f"{src}: [identity]")
    rest = {k: v for k, v in table.items() if k not in ("node", "identity")}
    data = dict(rest.get("data", {})) if isinstance(rest.get("data", {}), dict) else rest.get("data")
    site_index = 0
    if isinstance(data, dict):
        if "site_index" not in data:
            raise ConfigError(f"{src}: [data].site_index: required (which partition this node holds)")
        raw = data.pop("site_index")
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{src}: [data].site_index: expected an integer, got {raw!r}")
        site_index = raw
        rest["data"] = data
    else:
        raise ConfigError(f"{src}: missing section [data] (at least data.site_index)")
    common = common_from(rest, src)
    strategy_params = node_strategy_params(common.strategy, src)
    if not 0 <= site_index < common.data.num_sites:
        raise ConfigError(f"{src}: [data].site_index: must be in 0..{common.data.num_sites - 1} "
                          f"(data.num_sites = {common.data.num_sites}), got {site_index}")
    if node.ranks > 1:
        check_ranks(node.ranks, common, f"{src}: [node].ranks")
    base = p.parent
    cfg = NodeConfig(path=p, node=node, identity=identity, common=common, site_index=site_index,
                     strategy_params=strategy_params)
    for name in ("cert", "key", "ca", "roster", "crl"):
        resolved = resolve_path(base, getattr(identity, name))
        if not resolved.is_file():
            raise ConfigError(f"{src}: [identity].{name}: file not found: {resolved}")
        setattr(cfg, f"{name}_path", resolved)
    cfg.output_dir = resolve_path(base, node.output)
    return cfg


def check_ranks(ranks: int, common: CommonConfig, where: str) -> None:
    """Refuse a multi-rank site the distributed DP step cannot train (one line naming ``where``)."""
    if common.client.app:
        raise ConfigError(f"{where}: {ranks} ranks need privfl's own DPClient; [client].app "
                          f"{common.client.app!r} trains in one process (use ranks = 1)")
    if common.dp.mechanism != "gaussian" or common.dp.subspace:
        raise ConfigError(f"{where}: {ranks} ranks implement the gaussian mechanism only "
                          f"([dp].mechanism = {common.dp.mechanism!r}); use ranks = 1")


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node's TOML config file."""
    return node_config_from(read_toml(path), path)


__all__ = ["IdentitySection", "NodeConfig", "NodeSection", "NodeStrategyParams", "check_ranks", "load_node_config",
           "node_config_from", "node_strategy_params"]
