"""PNG plots of runs: test accuracy against virtual time, bytes sent and ε; ε over time; the answer view.

Each curve is one strategy: at every evaluation, the mean accuracy over nodes (on the
pooled test sets of every site: the researcher's view of a simulation), the total bytes
sent by all nodes so far, and the largest ε any node has spent. With several repeats
(seeds) a curve is the mean of the repeats' curves, each interpolated onto a common grid
over the x range every repeat covers, with a band: the 95 % Student-t interval of that
mean at each grid point. Every legend entry says how the strategy's nodes meet
(federated (server), decentralized (gossip), collective (all-reduce)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from privfl.answer import NOT_REACHED, curve, t_quantile  # noqa: E402  (curve: re-exported)

__all__ = ["ANSWER_PLOT", "AXES", "PLOTS", "curve", "mean_band", "plot_answer", "plot_runs"]

PLOTS = ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_epsilon.png", "epsilon_vs_time.png")
ANSWER_PLOT = "answer.png"

#: axis labels that say what is modelled and what is counted
AXES = {
    "time": "virtual time (s, modelled: compute speeds + link latency/bandwidth)",
    "bytes": "bytes on the wire, all nodes (counted: message sizes + headers; collective: up + down)",
    "epsilon": "ε spent (max over nodes, accountant)",
    "accuracy": "test accuracy (mean over nodes, pooled test sets)",
}
_NAMES = {"time": "virtual time", "bytes": "bytes", "epsilon": "ε"}
_MARKERS = {"federated (server)": "o", "decentralized (gossip)": "s", "collective (all-reduce)": "^"}


def mean_band(xy: Sequence[tuple[Sequence[float], Sequence[float]]], logx: bool = False, points: int = 200
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The mean of several curves on a common grid, and its 95 % t-interval (None with one curve).

    Each curve (xs, ys) keeps its finite points (x > 0 on a log axis), sorted by x, and is
    linearly interpolated onto ``points`` grid values spanning the x range every curve covers."""
    cleaned: list[tuple[np.ndarray, np.ndarray]] = []
    for xs, ys in xy:
        pts = sorted((x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y) and (not logx or x > 0))
        if pts:
            cleaned.append((np.array([p[0] for p in pts]), np.array([p[1] for p in pts])))
    if not cleaned:
        return np.zeros(0), np.zeros(0), None, None
    lo, hi = max(c[0][0] for c in cleaned), min(c[0][-1] for c in cleaned)
    if len(cleaned) == 1 or hi <= lo:
        x, y = cleaned[0] if len(cleaned) == 1 else max(cleaned, key=lambda c: len(c[0]))
        return x, y, None, None
    grid = np.geomspace(lo, hi, points) if logx else np.linspace(lo, hi, points)
    on_grid = np.stack([np.interp(grid, cx, cy) for cx, cy in cleaned])
    n = len(cleaned)
    mean = on_grid.mean(axis=0)
    half = t_quantile(n - 1) * on_grid.std(axis=0, ddof=1) / math.sqrt(n)  # as privfl.answer.t_interval, per point
    return grid, mean, mean - half, mean + half


def _legend(label: str, kinds: Mapping[str, str], no_dp: set[str], eps_axis: bool) -> str:
    text = label + (f" — {kinds[label]}" if kinds.get(label) else "")
    if label in no_dp:
        text += " (no DP: no ε)" if eps_axis else " (no DP)"
    return text


def plot_runs(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], out_dir: str | Path, title: str = "",
              no_dp: Iterable[str] = (), kinds: Mapping[str, str] | None = None, subtitle: str = "",
              collective: Iterable[str] = ()) -> list[Path]:
    """Write the four comparison plots for ``runs`` (label → each repeat's metric rows) into ``out_dir``.

    One repeat: the evaluations as points joined by lines. Several: the mean curve and its
    95 % t-interval band (:func:`mean_band`). Runs in ``no_dp`` trained without differential
    privacy: their legend says "no DP" and they have no ε to plot (never drawn as if ε were
    spent). ``kinds`` (label → federated / decentralized / collective) tags every legend entry;
    ``subtitle`` (δ, neighbouring relation, repeats) goes under the title; runs in ``collective``
    count their downloads in the bytes too (:func:`privfl.answer.curve`)."""
    without = set(no_dp)
    kinds = dict(kinds or {})
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    coll = set(collective)
    curves = {label: [curve(rows, collective=label in coll) for rows in reps] for label, reps in runs.items()}
    specs = [
        (PLOTS[0], "time", "accuracy", False),
        (PLOTS[1], "bytes", "accuracy", True),
        (PLOTS[2], "epsilon", "accuracy", False),
        (PLOTS[3], "time", "epsilon", False),
    ]
    paths = []
    for fname, xk, yk, logx in specs:
        fig, ax = plt.subplots(figsize=(7.6, 5.0), dpi=110)
        for label, cs in curves.items():
            kind = kinds.get(label, "")
            marker = _MARKERS.get(kind, "D")
            name = _legend(label, kinds, without, "epsilon" in (xk, yk))
            if label in without and "epsilon" in (xk, yk):
                ax.plot([], [], marker=marker, label=name)
                continue
            x, y, low, high = mean_band([(c[xk], c[yk]) for c in cs], logx=logx)
            if not len(x):
                continue
            if low is None or high is None:
                ax.plot(x, y, marker=marker, markersize=3, label=name)
            else:
                (line,) = ax.plot(x, y, label=f"{name}, mean of {len(cs)}")
                top = 1.0 if yk == "accuracy" else None  # the band drawn within the quantity's range
                ax.fill_between(x, np.clip(low, 0.0, top), np.clip(high, 0.0, top), color=line.get_color(),
                                alpha=0.2, linewidth=0)
                mid = len(x) // 2
                ax.plot([x[mid]], [y[mid]], marker=marker, color=line.get_color())
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(AXES[xk])
        ax.set_ylabel(AXES[yk])
        ax.grid(alpha=0.3)
        if title or subtitle:
            ax.set_title("\n".join(t for t in (title, subtitle) if t), fontsize=9)
        if curves:
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = d / fname
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


