"""``run_simulation(SimSpec)``: build sites, DPClients, topology and strategies, then run the engine.

The TOML layer and CLI build a :class:`SimSpec`; nothing here parses files. Strategies
come from the one registry of ``privfl.strategies.registry`` (:data:`STRATEGIES`,
:func:`register_strategy`), the very table a real node builds through: the simulator
fills one ``StrategyBuild`` per node (``node`` strategies) or one for all
(``collective``) with :meth:`SimContext.strategy_build`.

Preprocessing: each site fits ``spec.preprocessing`` on its own training rows (public
statistics, or a DP estimate drawn from a seed derived from the run seed and the site
index) and applies it to its own train and test rows, as its node would. A DP estimate's
event is put in the site's accountant before training, and the DP-SGD σ is calibrated so
that preprocessing and training together fit the target ε.

Evaluation set: the union of every site's test split, each preprocessed by its own
site, so a node's accuracy is its model's accuracy across all sites.
All nodes start from the same initial model (built once from ``seed``).

Backends (``spec.backend``): ``"local"`` builds every client in this process; ``"ray"``
builds each in a Ray actor from the same spec and seed (:mod:`privfl.sim.ray_backend`) and
hands the engine proxies, so both give the same metrics for the same seed. σ is calibrated
once per run (per distinct preprocessing event), not once per node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from flwr.client import NumPyClient
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from privfl.accounting import PrivacyAccountant
from privfl.clients import DPClient, DPConfig, evaluate_model
from privfl.clients.dp_client import evaluate_dataset
from privfl.clients.losses import build_loss
from privfl.clients.plugins import is_import_path
from privfl.clients.randomness import SeededRandom
from privfl.config import resolve_device
from privfl.data import DATASETS, SiteData, SiteInputs, load_dataset, load_factory_site, split_sites
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.preprocessing import Preprocessing, PreprocessingSpec, preprocess_site
from privfl.sim.engine import Engine, SimulationResult, StopCriteria
from privfl.sim.network import SimWorld
from privfl.sim.profiles import STEP_TIMES, LinkSpec, compute_speeds, default_step_cost
from privfl.site import ClientBuild, build_client, reads_site_data
from privfl.strategies.base import Params, PeerNetwork
from privfl.strategies.compression.params import sync_compression_params  # noqa: F401  (re-exported)
from privfl.strategies.registry import (  # shared with privfl.node
    STRATEGIES,
    StrategyBuild,
    StrategyEntry,
    build_collective_strategy,
    build_node_strategy,
    check_strategy,
    register_strategy,
)
from privfl.strategies.topology import Topology, build_topology

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
    client_app: str = ""  # [client].app: the hospital's own Flower client ("pkg.module:client_fn")
    client_run_config: dict[str, Any] = field(default_factory=dict)  # [client].run_config
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
    step_time: str = "fixed"  # the compute-time model: "fixed" or "exponential" (seeded; profiles.StepTimes)
    links: LinkSpec = field(default_factory=LinkSpec)
    stop: StopCriteria = field(default_factory=lambda: StopCriteria(max_steps=50))
    eval_every: float | None = None
    eval_every_rounds: int | None = None
    seed: int = 0
    device: str = "cpu"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"; [simulation].device
    progress: bool = False
    node_ids: list[str] | None = None
    torch_threads: int | None = 1
    backend: str = "local"  # [simulation].backend: "local" (this process) or "ray" (nodes' training in Ray actors)
    address: str | None = None  # [simulation].address: "auto", "HOST:PORT"; None: a local Ray instance
    actors: int | None = None  # [simulation].actors: Ray actors the nodes are spread over (None: the CPUs)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, as the experiment config names it
        (``[data].num_sites``, ``[strategy].local_steps``, ``[simulation].eval_every``, ``[stop].max_steps``,
        ...); a field only the Python API sets is named ``SimSpec.<field>``."""
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"[data].num_sites: must be a positive integer, got {self.num_nodes!r}")
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ConfigError(f"[strategy].local_steps: must be a positive integer, got {self.local_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"[simulation].seed: must be an integer >= 0, got {self.seed!r}")
        if self.eval_every is not None and not self.eval_every > 0:
            raise ConfigError(f"[simulation].eval_every: must be > 0 virtual seconds, got {self.eval_every!r}")
        if self.eval_every_rounds is not None and not self.eval_every_rounds >= 1:
            raise ConfigError(f"[simulation].eval_every_rounds: must be >= 1, got {self.eval_every_rounds!r}")
        if isinstance(self.step_cost, str) and self.step_cost != "measure":
            raise ConfigError(f"[simulation].step_cost: must be a number of virtual seconds or 'measure', "
                              f"got {self.step_cost!r}")
        if isinstance(self.step_cost, (int, float)) and not self.step_cost > 0:
            raise ConfigError(f"[simulation].step_cost: must be > 0 virtual seconds, got {self.step_cost!r}")
        if self.step_time not in STEP_TIMES:
            raise ConfigError(f"SimSpec.step_time: must be one of {', '.join(STEP_TIMES)}, got {self.step_time!r}")
        if self.node_ids is not None and len(self.node_ids) != self.num_nodes:
            raise ConfigError(f"SimSpec.node_ids: lists {len(self.node_ids)} ids for {self.num_nodes} nodes")
        self.links.bind(self.num_nodes)
        compute_speeds(self.compute_profile, self.num_nodes, self.seed, self.compute_params)
        self.preprocessing.validate("[data]")
        resolve_device(self.device, "[simulation].device")
        check_strategy(self.strategy, self.strategy_params, "simulate")
        from privfl.sim.ray_backend import check_backend

        check_backend(self.backend, self.address, self.actors)
        s = self.stop
        if not any(v is not None for v in (s.max_time, s.max_steps, s.max_rounds)):
            raise ConfigError("[stop]: give at least one of [stop].max_steps, [stop].max_seconds or "
                              "[simulation].max_rounds")
        if s.max_time is not None and not s.max_time >= 0:
            raise ConfigError(f"[stop].max_seconds: must be >= 0 virtual seconds, got {s.max_time!r}")
        if s.max_steps is not None and not s.max_steps >= 0:
            raise ConfigError(f"[stop].max_steps: must be >= 0, got {s.max_steps!r}")
        if s.max_rounds is not None and not s.max_rounds >= 0:
            raise ConfigError(f"[simulation].max_rounds: must be >= 0 (0: no limit), got {s.max_rounds!r}")
        if s.target_accuracy is not None and not 0 <= s.target_accuracy <= 1:
            raise ConfigError(f"[stop].target_accuracy: must be in [0, 1] (0: no target), got {s.target_accuracy!r}")


@dataclass
class SimContext:
    """The simulated world strategies are built in: one registry request per node, or one for all."""

    spec: SimSpec
    node_ids: list[str]
    topology: Topology
    clients: dict[str, NumPyClient]
    init_params: Params

    def strategy_build(self, node_id: str | None = None, network: PeerNetwork | None = None) -> StrategyBuild:
        """The registry request for ``node_id``'s strategy over ``network`` (None: the collective one).

        Node ``i`` seeds its peer choice with ``seed * 1000 + i`` (``[strategy].params.seed``
        may replace it) and its compressor with that seed ``+ 7919 * i``; a round waits for
        every live neighbour (``timeout = inf``) and compressed gossip starts from the
        shared initial model (every simulated node builds it from ``seed``).
        """
        spec = self.spec
        if node_id is None:
            return StrategyBuild(spec.strategy, "simulate", spec.strategy_params, spec.local_steps, seed=spec.seed,
                                 initial=self.init_params)
        i = self.node_ids.index(node_id)
        seed = spec.seed * 1000 + i
        return StrategyBuild(spec.strategy, "simulate", spec.strategy_params, spec.local_steps, seed=seed,
                             compressor_seed=int(spec.strategy_params.get("seed", seed)) + 7919 * i,
                             timeout=math.inf, shared_init=True, node_id=node_id, topology=self.topology,
                             client=self.clients[node_id], network=network, initial=self.init_params,
                             planned_steps=spec.dp.planned_steps or spec.stop.max_steps)


# ---- building the world --------------------------------------------------------------
def _union_test(sites: list[SiteInputs]) -> Dataset[Any]:
    """The union of every site's test split: one ``TensorDataset`` when every site holds arrays
    (scored in one batch pass), else the sites' own Datasets concatenated."""
    if all(isinstance(s.test, tuple) for s in sites):
        return TensorDataset(torch.as_tensor(np.concatenate([s.test[0] for s in sites])),
                             torch.as_tensor(np.concatenate([s.test[1] for s in sites])))
    return ConcatDataset([s.test for s in sites])


def _make_evaluator(spec: SimSpec, in_shape: tuple[int, ...], num_classes: int,
                    sites: list[SiteInputs]) -> Callable[[Params], tuple[float, float]]:
    """Accuracy on the union of every site's test split (the researcher's view of a simulation)."""
    model = build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                        args=spec.model_args)
    device = torch.device(spec.device)
    model.to(device)
    keys = list(model.state_dict().keys())
    union = _union_test(sites)
    if isinstance(union, TensorDataset):
        x, y = union.tensors
        run: Callable[[], tuple[float, float]] = lambda: evaluate_model(model, x, y, device)  # noqa: E731
    else:
        run = lambda: evaluate_dataset(model, union, device)  # noqa: E731

    def evaluate(params: Params) -> tuple[float, float]:
        state = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in zip(keys, params)}
        model.load_state_dict(state, strict=True)
        return run()

    return evaluate


