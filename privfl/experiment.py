"""Experiment configs (``privfl simulate`` / ``privfl compare``) turned into simulator specs, and their runs.

A compare config is one experiment config plus a ``[compare]`` table listing the
runs; every run gets the very same data split, model, DP settings, seed and simulated
machines — only the way models meet changes. A run may change only what it declares:
``[compare.overrides.<name>]`` or a ``[[compare.runs]]`` entry (label, strategy) may set
``local_steps``, strategy ``params`` (e.g. a compressor) and ``dp`` fields (e.g.
``mechanism = "topagg"``), and the resolved config of every run is saved beside it.

Repeats: ``[compare] repeats = N`` (or ``privfl compare --repeats N``) runs every run over
N seeds, ``base + r`` for r = 0 … N-1, where base is ``[simulation].seed`` (or, when that
is 0, ``[data].seed``). That one seed drives everything random in a simulated run: the data
split (privfl-split data; a ``[data].factory``'s Datasets are the user's own), the initial
model, every site's DP noise and Poisson sampling, DP preprocessing noise, gossip peer
choice and compressor masks (unless ``[strategy].params.seed`` fixes them). Every run and
seed keeps its own folder (``<label>/seed-<seed>/`` when N > 1) with its metrics;
``comparison.json`` gives per run and per figure the mean over seeds, a 95 % Student-t
interval of that mean (``null`` with one seed: no interval is made up) and the per-seed
values, and ``answer.csv`` / ``answer.png`` the answer view of :mod:`privfl.answer`.

Every run is checked before the first one starts (:func:`validate_experiment`): strategy
names, params and overrides, each refusal one line naming the ``[section].field``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privfl.answer import answer, stat, strategy_kind, write_answer_csv
from privfl.config import (
    SHARED_SECTIONS,
    CommonConfig,
    DPSection,
    apply_python_path,
    check_sections,
    common_from,
    from_table,
    read_toml,
    resolve_device,
    resolve_path,
)
from privfl.errors import ConfigError
from privfl.sim import STEP_TIMES, LinkSpec, SimSpec, SimulationResult, StopCriteria, run_simulation, write_results

log = logging.getLogger("privfl.experiment")

#: the neighbouring relation every ε here is stated for (the accountant's)
NEIGHBOURING = "add/remove one record"
#: the figures of one run that comparison.json aggregates over repeats
FIGURES = ("virtual_time", "accuracy_mean", "accuracy_min", "epsilon_max", "bytes_total", "bytes_sent",
           "steps_mean", "consensus_max")


class ConfigProblems(ConfigError):
    """Several refusals found at once, one line each (``problems``); the message joins them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass
class SimulationSection:
    """Simulated machines and links, evaluation cadence, and the run folder."""

    compute_profile: str = "homogeneous"
    straggler_factor: float = 4.0
    straggler_index: int = -1
    lognormal_sigma: float = 0.5
    speeds: list[float] = field(default_factory=list)
    #: how a local step's compute time varies: "fixed" (step_cost / speed) or "exponential" (seeded
    #: per node, mean step_cost / speed)
    step_time: str = "fixed"
    latency: float = 0.005
    bandwidth: float = 12.5e6
    step_cost: float = 0.0
    eval_every: float = 0.0
    eval_every_rounds: int = 0
    max_rounds: int = 0
    seed: int = 0
    output: str = "runs"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"
    #: "local" (every node in this process) or "ray" (the nodes' training in Ray actors: privfl[ray])
    backend: str = "local"
    #: with backend "ray": "" (start a local Ray instance on 127.0.0.1), "auto" or "HOST:PORT" (join a cluster)
    address: str = ""
    actors: int = 0  # with backend "ray": Ray actors the nodes are spread over (0: the cluster's CPUs)

    def validate(self, where: str) -> None:
        """Refuse a device this machine does not have (CUDA asked for and absent, cuda:N out of range),
        and a bad backend / address / actor count (or backend "ray" without Ray installed)."""
        from privfl.sim.ray_backend import check_backend

        resolve_device(self.device, f"{where}.device")
        if self.step_time not in STEP_TIMES:
            raise ConfigError(f"{where}.step_time: must be one of {', '.join(STEP_TIMES)}, got {self.step_time!r}")
        check_backend(self.backend, self.address or None, self.actors or None, where)

    def compute_params(self, n: int) -> dict[str, Any]:
        """The profile parameters ``compute_speeds`` takes for this profile."""
        if self.compute_profile == "straggler":
            idx = self.straggler_index if self.straggler_index >= 0 else n - 1
            return {"factor": self.straggler_factor, "index": idx}
        if self.compute_profile == "lognormal":
            return {"sigma": self.lognormal_sigma}
        if self.compute_profile == "explicit":
            return {"speeds": list(self.speeds)}
        return {}


