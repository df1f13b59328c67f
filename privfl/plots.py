"""PNG plots of runs: test accuracy against virtual time, bytes sent and ε; ε over time.

Each curve is one strategy: at every evaluation, the mean accuracy over nodes, the
total bytes sent by all nodes so far, and the largest ε any node has spent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_epsilon.png", "epsilon_vs_time.png")


def curve(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per evaluation: time, mean accuracy, total bytes sent, max ε over nodes."""
    by_eval: dict[tuple[float, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_eval[(float(r["time"]), int(r.get("round", 0) or 0))].append(r)
    out: dict[str, list[float]] = {"time": [], "accuracy": [], "bytes": [], "epsilon": []}
    for key in sorted(by_eval):
        group = by_eval[key]
        eps = [float(r["epsilon"]) for r in group if r.get("epsilon") not in (None, "")]
        eps = [e for e in eps if math.isfinite(e) and e >= 0]
        out["time"].append(key[0])
        out["accuracy"].append(sum(float(r["accuracy"]) for r in group) / len(group))
        out["bytes"].append(float(sum(float(r.get("bytes_sent", 0) or 0) for r in group)))
        out["epsilon"].append(max(eps) if eps else float("nan"))
    return out


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str = "",
              no_dp: Iterable[str] = ()) -> list[Path]:
    """Write the four comparison plots for ``runs`` (label → metric rows) into ``out_dir``.

    Runs in ``no_dp`` trained without differential privacy: their legend says "no DP" and
    they have no ε to plot (never drawn as if ε were spent)."""
    without = set(no_dp)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    curves = {label: curve(rows) for label, rows in runs.items()}
    specs = [
        (PLOTS[0], "time", "accuracy", "virtual time (s)", "test accuracy (mean over nodes)", False),
        (PLOTS[1], "bytes", "accuracy", "bytes sent (all nodes)", "test accuracy (mean over nodes)", True),
        (PLOTS[2], "epsilon", "accuracy", "ε spent (max over nodes)", "test accuracy (mean over nodes)", False),
        (PLOTS[3], "time", "epsilon", "virtual time (s)", "ε spent (max over nodes)", False),
    ]
    paths = []
    for fname, xk, yk, xl, yl, logx in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for label, c in curves.items():
            xs, ys = c[xk], c[yk]
            pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y) and (not logx or x > 0)]
            if label in without and "epsilon" in (xk, yk):
                ax.plot([], [], marker=".", label=f"{label} (no DP: no ε)")
            elif pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                        label=f"{label} (no DP)" if label in without else label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title)
        if curves:
            ax.legend()
        fig.tight_layout()
        p = d / fname
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths
