"""Discrete-event engine: runs real strategies and real clients on virtual clocks.

Three drivers, one per strategy family:

* asynchronous :class:`~strategies.base.NodeStrategy` (``AsyncGossip``): a heap of
  (time the node's local compute ends, node index); the earliest pops, its ``step()``
  runs (training + exchange, the exchange advancing its clock by the round trip), and it
  is pushed back ``local_steps × step_cost / speed`` later — or at once, with no compute
  charged, when the strategy's ``begin_compute`` says a step beginning then will not train
  (a training deadline; that ``step()`` stops the node). Ties go to the lower index.
  A step's training is applied at the end of its virtual compute, the moment its
  exchange happens. A strategy that ``overlaps_communication`` (``overlap``: AD-PSGD's
  communication thread) runs the next compute beside the exchanges: its next step is
  due at max(t + compute, t + exchanges), as a node with a communication thread spends
  (the engine joins the exchanges with ``settle()`` right after the step).
* round-synchronous ``NodeStrategy`` (``SyncGossip``): every node's ``begin_round``
  (compute, then sends), then every node's ``receive`` + ``finish_round``, then a barrier:
  the round ends at the latest node's clock.
* :class:`~strategies.base.CollectiveStrategy`: ``run_round`` per round; the round takes
  the max over nodes of compute + transfer of ``bytes_up`` and ``bytes_down`` over that
  node's link.

Models are evaluated every ``eval_every`` virtual seconds (round drivers: after the round
that crosses the mark, or every ``eval_every_rounds`` rounds), and once at the end: every
driver writes one row per (evaluation, node), the final evaluation included — when the
last periodic evaluation already is of the final models (the last round crossed a mark)
it is the final one and is not written again, and when nodes changed their models after
an evaluation at the very end time (asynchronous events at that instant) the final
evaluation replaces it. So a sum over a CSV's rows, or over one evaluation's rows, counts
each node once. No model history is kept:
only the models of the last evaluation (:attr:`Engine.final_models`), which
:func:`write_results` saves under the model's own ``state_dict`` names, one file a node.

Byte columns of a metric row (``bytes_sent``, ``bytes_received``; summary.json's
``bytes_sent``/``bytes_received``/``messages_sent`` are their final values): cumulative
wire bytes of that node since the start, each message counted as its payload
(``ModelMessage.nbytes``, or a collective strategy's ``bytes_up``/``bytes_down``) plus the
link's ``header_bytes``. They mean the same for every strategy:

* ``bytes_sent`` — what the node put on the wire: gossip, every exchange request, reply
  and one-way message it sent to a peer; collective, its uploads (its model or update to
  the FedAvg server, its share of the all-reduce).
* ``bytes_received`` — what reached the node: gossip, every message a peer sent it (so,
  summed over nodes, ``bytes_sent`` equals ``bytes_received``); collective, its downloads
  (the global model, the average, FedAvg's evaluation model when evaluation is on).
* ``messages_sent`` — messages the node sent (collective: its uploads).

For a collective round the server's side is not a node and has no row: a FedAvg server's
sends are the nodes' ``bytes_received``, its receipts their ``bytes_sent``; the traffic of
a collective run is Σ ``bytes_sent`` + Σ ``bytes_received``, of a gossip run Σ
``bytes_sent`` (= Σ ``bytes_received``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import heapq
import importlib.util
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient

from privfl.sim.network import SimWorld
from privfl.sim.profiles import StepTimes
from privfl.strategies.base import CollectiveStrategy, NodeStrategy, Params

__all__ = ["Engine", "SimulationResult", "StopCriteria", "consensus_distance", "save_state_dict",
           "state_dict_files", "write_results"]

log = logging.getLogger("privfl.sim")

Evaluate = Callable[[Params], tuple[float, float]]

METRIC_FIELDS = ("time", "round", "node", "steps", "loss", "accuracy", "epsilon", "bytes_sent",
                 "bytes_received", "consensus_max", "consensus_rms", "stopped")


@dataclass
class StopCriteria:
    """When a simulation ends: the first limit reached (at least one must be set)."""

    max_time: float | None = None
    max_steps: int | None = None
    max_rounds: int | None = None
    target_accuracy: float | None = None


@dataclass
class SimulationResult:
    """Metric rows (one per node per evaluation) and a summary of the run."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    node_ids: list[str] = field(default_factory=list)
    #: each node's model at the last evaluation (the one its final accuracy is of), in ``param_names`` order
    models: dict[str, Params] = field(default_factory=dict)
    #: the model's ``state_dict()`` keys: what ``load_state_dict`` expects
    param_names: list[str] = field(default_factory=list)
    #: each node's fitted :class:`privfl.preprocessing.Preprocessing` (applied to its own records)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def final(self) -> list[dict[str, Any]]:
        """The last evaluation's rows, one per node."""
        return self.rows[-len(self.node_ids):] if self.rows and self.node_ids else []


