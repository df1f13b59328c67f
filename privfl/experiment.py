"""Experiment configs (``privfl simulate`` / ``privfl compare``) turned into simulator specs.

A compare config is one experiment config plus a ``[compare]`` table listing the
runs; every run gets the very same data split, model, DP settings, seed and simulated
machines — only the way models meet changes. A run may change only what it declares:
``[compare.overrides.<name>]`` or a ``[[compare.runs]]`` entry (label, strategy) may set
``local_steps``, strategy ``params`` (e.g. a compressor) and ``dp`` fields (e.g.
``mechanism = "topagg"``), and the resolved config of every run is saved beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from privfl.sim import LinkSpec, SimSpec, SimulationResult, StopCriteria, run_simulation, write_results


@dataclass
class SimulationSection:
    """Simulated machines and links, evaluation cadence, and the run folder."""

    compute_profile: str = "homogeneous"
    straggler_factor: float = 4.0
    straggler_index: int = -1
    lognormal_sigma: float = 0.5
    speeds: list[float] = field(default_factory=list)
    latency: float = 0.005
    bandwidth: float = 12.5e6
    step_cost: float = 0.0
    eval_every: float = 0.0
    eval_every_rounds: int = 0
    max_rounds: int = 0
    seed: int = 0
    output: str = "runs"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"

    def validate(self, where: str) -> None:
        """Refuse a device this machine does not have (CUDA asked for and absent, cuda:N out of range)."""
        resolve_device(self.device, f"{where}.device")

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
    """One run of a comparison: a strategy, and what (if anything) it changes besides."""

    label: str
    strategy: str
    local_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dp: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    """A parsed experiment: shared sections, simulation settings, and the runs to make."""

    name: str
    common: CommonConfig
    simulation: SimulationSection
    runs: list[RunVariant]
    source: Path
    raw: dict[str, Any]

    @property
    def strategies(self) -> list[str]:
        """The labels of the runs, in order."""
        return [r.label for r in self.runs]


_VARIANT_KEYS = {"local_steps", "params", "dp"}


def _variant(p: Path, where: str, label: str, strategy: str, table: dict[str, Any],
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
    return RunVariant(label, strategy, ls, dict(table.get("params", {})), dp)


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
    if "compare" in table:
        base_dp = table.get("dp", {})
        runs = _compare_runs(p, table["compare"], dict(base_dp) if isinstance(base_dp, dict) else {})
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"{p}: [compare]: run label(s) {', '.join(dup)} appear twice")
    return Experiment(name, common, sim, runs, p, table)


def _compare_runs(p: Path, cmp: Any, base_dp: dict[str, Any]) -> list[RunVariant]:
    """``strategies = [...]`` (with optional ``[compare.overrides.<name>]``) and/or
    ``[[compare.runs]]`` entries with a ``label``, a ``strategy`` and what they change."""
    if not isinstance(cmp, dict):
        raise ConfigError(f"{p}: [compare] must be a table")
    bad = sorted(set(cmp) - {"strategies", "overrides", "runs"})
    if bad:
        raise ConfigError(f"{p}: [compare]: unknown key(s) {', '.join(bad)}; allowed: overrides, runs, strategies")
    names = cmp.get("strategies", [])
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise ConfigError(f"{p}: [compare].strategies must be a list of strategy names")
    overrides = cmp.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{p}: [compare.overrides] must be a table")
    for sname in overrides:
        if sname not in names:
            raise ConfigError(f"{p}: [compare.overrides.{sname}]: {sname!r} is not in compare.strategies")
    runs = [_variant(p, f"[compare.overrides.{n}]", n, n, overrides.get(n, {}), base_dp) for n in names]
    extra = cmp.get("runs", [])
    if not isinstance(extra, list):
        raise ConfigError(f"{p}: [[compare.runs]] must be an array of tables")
    for i, r in enumerate(extra):
        where = f"[[compare.runs]] #{i + 1}"
        if not isinstance(r, dict) or not isinstance(r.get("label"), str) or not isinstance(r.get("strategy"), str):
            raise ConfigError(f"{p}: {where}: needs a string label and a string strategy")
        runs.append(_variant(p, where, r["label"], r["strategy"], r, base_dp))
    if not runs:
        raise ConfigError(f"{p}: [compare] lists no runs: give strategies = [...] or [[compare.runs]]")
    return runs


def spec_for(exp: Experiment, run: RunVariant | str, progress: bool = False) -> SimSpec:
    """The simulator spec of one run of ``exp`` (a run variant, or a label of one)."""
    if isinstance(run, str):
        matches = [r for r in exp.runs if r.label == run]
        if not matches:
            raise ConfigError(f"no run labelled {run!r}; runs are {', '.join(exp.strategies)}")
        run = matches[0]
    c = exp.common
    params = dict(c.strategy.params) if run.strategy == c.strategy.name else {}
    params.update(run.params)
    local_steps = run.local_steps or c.strategy.local_steps
    dp_section = c.dp
    if run.dp:
        dp_section = from_table(DPSection, {**dataclasses.asdict(c.dp), **run.dp}, f"run {run.label}: dp")
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
        seed=s.seed or c.data.seed,
        device=str(resolve_device(s.device, f"{exp.source}: [simulation].device")),
        progress=progress,
    )


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


def run_experiment(exp: Experiment, run_dir: Path, progress: bool = False) -> dict[str, SimulationResult]:
    """Run each strategy of ``exp`` (into ``run_dir/<strategy>/`` when there are several),
    then write the plots and ``comparison.json`` (one summary line per strategy)."""
    from privfl.plots import plot_runs

    (run_dir / "config.toml").write_text(exp.source.read_text())
    resolved: dict[str, Any] = {"name": exp.name, "runs": exp.strategies}
    results: dict[str, SimulationResult] = {}
    for run in exp.runs:
        spec = spec_for(exp, run, progress=progress)
        res = run_simulation(spec)
        sub = run_dir / run.label if len(exp.runs) > 1 else run_dir
        write_results(res, sub)
        resolved[run.label] = _spec_json(spec)
        results[run.label] = res
    (run_dir / "resolved_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    plot_runs({k: v.rows for k, v in results.items()}, run_dir, title=exp.name,
              no_dp={k for k, v in results.items() if not v.summary.get("dp", True)})
    comparison = {k: summarize(v) for k, v in results.items()}
    (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str) + "\n")
    return results


def summarize(res: SimulationResult) -> dict[str, Any]:
    """Final accuracy (mean/min over nodes), max ε (None for a run without DP), bytes, virtual time."""
    final = res.final()
    accs = [float(r["accuracy"]) for r in final]
    eps = [float(r["epsilon"]) for r in final if r.get("epsilon") is not None]
    dp = bool(res.summary.get("dp", True))
    return {
        "privacy": "DP" if dp else "no DP",
        "virtual_time": float(final[0]["time"]) if final else 0.0,
        "accuracy_mean": sum(accs) / len(accs) if accs else float("nan"),
        "accuracy_min": min(accs) if accs else float("nan"),
        "epsilon_max": (max(eps) if eps else float("nan")) if dp else None,
        "bytes_sent": int(sum(float(r.get("bytes_sent", 0) or 0) for r in final)),
        "steps_mean": sum(float(r.get("steps", 0) or 0) for r in final) / max(1, len(final)),
        "consensus_max": float(final[0].get("consensus_max", float("nan"))) if final else float("nan"),
    }


def _spec_json(spec: SimSpec) -> dict[str, Any]:
    d = dataclasses.asdict(copy.deepcopy(spec))
    d.pop("links", None)
    d["links"] = {"latency": spec.links.latency, "bandwidth": spec.links.bandwidth}
    return d