def _clients_evaluator(clients: list[NumPyClient]) -> Callable[[Params], tuple[float, float]]:
    """A model's mean (loss, accuracy) over every site's own evaluation, for a simulation whose
    user clients hold their own data (the researcher's view; a node never releases it)."""

    def evaluate(params: Params) -> tuple[float, float]:
        scores = [c.evaluate_local(params) for c in clients]  # type: ignore[attr-defined]
        return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))

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


def _site_inputs(spec: SimSpec, node_ids: list[str]) -> tuple[list[SiteInputs | None], list[Preprocessing]]:
    """Every site's inputs: the user's ``data_factory`` Datasets as they are (no preprocessing),
    or the shared-seed split of a shipped set / file, each site preprocessed on its own rows."""
    n = len(node_ids)
    if not reads_site_data(spec.client_app, spec.data_factory):  # the user's client loads its own records
        return [None] * n, [dataclasses.replace(Preprocessing("none", "none", ()), spec=spec.preprocessing)] * n
    if spec.data_factory:
        out: list[SiteInputs | None] = []
        preps: list[Preprocessing] = []
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
        if dp.enabled and dp.noise_multiplier is None and dp.planned_steps:  # calibrate once, not per node
            if None not in calibrated:
                try:
                    calibrated[None] = dataclasses.replace(dp, noise_multiplier=dp.resolved_noise())
                except ConfigError:  # the client refuses it, naming the field
                    calibrated[None] = dp
            return accountant, calibrated[None]
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