def state_dict_files(stem: str) -> tuple[str, ...]:
    """The file names :func:`save_state_dict` may write for ``stem`` (and its temporary names)."""
    return tuple(f"{stem}{ext}{tmp}" for ext in (".pt", ".safetensors") for tmp in ("", ".tmp"))


def save_state_dict(names: Sequence[str], params: Sequence[np.ndarray], stem: str | Path) -> Path:
    """Write ``params`` under ``names`` (a model's ``state_dict()`` keys) so the user loads it with
    ``model.load_state_dict(...)``: ``<stem>.safetensors`` when safetensors is installed, else
    ``<stem>.pt`` (a plain ``torch.save`` of a dict of tensors, ``torch.load(..., weights_only=True)``).
    Written atomically (a temporary file, then ``os.replace``); returns the path."""
    if len(names) != len(params):
        raise ValueError(f"{len(names)} names for {len(params)} arrays")
    tensors = {str(n): torch.from_numpy(np.array(p, copy=True)) for n, p in zip(names, params)}
    stem = Path(stem)
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import save as st_save

        path, data = stem.with_name(stem.name + ".safetensors"), st_save(tensors)
    else:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        path, data = stem.with_name(stem.name + ".pt"), bytes(buf.getbuffer())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _file_id(node_id: str) -> str:
    """A node id as a file-name part (anything but letters, digits, ``.``, ``_``, ``-`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node_id) or "_"


def write_results(result: SimulationResult, run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``summary.json`` into ``run_dir`` (created if needed), and each
    node's final model (``final_model_<node>.pt``/``.safetensors``, its ``state_dict``) with the
    public preprocessing its site applied (``preprocessing_<node>.json``; a per-site z-score is
    private and is not written)."""
    from privfl.preprocessing import save_preprocessing

    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    mpath, spath = d / "metrics.csv", d / "summary.json"
    with mpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(METRIC_FIELDS), extrasaction="ignore")
        w.writeheader()
        for row in result.rows:
            w.writerow(row)
    files: dict[str, dict[str, str]] = {}
    for nid, params in result.models.items():
        if result.param_names:
            model = save_state_dict(result.param_names, params, d / f"final_model_{_file_id(nid)}")
            files.setdefault(nid, {})["model"] = model.name
    for nid, pre in result.preprocessing.items():
        if getattr(pre, "kind", None) == "site":
            log.warning("simulate %s: per-site z-score preprocessing is private; not written (research only)", nid)
            continue
        ppath = d / f"preprocessing_{_file_id(nid)}.json"
        save_preprocessing(pre, ppath)
        files.setdefault(nid, {})["preprocessing"] = ppath.name
    summary = dict(result.summary)
    if files:
        summary["model_files"] = files
    spath.write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
    return mpath, spath


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(x, np.integer):
        return int(x)
    return x


def _flat(params: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in params]) if params else np.zeros(0)


def _digest(params: Sequence[np.ndarray]) -> bytes:
    """A digest of a model's exact values, dtypes and shapes (equal digests: the same model)."""
    h = hashlib.blake2b(digest_size=16)
    for p in params:
        a = np.ascontiguousarray(p)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.digest()


