"""Experiment configs (``privfl simulate`` / ``privfl compare``) turned into simulator specs.

A compare config is one experiment config plus a ``[compare]`` table listing the
strategies; every strategy gets the very same data split, model, DP settings, seed and
simulated machines — only the way models meet changes (``[compare.overrides.<name>]``
may change a strategy's ``local_steps`` or ``params``, and says so in the summary).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privfl.config import CommonConfig, common_from, from_table, read_toml, resolve_path
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
class Experiment:
    """A parsed experiment: shared sections, simulation settings, and the strategies to run."""

    name: str
    common: CommonConfig
    simulation: SimulationSection
    strategies: list[str]
    overrides: dict[str, dict[str, Any]]
    source: Path
    raw: dict[str, Any]


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment (or compare) TOML file."""
    p = Path(path)
    table = read_toml(p)
    allowed = {"name", "data", "model", "dp", "topology", "strategy", "stop", "simulation", "compare"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    common = common_from(table, str(p))
    sim = from_table(SimulationSection, table.get("simulation", {}), f"{p}: [simulation]")
    name = table.get("name", p.parent.name or p.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{p}: name must be a non-empty string")
    strategies = [common.strategy.name]
    overrides: dict[str, dict[str, Any]] = {}
    if "compare" in table:
        cmp = table["compare"]
        if not isinstance(cmp, dict):
            raise ConfigError(f"{p}: [compare] must be a table")
        bad = sorted(set(cmp) - {"strategies", "overrides"})
        if bad:
            raise ConfigError(f"{p}: [compare]: unknown key(s) {', '.join(bad)}; allowed: overrides, strategies")
        strategies = cmp.get("strategies", [])
        if not isinstance(strategies, list) or not strategies or not all(isinstance(s, str) for s in strategies):
            raise ConfigError(f"{p}: [compare].strategies must be a non-empty list of strategy names")
        overrides = cmp.get("overrides", {})
        for sname, ov in overrides.items():
            if sname not in strategies:
                raise ConfigError(f"{p}: [compare.overrides.{sname}]: {sname!r} is not in compare.strategies")
            if not isinstance(ov, dict) or set(ov) - {"local_steps", "params"}:
                raise ConfigError(f"{p}: [compare.overrides.{sname}]: only local_steps and params may be overridden")
    return Experiment(name, common, sim, strategies, overrides, p, table)


def spec_for(exp: Experiment, strategy: str, progress: bool = False) -> SimSpec:
    """The simulator spec of ``exp`` run with ``strategy`` (applying its overrides)."""
    c = exp.common
    ov = exp.overrides.get(strategy, {})
    params = dict(c.strategy.params)
    if strategy != c.strategy.name:
        params = {}
    params.update(ov.get("params", {}))
    local_steps = int(ov.get("local_steps", c.strategy.local_steps))
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
        scaling=c.data.scaling,
        model=c.model.name,
        hidden=tuple(c.model.hidden),
        dp=c.dp.to_dp_config(),
        strategy=strategy,
        strategy_params=params,
        local_steps=local_steps,
        topology=c.topology.kind,
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
    resolved = {"name": exp.name, "strategies": exp.strategies}
    results: dict[str, SimulationResult] = {}
    for strategy in exp.strategies:
        spec = spec_for(exp, strategy, progress=progress)
        res = run_simulation(spec)
        sub = run_dir / strategy if len(exp.strategies) > 1 else run_dir
        write_results(res, sub)
        resolved[strategy] = _spec_json(spec)
        results[strategy] = res
    (run_dir / "resolved_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    plot_runs({k: v.rows for k, v in results.items()}, run_dir, title=exp.name)
    comparison = {k: summarize(v) for k, v in results.items()}
    (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str) + "\n")
    return results


def summarize(res: SimulationResult) -> dict[str, Any]:
    """Final accuracy (mean/min over nodes), max ε, bytes, virtual time of a run."""
    final = res.final()
    accs = [float(r["accuracy"]) for r in final]
    eps = [float(r["epsilon"]) for r in final if r.get("epsilon") is not None]
    return {
        "virtual_time": float(final[0]["time"]) if final else 0.0,
        "accuracy_mean": sum(accs) / len(accs) if accs else float("nan"),
        "accuracy_min": min(accs) if accs else float("nan"),
        "epsilon_max": max(eps) if eps else float("nan"),
        "bytes_sent": int(sum(float(r.get("bytes_sent", 0) or 0) for r in final)),
        "steps_mean": sum(float(r.get("steps", 0) or 0) for r in final) / max(1, len(final)),
        "consensus_max": float(final[0].get("consensus_max", float("nan"))) if final else float("nan"),
    }


def _spec_json(spec: SimSpec) -> dict[str, Any]:
    d = dataclasses.asdict(copy.deepcopy(spec))
    d.pop("links", None)
    d["links"] = {"latency": spec.links.latency, "bandwidth": spec.links.bandwidth}
    return d