def _model_maker(spec: SimSpec, first: SiteInputs | None) -> Callable[[], torch.nn.Module | None]:
    """A fresh initial model (the same for every call: built from ``spec.seed``), or None when the
    user's clients build their own (then it seeds torch's global generator, as each client expects)."""
    in_shape = first.in_shape if first is not None else ()
    num_classes = first.num_classes if first is not None else 0
    has_model = first is not None or is_import_path(spec.model)

    def make_model() -> torch.nn.Module | None:
        if not has_model:
            torch.manual_seed(spec.seed)  # public: every user client builds the same initial model
            return None
        return build_model(spec.model, in_shape, num_classes, seed=spec.seed, hidden=tuple(spec.hidden),
                           args=spec.model_args)

    return make_model


def _build_clients(spec: SimSpec, node_ids: list[str], sites: list[SiteInputs | None],
                   preps: list[Preprocessing], indices: Sequence[int]) -> dict[str, NumPyClient]:
    """The real clients of the nodes at ``indices``: node ``i``'s seed is ``seed * 1000 + i`` and its
    σ is calibrated once per distinct (prior events, q, steps, ε, δ), so a client is the same
    whichever process builds it (this one, or a Ray actor)."""
    make_model = _model_maker(spec, sites[0])
    calibrated: dict[Any, DPConfig] = {}
    clients: dict[str, NumPyClient] = {}
    n = len(node_ids)
    for i in indices:
        accountant, dpc = _site_accounting(spec.dp, preps[i], calibrated)
        clients[node_ids[i]] = build_client(ClientBuild(
            dpc, i, n, spec.local_steps, model=make_model(), site=sites[i], loss=spec.loss, app=spec.client_app,
            run_config=spec.client_run_config, seed=spec.seed * 1000 + i, device=spec.device,
            accountant=accountant, where="[client]"))
    return clients


