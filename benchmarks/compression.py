"""Compressed gossip and FedAvg on the digits heterogeneous setting: bytes to reach dense accuracy at equal ε.

Runs every ``[[compare.runs]]`` entry of ``examples/digits-compressed/compare.toml``
(16 sites, CNN, Dirichlet α = 0.5, one 4× straggler; every run the same DP-SGD settings,
so the same ε) in the simulator, which counts the real wire bytes (``Compressed.nbytes``
or the framed change, + the link header per message). Each run is measured against the
dense run of its own strategy: the run labelled ``dense`` (sync_gossip) or
``<strategy>-dense`` (e.g. ``fedavg-dense``). For each run it reports:

* ``reference``: that dense run's label;
* ``bytes_to_dense_final``: total bytes all sites (and the server) had sent at the first
  evaluation where the mean accuracy reached the reference's final mean accuracy (null
  if never), and ``bytes_to_within_1pp`` for 1 percentage point below it;
* ``reduction_*``: the reference's bytes for the same target divided by the run's;
* ``accuracy_gap_pp``: reference final mean accuracy minus the run's, in percentage points;
* ``bytes_per_message`` and ``epsilon_max`` (equal across runs by construction).

``--subspace`` runs ``examples/digits-compressed/subspace.toml`` instead: subspace DP-SGD
(``[dp].subspace``: every DP step clipped and noised on a public random k-coordinate mask,
the wire carrying only those k values) against the same dense gossip reference, at the
same ε.

The summary ``goal`` (issue 14): at least 25× fewer bytes than the reference to reach within
1 pp of the reference's final accuracy, by a run whose final accuracy is within 1 pp of it,
at equal ε (aim: 100×); ``best`` names that run per strategy and ``held`` says whether the
goal held.

``--seeds 0 1 2`` runs every variant once per seed (``[simulation].seed``: model init, data
order, noise; the public mask seed stays) and adds ``across_seeds``: per run its per-seed
final accuracy, gap and reduction and their mean, and ``robust_best``: the largest
smallest-over-seeds reduction among runs within 1 pp of their reference on every seed.
``subspace.toml`` also holds async gossip runs (``async-*``, against ``async-dense``):
pairwise averages of a fixed mask's k values, request and reply. Async gossip has no rounds:
it is evaluated every ``ASYNC_EVAL_SECONDS`` virtual seconds, and its ``round_to_*`` fields
are the virtual time of that evaluation.

``--quick`` shortens every run (``--rounds``, default 40) for a smoke check; ``--jobs``
runs that many simulations in parallel processes (one torch thread each). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLE = ROOT / "examples" / "digits-compressed" / "compare.toml"
SUBSPACE = ROOT / "examples" / "digits-compressed" / "subspace.toml"


def _curve(rows: list[dict[str, Any]], collective: bool, timed: bool = False) -> list[tuple[float, float, float]]:
    """(round, mean accuracy over sites, all traffic so far) per evaluation: the nodes' sends,
    plus their downloads for a collective strategy (gossip: a send is another node's receipt).
    ``timed`` (async gossip, evaluated every ``eval_every`` virtual seconds): the evaluation's time
    instead of the round."""
    keys = ("bytes_sent", "bytes_received") if collective else ("bytes_sent",)
    by_round: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        by_round.setdefault(float(r["time"]) if timed else int(r["round"]), []).append(r)
    out = []
    for rnd in sorted(by_round):
        rs = by_round[rnd]
        acc = sum(float(r["accuracy"]) for r in rs) / len(rs)
        out.append((rnd, acc, float(sum(float(r.get(k, 0) or 0) for r in rs for k in keys))))
    return out


def _bytes_to(curve: list[tuple[float, float, float]], target: float) -> tuple[float | None, float | None]:
    for rnd, acc, b in curve:
        if acc >= target - 1e-12:
            return b, rnd
    return None, None


#: async gossip has no rounds: it is evaluated every this many virtual seconds (its curve's points)
ASYNC_EVAL_SECONDS = 2.0


def _one(args: tuple[str, str, int | None, int | None]) -> dict[str, Any]:
    """Run one labelled variant; returns its curve and summary (runs in a worker process)."""
    import logging

    logging.disable(logging.WARNING)
    from privfl.experiment import load_experiment, spec_for
    from privfl.sim import run_simulation
    from privfl.strategies.registry import STRATEGIES

    config, label, rounds, seed = args
    exp = load_experiment(config)
    spec = spec_for(exp, label, seed=seed)
    timed = spec.strategy == "async_gossip"
    if timed and spec.eval_every is None:
        spec.eval_every = ASYNC_EVAL_SECONDS
    if rounds:
        spec.stop.max_steps = None
        spec.stop.max_rounds = rounds
        spec.eval_every_rounds = max(1, rounds // 8)
    t0 = time.perf_counter()
    res = run_simulation(spec)
    s = res.summary
    msgs = sum(s.get("messages_sent", {}).values()) if isinstance(s.get("messages_sent"), dict) else None
    collective = STRATEGIES[spec.strategy].kind == "collective"
    total = float(sum(s["bytes_sent"].values()) + (sum(s["bytes_received"].values()) if collective else 0))
    return {
        "label": label,
        "seed": spec.seed,
        "strategy": spec.strategy,
        "mechanism": spec.dp.mechanism,
        "params": spec.strategy_params,
        "rounds": s["rounds"],
        "final_accuracy_mean": s["mean_accuracy"],
        "final_accuracy_min": min(s["final_accuracy"].values()),
        "epsilon_max": max(s["epsilon"].values()),
        "bytes_total": total,
        "messages": msgs,
        "consensus_max": s["final_consensus_max"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "curve": _curve(res.rows, collective, timed),
    }


GOAL_RATIO, AIM_RATIO, GOAL_GAP_PP = 25.0, 100.0, 1.0


def _goal(runs: list[dict[str, Any]], epsilon_equal: bool) -> dict[str, Any]:
    """The best bytes reduction to within 1 pp of the reference among runs ending within 1 pp, per strategy."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        red = r["reduction_to_within_1pp"]
        if _is_reference(r["label"]) or red is None or r["accuracy_gap_pp"] > GOAL_GAP_PP:
            continue
        if r["strategy"] not in best or red > best[r["strategy"]]["reduction_to_within_1pp"]:
            best[r["strategy"]] = {k: r[k] for k in ("label", "reduction_to_within_1pp", "reduction_to_dense_final",
                                                     "wire_reduction_per_message", "accuracy_gap_pp",
                                                     "final_accuracy_mean", "epsilon_max")}
    top = max((b["reduction_to_within_1pp"] for b in best.values()), default=None)
    return {
        "goal": f">= {GOAL_RATIO:g}x fewer bytes to within {GOAL_GAP_PP:g} pp of the dense run's final accuracy, "
                f"final accuracy within {GOAL_GAP_PP:g} pp, equal epsilon (aim {AIM_RATIO:g}x)",
        "best": best,
        "best_ratio": top,
        "held": bool(epsilon_equal and top is not None and top >= GOAL_RATIO),
        "aim_held": bool(epsilon_equal and top is not None and top >= AIM_RATIO),
    }


def _is_reference(label: str) -> bool:
    return label == "dense" or label.endswith("-dense")


def _analyse(results: list[dict[str, Any]], config: str) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """Each run against its strategy's dense reference of the same seed: (runs, references, epsilon_equal)."""
    reference = {r["strategy"]: r for r in results if _is_reference(r["label"])}
    runs = []
    for r in results:
        dense = reference.get(r["strategy"])
        if dense is None:
            raise SystemExit(f"{config}: run {r['label']!r} ({r['strategy']}) has no '{r['strategy']}-dense' "
                             "reference run")
        target = dense["final_accuracy_mean"]
        d_full, _ = _bytes_to(dense["curve"], target)
        d_1pp, _ = _bytes_to(dense["curve"], target - 0.01)
        b_full, r_full = _bytes_to(r["curve"], target)
        b_1pp, r_1pp = _bytes_to(r["curve"], target - 0.01)
        n_msgs = r["messages"]
        runs.append({
            **{k: v for k, v in r.items() if k != "curve"},
            "reference": dense["label"],
            "bytes_per_message": (r["bytes_total"] / n_msgs) if n_msgs else None,
            "wire_reduction_per_message": (dense["bytes_total"] / r["bytes_total"]) if r["bytes_total"] else None,
            "accuracy_gap_pp": round(100 * (target - r["final_accuracy_mean"]), 2),
            "bytes_to_dense_final": b_full,
            "round_to_dense_final": r_full,
            "reduction_to_dense_final": (d_full / b_full) if (b_full and d_full) else None,
            "bytes_to_within_1pp": b_1pp,
            "round_to_within_1pp": r_1pp,
            "reduction_to_within_1pp": (d_1pp / b_1pp) if (b_1pp and d_1pp) else None,
            "accuracy_curve": [(rnd, round(acc, 4)) for rnd, acc, _ in r["curve"]],
        })
    epsilon_equal = len({round(r["epsilon_max"], 9) for r in results}) == 1
    return runs, reference, epsilon_equal


def _across_seeds(per_seed: dict[int, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Per label: per-seed final accuracy, gap and reduction (on the seeds it ran on), their means; and the
    robust best run (run on every seed, within 1 pp on each)."""
    labels = list(dict.fromkeys(r["label"] for runs in per_seed.values() for r in runs))
    table: dict[str, Any] = {}
    for lab in labels:
        rows = {seed: r for seed, runs in per_seed.items() for r in runs if r["label"] == lab}  # seeds it ran on
        reds = [r["reduction_to_within_1pp"] for r in rows.values()]
        gaps = [r["accuracy_gap_pp"] for r in rows.values()]
        table[lab] = {
            "strategy": next(iter(rows.values()))["strategy"],
            "per_seed": {seed: {"final_accuracy_mean": r["final_accuracy_mean"],
                                "accuracy_gap_pp": r["accuracy_gap_pp"],
                                "reduction_to_within_1pp": r["reduction_to_within_1pp"],
                                "wire_reduction_per_message": r["wire_reduction_per_message"]}
                         for seed, r in rows.items()},
            "mean_final_accuracy": sum(r["final_accuracy_mean"] for r in rows.values()) / len(rows),
            "mean_gap_pp": round(sum(gaps) / len(gaps), 2),
            "min_reduction_to_within_1pp": None if any(x is None for x in reds) else min(reds),
            "within_1pp_every_seed": all(g <= GOAL_GAP_PP for g in gaps) and all(x is not None for x in reds),
            "all_seeds": len(rows) == len(per_seed),
        }
    robust = [(lab, t) for lab, t in table.items()
              if not _is_reference(lab) and t["all_seeds"] and t["within_1pp_every_seed"]]
    best = max(robust, key=lambda lt: lt[1]["min_reduction_to_within_1pp"], default=None)
    if best is None:
        return table, None
    return table, {"label": best[0], "min_reduction_to_within_1pp": best[1]["min_reduction_to_within_1pp"],
                   "mean_gap_pp": best[1]["mean_gap_pp"],
                   "held_every_seed": best[1]["min_reduction_to_within_1pp"] >= GOAL_RATIO}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help=f"default: {EXAMPLE.relative_to(ROOT)}")
    ap.add_argument("--subspace", action="store_true",
                    help=f"the subspace DP-SGD variants ({SUBSPACE.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true", help="short runs (--rounds) for a smoke check")
    ap.add_argument("--rounds", type=int, default=40, help="rounds per run with --quick")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", nargs="*", help="labels to run (the dense references are always run)")
    ap.add_argument("--seeds", nargs="*", type=int, default=None,
                    help="[simulation].seed values: every run once per seed (default: the config's seed)")
    ap.add_argument("--merge", nargs="*", help="earlier JSON outputs of this script whose runs to add (a run "
                                                "of a seed and label not already here)")
    ap.add_argument("--no-run", action="store_true", help="run nothing: only combine the --merge outputs")
    a = ap.parse_args()
    if a.config is None:
        a.config = str(SUBSPACE if a.subspace else EXAMPLE)
    elif a.subspace:
        raise SystemExit("give --config or --subspace, not both")

    from privfl.experiment import load_experiment

    exp = load_experiment(a.config)
    labels = exp.strategies
    refs = [x for x in labels if _is_reference(x)]
    if not refs:
        raise SystemExit(f"{a.config}: needs a run labelled 'dense' or '<strategy>-dense' (the reference)")
    if a.only:  # the chosen runs and the references of their strategies
        from privfl.experiment import spec_for

        chosen = [x for x in labels if x in a.only and x not in refs]
        used = {spec_for(exp, x).strategy for x in [*chosen, *[r for r in refs if r in a.only]]}
        labels = [*[r for r in refs if spec_for(exp, r).strategy in used], *chosen]
    rounds = a.rounds if a.quick else None
    t0 = time.perf_counter()
    seeds: list[int | None] = list(a.seeds) if a.seeds else [None]
    jobs = [] if a.no_run else [(a.config, lab, rounds, seed) for seed in seeds for lab in labels]
    if a.jobs > 1 and jobs:
        with ProcessPoolExecutor(a.jobs) as pool:
            results = list(pool.map(_one, jobs))
    else:
        results = [_one(j) for j in jobs]
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    analysed = {seed: _analyse(rs, a.config) for seed, rs in by_seed.items()}
    epsilons = {round(r["epsilon_max"], 9) for r in results}
    epsilon_equal = all(e for _, _, e in analysed.values())
    for earlier in a.merge or []:  # per-seed runs of earlier outputs of this script (same config)
        prev = json.loads(Path(earlier).read_text())
        for seed, rs in (prev.get("runs_per_seed") or {str(prev["seed"]): prev["runs"]}).items():
            have = analysed.get(int(seed), ([], {}, True))
            labels_had = {r["label"] for r in have[0]}
            new = [r for r in rs if r["label"] not in labels_had]  # a seed's runs are deterministic: one copy
            if new:
                merged = [*have[0], *new]
                analysed[int(seed)] = (merged, {r["strategy"]: r for r in merged if _is_reference(r["label"])},
                                       have[2] and bool(prev["epsilon_equal"]))
                epsilon_equal = epsilon_equal and bool(prev["epsilon_equal"])
                epsilons |= {round(r["epsilon_max"], 9) for r in new}
    if not analysed:
        raise SystemExit("nothing to report: give runs to make, or --merge earlier outputs")
    epsilon_equal = epsilon_equal and len(epsilons) == 1
    analysed = dict(sorted(analysed.items()))
    first = next(iter(analysed))
    runs, reference, _ = analysed[first]
    out = {
        "benchmark": "compression",
        "config": str(Path(a.config).resolve().relative_to(ROOT)) if str(a.config).startswith(str(ROOT)) else a.config,
        "quick": a.quick,
        "rounds": rounds or exp.common.stop.max_steps,
        "seed": first,
        "reference_final_accuracy": {s: r["final_accuracy_mean"] for s, r in reference.items()},
        "epsilon_equal": epsilon_equal,
        **_goal(runs, epsilon_equal),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    if len(analysed) > 1:
        out["runs_per_seed"] = {seed: rs for seed, (rs, _, _) in sorted(analysed.items())}
        table, robust = _across_seeds({seed: rs for seed, (rs, _, _) in analysed.items()})
        out["seeds"] = sorted(analysed)
        out["goal_per_seed"] = {seed: {k: v for k, v in _goal(rs, e).items() if k != "goal"}
                                for seed, (rs, _, e) in analysed.items()}
        out["across_seeds"] = table
        out["robust_best"] = robust
        out["held_every_seed"] = bool(epsilon_equal and robust is not None and robust["held_every_seed"])
    print(json.dumps(out, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))


if __name__ == "__main__":
    main()
