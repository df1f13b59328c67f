"""``run_simulation(SimSpec)``: build sites, DPClients, topology and strategies, then run the engine.

The TOML layer and CLI build a :class:`SimSpec`; nothing here parses files. Strategies
are looked up by name in :data:`STRATEGIES`, which other modules extend with
:func:`register_strategy` (``node`` entries build one ``NodeStrategy`` per node,
``collective`` entries one ``CollectiveStrategy`` for all).

Preprocessing: each site fits ``spec.preprocessing`` on its own training rows (public
statistics, or a DP estimate drawn from a seed derived from the run seed and the site
index) and applies it to its own train and test rows, as its node would. A DP estimate's
event is put in the site's accountant before training, and the DP-SGD σ is calibrated so
that preprocessing and training together fit the target ε.

Evaluation set: the union of every site's test split, each preprocessed by its own
site, so a node's accuracy is its model's accuracy across all sites.
All nodes start from the same initial model (built once from ``seed``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from flwr.client import NumPyClient
from torch.utils.data import ConcatDataset

from privfl.accounting import PrivacyAccountant
from privfl.clients import DPClient, DPConfig, evaluate_model
from privfl.clients.dp_client import evaluate_dataset
from privfl.clients.losses import build_loss
from privfl.clients.randomness import SeededRandom
from privfl.strategies.base import CollectiveStrategy, NodeStrategy, Params, PeerNetwork
from privfl.strategies.compression.params import (  # shared with privfl.node
    SYNC_GOSSIP_KEYS,
    build_compressor,
    check_strategy_keys,
    sync_compression_params,
)
from privfl.strategies.gossip import AsyncGossip, SyncGossip
from privfl.strategies.topology import Topology, build_topology

from privfl.config import resolve_device
from privfl.data import DATASETS, SiteData, SiteInputs, load_dataset, load_factory_site, split_sites
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.preprocessing import Preprocessing, PreprocessingSpec, preprocess_site
from privfl.sim.engine import Engine, SimulationResult, StopCriteria
from privfl.sim.network import SimWorld
from privfl.sim.profiles import LinkSpec, compute_speeds, default_step_cost

__all__ = ["STRATEGIES", "SimContext", "SimSpec", "StrategyEntry", "register_strategy", "run_simulation"]

log = logging.getLogger("privfl.sim")


@dataclass
class SimSpec:
    """Everything one simulated run needs (no file parsing: the config layer fills this)."""

    dataset: str = "breast_cancer"
    label_column: str | None = None
    num_nodes: int = 4
    partitioning: str = "iid"
    alpha: float = 0.5
    shards_per_site: int = 2
    test_fraction: float = 0.2
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)
    model: str = "logreg"  # a built-in name, or a user factory "pkg.module:name"
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a user factory
    loss: str = "cross_entropy"  # [model].loss: a built-in name or "pkg.module:name"
    data_factory: str = ""  # [data].factory "pkg.module:name": the sites' own torch Datasets
    data_args: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None  # [data].root, absolute
    num_classes: int = 0  # [data].num_classes (declared; a factory's built-in model needs it)
    hidden: tuple[int, ...] = (64, 32)
    dp: DPConfig = field(default_factory=lambda: DPConfig(noise_multiplier=1.0, batch_size=16, lr=0.5))
    strategy: str = "async_gossip"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    local_steps: int = 1
    topology: str = "ring"
    topology_params: dict[str, Any] = field(default_factory=dict)
    compute_profile: str = "homogeneous"
    compute_params: dict[str, Any] = field(default_factory=dict)
    step_cost: float | Literal["measure"] | None = None
    links: LinkSpec = field(default_factory=LinkSpec)
    stop: StopCriteria = field(default_factory=lambda: StopCriteria(max_steps=50))
    eval_every: float | None = None
    eval_every_rounds: int | None = None
    seed: int = 0
    device: str = "cpu"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"; [simulation].device
    progress: bool = False
    node_ids: list[str] | None = None
    torch_threads: int | None = 1

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"sim.num_nodes must be a positive integer, got {self.num_nodes!r}")
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ConfigError(f"strategy.local_steps must be a positive integer, got {self.local_steps!r}")
        if self.eval_every is not None and not self.eval_every > 0:
            raise ConfigError(f"sim.eval_every must be > 0 virtual seconds, got {self.eval_every!r}")
        if self.eval_every_rounds is not None and not self.eval_every_rounds >= 1:
            raise ConfigError(f"sim.eval_every_rounds must be >= 1, got {self.eval_every_rounds!r}")
        if isinstance(self.step_cost, str) and self.step_cost != "measure":
            raise ConfigError(f"sim.step_cost must be a number of virtual seconds or 'measure', got {self.step_cost!r}")
        if isinstance(self.step_cost, (int, float)) and not self.step_cost > 0:
            raise ConfigError(f"sim.step_cost must be > 0, got {self.step_cost!r}")
        if self.node_ids is not None and len(self.node_ids) != self.num_nodes:
            raise ConfigError(f"sim.node_ids lists {len(self.node_ids)} ids for {self.num_nodes} nodes")
        self.preprocessing.validate("[data]")
        resolve_device(self.device, "[simulation].device")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy.name: unknown strategy {self.strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}")
        s = self.stop
        if not any(v is not None for v in (s.max_time, s.max_steps, s.max_rounds)):
            raise ConfigError("stop: give at least one of max_time, max_steps or max_rounds")


@dataclass
class SimContext:
    """What a strategy factory may use to build its strategy."""

    spec: SimSpec
    node_ids: list[str]
    topology: Topology
    clients: dict[str, NumPyClient]
    init_params: Params


NodeFactory = Callable[[SimContext, str, NumPyClient, PeerNetwork, Params], NodeStrategy]
CollectiveFactory = Callable[[SimContext], CollectiveStrategy]


@dataclass
class StrategyEntry:
    """A registered strategy: ``kind`` is ``node`` (one per node) or ``collective`` (one for all)."""

    kind: Literal["node", "collective"]
    factory: Callable[..., Any]


STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(name: str, kind: Literal["node", "collective"], factory: Callable[..., Any]) -> None:
    """Make ``name`` usable as ``SimSpec.strategy`` (replaces an existing entry)."""
    if kind not in ("node", "collective"):
        raise ValueError(f"strategy kind must be 'node' or 'collective', got {kind!r}")
    STRATEGIES[name] = StrategyEntry(kind, factory)


def _node_config(ctx: SimContext, node_id: str) -> dict[str, Any]:
    cfg = dict(ctx.spec.strategy_params)
    cfg.setdefault("local_steps", ctx.spec.local_steps)
    cfg.setdefault("seed", ctx.spec.seed * 1000 + ctx.node_ids.index(node_id))
    return cfg


_ASYNC_KEYS = {"local_steps", "seed", "consensus_exchanges", "compressor"}
_SYNC_KEYS = SYNC_GOSSIP_KEYS
_check_keys = check_strategy_keys


def _async_gossip(ctx: SimContext, node_id: str, client: NumPyClient, net: PeerNetwork, params: Params) -> NodeStrategy:
    comp = ctx.spec.strategy_params.get("compressor")
    if comp not in (None, "none"):
        raise ConfigError(f"strategy.params.compressor: async_gossip cannot compress ({comp!r}): its pairwise "
                          "averaging exchanges whole models with a random peer each time, and CHOCO-style "
                          "estimates would need every message to every neighbour delivered in order; "
                          "use strategy sync_gossip with a compressor")
    _check_keys("async_gossip", ctx.spec.strategy_params, _ASYNC_KEYS)
    cfg = _node_config(ctx, node_id)
    cfg.update(AsyncGossip.roles(ctx.topology, node_id))
    return AsyncGossip(client, net, params, cfg)


def _sync_gossip(ctx: SimContext, node_id: str, client: NumPyClient, net: PeerNetwork, params: Params) -> NodeStrategy:
    cfg = _node_config(ctx, node_id)
    cfg.setdefault("mixing", ctx.topology.mixing_row(node_id))
    cfg.setdefault("timeout", math.inf)  # the simulator waits for every live neighbour
    comp_cfg = sync_compression_params(ctx.spec.strategy_params)
    for key in set(cfg) - _SYNC_KEYS:  # compressor settings, validated above
        cfg.pop(key)
    cfg.pop("compression_params", None)
    if comp_cfg is None:
        cfg.pop("compressor", None)
    else:
        # one compressor per node (per-node state and random streams, reproducible from the run's seed)
        name, kwargs = comp_cfg
        cfg["compressor"] = build_compressor(name, kwargs, int(cfg["seed"]) + 7919 * ctx.node_ids.index(node_id))
        cfg.setdefault("shared_init", True)  # every simulated node starts from the same public model
    return SyncGossip(client, net, params, cfg)


def _fedavg(ctx: SimContext) -> CollectiveStrategy:
    from privfl.strategies.federated import FedAvgConfig, FederatedAveraging

    p = dict(ctx.spec.strategy_params)
    allowed = {f for f in FedAvgConfig.__dataclass_fields__} - {"local_steps", "seed", "evaluate"}
    unknown = sorted(set(p) - allowed)
    if unknown:
        raise ConfigError(f"strategy: fedavg does not take {', '.join(unknown)}")
    cfg = FedAvgConfig(local_steps=ctx.spec.local_steps, seed=ctx.spec.seed, evaluate=False,
                       min_available_clients=1, **p)
    return FederatedAveraging(cfg, initial_parameters=ctx.init_params)


def _periodic(cls_name: str, label: str) -> CollectiveFactory:
    """Factory for ``strategies.periodic.<cls_name>``, built from ``strategy_params``."""

    def factory(ctx: SimContext) -> CollectiveStrategy:
        from privfl.strategies import periodic

        cls = getattr(periodic, cls_name)
        try:
            return cls(**ctx.spec.strategy_params)
        except TypeError as e:
            raise ConfigError(f"strategy: bad parameter for {label}: {e}") from None

    return factory


register_strategy("async_gossip", "node", _async_gossip)
register_strategy("sync_gossip", "node", _sync_gossip)
register_strategy("fedavg", "collective", _fedavg)
register_strategy("allreduce", "collective", _periodic("AllReduce", "allreduce"))
register_strategy("periodic", "collective", _periodic("PeriodicAveraging", "periodic"))
register_strategy("adaptive_period", "collective", _periodic("AdaptivePeriod", "adaptive_period"))


# ---- building the world --------------------------------------------------------------
def _make_evaluator(spec: SimSpec, in_shape: tuple[int, ...], num_classes: int,
                    sites: list[SiteInputs]) -> Callable[[Params], tuple[float, float]]:
    """Accuracy on the union of every site's test split (the researcher's view of a simulation)."""
    model = build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                        args=spec.model_args)
    device = torch.device(spec.device)
    model.to(device)
    keys = list(model.state_dict().keys())
    if all(isinstance(s.test, tuple) for s in sites):
        x = torch.as_tensor(np.concatenate([s.test[0] for s in sites]))
        y = torch.as_tensor(np.concatenate([s.test[1] for s in sites]))
        run: Callable[[], tuple[float, float]] = lambda: evaluate_model(model, x, y, device)  # noqa: E731
    else:
        union = ConcatDataset([s.test for s in sites])
        run = lambda: evaluate_dataset(model, union, device)  # noqa: E731

    def evaluate(params: Params) -> tuple[float, float]:
        state = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in zip(keys, params)}
        model.load_state_dict(state, strict=True)
        return run()

    return evaluate


def _measure_step_cost(spec: SimSpec, train: Any, in_shape: tuple[int, ...], num_classes: int) -> float:
    """Wall seconds of one local step on a scratch client (its own accountant: no real budget spent)."""
    model = build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                        args=spec.model_args)
    cfg = DPConfig(**{**asdict(spec.dp), "target_epsilon": 1e6})
    scratch = DPClient(model, train, None, cfg, seed=spec.seed, device=spec.device, criterion=build_loss(spec.loss))
    p = scratch.get_parameters({})
    scratch.fit(p, {"local_steps": 2})
    t0 = time.perf_counter()
    scratch.fit(p, {"local_steps": 10})
    return (time.perf_counter() - t0) / 10


def preprocessing_seed(run_seed: int, site: int) -> int:
    """The seed of site ``site``'s DP preprocessing noise in a simulation (its own stream)."""
    return int(np.random.SeedSequence([int(run_seed), int(site), 0x9E3779B9]).generate_state(1)[0])