def consensus_distance(models: Sequence[Sequence[np.ndarray]]) -> tuple[float, float]:
    """(max pairwise L2 distance, RMS distance to the mean model) over node models."""
    if len(models) < 2:
        return 0.0, 0.0
    v = np.stack([_flat(m) for m in models])
    rms = float(np.sqrt(np.mean(np.sum((v - v.mean(axis=0)) ** 2, axis=1))))
    # the max over distinct models (equal ones add only zeros), from their Gram matrix after centring
    # (one BLAS product instead of N²/2 differences; centred, the largest distance loses no precision)
    u = v[sorted({row.tobytes(): i for i, row in enumerate(v)}.values())]
    if len(u) < 2:
        return 0.0, rms
    c = u - u.mean(axis=0)
    sq = np.einsum("ij,ij->i", c, c)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)
    return float(np.sqrt(max(0.0, float(d2.max())))), rms


class Engine:
    """Runs one simulation; see the module docstring for the three drivers."""

    def __init__(self, node_ids: Sequence[str], clients: Mapping[str, NumPyClient], world: SimWorld,
                 speeds: Sequence[float], step_cost: float, local_steps: int, stop: StopCriteria,
                 evaluate: Evaluate, eval_every: float | None = None, eval_every_rounds: int | None = None,
                 progress: bool = False, step_time: str = "fixed", seed: int = 0) -> None:
        if not any(v is not None for v in (stop.max_time, stop.max_steps, stop.max_rounds)):
            raise _config("[stop]: give at least one of [stop].max_steps, [stop].max_seconds or "
                          "[simulation].max_rounds")
        self.node_ids = list(node_ids)
        self.clients = dict(clients)
        self.world = world
        self.speeds = list(speeds)
        self.step_cost = float(step_cost)
        #: the compute-time model (fixed, or exponential draws seeded per node from ``seed``)
        self.step_times = StepTimes(step_time, self.step_cost, self.speeds, seed)
        self.local_steps = int(local_steps)
        self.stop = stop
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.eval_every_rounds = eval_every_rounds
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self.steps = [0] * len(self.node_ids)
        self.epsilons = [math.nan] * len(self.node_ids)
        self.stopped = [False] * len(self.node_ids)
        self.stop_reasons: dict[str, str] = {}
        self.end_reason = ""
        self.last_accuracy: list[float] = []
        self.evals = 0
        self.round = 0
        self.final_models: dict[str, Params] = {}  # the models of the last evaluation
        self._changes = 0  # driver events that may change models (async steps, consensus rounds, rounds)
        self._last_eval: tuple[float, int, int] | None = None  # (time, round, changes) of the last evaluation
        #: runs a synchronous round's per-node ``begin_round`` calls, in node order: one after another,
        #: or (the Ray backend's ``run_in_turns``) taking turns while their actors train concurrently
        self.run_each: Callable[[Sequence[Callable[[], None]]], None] = _one_after_another
        #: scores several distinct models at once with ``evaluate``'s very computation (None: ``evaluate``
        #: on each in turn; the Ray backend spreads them over its actors)
        self.evaluate_many: Callable[[Sequence[Params]], list[tuple[float, float]]] | None = None

    # ---- helpers --------------------------------------------------------------------
    def compute_time(self, i: int, steps: int) -> float:
        """Virtual seconds for ``steps`` local steps on node i (one draw of the step-time model)."""
        return self.step_times(i, steps)

    def _epsilon(self, i: int, fallback: float = math.nan) -> float:
        eps = getattr(self.clients[self.node_ids[i]], "epsilon", None)
        if eps is None:
            return fallback if not math.isnan(fallback) else math.inf
        return float(eps)

    def _initial_epsilon(self, i: int) -> float:
        eps = getattr(self.clients[self.node_ids[i]], "epsilon", None)
        return math.nan if eps is None else float(eps)

    def _record(self, t: float, models: Sequence[Params]) -> bool:
        """Evaluate every node's model at virtual time ``t``; True when the target accuracy is met."""
        cmax, crms = consensus_distance(models)
        self.final_models = dict(zip(self.node_ids, models))
        accs = []
        keys = [_digest(m) for m in models]  # identical models (the start, after FedAvg) score once
        distinct = {k: m for k, m in zip(keys, models)}
        many = self.evaluate_many or (lambda ms: [self.evaluate(m) for m in ms])
        scores = dict(zip(distinct, many(list(distinct.values()))))
        for i, nid in enumerate(self.node_ids):
            loss, acc = scores[keys[i]]
            accs.append(acc)
            self.rows.append({
                "time": round(float(t), 9), "round": self.round, "node": nid, "steps": self.steps[i],
                "loss": float(loss), "accuracy": float(acc), "epsilon": self.epsilons[i],
                "bytes_sent": self.world.bytes_sent[i], "bytes_received": self.world.bytes_received[i],
                "consensus_max": cmax, "consensus_rms": crms, "stopped": int(self.stopped[i]),
            })
        self.evals += 1
        self._last_eval = (round(float(t), 9), self.round, self._changes)
        self.last_accuracy = accs
        log.debug("eval t=%.3f mean acc %.4f consensus %.3g", t, float(np.mean(accs)), cmax)
        target = self.stop.target_accuracy
        return target is not None and float(np.mean(accs)) >= target

    def _record_final(self, t: float, models: Sequence[Params]) -> None:
        """The end-of-run evaluation, written once: skipped when the last evaluation is of these
        very models at this time and round; replacing the last evaluation when that one has the
        same time and round but models changed since (events at the end instant)."""
        last = self._last_eval
        if last is not None and last[:2] == (round(float(t), 9), self.round):
            if last[2] == self._changes:
                return
            del self.rows[-len(self.node_ids):]
            self.evals -= 1
        self._record(t, models)

    def _progress(self, total: float, label: str) -> Any:
        if not self.progress:
            return None
        factory = progress_factory.get()
        if factory is not None:  # the caller's display (privfl compare: run, seed, ε, accuracy)
            return factory(self, total, label)
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        bar.add_task(label, total=total)
        return bar

    # ---- asynchronous node strategies --------------------------------------------------
    def run_async(self, strategies: Sequence[NodeStrategy]) -> float:
        """Drive asynchronous strategies on the event heap; return the final virtual time."""
        n = len(self.node_ids)
        self.epsilons = [self._initial_epsilon(i) for i in range(n)]
        models = lambda: [s.snapshot() for s in strategies]  # noqa: E731
        every = self.eval_every
        next_eval = 0.0

        def compute(i: int, start: float) -> float:
            """The compute of node i's next step, beginning at ``start`` (none if that step will not train)."""
            return self.compute_time(i, self.local_steps) if strategies[i].begin_compute(start) else 0.0

        heap = [(compute(i, 0.0), i) for i in range(n)]
        heapq.heapify(heap)
        limit = self.stop.max_time
        bar = self._progress(limit or float(self.stop.max_steps or 1) * n, "simulating")
        t_end = 0.0
        if every is None:
            self._record(0.0, models())
        try:
            while heap:
                t, i = heap[0]
                if limit is not None and t > limit:
                    self.end_reason = "max_time"
                    t_end = limit
                    break
                while every is not None and next_eval <= t:
                    if self._record(next_eval, models()):
                        self.end_reason = "target_accuracy"
                        return next_eval
                    next_eval += every
                heapq.heappop(heap)
                self.world.clocks[i] = t
                rep = strategies[i].step()
                overlapped = strategies[i].overlaps_communication
                if overlapped:  # its exchanges ran on the node's communication thread from t: wait for them
                    strategies[i].settle()
                self._changes += 1
                self.steps[i] += rep.local_steps
                self.epsilons[i] = self._epsilon(i, rep.epsilon)
                t_end = max(t_end, self.world.clocks[i])
                if strategies[i].stopped:
                    self.stopped[i] = True
                    self.stop_reasons[self.node_ids[i]] = strategies[i].stop_reason
                elif self.stop.max_steps is not None and self.steps[i] >= self.stop.max_steps:
                    self.stop_reasons[self.node_ids[i]] = "max_steps"
                else:  # the next compute starts after the exchanges, or (overlapped) beside them at t
                    start = t if overlapped else self.world.clocks[i]
                    heapq.heappush(heap, (max(start + compute(i, start), self.world.clocks[i]), i))
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=t if limit else sum(self.steps))
            else:
                self.end_reason = self.end_reason or ("all_stopped" if all(self.stopped) else "max_steps")
                t_end = max(t_end, self._consensus_phase(strategies))
        finally:
            if bar is not None:
                bar.stop()
        self._record_final(t_end, models())
        return t_end

    def _consensus_phase(self, strategies: Sequence[NodeStrategy]) -> float:
        """After training, the strategies' pure averaging exchanges (as a real node runs them),
        in rounds of one exchange per active node, in node order; returns the clock at the end."""
        rounds = max((int(s.consensus_exchanges) for s in strategies), default=0)
        if rounds:
            start = max(self.world.clocks)  # the phase starts once every node has finished training
            self.world.clocks[:] = [start] * len(self.world.clocks)
        for r in range(rounds):
            for s in strategies:
                if s.consensus_exchanges > r:
                    s.consensus_round()
                    self._changes += 1
        return max(self.world.clocks) if rounds else 0.0

    # ---- round-synchronous node strategies -------------------------------------------
    def run_sync(self, strategies: Sequence[NodeStrategy]) -> float:
        """Lock-step rounds: all begin, deliver, all finish, barrier at the slowest node.

        A strategy that ``overlaps_communication`` (CoCoD) sends at the round start while it
        computes: its messages leave at ``t`` and its round ends at max(t + compute, arrivals);
        otherwise they leave after the compute, and the round costs compute + communication.
        """

        def one_round(t: float) -> float:
            def begin(i: int, s: NodeStrategy) -> None:
                steps = s.config.get("local_steps", self.local_steps)
                done = t + (0.0 if s.stopped else self.compute_time(i, steps))
                self.world.clocks[i] = t if s.overlaps_communication else done
                rep = s.begin_round()
                if s.overlaps_communication:  # the compute ran while the messages travelled
                    self.world.clocks[i] = done
                self.steps[i] += rep.local_steps
                self.epsilons[i] = self._epsilon(i, rep.epsilon)

            self.run_each([functools.partial(begin, i, s) for i, s in enumerate(strategies)])
            for i, s in enumerate(strategies):
                net = self.world.network(self.node_ids[i])
                peers = list(s.mixing) if s.mixing is not None else net.neighbors()
                received = net.receive(self.round, peers, float(s.timeout))
                s.finish_round(received)
                if s.stopped and not self.stopped[i]:
                    self.stopped[i] = True
                    self.stop_reasons[self.node_ids[i]] = s.stop_reason
            return max(self.world.clocks)

        def consensus(t: float) -> float:
            """After training: ``consensus_exchanges`` pure mixing rounds (send, no compute; then mix)."""
            for r in range(max((int(s.consensus_exchanges) for s in strategies), default=0)):
                for i, s in enumerate(strategies):
                    self.world.clocks[i] = t
                    if s.consensus_exchanges > r:
                        s.begin_consensus_round()
                for i, s in enumerate(strategies):
                    if s.consensus_exchanges > r:
                        net = self.world.network(self.node_ids[i])
                        peers = list(s.mixing) if s.mixing is not None else net.neighbors()
                        s.finish_consensus_round(net.receive(self.round, peers, float(s.timeout)))
                t = max(self.world.clocks)
                self.world.clocks = [t] * len(self.node_ids)
                self.round += 1
                self._changes += 1
            return t

        return self._lockstep(lambda: [s.snapshot() for s in strategies], one_round, consensus)

    # ---- collective strategies -------------------------------------------------------
    def run_collective(self, strategy: CollectiveStrategy, init: Params) -> float:
        """Rounds of ``strategy.run_round``; stopped nodes keep their last model."""
        params: dict[str, Params] = {nid: [np.array(p, copy=True) for p in init] for nid in self.node_ids}

        def one_round(t: float) -> float:
            live = {nid: self.clients[nid] for i, nid in enumerate(self.node_ids) if not self.stopped[i]}
            cr = strategy.run_round(live, params, self.round)
            durations = []
            for i, nid in enumerate(self.node_ids):
                if nid in cr.params:
                    params[nid] = [np.asarray(p) for p in cr.params[nid]]
                k = int(cr.local_steps.get(nid, 0))
                self.steps[i] += k
                d = self.compute_time(i, k)
                up, down = int(cr.bytes_up.get(nid, 0)), int(cr.bytes_down.get(nid, 0))
                if up:  # the node's upload: its bytes_sent
                    d += self.world.charge(i, None, up)
                if down:  # what the server / all-reduce gives back: its bytes_received
                    d += self.world.download(i, down)
                durations.append(d)
                m = cr.metrics.get(nid, {})
                fallback = float(m["epsilon"]) if "epsilon" in m and float(m["epsilon"]) >= 0 else math.inf
                self.epsilons[i] = self._epsilon(i, fallback)
                if nid in cr.stopped and not self.stopped[i]:
                    self.stopped[i] = True
                    self.stop_reasons[nid] = str(m.get("stop_reason", "stopped by the strategy"))
            return t + (max(durations) if durations else 0.0)

        return self._lockstep(lambda: [params[nid] for nid in self.node_ids], one_round)

    def _lockstep(self, models: Callable[[], Sequence[Params]], one_round: Callable[[float], float],
                  finish: Callable[[float], float] | None = None) -> float:
        """Run ``one_round(t) -> t_end`` until a stop limit; after each, barrier the clocks,
        advance the progress bar and evaluate when due; then ``finish(t) -> t_end`` (after
        training: pure averaging rounds) before the final evaluation. Returns the final virtual time."""
        self.epsilons = [self._initial_epsilon(i) for i in range(len(self.node_ids))]
        t = 0.0
        self._record(0.0, models())
        next_eval = self.eval_every if self.eval_every is not None else math.inf
        bar = self._progress(float(self.stop.max_rounds or self.stop.max_time or 1), "simulating")
        try:
            while not self._limit_reached(t):
                t = one_round(t)
                self.world.clocks = [t] * len(self.node_ids)
                self.round += 1
                self._changes += 1
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=self.round if self.stop.max_rounds else t)
                if self._eval_due(t, next_eval):
                    if self._record(t, models()):
                        self.end_reason = "target_accuracy"
                        return t
                    while next_eval <= t:
                        next_eval += self.eval_every or math.inf
        finally:
            if bar is not None:
                bar.stop()
        if finish is not None:
            t = finish(t)
        self._record_final(t, models())
        return t

    def _limit_reached(self, t: float) -> bool:
        s = self.stop
        if s.max_rounds is not None and self.round >= s.max_rounds:
            self.end_reason = "max_rounds"
        elif s.max_time is not None and t >= s.max_time:
            self.end_reason = "max_time"
        elif s.max_steps is not None and all(k >= s.max_steps for k in self.steps):
            self.end_reason = "max_steps"
        elif all(self.stopped):
            self.end_reason = "all_stopped"
        else:
            return False
        return True

    def _eval_due(self, t: float, next_eval: float) -> bool:
        if self.eval_every_rounds:
            return self.round % self.eval_every_rounds == 0
        return t >= next_eval


#: a caller's progress display, when set: ``factory(engine, total, label)`` returns a started
#: ``rich.progress.Progress`` with one task, which the drivers update and stop as the plain bar
#: (``privfl compare`` names the run and seed and shows the engine's ε and accuracy)
progress_factory: ContextVar[Callable[[Engine, float, str], Any] | None] = ContextVar(
    "privfl_sim_progress_factory", default=None)


def _one_after_another(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` in order (the local backend's :attr:`Engine.run_each`)."""
    for task in tasks:
        task()


def _config(msg: str) -> Exception:
    from privfl.errors import ConfigError

    return ConfigError(msg)