def build_site_clients(spec: SimSpec, node_ids: list[str], indices: Sequence[int]
                       ) -> tuple[dict[str, NumPyClient], Callable[[Params], tuple[float, float]] | None]:
    """The clients of the nodes at ``indices``, their sites loaded and preprocessed here from the
    spec and seed exactly as :func:`run_simulation` does (what a Ray actor of the ray backend runs),
    and the run's evaluator over every site's test split (None when the user's clients hold the data)."""
    sites, preps = _site_inputs(spec, node_ids)
    return _build_clients(spec, node_ids, sites, preps, indices), _union_evaluator(spec, sites)


def _union_evaluator(spec: SimSpec, sites: list[SiteInputs | None]) -> Callable[[Params], tuple[float, float]] | None:
    """Accuracy on the union of every site's test split, when privfl loads the sites and builds the model."""
    first = sites[0]
    if first is None:
        return None
    return _make_evaluator(spec, first.in_shape, first.num_classes, sites)  # type: ignore[arg-type]


def evaluation_records(spec: SimSpec) -> Dataset[Any] | None:
    """The records a simulation of ``spec`` scores its models on: the union of every site's test
    split, split, seeded and preprocessed exactly as :func:`run_simulation` does (a
    ``TensorDataset`` when the sites hold arrays). None when the user's clients hold their own
    data. The researcher's view of a simulation, never a node's: it reads every site."""
    sites, _ = _site_inputs(spec, node_ids_of(spec))
    if sites[0] is None:
        return None
    return _union_test(sites)  # type: ignore[arg-type]


def node_ids_of(spec: SimSpec) -> list[str]:
    """The simulated nodes' ids: ``spec.node_ids``, or node0 … node{n-1}."""
    return list(spec.node_ids) if spec.node_ids else [f"node{i}" for i in range(spec.num_nodes)]


def _node_clients(spec: SimSpec, node_ids: list[str], sites: list[SiteInputs | None],
                  preps: list[Preprocessing], stack: contextlib.ExitStack) -> tuple[dict[str, NumPyClient], Any]:
    """Every node's client: built here (``backend = "local"``), or proxies of clients that live in
    Ray actors (``"ray"``; the actors and a Ray instance this starts end with ``stack``), with
    the Ray backend's :class:`~privfl.sim.ray_backend.CallBatch` (None for the local backend)."""
    if spec.backend == "ray":
        from privfl.sim.ray_backend import ray_clients

        clients, batch = stack.enter_context(ray_clients(spec, node_ids))
        return clients, batch
    return _build_clients(spec, node_ids, sites, preps, range(len(node_ids))), None


def _run(spec: SimSpec) -> SimulationResult:
    with contextlib.ExitStack() as stack:
        return _run_in(spec, stack)


