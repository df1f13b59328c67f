"""sync_gossip's ``strategy.params``: which compressor they ask for, and the compressor itself.

Why here: the simulator (``privfl.sim.runner``) and a real node (``privfl.node``) read the
same ``[strategy] params`` table (``{ compressor = "topk", ratio = 0.01, gamma = 0.5 }``),
so both use these functions and a config means the same in both worlds. Every error
names the key, as ``<where>.<key>`` (``where`` is ``strategy.params`` in a simulation
spec, ``[strategy].params`` in a node's TOML file).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from privfl.accounting.errors import ConfigError
from privfl.strategies.compression.compressors import COMPRESSORS, Compressor, canonical_name, compressor_from_config
from privfl.strategies.compression.subspace import SubspaceK  # noqa: F401  (registers "subspace")

__all__ = ["SYNC_GOSSIP_KEYS", "build_compressor", "check_strategy_keys", "sync_compression_params"]

# what sync_gossip itself takes in strategy.params; any other key is a compressor setting
SYNC_GOSSIP_KEYS = frozenset({"local_steps", "seed", "mixing", "timeout", "compressor", "compression_params",
                              "gamma", "shared_init"})


def _named(where: str, keys: Iterable[str]) -> str:
    return ", ".join(f"{where}.{k}" for k in keys)


def check_strategy_keys(name: str, params: Mapping[str, Any], allowed: Iterable[str], extra_note: str = "",
                        where: str = "strategy.params") -> None:
    """ConfigError naming every key of ``params`` that strategy ``name`` does not take."""
    allowed = set(allowed)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"{_named(where, unknown)}: {name} does not take {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}{extra_note}")


def sync_compression_params(params: Mapping[str, Any], where: str = "strategy.params"
                            ) -> tuple[str, dict[str, Any]] | None:
    """The compressor (name, settings) that sync_gossip's ``strategy.params`` ask for, or None.

    Settings may sit beside ``compressor`` (``{compressor = "topk", ratio = 0.01, gamma = 0.5}``)
    or in a ``compression_params`` table. Sparsifiers default to ``error_feedback = false``
    (CHOCO: the public estimate keeps the residual); with ``error_feedback = true`` (and for
    AdaComp, whose residue is intrinsic) the compressor keeps it and the nodes send compressed
    model changes. Raises ConfigError naming any key neither sync_gossip nor the compressor takes.
    """
    comp = params.get("compressor")
    nested = params.get("compression_params", {}) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}.compression_params: must be a table")
    flat = {k: v for k, v in params.items() if k not in SYNC_GOSSIP_KEYS}
    if comp is None or comp == "none":
        if flat or nested:
            check_strategy_keys("sync_gossip", params, SYNC_GOSSIP_KEYS - {"compression_params"},
                                f" (compressor settings need {where}.compressor)", where)
        return None
    if not isinstance(comp, str):
        raise ConfigError(f"{where}.compressor: must be a compressor name, got {comp!r}")
    key = canonical_name(comp)
    if key not in COMPRESSORS:
        raise ConfigError(f"{where}.compressor: unknown compressor {comp!r}; choose one of {', '.join(COMPRESSORS)}")
    takes = {p for p in inspect.signature(COMPRESSORS[key].__init__).parameters if p != "self"}
    both = sorted(set(flat) & set(nested))
    if both:
        raise ConfigError(f"{_named(where, both)}: given both beside compressor and in {where}.compression_params")
    kwargs = {**nested, **flat}
    bad = sorted(set(kwargs) - takes)
    if bad:
        raise ConfigError(f"{_named(where, bad)}: sync_gossip with compressor {key!r} does not take "
                          f"{', '.join(bad)}; sync_gossip takes {', '.join(sorted(SYNC_GOSSIP_KEYS))}; {key} takes "
                          f"{', '.join(sorted(takes)) or 'nothing'}")
    if key == "cltk":
        raise ConfigError(f"{where}.compressor: 'cltk' is not supported by sync_gossip (CLT-k needs one leader's "
                          "index set broadcast to every node each round); use topk, randomk, quantize8 or adacomp")
    if "error_feedback" in takes and "error_feedback" not in kwargs and not kwargs.get("unbiased", False):
        kwargs["error_feedback"] = False
    try:  # build once so that bad values fail when the config is read, naming the field
        compressor_from_config(key, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return key, kwargs


def build_compressor(name: str, kwargs: Mapping[str, Any], seed: int) -> Compressor:
    """One node's compressor (compressors keep per-node state); a seeded one gets ``seed``.

    ``seed`` (derived per node) always wins over a configured one, so that no two nodes
    share a random stream (random-k, stochastic rounding) and runs stay reproducible.
    """
    kwargs = dict(kwargs)
    if "seed" in inspect.signature(COMPRESSORS[name].__init__).parameters:
        kwargs["seed"] = int(seed)
    return compressor_from_config(name, **kwargs)