@dataclass
class RunVariant:
    """One run of a comparison: a strategy, and what (if anything) it changes besides.

    ``where`` names the table the run comes from (for refusals: ``[compare.overrides.fedavg]``,
    ``[[compare.runs]] #2 (label 'x')``) and ``name_where`` the field holding its strategy name."""

    label: str
    strategy: str
    local_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dp: dict[str, Any] = field(default_factory=dict)
    where: str = "[strategy]"
    name_where: str = "[strategy].name"


@dataclass
class Experiment:
    """A parsed experiment: shared sections, simulation settings, the runs to make, repeats and targets."""

    name: str
    common: CommonConfig
    simulation: SimulationSection
    runs: list[RunVariant]
    source: Path
    raw: dict[str, Any]
    repeats: int = 1
    targets: list[float] = field(default_factory=list)  # empty: derived from the runs (privfl.answer)
    repeats_from: str = "[compare].repeats"

    @property
    def strategies(self) -> list[str]:
        """The labels of the runs, in order."""
        return [r.label for r in self.runs]

    @property
    def base_seed(self) -> int:
        """The seed of repeat 0: ``[simulation].seed``, or ``[data].seed`` when that is 0."""
        return int(self.simulation.seed or self.common.data.seed)

    @property
    def seeds(self) -> list[int]:
        """The seed of every repeat: base seed + r."""
        return [self.base_seed + r for r in range(self.repeats)]


_VARIANT_KEYS = {"local_steps", "params", "dp"}
_COMPARE_KEYS = ("overrides", "repeats", "runs", "strategies", "targets")


def _variant(p: Path, where: str, name_where: str, label: str, strategy: str, table: dict[str, Any],
             base_dp: dict[str, Any]) -> RunVariant:
    bad = sorted(set(table) - _VARIANT_KEYS - {"label", "strategy"})
    if bad:
        raise ConfigError(f"{p}: {where}: unknown key(s) {', '.join(bad)}; a run may change "
                          f"{', '.join(sorted(_VARIANT_KEYS))}")
    ls = table.get("local_steps")
    if ls is not None and (isinstance(ls, bool) or not isinstance(ls, int) or ls < 1):
        raise ConfigError(f"{p}: {where}.local_steps: must be a positive integer, got {ls!r}")
    for key in ("params", "dp"):
        if not isinstance(table.get(key, {}), dict):
            raise ConfigError(f"{p}: {where}.{key}: must be a table")
    dp = dict(table.get("dp", {}))
    if dp:  # validate the overridden DP section as a whole: the file's [dp] with the run's changes
        from_table(DPSection, {**dataclasses.asdict(DPSection()), **base_dp, **dp}, f"{p}: {where}.dp")
    return RunVariant(label, strategy, ls, dict(table.get("params", {})), dp, where, name_where)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment (or compare) TOML file."""
    p = Path(path)
    table = read_toml(p)
    apply_python_path(table, p.parent, str(p))
    check_sections(table, ("name", *SHARED_SECTIONS, "simulation", "compare"), str(p))
    common = common_from(table, str(p))
    sim = from_table(SimulationSection, table.get("simulation", {}), f"{p}: [simulation]")
    name = table.get("name", p.parent.name or p.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{p}: name must be a non-empty string")
    runs = [RunVariant(common.strategy.name, common.strategy.name)]
    repeats, targets = 1, list[float]()
    if "compare" in table:
        base_dp = table.get("dp", {})
        runs = _compare_runs(p, table["compare"], dict(base_dp) if isinstance(base_dp, dict) else {})
        repeats, targets = _repeats_targets(p, table["compare"])
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"{p}: [compare]: run label(s) {', '.join(dup)} appear twice")
    return Experiment(name, common, sim, runs, p, table, repeats, targets)


def check_repeats(value: Any, where: str) -> int:
    """A number of repeats: a positive integer, else a one-line ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: must be a positive integer (seeds per run), got {value!r}")
    return int(value)


def _repeats_targets(p: Path, cmp: dict[str, Any]) -> tuple[int, list[float]]:
    repeats = check_repeats(cmp.get("repeats", 1), f"{p}: [compare].repeats")
    targets = cmp.get("targets", [])
    if not isinstance(targets, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in targets):
        raise ConfigError(f"{p}: [compare].targets: must be a list of accuracies in (0, 1], got {targets!r}")
    return repeats, sorted({float(t) for t in targets})


def _compare_runs(p: Path, cmp: Any, base_dp: dict[str, Any]) -> list[RunVariant]:
    """``strategies = [...]`` (with optional ``[compare.overrides.<name>]``) and/or
    ``[[compare.runs]]`` entries with a ``label``, a ``strategy`` and what they change.
    Every entry is checked; the refusals come together, one line each."""
    if not isinstance(cmp, dict):
        raise ConfigError(f"{p}: [compare] must be a table")
    bad = sorted(set(cmp) - set(_COMPARE_KEYS))
    if bad:
        raise ConfigError(f"{p}: [compare]: unknown key(s) {', '.join(bad)}; allowed: {', '.join(_COMPARE_KEYS)}")
    names = cmp.get("strategies", [])
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise ConfigError(f"{p}: [compare].strategies must be a list of strategy names")
    overrides = cmp.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{p}: [compare.overrides] must be a table")
    problems: list[str] = []
    for sname in overrides:
        if sname not in names:
            problems.append(f"{p}: [compare.overrides.{sname}]: {sname!r} is not in compare.strategies")
    runs: list[RunVariant] = []
    for k, n in enumerate(names):
        try:
            runs.append(_variant(p, f"[compare.overrides.{n}]", f"[compare].strategies[{k}]", n, n,
                                 overrides.get(n, {}), base_dp))
        except ConfigError as e:
            problems.append(str(e))
    extra = cmp.get("runs", [])
    if not isinstance(extra, list):
        raise ConfigError(f"{p}: [[compare.runs]] must be an array of tables")
    for i, r in enumerate(extra):
        where = f"[[compare.runs]] #{i + 1}"
        if not isinstance(r, dict) or not isinstance(r.get("label"), str) or not isinstance(r.get("strategy"), str):
            problems.append(f"{p}: {where}: needs a string label and a string strategy")
            continue
        where = f"{where} (label {r['label']!r})"
        try:
            runs.append(_variant(p, where, f"{where}.strategy", r["label"], r["strategy"], r, base_dp))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigProblems(problems) if len(problems) > 1 else ConfigError(problems[0])
    if not runs:
        raise ConfigError(f"{p}: [compare] lists no runs: give strategies = [...] or [[compare.runs]]")
    return runs


def _run_of(exp: Experiment, run: RunVariant | str) -> RunVariant:
    if isinstance(run, RunVariant):
        return run
    matches = [r for r in exp.runs if r.label == run]
    if not matches:
        raise ConfigError(f"no run labelled {run!r}; runs are {', '.join(exp.strategies)}")
    return matches[0]


def _params_of(exp: Experiment, run: RunVariant) -> dict[str, Any]:
    c = exp.common
    params = dict(c.strategy.params) if run.strategy == c.strategy.name else {}
    params.update(run.params)
    return params