def _site_inputs(spec: SimSpec, node_ids: list[str]) -> tuple[list[SiteInputs], list[Preprocessing]]:
    """Every site's inputs: the user's ``data_factory`` Datasets as they are (no preprocessing),
    or the shared-seed split of a shipped set / file, each site preprocessed on its own rows."""
    n = len(node_ids)
    if spec.data_factory:
        out, preps = [], []
        for i in range(n):
            fs = load_factory_site(spec.data_factory, i, n, spec.data_root, spec.data_args)
            out.append(SiteInputs.of_factory(fs, spec.num_classes))
            preps.append(dataclasses.replace(Preprocessing("none", "none", fs.in_shape), spec=spec.preprocessing))
        return out, preps
    data = load_dataset(spec.dataset, label_column=spec.label_column, seed=spec.seed)
    raw = split_sites(data, n, spec.partitioning, seed=spec.seed, alpha=spec.alpha,  # type: ignore[arg-type]
                      test_fraction=spec.test_fraction, shards_per_site=spec.shards_per_site)
    sites, preps = _preprocess_sites(spec, node_ids, raw)
    return [SiteInputs.of_arrays(s) for s in sites], preps


def _preprocess_sites(spec: SimSpec, node_ids: list[str], raw: list[SiteData]
                      ) -> tuple[list[SiteData], list[Preprocessing]]:
    """Fit each site's preprocessing on its own training rows and apply it to its own splits."""
    name = spec.dataset if spec.dataset in DATASETS else None
    sites, preps = [], []
    for i, (nid, site) in enumerate(zip(node_ids, raw)):
        s, pre = preprocess_site(spec.preprocessing, site, source=SeededRandom(preprocessing_seed(spec.seed, i)),
                                 dataset_name=name)
        if pre.dp_event is not None:
            log.info("simulate %s: DP preprocessing estimate %s, sigma=%.4g, sensitivity=%.4g (seeded)", nid,
                     pre.dp_event.query, pre.dp_event.noise_multiplier, pre.dp_event.sensitivity)
        sites.append(s)
        preps.append(pre)
    return sites, preps