def _wrap(label: str) -> str:
    """An axis label on two lines at its parenthesis (the answer panels are narrow)."""
    return label.replace(" (", "\n(", 1)


def _err(s: Mapping[str, Any], low: float | None, high: float | None) -> list[list[float]] | None:
    """Matplotlib ``yerr`` of a stat's 95 % interval, drawn within [low, high] (the quantity's range)."""
    if s.get("ci95") is None:
        return None
    lo, hi = s["ci95"]
    lo = lo if low is None else max(lo, low)
    hi = hi if high is None else min(hi, high)
    return [[max(0.0, s["mean"] - lo)], [max(0.0, hi - s["mean"])]]


def plot_answer(view: Mapping[str, Any], out_dir: str | Path, kinds: Mapping[str, str] | None = None,
                title: str = "", subtitle: str = "", no_dp: Iterable[str] = ()) -> Path:
    """``answer.png``: virtual time, bytes and ε to reach each target accuracy, and the accuracy at the
    common ε, per strategy: the mean over repeats with its 95 % t-interval as an error bar.

    A strategy that never reached a target gets an ``×`` at the top of the panel marked
    "not reached" (never a bar at 0); one that reached it in only some repeats is drawn hollow,
    its mean over those repeats, with "k/N"."""
    kinds = dict(kinds or {})
    without = set(no_dp)
    labels = list(view["runs"])
    targets = list(view["targets"])
    fig, axes = plt.subplots(2, 2, figsize=(12.0, 8.4), dpi=110)
    panels = [(axes[0][0], "time", _wrap(AXES["time"]), False), (axes[0][1], "bytes", _wrap(AXES["bytes"]), True),
              (axes[1][0], "epsilon", _wrap(AXES["epsilon"]), False)]
    width = 0.8 / max(1, len(labels))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, key, ylabel, logy in panels:
        ax.set_title(f"{_NAMES[key]} to reach each target accuracy", fontsize=9)
        missing: list[tuple[float, str]] = []
        plotted: list[float] = []
        for j, lb in enumerate(labels):
            color = colors[j % len(colors)]
            marker = _MARKERS.get(kinds.get(lb, ""), "D")
            for k, row in enumerate(view["runs"][lb]["to_target"]):
                x = k + (j - (len(labels) - 1) / 2) * width
                s = row[key]
                if s is None:  # no DP: no ε
                    continue
                if s["mean"] is None:
                    missing.append((x, color))
                    continue
                err = _err(s, 0.0, None)
                plotted.append(s["mean"])
                partial = s["reached"] < s["of"]
                ax.errorbar([x], [s["mean"]], yerr=err, fmt=marker, color=color, capsize=3,
                            markerfacecolor="none" if partial else color)
                if partial:
                    ax.annotate(f"{s['reached']}/{s['of']}", (x, s["mean"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        if logy and plotted and min(plotted) > 0:
            ax.set_yscale("log")
        ax.set_xticks(range(len(targets)), [f"≥ {t:.2f}" for t in targets])
        ax.set_xlabel("target test accuracy (mean over nodes, pooled test sets)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if missing:
            top = ax.get_ylim()[1]
            for x, color in missing:
                ax.plot([x], [top], marker="x", color=color, markersize=8, clip_on=False)
                ax.annotate(NOT_REACHED, (x, top), fontsize=6, rotation=90, xytext=(0, -4), textcoords="offset points",
                            ha="center", va="top", color=color)
    ax = axes[1][1]
    common = view.get("common_epsilon")
    ax.set_title("accuracy at the common ε" + (f" = {common:.3g} (smallest final ε of all runs)"
                                               if common is not None else ": no DP run"), fontsize=9)
    for j, lb in enumerate(labels):
        color = colors[j % len(colors)]
        marker = _MARKERS.get(kinds.get(lb, ""), "D")
        s = view["runs"][lb]["at_common_epsilon"]
        if s is None or s["mean"] is None:
            ax.annotate("no DP" if lb in without or s is None else NOT_REACHED, (j, 0.5), fontsize=7, rotation=90,
                        xycoords=("data", "axes fraction"), ha="center", color=color)
            continue
        err = _err(s, 0.0, 1.0)
        ax.errorbar([j], [s["mean"]], yerr=err, fmt=marker, color=color, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7, ha="right")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel(_wrap(AXES["accuracy"]), fontsize=8)
    ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], linestyle="none", marker=_MARKERS.get(kinds.get(lb, ""), "D"),
                          color=colors[j % len(colors)], label=_legend(lb, kinds, without, False))
               for j, lb in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    head = "\n".join(t for t in (title, subtitle) if t)
    if head:
        fig.suptitle(head, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / ANSWER_PLOT
    fig.savefig(p)
    plt.close(fig)
    return p