def spec_for(exp: Experiment, run: RunVariant | str, progress: bool = False, seed: int | None = None) -> SimSpec:
    """The simulator spec of one run of ``exp`` (a run variant, or a label of one) for ``seed``
    (default: the base seed, repeat 0)."""
    run = _run_of(exp, run)
    c = exp.common
    params = _params_of(exp, run)
    local_steps = run.local_steps or c.strategy.local_steps
    dp_section = c.dp
    if run.dp:
        dp_section = from_table(DPSection, {**dataclasses.asdict(c.dp), **run.dp}, f"{exp.source}: {run.where}.dp")
    n = c.data.num_sites
    s = exp.simulation
    source = c.data.source
    if source.endswith((".csv", ".npz")):
        source = str(resolve_path(exp.source.parent, source))
    return SimSpec(
        dataset=source,
        label_column=c.data.label_column or None,
        num_nodes=n,
        partitioning=c.data.partitioning,
        alpha=c.data.alpha,
        shards_per_site=c.data.shards_per_site,
        test_fraction=c.data.test_fraction,
        preprocessing=c.data.preprocessing_spec(exp.source.parent),
        model=c.model.spec,
        model_args=dict(c.model.args),
        loss=c.model.loss,
        data_factory=c.data.factory,
        data_args=dict(c.data.args),
        data_root=c.data.root_path(exp.source.parent),
        num_classes=c.data.num_classes,
        client_app=c.client.app,
        client_run_config=dict(c.client.run_config),
        hidden=tuple(c.model.hidden),
        dp=dp_section.to_dp_config(),
        strategy=run.strategy,
        strategy_params=params,
        local_steps=local_steps,
        topology=c.topology.canonical_kind,
        topology_params=c.topology.params(),
        compute_profile=s.compute_profile,
        compute_params=s.compute_params(n),
        step_time=s.step_time,
        step_cost=s.step_cost or None,
        links=LinkSpec(latency=s.latency, bandwidth=s.bandwidth),
        stop=StopCriteria(
            max_time=c.stop.max_seconds or None,
            max_steps=c.stop.max_steps or None,
            max_rounds=s.max_rounds or None,
            target_accuracy=c.stop.target_accuracy or None,
        ),
        eval_every=s.eval_every or None,
        eval_every_rounds=s.eval_every_rounds or None,
        seed=exp.base_seed if seed is None else int(seed),
        device=str(resolve_device(s.device, f"{exp.source}: [simulation].device")),
        progress=progress,
        backend=s.backend,
        address=s.address or None,
        actors=s.actors or None,
    )


# ---- validation before anything runs ---------------------------------------------------------
_NAME, _PARAMS = "[strategy].name", "[strategy].params"


def _relocate(msg: str, run: RunVariant) -> str:
    """A strategy refusal (written for a node's ``[strategy]``) pointed at the table the run comes from."""
    if run.where == "[strategy]":
        return msg
    if msg.startswith(_NAME):
        return run.name_where + msg[len(_NAME):]
    if msg.startswith(_PARAMS):
        rest = msg[len(_PARAMS):]
        key = rest[1:].split(":", 1)[0].split(".", 1)[0] if rest.startswith(".") else ""
        if (key and key in run.params) or (not key and run.params):
            return f"{run.where}.params{rest}"
        head, _, tail = msg.partition(": ")
        return f"{head} (the file's [strategy].params, used by run {run.label!r}): {tail}"
    return msg if msg.startswith("[") else f"{run.where}: {msg}"


def _check_run(exp: Experiment, run: RunVariant) -> list[str]:
    """Every refusal of one run, one line each (empty: it can run)."""
    from privfl.strategies.registry import StrategyBuild, build_collective_strategy, check_strategy

    params = _params_of(exp, run)
    try:
        entry = check_strategy(run.strategy, params, "simulate")
    except ConfigError as e:
        return [f"{exp.source}: {_relocate(str(e), run)}"]
    problems = []
    try:
        spec = spec_for(exp, run)
        spec.validate()
    except ConfigError as e:
        text = str(e)
        if not text.startswith(str(exp.source)):
            text = f"{exp.source}: {_relocate(text, run)}"
        problems.append(text)
        return problems
    if entry.kind == "collective":  # values too: building one is cheap (no data, no model)
        try:
            build_collective_strategy(StrategyBuild(run.strategy, "simulate", params, spec.local_steps,
                                                    seed=spec.seed, initial=[np.zeros(1, dtype=np.float32)]))
        except (ConfigError, ValueError, TypeError) as e:
            where = f"{run.where}.params" if run.where != "[strategy]" else _PARAMS
            problems.append(f"{exp.source}: {where}: {e}")
    return problems


def validate_experiment(exp: Experiment) -> None:
    """Check every run (strategy name, params, overrides, the built SimSpec) before any runs.

    Raises :class:`ConfigError` (:class:`ConfigProblems` when several): one line per bad value,
    each naming the ``[section].field`` it comes from."""
    check_repeats(exp.repeats, f"{exp.source}: {exp.repeats_from}")
    problems: list[str] = []
    for run in exp.runs:
        for line in _check_run(exp, run):
            if line not in problems:
                problems.append(line)
    if problems:
        raise ConfigProblems(problems) if len(problems) > 1 else ConfigError(problems[0])