def _site_accounting(dp: DPConfig, pre: Preprocessing, calibrated: dict[Any, DPConfig]
                     ) -> tuple[PrivacyAccountant, DPConfig]:
    """The site's accountant with its preprocessing event already in it, and the DP config whose σ
    is calibrated so that preprocessing and training together fit the target ε."""
    accountant = PrivacyAccountant(dp.accountant)  # type: ignore[arg-type]
    ev = pre.dp_event
    if ev is None:
        return accountant, dp
    accountant.step(ev.noise_multiplier, ev.sample_rate, ev.steps)
    if not dp.enabled:
        return accountant, dp
    key = (ev.noise_multiplier, ev.sample_rate, ev.steps)
    if key not in calibrated:
        calibrated[key] = dataclasses.replace(dp, noise_multiplier=dp.resolved_noise(prior=accountant.events))
    return accountant, calibrated[key]


def run_simulation(spec: SimSpec) -> SimulationResult:
    """Run ``spec`` on a virtual clock with the real clients and strategies; return metrics.

    Torch runs with ``spec.torch_threads`` intra-op threads (default 1) for the duration:
    the nodes train one after another on tiny models, where more threads only contend
    (measured 6x slower with the default thread count on a loaded 2-core machine).
    """
    spec.validate()
    spec = dataclasses.replace(spec, device=str(resolve_device(spec.device, "[simulation].device")))
    threads = torch.get_num_threads()
    if spec.torch_threads:
        torch.set_num_threads(int(spec.torch_threads))
    try:
        return _run(spec)
    finally:
        torch.set_num_threads(threads)


def _run(spec: SimSpec) -> SimulationResult:
    wall0 = time.perf_counter()
    n = spec.num_nodes
    node_ids = list(spec.node_ids) if spec.node_ids else [f"node{i}" for i in range(n)]
    sites, preps = _site_inputs(spec, node_ids)
    in_shape = sites[0].in_shape
    num_classes = sites[0].num_classes
    topo_params = dict(spec.topology_params)
    if spec.topology == "random_regular":
        topo_params.setdefault("seed", spec.seed)
    topology = build_topology(spec.topology, node_ids, **topo_params)
    init_model = build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                        args=spec.model_args)
    init_params: Params = [v.detach().cpu().numpy().copy() for v in init_model.state_dict().values()]

    clients: dict[str, NumPyClient] = {}
    calibrated: dict[Any, DPConfig] = {}
    for i, (nid, site, pre) in enumerate(zip(node_ids, sites, preps)):
        model = build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                        args=spec.model_args)
        accountant, dpc = _site_accounting(spec.dp, pre, calibrated)
        try:
            clients[nid] = DPClient(model, site.train, site.test, dpc, seed=spec.seed * 1000 + i,
                                    device=spec.device, accountant=accountant, criterion=build_loss(spec.loss))
        except ValueError as e:
            raise ConfigError(f"dp: {e}") from None

    if spec.step_cost == "measure":
        step_cost = _measure_step_cost(spec, sites[0].train, in_shape, num_classes)
    elif spec.step_cost is None:
        step_cost = default_step_cost(spec.model)
    else:
        step_cost = float(spec.step_cost)
    speeds = compute_speeds(spec.compute_profile, n, spec.seed, spec.compute_params)
    world = SimWorld(node_ids, {nid: topology.neighbors(nid) for nid in node_ids}, spec.links)
    evaluate = _make_evaluator(spec, in_shape, num_classes, sites)
    engine = Engine(node_ids, clients, world, speeds, step_cost, spec.local_steps, spec.stop, evaluate,
                    spec.eval_every, spec.eval_every_rounds, spec.progress)
    ctx = SimContext(spec, node_ids, topology, clients, init_params)
    entry = STRATEGIES[spec.strategy]
    log.info("simulate %s: %d nodes, %s, profile %s, step cost %.4g s, device %s", spec.strategy, n,
             topology.summary(), spec.compute_profile, step_cost, spec.device)
    strategy_obj: Any
    if entry.kind == "node":
        strategies = [entry.factory(ctx, nid, clients[nid], world.network(nid), init_params) for nid in node_ids]
        for nid, s in zip(node_ids, strategies):
            world.strategies[nid] = s
        synchronous = all(getattr(s, "synchronous", False) for s in strategies)
        t_end = engine.run_sync(strategies) if synchronous else engine.run_async(strategies)
        strategy_obj = strategies
    else:
        strategy_obj = entry.factory(ctx)
        t_end = engine.run_collective(strategy_obj, init_params)

    final = engine.rows[-n:]
    summary: dict[str, Any] = {
        "strategy": spec.strategy,
        "num_nodes": n,
        "node_ids": node_ids,
        "topology": topology.name,
        "spectral_gap": topology.spectral_gap(),
        "compute_profile": spec.compute_profile,
        "speeds": speeds,
        "step_cost": step_cost,
        "virtual_time": t_end,
        "rounds": engine.round,
        "end_reason": engine.end_reason,
        "steps": dict(zip(node_ids, engine.steps)),
        "epsilon": dict(zip(node_ids, engine.epsilons)),
        "delta": spec.dp.delta,
        "dp": bool(spec.dp.enabled),
        "stop_reasons": engine.stop_reasons,
        "final_accuracy": {r["node"]: r["accuracy"] for r in final},
        "mean_accuracy": float(np.mean([r["accuracy"] for r in final])) if final else math.nan,
        "final_consensus_max": final[0]["consensus_max"] if final else math.nan,
        "bytes_sent": dict(zip(node_ids, world.bytes_sent)),
        "bytes_received": dict(zip(node_ids, world.bytes_received)),
        "messages_sent": dict(zip(node_ids, world.messages_sent)),
        "evaluations": engine.evals,
        "wall_seconds": time.perf_counter() - wall0,
        "seed": spec.seed,
        "preprocessing": {nid: pre.describe() for nid, pre in zip(node_ids, preps)},
    }
    log.info("simulate %s done: t=%.3f s virtual, mean acc %.4f, %s", spec.strategy, t_end,
             summary["mean_accuracy"], engine.end_reason)
    names = list(init_model.state_dict().keys())
    return SimulationResult(engine.rows, summary, node_ids, models=engine.final_models, param_names=names,
                            preprocessing=dict(zip(node_ids, preps)))
