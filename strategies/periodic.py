"""All-reduce strategies: synchronous DP-SGD, periodic averaging and adaptive-period averaging.

Every node trains locally from its current model, then all models are averaged with an
all-reduce (a uniform mean: every node counts once, as in CPSGD / Local SGD) and every
node continues from the average. One :meth:`run_round` is one synchronization.

* :class:`PeriodicAveraging` — constant period ``p`` local steps between syncs (CPSGD).
* :class:`AllReduce` — synchronous all-reduce DP-SGD: ``p = 1``, every step waits for the
  slowest node. Averaging the models after one SGD step from a common model ``x`` gives
  ``x − γ·mean_i(g_i)``, i.e. the average of the nodes' noised gradients, as long as the
  optimizer has no momentum (momentum buffers stay per node and break that equality).
* :class:`AdaptivePeriod` — adaptive periodic averaging (Jiang & Agrawal, arXiv
  2007.06134; the rule of ``research/communication-algorithms.md`` §1.3, derived, not
  quoted): keep ``V_k / p_k`` near the ratio ``r*`` calibrated over the warm-up syncs,
  where ``V_k = (1/N) Σ_i ‖x_i − x̄‖²`` is measured just before the k-th averaging.
  Not to be confused with :class:`~strategies.gossip.AsyncGossip` (AD-PSGD).

Privacy: averaging is post-processing of models each node trained with record-level
DP-SGD, so it costs nothing; a node's ε is the composition of its own local steps.

Iterate averaging (``ema_decay``, default off): each node keeps an exponential moving average of
its model after every sync (:class:`~strategies.iterate_average.IterateAverage`, post-processing,
no ε). The round's returned ``params`` (what the simulator evaluates and ends with) are then the
EMAs; the strategy keeps each node's training iterate and, when a node's next ``params`` are the
EMA it returned, trains from the kept iterate (other ``params``, e.g. a resumed model, are trained
from as given, and restart that node's average). Nothing is sent anywhere but the training iterate.

Byte convention (``bytes_convention``):

* ``"model"`` (default): per node per sync, ``bytes_up = bytes_down = model bytes`` — the
  logical cost of "send my model, receive the average", the same unit as FedAvg, so the
  two compare directly.
* ``"ring"``: what a ring all-reduce actually moves: each node sends and receives
  ``2·(N−1)/N`` × model bytes (reduce-scatter then all-gather), ~2× the model for large N.

``bytes_up`` is what the node sends (the simulator's ``bytes_sent``), ``bytes_down`` what
it receives (``bytes_received``). A node whose training was refused this sync (its budget
spent before a step) still takes the average: it sends nothing and receives model bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from flwr.client import NumPyClient

from privfl.accounting import BudgetExhausted
from privfl.accounting.errors import ConfigError
from privfl.strategies.base import CollectiveRound, CollectiveStrategy, Params
from privfl.strategies.iterate_average import IterateAverage, ema_decay_setting

__all__ = [
    "AdaptivePeriod",
    "AllReduce",
    "PeriodicAveraging",
    "average_models",
    "model_variance",
]

log = logging.getLogger("privfl.strategies.periodic")

BytesConvention = Literal["model", "ring"]


def average_models(models: list[Params]) -> Params:
    """Uniform mean of ``models`` (same shapes), summed in float64 in the given order, cast back."""
    if not models:
        raise ValueError("no models to average")
    out = []
    for arrays in zip(*models):
        acc = np.zeros(np.shape(arrays[0]), dtype=np.float64)
        for a in arrays:
            acc += np.asarray(a, dtype=np.float64)
        out.append((acc / len(arrays)).astype(np.asarray(arrays[0]).dtype))
    return out


def model_variance(models: list[Params]) -> float:
    """V = (1/N) Σ_i ‖x_i − x̄‖² over all arrays (the consensus distance Jiang & Agrawal track)."""
    if len(models) < 2:
        return 0.0
    total = 0.0
    for arrays in zip(*models):
        stack = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
        total += float(((stack - stack.mean(axis=0)) ** 2).sum())
    return total / len(models)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PeriodicAveraging(CollectiveStrategy):
    """Constant-period parameter averaging (CPSGD / Local SGD) over an all-reduce."""

    def __init__(self, period: int = 8, *, bytes_convention: BytesConvention = "model",
                 total_steps: int | None = None, ema_decay: float | None = None) -> None:
        self.period = _positive_int("periodic.period", period)
        if bytes_convention not in ("model", "ring"):
            raise ConfigError(f"periodic.bytes_convention must be 'model' or 'ring', got {bytes_convention!r}")
        self.bytes_convention: BytesConvention = bytes_convention
        self.total_steps = None if total_steps is None else _positive_int("periodic.total_steps", total_steps)
        self.stopped: set[str] = set()
        self.syncs = 0
        self.steps_done = 0
        self.history: list[dict[str, float]] = []
        self.ema_decay = ema_decay_setting({"ema_decay": ema_decay})
        self._ema: dict[str, IterateAverage] = {}
        self._iterate: dict[str, Params] = {}  # ema_decay: each node's training iterate
        self._given: dict[str, Params] = {}  # ema_decay: the EMA returned for each node

    def _start(self, node: str, given: Params) -> Params:
        """The model ``node`` trains from: its kept training iterate when ``given`` is the EMA this strategy
        returned for it (``ema_decay``), else ``given`` (that node's average then starts again)."""
        mine = self._given.get(node)
        if mine is not None and len(mine) == len(given) and all(
                np.array_equal(a, np.asarray(b)) for a, b in zip(mine, given)):
            return self._iterate[node]
        self._ema.pop(node, None)
        self._iterate.pop(node, None)
        return [np.asarray(a) for a in given]

    def _views(self, out: dict[str, Params], changed: bool) -> dict[str, Params]:
        """``ema_decay``: keep ``out`` as the training iterates, fold them into the EMAs (when the sync
        changed them) and return the EMAs in their place."""
        views: dict[str, Params] = {}
        for n, model in out.items():
            known = n in self._iterate
            self._iterate[n] = model
            avg = self._ema.get(n)
            if avg is None:
                avg = self._ema[n] = IterateAverage(self.ema_decay)  # type: ignore[arg-type]
            if changed or not known:
                avg.update(model)
            view = avg.view()
            assert view is not None
            self._given[n] = view
            views[n] = [a.copy() for a in view]
        return views

    # ---- hooks for subclasses -------------------------------------------------------
    def next_period(self) -> int:
        """Local steps before the next sync; 0 when the schedule is finished."""
        if self.total_steps is not None:
            return max(0, min(self.period, self.total_steps - self.steps_done))
        return self.period

    def after_sync(self, variance: float, period: int) -> dict[str, float]:
        """Record one sync; returns extra metrics for every node."""
        self.syncs += 1
        self.steps_done += period
        rec = {"sync": float(self.syncs), "period": float(period), "variance": variance}
        self.history.append(rec)
        return {"period": period, "variance": variance}

    def finished_reason(self) -> str:
        return f"schedule finished: {self.steps_done} of total_steps={self.total_steps} steps done"

    # ---- one sync -----------------------------------------------------------------
    def _bytes(self, model_bytes: int, n: int) -> int:
        if self.bytes_convention == "ring":
            return int(math.ceil(2 * (n - 1) / n * model_bytes)) if n > 1 else 0
        return model_bytes

    def run_round(self, clients: Mapping[str, NumPyClient], params: Mapping[str, Params],
                  round: int) -> CollectiveRound:
        """``period`` local steps on every active node, then one all-reduce average."""
        nodes = sorted(clients)
        missing = [n for n in nodes if n not in params]
        if missing:
            raise ConfigError(f"periodic: no starting parameters for node(s) {', '.join(missing)}")
        metrics: dict[str, dict[str, Any]] = {n: {} for n in nodes}
        local_steps = {n: 0 for n in nodes}
        bytes_up = {n: 0 for n in nodes}
        bytes_down = {n: 0 for n in nodes}
        newly_stopped: set[str] = set()
        active = [n for n in nodes if n not in self.stopped]
        period = self.next_period()
        if period <= 0:
            for n in active:
                self._stop(n, self.finished_reason(), metrics, newly_stopped)
            active = []

        start = {n: (self._start(n, params[n]) if self.ema_decay is not None else params[n]) for n in nodes}
        trained: dict[str, Params] = {}
        for n in active:
            try:
                new, _, m = clients[n].fit([np.asarray(a) for a in start[n]],
                                           {"local_steps": period, "server_round": int(round)})
            except BudgetExhausted as exc:
                self._stop(n, f"budget exhausted: {exc}", metrics, newly_stopped)
                continue
            trained[n] = [np.asarray(a) for a in new]
            metrics[n].update(m)
            local_steps[n] = int(m.get("steps", period))
            if int(m.get("budget_exhausted", 0)):
                self._stop(n, "budget exhausted after this sync's last allowed steps", metrics, newly_stopped)

        out = {n: [np.array(a, copy=True) for a in start[n]] for n in nodes}
        if trained:
            models = [trained[n] for n in sorted(trained)]
            variance = model_variance(models)
            avg = average_models(models)
            extra = self.after_sync(variance, period)
            model_bytes = int(sum(a.nbytes for a in avg))
            nbytes = self._bytes(model_bytes, len(models))
            for n in nodes:
                out[n] = [a.copy() for a in avg]
                metrics[n].update(extra)
                # a node that trained sends its share and receives the average; one stopped
                # before training this sync sends nothing and receives the finished average
                bytes_up[n] = nbytes if n in trained else 0
                bytes_down[n] = nbytes if n in trained else model_bytes
            log.info("%s sync %d (round %d): %d nodes, period %d, V=%.3g",
                     type(self).__name__, self.syncs, round, len(models), period, variance)
        if self.ema_decay is not None:
            out = self._views(out, bool(trained))
        return CollectiveRound(params=out, local_steps=local_steps, bytes_up=bytes_up,
                               bytes_down=bytes_down, metrics=metrics, stopped=newly_stopped)

    def _stop(self, node: str, reason: str, metrics: dict[str, dict[str, Any]], newly: set[str]) -> None:
        self.stopped.add(node)
        newly.add(node)
        metrics[node]["stop_reason"] = reason
        log.info("node %s stopped: %s", node, reason)


class AllReduce(PeriodicAveraging):
    """Synchronous all-reduce DP-SGD: one local step per sync (period 1).

    With a momentum-free optimizer, averaging the models after one step from a common
    model equals averaging the nodes' noised gradients.
    """

    def __init__(self, *, bytes_convention: BytesConvention = "model", total_steps: int | None = None,
                 ema_decay: float | None = None) -> None:
        super().__init__(1, bytes_convention=bytes_convention, total_steps=total_steps, ema_decay=ema_decay)


class AdaptivePeriod(PeriodicAveraging):
    """Adaptive periodic averaging (Jiang & Agrawal): sync often while models diverge fast.

    Between two syncs ``V`` grows roughly with the number of local steps, and the
    consensus term of the Local-SGD bound is minimized for a fixed number of syncs when
    ``V_k / p_k`` is constant (derived in communication-algorithms.md §1.3). So:

    1. The first ``warmup_syncs`` syncs run at ``p_init`` and calibrate
       ``r* = Σ V_k / Σ p_k``.
    2. After that, with ``r_k = V_k / p_k``: if ``r_k < r*/grow_factor`` the period grows
       (×grow_factor, at most ``p_max``); if ``r_k > r*·grow_factor`` it shrinks
       (÷grow_factor, at least 1).
    3. With ``budget`` (number of syncs) and ``total_steps`` set, each period is at least
       ``ceil(remaining steps / remaining syncs)`` (this floor may exceed ``p_max``), so
       the ``total_steps`` finish within ``budget`` syncs; with ``budget`` alone, the
       schedule ends after ``budget`` syncs. When the schedule is finished, a round
       stops every node with a reason and trains nothing.

    Metrics per node and sync: ``variance`` (V_k), ``period`` (p_k), ``ratio`` (r_k),
    ``r_star`` (NaN during warm-up) and ``next_period``.
    """

    def __init__(self, p_init: int = 1, warmup_syncs: int = 5, p_max: int = 64, grow_factor: float = 2.0,
                 budget: int | None = None, *, total_steps: int | None = None,
                 bytes_convention: BytesConvention = "model", ema_decay: float | None = None) -> None:
        p_init = _positive_int("adaptive_period.p_init", p_init)
        super().__init__(p_init, bytes_convention=bytes_convention, total_steps=total_steps, ema_decay=ema_decay)
        self.p_init = p_init
        self.warmup_syncs = _positive_int("adaptive_period.warmup_syncs", warmup_syncs)
        self.p_max = _positive_int("adaptive_period.p_max", p_max)
        if self.p_max < p_init:
            raise ConfigError(f"adaptive_period.p_max={p_max} is smaller than adaptive_period.p_init={p_init}")
        if isinstance(grow_factor, bool) or not isinstance(grow_factor, (int, float)) or not grow_factor > 1:
            raise ConfigError(f"adaptive_period.grow_factor must be a number > 1, got {grow_factor!r}")
        self.grow_factor = float(grow_factor)
        self.budget = None if budget is None else _positive_int("adaptive_period.budget", budget)
        self._warm_v = 0.0
        self._warm_p = 0
        self.r_star: float | None = None

    def next_period(self) -> int:
        if self.budget is not None and self.syncs >= self.budget:
            return 0
        p = self.period
        if self.total_steps is not None:
            remaining = self.total_steps - self.steps_done
            if remaining <= 0:
                return 0
            if self.budget is not None:
                p = max(p, math.ceil(remaining / (self.budget - self.syncs)))
            p = min(p, remaining)
        return p

    def finished_reason(self) -> str:
        if self.budget is not None and self.syncs >= self.budget:
            return f"sync budget reached: {self.syncs} of budget={self.budget} syncs done"
        return super().finished_reason()

    def _grown(self, p: int) -> int:
        return min(self.p_max, max(p + 1, int(round(p * self.grow_factor))))

    def _shrunk(self, p: int) -> int:
        return max(1, min(p - 1, int(round(p / self.grow_factor))))

    def after_sync(self, variance: float, period: int) -> dict[str, float]:
        base = super().after_sync(variance, period)
        ratio = variance / period
        if self.r_star is None:
            self._warm_v += variance
            self._warm_p += period
            if self.syncs >= self.warmup_syncs:
                self.r_star = self._warm_v / self._warm_p
                log.info("adaptive period: r* = %.4g calibrated over %d warm-up syncs", self.r_star, self.syncs)
            new = self.period
        else:
            g, r_star = self.grow_factor, self.r_star
            if ratio < r_star / g or (r_star == 0.0 and ratio == 0.0):
                new = self._grown(period)
            elif ratio > r_star * g:
                new = self._shrunk(period)
            else:
                new = period
        if new != period:
            log.info("adaptive period: sync %d r=%.4g r*=%.4g, period %d -> %d",
                     self.syncs, ratio, self.r_star if self.r_star is not None else float("nan"), period, new)
        self.period = new
        self.history[-1].update({"ratio": ratio, "next_period": float(new),
                                 "r_star": self.r_star if self.r_star is not None else float("nan")})
        return {**base, "ratio": ratio, "next_period": new,
                "r_star": self.r_star if self.r_star is not None else float("nan")}