def run_dir_for(exp: Experiment, out: str | None) -> Path:
    """A fresh run folder: ``<output>/<name>-<UTC timestamp>``."""
    base = Path(out) if out else resolve_path(Path.cwd(), exp.simulation.output)
    d = base / f"{exp.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while d.exists():
        d = d.with_name(f"{d.name}-{n}")
        n += 1
    d.mkdir(parents=True)
    return d


# ---- running ---------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Every run of a comparison: label → one result per seed, and what was written from them."""

    exp: Experiment
    run_dir: Path
    results: dict[str, list[SimulationResult]]
    summary: dict[str, Any]  # comparison.json
    answer: dict[str, Any]  # the answer view (privfl.answer.answer)

    @property
    def first(self) -> dict[str, SimulationResult]:
        """Each run's result for the base seed."""
        return {k: v[0] for k, v in self.results.items()}


def run_folder(exp: Experiment, run_dir: Path, label: str, seed: int) -> Path:
    """Where one run and seed writes: ``run_dir`` (one run), ``run_dir/<label>`` (several), and
    ``…/seed-<seed>`` below that when there are repeats."""
    sub = run_dir / label if len(exp.runs) > 1 else run_dir
    return sub / f"seed-{seed}" if exp.repeats > 1 else sub


ProgressFactory = Callable[[Any, float, str], Any]


def progress_display(name: str) -> ProgressFactory:
    """A progress display for :data:`privfl.sim.engine.progress_factory` naming the run (``name``:
    label, and seed with repeats) and showing the engine's ε (max over nodes) and the mean
    accuracy of its last evaluation as they go."""
    from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

    def fields(engine: Any) -> dict[str, Any]:
        eps = [e for e in engine.epsilons if math.isfinite(e)]
        acc = engine.last_accuracy
        return {"eps": f"{max(eps):.3f}" if eps else "–",
                "acc": f"{sum(acc) / len(acc):.3f}" if acc else "–"}

    def done(engine: Any) -> float:
        """Percent of the run: the furthest of its limits (steps, rounds, virtual time) reached."""
        stop, n = engine.stop, max(1, len(engine.steps))
        parts = []
        if stop.max_steps:
            parts.append(sum(min(k, stop.max_steps) for k in engine.steps) / (stop.max_steps * n))
        if stop.max_rounds:
            parts.append(engine.round / stop.max_rounds)
        if stop.max_time:
            parts.append(max(engine.world.clocks, default=0.0) / stop.max_time)
        return 100.0 * min(1.0, max(parts, default=0.0))

    class RunProgress(Progress):
        def __init__(self, engine: Any) -> None:
            super().__init__(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                             TextColumn("ε {task.fields[eps]}  acc {task.fields[acc]}"), TimeElapsedColumn())
            self.engine = engine

        def update(self, task_id: TaskID, **kw: Any) -> None:  # type: ignore[override]
            kw.update(fields(self.engine), completed=done(self.engine))  # the engine's count, as a percentage
            super().update(task_id, **kw)

        def stop(self) -> None:
            for t in self.task_ids:
                super().update(t, **fields(self.engine), completed=done(self.engine))
            super().stop()

    def factory(engine: Any, total: float, label: str) -> Any:
        from rich.markup import escape

        bar = RunProgress(engine)
        bar.start()
        bar.add_task(escape(name), total=100.0, **fields(engine))
        return bar

    return factory


@contextlib.contextmanager
def _display(name: str, progress: bool) -> Iterator[None]:
    if not progress:
        yield
        return
    from privfl.sim.engine import progress_factory

    token = progress_factory.set(progress_display(name))
    try:
        yield
    finally:
        progress_factory.reset(token)


