"""Repeats, intervals and the answer view of ``privfl compare``: what each strategy costs to reach an accuracy.

Everything here reads metric rows (one per node per evaluation, as ``metrics.csv`` holds
them) and the run summaries; nothing trains. The quantities are the researcher's view of a
simulation (accuracy on the pooled test sets of every site), never something a node releases.

* :func:`curve`: per evaluation, the virtual time, the mean accuracy over nodes, the bytes
  sent by all nodes so far and the largest ε any node has spent.
* :func:`stat`: the mean over repeats and a two-sided Student-t interval of that mean
  (``None`` with fewer than two repeats: one seed gives no interval, and none is made up).
* :func:`answer`: per strategy, the virtual time, bytes and ε at the first evaluation whose
  mean accuracy reaches each target ("not reached" when none does), and the accuracy at the
  *common ε*, the smallest final ε of all DP runs (the last evaluation whose ε is within it).
* :func:`strategy_kind`: federated (a server), decentralized (gossip) or collective (all-reduce),
  from the strategy registry's ``kind``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONFIDENCE", "EPS_TOLERANCE", "NOT_REACHED", "accuracy_at_epsilon", "answer", "answer_rows", "curve",
           "default_targets", "first_reach", "fmt_stat", "human_bytes", "stat", "strategy_kind", "t_interval",
           "t_quantile", "write_answer_csv"]

CONFIDENCE = 0.95
NOT_REACHED = "not reached"
#: a run's ε counts as within the common ε up to this relative slack (float noise of the accountant)
EPS_TOLERANCE = 1e-9
#: default targets: these fractions of the best mean final accuracy, floored to 0.01
TARGET_FRACTIONS = (0.9, 0.95, 0.99)

#: collective strategies with a server that aggregates (the federated baseline)
_SERVER = frozenset({"fedavg"})


def strategy_kind(strategy: str) -> str:
    """How the nodes of ``strategy`` meet, for legends and tables.

    ``node`` strategies of the registry (one instance per node, exchanging with peers) are
    "decentralized (gossip)"; ``collective`` ones are "federated (server)" when a server
    aggregates (``fedavg``: Flower's FedAvg) and "collective (all-reduce)" otherwise
    (allreduce, periodic, adaptive_period average all nodes' models, with no server holding them).
    """
    from privfl.strategies.registry import STRATEGIES

    entry = STRATEGIES.get(strategy)
    if entry is None:
        return "unknown"
    if entry.kind == "node":
        return "decentralized (gossip)"
    return "federated (server)" if strategy in _SERVER else "collective (all-reduce)"


# ---- per-evaluation curves -------------------------------------------------------------------
def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def curve(rows: Sequence[Mapping[str, Any]], collective: bool = False) -> dict[str, list[float]]:
    """Per evaluation (rows with the same time and round): time, mean accuracy, bytes so far, max ε.

    Bytes are all the traffic so far: the nodes' ``bytes_sent`` summed (gossip: every message
    is one node's send and another's receipt), plus their ``bytes_received`` for a
    ``collective`` run (what the server or the all-reduce sends back is no node's send).
    A node listed twice in one evaluation counts once (its last row): the mean and the byte
    total are over nodes, not over rows. ε is ``nan`` where no node reports one (no DP)."""
    by_eval: dict[tuple[float, int], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        key = (float(r["time"]), int(float(r.get("round", 0) or 0)))
        by_eval.setdefault(key, {})[str(r.get("node", len(by_eval.get(key, {}))))] = r
    out: dict[str, list[float]] = {"time": [], "accuracy": [], "bytes": [], "epsilon": []}
    for key in sorted(by_eval):
        group = list(by_eval[key].values())
        eps = [e for e in (_num(r.get("epsilon")) for r in group) if math.isfinite(e) and e >= 0]
        out["time"].append(key[0])
        out["accuracy"].append(sum(float(r["accuracy"]) for r in group) / len(group))
        keys = ("bytes_sent", "bytes_received") if collective else ("bytes_sent",)
        out["bytes"].append(float(sum(_num(r.get(k, 0) or 0) for r in group for k in keys)))
        out["epsilon"].append(max(eps) if eps else math.nan)
    return out


def first_reach(c: Mapping[str, Sequence[float]], target: float) -> dict[str, float] | None:
    """Time, bytes, ε and accuracy at the first evaluation whose mean accuracy is ≥ ``target``; None if none."""
    for i, acc in enumerate(c["accuracy"]):
        if acc >= target:
            return {"time": c["time"][i], "bytes": c["bytes"][i], "epsilon": c["epsilon"][i], "accuracy": acc}
    return None


def accuracy_at_epsilon(c: Mapping[str, Sequence[float]], epsilon: float) -> float | None:
    """Mean accuracy at the last evaluation whose ε is within ``epsilon`` (the model that budget buys);
    None when no evaluation reports an ε within it."""
    found = None
    for acc, eps in zip(c["accuracy"], c["epsilon"]):
        if math.isfinite(eps) and eps <= epsilon * (1 + EPS_TOLERANCE):
            found = acc
    return found


# ---- statistics over repeats -----------------------------------------------------------------
def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Student-t interval of the mean of ``values``: mean ± t_{(1+c)/2, n-1} · s / √n.

    None for fewer than two values (no spread to estimate)."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    h = t_quantile(n - 1, confidence) * s / math.sqrt(n)
    return m - h, m + h


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value t_{(1+c)/2, dof} (12.71 for one degree of freedom at 95 %)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf((1 + confidence) / 2, dof))


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, 95 % t-interval and per-seed values of one figure over the repeats.

    ``None`` entries (a seed that never reached a target) stay in ``per_seed`` as None and are
    left out of the mean; ``reached`` counts the others. No value at all: mean None."""
    got = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    ci = t_interval(got)
    return {"mean": sum(got) / len(got) if got else None, "ci95": list(ci) if ci is not None else None,
            "reached": len(got), "of": len(values),
            "per_seed": [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]}


def _g(x: float, digits: int) -> str:
    if abs(x) >= 1e5:
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def human_bytes(x: float) -> str:
    """``x`` bytes in SI units, three significant digits: 307 kB, 1.50 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(x) < 999.5:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.3g} {unit}"
        x /= 1000
    return f"{x:.3g} TB"


def fmt_stat(s: Mapping[str, Any] | None, digits: int = 3, fmt: Callable[[float], str] | None = None) -> str:
    """``mean [lo, hi]`` (no interval with one repeat); "not reached" / "k/N reached" as such, never 0.

    ``fmt`` formats one number (default: ``digits`` decimals)."""
    if s is None:
        return "–"
    if s.get("mean") is None:
        return NOT_REACHED
    show = fmt or (lambda v: _g(v, digits))
    text = show(s["mean"])
    if s.get("ci95") is not None:
        lo, hi = s["ci95"]
        text += f" [{show(lo)}, {show(hi)}]"
    if s.get("reached", 0) < s.get("of", 0):
        text += f" ({s['reached']}/{s['of']} reached)"
    return text


# ---- the answer view ---------------------------------------------------------------------------
def default_targets(best_final_accuracy: float) -> list[float]:
    """:data:`TARGET_FRACTIONS` of the best mean final accuracy, floored to 0.01, distinct, ascending."""
    if not math.isfinite(best_final_accuracy) or best_final_accuracy <= 0:
        return []
    return sorted({math.floor(f * best_final_accuracy * 100 + 1e-9) / 100 for f in TARGET_FRACTIONS})


def answer(curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]], dp: Mapping[str, bool],
           targets: Sequence[float] | None = None) -> dict[str, Any]:
    """The answer view for ``curves`` (label → one :func:`curve` per repeat) and ``dp`` (label → trained with DP).

    Returns ``{"targets", "targets_from", "common_epsilon", "runs": {label: {"to_target":
    [{"target", "time", "bytes", "epsilon"}, ...], "at_common_epsilon": stat | None}}}``; each
    time/bytes/ε is a :func:`stat` over repeats whose per-seed None means that seed never
    reached the target. The common ε is the smallest final ε over every DP run and repeat;
    runs without DP have no accuracy at it (None)."""
    finals = {lb: [c["accuracy"][-1] for c in cs if c["accuracy"]] for lb, cs in curves.items()}
    means = [sum(v) / len(v) for v in finals.values() if v]
    best = max(means) if means else math.nan
    targets_from = "[compare].targets"
    if targets is None or not len(targets):
        fractions = ", ".join(str(f) for f in TARGET_FRACTIONS)
        targets = default_targets(best)
        targets_from = f"{fractions} × the best mean final accuracy ({best:.3f}), floored to 0.01"
    final_eps = [c["epsilon"][-1] for lb, cs in curves.items() if dp.get(lb, True) for c in cs
                 if c["epsilon"] and math.isfinite(c["epsilon"][-1])]
    common = min(final_eps) if final_eps else None
    runs: dict[str, Any] = {}
    for lb, cs in curves.items():
        rows = []
        for tg in targets:
            hits = [first_reach(c, tg) for c in cs]
            rows.append({"target": float(tg), **{k: stat([None if h is None else h[k] for h in hits])
                                                  for k in ("time", "bytes", "epsilon")}})
            if not dp.get(lb, True):
                rows[-1]["epsilon"] = None  # no DP: no ε to speak of
        at = None
        if common is not None and dp.get(lb, True):
            at = stat([accuracy_at_epsilon(c, common) for c in cs])
        runs[lb] = {"to_target": rows, "at_common_epsilon": at}
    return {"targets": [float(t) for t in targets], "targets_from": targets_from, "common_epsilon": common,
            "best_final_accuracy": best if math.isfinite(best) else None, "runs": runs}


_CSV_FIELDS = ("strategy", "kind", "privacy", "delta", "question", "target", "quantity", "mean", "ci95_low",
               "ci95_high", "reached", "repeats", "per_seed")


def _cells(s: Mapping[str, Any] | None) -> dict[str, Any]:
    if s is None:
        return {"mean": "no DP", "ci95_low": "", "ci95_high": "", "reached": "", "per_seed": ""}
    lo, hi = s["ci95"] if s.get("ci95") is not None else ("", "")
    per = ";".join(NOT_REACHED if v is None else repr(v) for v in s["per_seed"])
    return {"mean": NOT_REACHED if s["mean"] is None else s["mean"], "ci95_low": lo, "ci95_high": hi,
            "reached": f"{s['reached']}/{s['of']}", "per_seed": per}


def answer_rows(view: Mapping[str, Any], meta: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows of the answer view (one per strategy, question and quantity) for ``answer.csv``;
    ``meta`` gives each label's ``kind``, ``privacy`` and ``delta``."""
    out = []
    for lb, r in view["runs"].items():
        m = meta.get(lb, {})
        head = {"strategy": lb, "kind": m.get("kind", ""), "privacy": m.get("privacy", ""),
                "delta": m.get("delta", ""), "repeats": len(r["to_target"][0]["time"]["per_seed"])
                if r["to_target"] else ""}
        for row in r["to_target"]:
            for q, name in (("time", "virtual_time_s"), ("bytes", "bytes_total"), ("epsilon", "epsilon")):
                out.append({**head, "question": "to reach accuracy", "target": row["target"], "quantity": name,
                            **_cells(row[q])})
        if view.get("common_epsilon") is not None:
            out.append({**head, "question": "accuracy at common epsilon", "target": view["common_epsilon"],
                        "quantity": "accuracy_mean", **_cells(r["at_common_epsilon"])})
    return out


def write_answer_csv(view: Mapping[str, Any], meta: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Write :func:`answer_rows` to ``path`` ("not reached" in the mean column, never 0)."""
    p = Path(path)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_CSV_FIELDS))
        w.writeheader()
        for row in answer_rows(view, meta):
            w.writerow(row)
    return p