def _run_in(spec: SimSpec, stack: contextlib.ExitStack) -> SimulationResult:
    wall0 = time.perf_counter()
    n = spec.num_nodes
    node_ids = node_ids_of(spec)
    sites, preps = _site_inputs(spec, node_ids)
    first = sites[0]
    in_shape = first.in_shape if first is not None else ()
    num_classes = first.num_classes if first is not None else 0
    make_model = _model_maker(spec, first)
    topo_params = dict(spec.topology_params)
    if spec.topology == "random_regular":
        topo_params.setdefault("seed", spec.seed)
    topology = build_topology(spec.topology, node_ids, **topo_params)
    init_model = make_model()
    t_clients = time.perf_counter()
    clients, ray_nodes = _node_clients(spec, node_ids, sites, preps, stack)
    t_clients = time.perf_counter() - t_clients
    if init_model is not None:
        init_params: Params = [v.detach().cpu().numpy().copy() for v in init_model.state_dict().values()]
        names = list(init_model.state_dict().keys())
    else:  # as Flower's server does: the initial model is one client's (all built from the same seed)
        init_params = clients[node_ids[0]].get_parameters({})
        names = []  # the user's own names, known once its model was made private (after training)

    if spec.step_cost == "measure":
        if first is None:
            raise ConfigError("[simulation].step_cost: 'measure' times privfl's DPClient on privfl-loaded data; "
                              "give a number of virtual seconds with a [client].app")
        step_cost = _measure_step_cost(spec, first.train, in_shape, num_classes)
    elif spec.step_cost is None:
        step_cost = default_step_cost(spec.model)
    else:
        step_cost = float(spec.step_cost)
    speeds = compute_speeds(spec.compute_profile, n, spec.seed, spec.compute_params)
    world = SimWorld(node_ids, {nid: topology.neighbors(nid) for nid in node_ids}, spec.links)
    union = _union_evaluator(spec, sites)
    evaluate = union if union is not None else _clients_evaluator([clients[nid] for nid in node_ids])
    engine = Engine(node_ids, clients, world, speeds, step_cost, spec.local_steps, spec.stop, evaluate,
                    spec.eval_every, spec.eval_every_rounds, spec.progress, step_time=spec.step_time, seed=spec.seed)
    if ray_nodes is not None:  # the nodes' begin_round calls take turns while their actors train, and
        engine.run_each = ray_nodes.run_each  # the actors evaluate the models (the same evaluator)
        if union is not None:
            engine.evaluate_many = ray_nodes.evaluate_many
    ctx = SimContext(spec, node_ids, topology, clients, init_params)
    entry = STRATEGIES[spec.strategy]
    if log.isEnabledFor(logging.INFO):  # the summary's spectral gap is an O(N³) eigendecomposition
        log.info("simulate %s: %d nodes, %s, profile %s, step cost %.4g s, device %s", spec.strategy, n,
                 topology.summary(), spec.compute_profile, step_cost, spec.device)
    if entry.kind == "node":
        strategies = [build_node_strategy(ctx.strategy_build(nid, world.network(nid))) for nid in node_ids]
        for nid, s in zip(node_ids, strategies):
            world.strategies[nid] = s
        synchronous = all(s.synchronous for s in strategies)
        t_end = engine.run_sync(strategies) if synchronous else engine.run_async(strategies)
    else:
        t_end = engine.run_collective(build_collective_strategy(ctx.strategy_build()), init_params)

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
        "privacy": "DP" if spec.dp.enabled else "no DP",
        "stop_reasons": engine.stop_reasons,
        "final_accuracy": {r["node"]: r["accuracy"] for r in final},
        "mean_accuracy": float(np.mean([r["accuracy"] for r in final])) if final else math.nan,
        "final_consensus_max": final[0]["consensus_max"] if final else math.nan,
        "bytes_sent": dict(zip(node_ids, world.bytes_sent)),
        "bytes_received": dict(zip(node_ids, world.bytes_received)),
        "messages_sent": dict(zip(node_ids, world.messages_sent)),
        "evaluations": engine.evals,
        "wall_seconds": time.perf_counter() - wall0,
        "backend": spec.backend,
        "client_setup_seconds": t_clients,  # building the clients (ray: starting the actors that build them)
        "seed": spec.seed,
        "preprocessing": {nid: pre.describe() for nid, pre in zip(node_ids, preps)},
    }
    log.info("simulate %s done: t=%.3f s virtual, mean acc %.4f, %s", spec.strategy, t_end,
             summary["mean_accuracy"], engine.end_reason)
    names = names or clients[node_ids[0]].parameter_names()  # type: ignore[attr-defined]
    return SimulationResult(engine.rows, summary, node_ids, models=engine.final_models, param_names=names,
                            preprocessing=dict(zip(node_ids, preps)))