def run_comparison(exp: Experiment, run_dir: Path, progress: bool = False) -> Comparison:
    """Run each run of ``exp`` for each seed (:attr:`Experiment.seeds`) into its own folder
    (:func:`run_folder`), then write ``comparison.json`` (per run: figures over seeds), the
    answer view (``answer.csv``, ``answer.png``), ``per_seed.csv`` and the plots.

    Everything is validated first (:func:`validate_experiment`), before anything is written.
    A run that fails leaves the finished ones in place and ``error.txt`` saying what failed."""
    validate_experiment(exp)
    (run_dir / "config.toml").write_text(exp.source.read_text())
    seeds = exp.seeds
    resolved: dict[str, Any] = {"name": exp.name, "runs": exp.strategies, "repeats": exp.repeats, "seeds": seeds,
                                "repeats_from": exp.repeats_from,
                                "seed_rule": "seed of repeat r = base seed + r; it seeds the split, the initial "
                                             "model, DP noise and sampling, peer choice"}
    results: dict[str, list[SimulationResult]] = {}
    done: list[str] = []
    with contextlib.ExitStack() as stack:
        _ray_for(exp, stack)
        _run_all(exp, run_dir, progress, seeds, resolved, results, done)
    (run_dir / "resolved_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    return _write_comparison(exp, run_dir, results)


def _ray_for(exp: Experiment, stack: contextlib.ExitStack) -> None:
    """With ``[simulation] backend = "ray"``: one Ray session (and one set of actors) for every run."""
    if exp.simulation.backend == "ray":
        from privfl.sim.ray_backend import ray_session

        stack.enter_context(ray_session(exp.simulation.address or None))


def _run_all(exp: Experiment, run_dir: Path, progress: bool, seeds: list[int], resolved: dict[str, Any],
             results: dict[str, list[SimulationResult]], done: list[str]) -> None:
    """Every run for every seed, each into its own folder (see :func:`run_comparison`)."""
    for run in exp.runs:
        resolved[run.label] = _spec_json(spec_for(exp, run))
        for seed in seeds:
            name = run.label + (f" seed {seed}" if exp.repeats > 1 else "")
            try:
                with _display(name, progress):
                    res = run_simulation(spec_for(exp, run, progress=progress, seed=seed))
                write_results(res, run_folder(exp, run_dir, run.label, seed))
            except BaseException as e:
                _error_note(run_dir, name, e, done, resolved)
                raise
            done.append(str(run_folder(exp, run_dir, run.label, seed).relative_to(run_dir)) or ".")
            results.setdefault(run.label, []).append(res)


def run_experiment(exp: Experiment, run_dir: Path, progress: bool = False) -> dict[str, SimulationResult]:
    """:func:`run_comparison`, returning each run's result for the base seed (label → result)."""
    return run_comparison(exp, run_dir, progress=progress).first


def _error_note(run_dir: Path, name: str, e: BaseException, done: list[str], resolved: dict[str, Any]) -> None:
    """``error.txt``: which run failed and how, and which finished (their folders are kept)."""
    what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
    lines = [f"run {name} failed: {what}", "",
             "finished (kept, with their metrics): " + (", ".join(done) if done else "none"),
             "no comparison.json, answer or plots were written", ""]
    if not isinstance(e, (KeyboardInterrupt, ConfigError)):
        lines += ["".join(traceback.format_exception(e))]
    (run_dir / "error.txt").write_text("\n".join(lines))
    (run_dir / "resolved_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    # run.log's record; the console has the command's own "error:" line (not said twice)
    log.info("run %s failed (%s); finished: %s", name, what, ", ".join(done) or "none")


def _meta(exp: Experiment, label: str, res: SimulationResult) -> dict[str, Any]:
    run = _run_of(exp, label)
    dp = bool(res.summary.get("dp", True))
    return {"strategy": run.strategy, "kind": strategy_kind(run.strategy), "privacy": "DP" if dp else "no DP",
            "delta": res.summary.get("delta") if dp else None, "neighbouring": NEIGHBOURING if dp else None}


def subtitle(exp: Experiment, meta: dict[str, dict[str, Any]]) -> str:
    """The line under every plot title: δ, the neighbouring relation, and the repeats."""
    deltas = sorted({m["delta"] for m in meta.values() if m["delta"] is not None})
    dp = (f"(ε, δ = {' / '.join(f'{d:g}' for d in deltas)})-DP per site, neighbours: {NEIGHBOURING}"
          if deltas else "no DP")
    reps = (f"mean and 95 % t-interval over {exp.repeats} seeds ({exp.seeds[0]}–{exp.seeds[-1]})"
            if exp.repeats > 1 else f"one seed ({exp.seeds[0]}): no interval")
    return f"{dp}; {reps}"


def _write_comparison(exp: Experiment, run_dir: Path, results: dict[str, list[SimulationResult]]) -> Comparison:
    from privfl.answer import curve
    from privfl.plots import plot_answer, plot_runs

    meta = {lb: _meta(exp, lb, rs[0]) for lb, rs in results.items()}
    collective = {lb for lb, m in meta.items() if m["kind"] != "decentralized (gossip)"}
    no_dp = {lb for lb, m in meta.items() if m["privacy"] == "no DP"}
    comparison: dict[str, Any] = {}
    per_seed_rows = []
    for lb, rs in results.items():
        sums = [summarize(r, collective=lb in collective) for r in rs]
        entry: dict[str, Any] = {**meta[lb], "repeats": len(rs), "seeds": [int(r.summary.get("seed", 0)) for r in rs]}
        # the figures as before (one seed: its values; several: the mean over seeds) ...
        for k, v in sums[0].items():
            if k in FIGURES and v is not None:
                vals = [s[k] for s in sums]
                entry[k] = v if len(rs) == 1 else sum(vals) / len(vals)
            else:
                entry[k] = v
        # ... and each with its interval and per-seed values
        entry["figures"] = {k: None if sums[0][k] is None else stat([s[k] for s in sums]) for k in FIGURES}
        comparison[lb] = entry
        for seed, s in zip(entry["seeds"], sums):
            folder = run_folder(exp, run_dir, lb, seed).relative_to(run_dir)
            per_seed_rows.append({"strategy": lb, "kind": meta[lb]["kind"], "seed": seed,
                                  "folder": str(folder) or ".", **{k: s[k] for k in FIGURES}})
    curves = {lb: [curve(r.rows, collective=lb in collective) for r in rs] for lb, rs in results.items()}
    view = answer(curves, {lb: lb not in no_dp for lb in results}, exp.targets or None)
    for lb in comparison:
        comparison[lb]["answer"] = {"targets_from": view["targets_from"], "common_epsilon": view["common_epsilon"],
                                    **view["runs"][lb]}
    (run_dir / "comparison.json").write_text(json.dumps(_finite(comparison), indent=2, default=str) + "\n")
    write_answer_csv(view, meta, run_dir / "answer.csv")
    with (run_dir / "per_seed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["strategy", "kind", "seed", "folder", *FIGURES])
        w.writeheader()
        w.writerows(per_seed_rows)
    sub = subtitle(exp, meta)
    kinds = {lb: m["kind"] for lb, m in meta.items()}
    plot_runs({lb: [r.rows for r in rs] for lb, rs in results.items()}, run_dir, title=exp.name, no_dp=no_dp,
              kinds=kinds, subtitle=sub, collective=collective)
    plot_answer(view, run_dir, kinds=kinds, title=f"{exp.name}: what it takes to reach an accuracy", subtitle=sub,
                no_dp=no_dp)
    return Comparison(exp, run_dir, results, comparison, view)


def _finite(x: Any) -> Any:
    """JSON without NaN/Infinity: a non-finite float becomes None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summarize(res: SimulationResult, collective: bool = False) -> dict[str, Any]:
    """Final accuracy (mean/min over nodes), max ε (None for a run without DP), bytes, virtual time.

    ``bytes_sent`` sums the nodes' ``bytes_sent``; ``bytes_total`` is all the traffic: that sum
    for gossip (every message is one node's send and another's receipt), plus the nodes'
    ``bytes_received`` for a ``collective`` run (the server's or all-reduce's downloads)."""
    final = res.final()
    accs = [float(r["accuracy"]) for r in final]
    eps = [float(r["epsilon"]) for r in final if r.get("epsilon") is not None]
    dp = bool(res.summary.get("dp", True))
    sent = int(sum(float(r.get("bytes_sent", 0) or 0) for r in final))
    received = int(sum(float(r.get("bytes_received", 0) or 0) for r in final))
    return {
        "privacy": "DP" if dp else "no DP",
        "virtual_time": float(final[0]["time"]) if final else 0.0,
        "accuracy_mean": sum(accs) / len(accs) if accs else float("nan"),
        "accuracy_min": min(accs) if accs else float("nan"),
        "epsilon_max": (max(eps) if eps else float("nan")) if dp else None,
        "bytes_sent": sent,
        "bytes_total": sent + received if collective else sent,
        "steps_mean": sum(float(r.get("steps", 0) or 0) for r in final) / max(1, len(final)),
        "consensus_max": float(final[0].get("consensus_max", float("nan"))) if final else float("nan"),
    }


def _spec_json(spec: SimSpec) -> dict[str, Any]:
    d = dataclasses.asdict(copy.deepcopy(spec))
    d.pop("links", None)
    d["links"] = {"latency": spec.links.latency, "bandwidth": spec.links.bandwidth}
    return d
