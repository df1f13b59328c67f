"""Virtual time to a target accuracy under compute heterogeneity, at equal per-node ε budget.

Grid: n ∈ {4, 8, 16} nodes × one persistent straggler s ∈ {2, 4, 10} times slower, every
local step's compute time an exponential draw around its node's mean (seeded; ``--step-time
fixed`` for constant times), link latency and bandwidth charged on the virtual clock (5 ms,
100 Mbit/s by default). Digits (IID), the small CNN, DP-SGD: every node gets the same budget
(``--epsilon``, δ = 1e-5) and the σ calibrated so that ``--steps`` local steps spend it. The
noisy gradient sum is divided by the expected batch q · (the site's public size: the train share
of an equal split of the public digits set), so a step's size does not change with n and one lr
grid fits every cell (dividing by the nominal ``batch_size`` 16, as before, made the steps 2.8×
too large at n = 16 and 11× at n = 4).

* synchronous all-reduce DP-SGD: every step is one all-reduce round that waits for the
  slowest node's compute plus its upload and download; ``--steps`` rounds spend the budget.
  Its time to target is the first evaluation (every ``--eval-every`` virtual seconds) whose
  accuracy reaches the target — what a run stopped there would deliver.
* asynchronous gossip (AD-PSGD / A(DP)²SGD on the complete graph): after each local step a
  node makes ``--exchanges`` pairwise averages with random peers (bytes and round trips on
  the virtual clock, no ε), each message (``--bits 8``, the default) every coordinate's offset
  from the public initial model quantised to 8 bits per tensor — the async subspace exchange on a
  mask of all coordinates, a function of the released model and public values only, 4× fewer
  bytes than the float32 model (``--bits 32``), which puts two exchanges (32 ms) under a step's
  compute (50 ms) — with ``--overlap`` (the default) on its communication thread
  while its next step trains, so a step costs max(compute, exchanges) (``--no-overlap``:
  compute + exchanges); with ``--gradient-peers m`` every step's gradient is taken at the mean of
  the node's model and the last m peer models it received in exchanges (AsyncGossip's
  ``gradient_peers``: released models only; 8 by default, which moved the goal cell 1.7–1.9 pp
  closer to all-reduce on every seed; 0, its own model, as AD-PSGD); training ends at a
  deadline (``train_seconds``: the time a nominal node needs for its planned steps and
  exchanges, × ``--deadline-factor``) or when
  the node's budget is spent, then every node makes ``--consensus`` averaging exchanges. So
  fast nodes spend their budget, and the straggler takes fewer steps and spends less ε
  (reported beside every figure). Its time to target is the earliest of: the first
  evaluation during training whose mean accuracy over the nodes' models reaches the target,
  and the end (consensus included) of the shortest run in ``--deadline-sweep`` (shorter
  deadlines, tried in order) whose final accuracy reaches it — what a deployment with that
  deadline would deliver (a run with a shorter deadline is the same run cut there, then
  averaged: the simulator is deterministic). The sweep runs only when the full-deadline run
  ends at target.

The target is the all-reduce run's final mean test accuracy less 1 pp (``--target-gap``).
The learning rate is tuned per strategy over ``--lrs`` on the full-budget runs (best final
accuracy wins), the same grid for both (0.7 and 1.0: on the goal's cell all-reduce measured
0.899 / 0.910 / 0.882 final at lr 0.7 / 1.0 / 2.0; overlapped async gossip 0.852 / 0.879 /
0.067 at lr 0.5 / 1.0 / 2.0 with 5 consensus exchanges, 0.888 / 0.880 at 0.7 / 1.0 with 20).

Prints JSON: per cell both runs (time to target, final accuracy, per-node ε at target and at
the end, steps, bytes), the async deadline sweep, the speed-up, the speed-up against an
all-reduce that sent async's smaller frames too (the same run less the transfer time saved on
each round before its target), the throughput bound (s(n−1)+1)/n, and the issue's goal at
n = 16, s = 4 (≥ 3× faster to target, async final accuracy within 1 pp) and whether it held —
with ``--seeds``, on every seed (``goal_cell_over_seeds`` has the per-seed figures and means:
one seed moves the cell by several pp, as the final DP iterate swings ±3-5 pp between
consecutive rounds). ``--diagnose`` adds the same async run with every gradient taken at the
network's exact mean model (:func:`gradients_at_network_mean`, a diagnostic, not a protocol).
``--ema-decay d`` (off by default) makes both strategies evaluate, and end with, an
exponential moving average of each node's DP iterates (``[strategy].params.ema_decay``, the same
value for both; :mod:`strategies.iterate_average`, De et al. 2022; post-processing, no ε; async
nodes exchange their training iterates and, once stopped, their EMAs, so the consensus averages
the EMAs). Its warm-up, decay min(d, (1 + t) / (10 + t)) at the t-th update, stays below 0.9 for
the first 80 updates, so with 60 steps d = 0.9, 0.95 and 0.99 are the same run. Measured on the goal's
cell (d = 0.9, seeds 0 / 1 / 2): gaps −0.23 / −1.25 / −0.23 pp (off: −0.21 / −3.98 / −1.88);
finals all-reduce 0.9272 / 0.9076 / 0.9020, async 0.9249 / 0.8951 / 0.8997 (off: 0.9104 / 0.9104 / 0.9216,
0.9083 / 0.8706 / 0.9028); speed-up 3.52× / none (async misses the target 0.8976) / 2.65× —
the goal still holds on seed 0 only, so it stays off by default. d = 0.8 (seeds 1 / 2; the EMA also
lifts all-reduce's final, to 0.9160 / 0.9132): gaps −2.14 / −1.11 pp, async (0.8946 / 0.9021) reaches the
target on neither.
A deadline is checked when a step's compute begins (``NodeStrategy.begin_compute``), as on a real node: a step
that began before it trains even if it ends after it. Re-measured with that (seeds 0 / 1 / 2): EMA off gaps
−0.18 / −3.98 / −2.47 pp, 3.49× / none / none; d = 0.9 gaps −0.20 / −1.39 / +0.01 pp, 3.49× / none / 2.64× (seed 2:
the straggler's last step begins 0.08 s before the 3.48 s deadline and draws 1.3 s, so the run ends at 4.8 s, the
fast nodes by 3.6 s). ``--consensus 20`` (d = 0.9, before that change): seed 1 −1.05 pp, none; seed 2 +0.24 pp, 2.53×.
Since then a node does not begin a step expected to end past the deadline (its beginning plus its mean measured
step time): EMA off gaps +0.10 / −3.96 / −2.44 pp, 3.82× / none / none; d = 0.9 gaps −0.72 / −1.25 / −0.39 pp,
3.82× / none / 3.44× (seed 1: async ends at 0.8951 against the target 0.8976), held on seeds 0 and 2; held-out seeds
3 / 4 (d = 0.9): −1.46 / −1.84 pp, none (the five seeds' mean gap −1.13 pp). ``--consensus 10`` / ``20`` (d = 0.9):
seeds 0 / 1 / 2 −0.76 / −1.14 / −0.46 pp, 3.73× / none / 3.36×; −0.79 / −1.18 / −0.51 pp, 3.58× / none / 3.23×.
Each cell also re-scores both runs' final node models on the test records (``final_gap_on_test_records``: the gap,
its paired-bootstrap 95% interval over the records, what one record is worth), and ``goal_cell_over_seeds`` adds the
gap's spread over seeds and how many records each missed target is short by. Ten seeds (0-9, d = 0.9): held on
0 / 2 / 5 / 7 / 8 / 9 (3.82 / 3.44 / 3.00 / 3.56 / 3.42 / 4.69×), missed on 1 / 3 / 4 / 6 (gaps −1.25 / −1.46 / −1.84 /
−1.18 pp, their targets 0.9 / 1.6 / 3.0 / 0.6 records away); mean gap −0.73 pp (SD 0.72, standard error 0.23). The
test set is 357 digits (0.28 pp a record), and each seed's interval is about ±1.8 pp wide: one seed cannot resolve 1 pp.
``--exchanges 3`` (d = 0.9, the same ten seeds): held on 4 (0 / 3 / 6 / 7: 3.06 / 3.56 / 3.76 / 3.11×), gaps −1.00 /
−1.86 / +0.19 / −0.11 / −1.95 / −0.48 / −0.56 / +0.45 / −0.62 / −1.07 pp on seeds 0-9 (mean −0.70 pp, as with 2): the
third exchange does not fit under every exponential step (3 × 16 ms against a 50 ms mean), so speed-ups fall (2.55 /
2.71 / 2.84× on seeds 2 / 5 / 8, each held with 2) and the accuracy does not rise on average; 2 stays the default.
``--dataset synthetic`` is a second set-up with larger sites (:func:`synthetic_site`,
``--site-records`` per site), reported beside digits, never instead of it.

    .venv/bin/python benchmarks/heterogeneity.py               # the whole grid (slow: an hour and more)
    .venv/bin/python benchmarks/heterogeneity.py --cell 16 4 --seeds 0 1 2   # the goal's cell, 3 seeds (~5 min)
    .venv/bin/python benchmarks/heterogeneity.py --cell 16 4 --diagnose      # + gradients at the network mean
    .venv/bin/python benchmarks/heterogeneity.py --quick       # n = 4 and 8 at s = 4, 40 steps, one lr
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privfl.clients import DPConfig  # noqa: E402
from privfl.data import load_builtin  # noqa: E402
from privfl.preprocessing import PreprocessingSpec  # noqa: E402
from privfl.sim import LinkSpec, SimSpec, SimulationResult, StopCriteria, run_simulation  # noqa: E402

TEST_FRACTION = 0.2  # split_sites' default
NUM_CLASSES = 10  # digits and the synthetic set alike
GOAL = {"nodes": 16, "straggler": 4.0, "speedup": 3.0, "accuracy_gap_pp": 1.0}


def curve(res: SimulationResult) -> list[tuple[float, float, list[float], int]]:
    """(virtual time, mean accuracy over nodes, ε of every node, round) per evaluation, in time order."""
    by: dict[tuple[float, int], list[dict[str, Any]]] = defaultdict(list)
    for r in res.rows:
        by[(float(r["time"]), int(r["round"]))].append(r)
    out = []
    for k, rows in sorted(by.items()):
        rows = sorted(rows, key=lambda r: res.node_ids.index(r["node"]))
        out.append((k[0], sum(float(r["accuracy"]) for r in rows) / len(rows), [float(r["epsilon"]) for r in rows],
                    k[1]))
    return out


def first_at(c: list[tuple[float, float, list[float], int]], target: float
             ) -> tuple[float, float, list[float], int] | None:
    """The first evaluation whose mean accuracy reaches ``target`` (None if none does)."""
    return next((e for e in c if e[1] >= target), None)


def eps_summary(eps: list[float]) -> dict[str, float]:
    """Per-node ε at one moment: min, max and the straggler's (the last node)."""
    clean = [0.0 if math.isnan(e) else e for e in eps]
    return {"min": round(min(clean), 3), "max": round(max(clean), 3), "straggler": round(clean[-1], 3)}


def synthetic_site(site_index: int, num_sites: int, records: int = 1500, seed: int = 0
                   ) -> tuple[Any, Any]:
    """The larger-site set-up (``--dataset synthetic``): ``records`` training and ``records // 4`` test 8×8 images
    per site (the digits' shape and 10 classes), each a class's public prototype (drawn from ``seed``, the same
    at every site) plus Gaussian pixel noise drawn from the site's own stream — IID across sites, so only the
    site size differs from digits (~90 records per site at n = 16)."""
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    protos = np.random.default_rng(np.random.SeedSequence([seed, 0x5171])).uniform(0, 1, (10, 1, 8, 8))
    rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, num_sites, 0xDA7A]))

    def draw(m: int) -> TensorDataset:
        y = rng.integers(0, 10, m)
        x = np.clip(protos[y] + rng.normal(0, SYNTHETIC_NOISE, (m, 1, 8, 8)), 0, 1).astype(np.float32)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    return draw(records), draw(records // 4)


SYNTHETIC_NOISE = 0.6  # pixel noise of the synthetic set: hard enough that neither strategy saturates


def declared_size(n: int) -> int:
    """A site's public record count: the train share of an equal IID split of the public digits set
    (so the noisy sum is divided by the expected batch q · size at every n, and one lr grid fits all)."""
    return int(len(load_builtin("digits").y) * (1 - TEST_FRACTION) / n)


def spec(strategy: str, n: int, s: float, lr: float, deadline: float | None, args: argparse.Namespace) -> SimSpec:
    """One run: identical data, model, DP budget, machines and links; only the strategy (and lr) differ."""
    data: dict[str, Any] = {"dataset": "digits"}
    size = declared_size(n)
    if getattr(args, "dataset", "digits") == "synthetic":  # public declared size: the factory's train records
        data = {"data_factory": "heterogeneity:synthetic_site", "num_classes": NUM_CLASSES,
                "data_args": {"records": args.site_records, "seed": args.seed}}
        size = args.site_records
    params: dict[str, Any] = {}
    if args.ema_decay is not None:  # both strategies alike: each node evaluates its iterates' EMA
        params["ema_decay"] = args.ema_decay
    if strategy == "async_gossip":
        params |= {"exchanges_per_step": args.exchanges, "consensus_exchanges": args.consensus,
                  "overlap": args.overlap, "gradient_peers": args.gradient_peers, **wire_params(args)}
        if deadline is not None:
            params["train_seconds"] = deadline
    return SimSpec(
        **data, num_nodes=n, partitioning="iid", preprocessing=PreprocessingSpec(scaling="none"),
        model="cnn",
        dp=DPConfig(noise_multiplier=None, planned_steps=args.steps, target_epsilon=args.epsilon, delta=1e-5,
                    batch_size=16, sample_rate=args.sample_rate, declared_size=size, lr=lr,
                    clipping="psac", engine="fast"),
        strategy=strategy, strategy_params=params, local_steps=1, topology="complete",
        compute_profile="straggler", compute_params={"factor": s}, step_time=args.step_time,
        links=LinkSpec(latency=args.latency, bandwidth=args.bandwidth),
        stop=StopCriteria(max_steps=args.steps), eval_every=args.eval_every, seed=args.seed,
    )


def wire_params(args: argparse.Namespace) -> dict[str, Any]:
    """Async's exchange frames: whole float32 models, or (``--bits``) every coordinate's offset from the public
    initial model quantised per tensor (the subspace exchange on a mask of all coordinates: no [dp].subspace,
    the DP step is the dense one; the frame is a function of the released model and public values only)."""
    if args.bits is None:
        return {}
    return {"compressor": "subspace", "fraction": 1.0, "public_seed": 0, "period": args.steps, "bits": args.bits}


def frame_bytes(shapes: list[tuple[int, ...]], args: argparse.Namespace) -> int:
    """Payload bytes of one async exchange message (request or reply) for a model of ``shapes``."""
    if args.bits is None:
        return 4 * sum(math.prod(s) for s in shapes)
    import numpy as np

    from privfl.strategies.compression.subspace import SubspaceK
    from privfl.strategies.compression.subspace_exchange import SubspaceExchange

    init = [np.zeros(s, dtype=np.float32) for s in shapes]
    wp = wire_params(args)
    comp = SubspaceK(fraction=wp["fraction"], public_seed=wp["public_seed"], period=wp["period"], bits=wp["bits"])
    return int(SubspaceExchange("probe", comp, init, args.steps).encode(init).nbytes)


def nominal_step(comm: float, args: argparse.Namespace, cost: float = 0.05) -> float:
    """Expected virtual seconds of a nominal node's step with ``comm`` seconds of exchanges: compute +
    comm, or with overlap max(compute, comm) (E = comm + cost·e^(−comm/cost) for exponential compute)."""
    if not args.overlap:
        return cost + comm
    return max(cost, comm) if args.step_time == "fixed" else comm + cost * math.exp(-comm / cost)


@contextlib.contextmanager
def gradients_at_network_mean() -> Iterator[None]:
    """DIAGNOSTIC ONLY (``--diagnose``; not a protocol: no node has the network's mean): every async node takes
    its step's gradient at the exact mean of all nodes' current models — the point all-reduce takes it at — and
    adds the step's update to its own model; noise, ε, straggler, timing and exchanges are unchanged. If this
    closes the gap to all-reduce, the gap is where gradients are taken (the consensus distance: each node's
    model carries its own recent, not yet averaged DP noise), not privacy, time or the straggler."""
    import numpy as np

    from privfl.strategies import gossip

    nodes: list[Any] = []
    init, train = gossip.AsyncGossip.__init__, gossip.AsyncGossip._train

    def record(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        nodes.append(self)

    def at_mean(self: Any, start: Any) -> Any:
        mean = [np.mean([np.asarray(nd.params[k], np.float64) for nd in nodes], axis=0).astype(p.dtype)
                for k, p in enumerate(start)]
        new, steps, exhausted = train(self, mean)
        return (None if new is None else [s + (t - m) for s, t, m in zip(start, new, mean)]), steps, exhausted

    gossip.AsyncGossip.__init__, gossip.AsyncGossip._train = record, at_mean  # type: ignore[method-assign]
    try:
        yield
    finally:
        gossip.AsyncGossip.__init__, gossip.AsyncGossip._train = init, train  # type: ignore[method-assign]


def run(strategy: str, n: int, s: float, lr: float, deadline: float | None, args: argparse.Namespace
        ) -> dict[str, Any]:
    """One simulation, summarised; ``_curve`` keeps the accuracy curve for the target look-up."""
    w0 = time.perf_counter()
    res = run_simulation(spec(strategy, n, s, lr, deadline, args))
    c = curve(res)
    return {
        "lr": lr,
        "final_accuracy": round(c[-1][1], 4),
        "virtual_time_end": round(float(res.summary["virtual_time"]), 3),
        "end_reason": res.summary["end_reason"],
        "steps": {"min": min(res.summary["steps"].values()), "max": max(res.summary["steps"].values()),
                  "straggler": res.summary["steps"][res.node_ids[-1]]},
        "epsilon_end": eps_summary([float(res.summary["epsilon"][nid]) for nid in res.node_ids]),
        "bytes_sent": int(sum(res.summary["bytes_sent"].values())),
        "bytes_received": int(sum(res.summary["bytes_received"].values())),
        "_exchange_messages": int(sum(res.summary["messages_sent"].values())),
        "wall_seconds": round(time.perf_counter() - w0, 1),
        "_curve": c,
        "_shapes": [tuple(int(d) for d in p.shape) for p in res.models[res.node_ids[0]]],
        "_models": [res.models[nid] for nid in res.node_ids],
        "_names": res.param_names,
    }


def test_records(n: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """The union of every site's test split at ``n`` nodes, as the run's evaluator scores it (the same
    split, seed and preprocessing as :func:`run_simulation`; the researcher's view, never a node's)."""
    from privfl.sim import evaluation_records

    records = evaluation_records(spec("allreduce", n, 1.0, 1.0, None, args))
    assert records is not None  # the benchmark's sets are privfl's own
    return tuple(t.numpy() for t in records.tensors)  # type: ignore[attr-defined, return-value]


def correct_per_record(r: dict[str, Any], x: Any, y: Any, args: argparse.Namespace) -> Any:
    """Each test record's mean correctness over the run's final node models (its mean is the run's final
    accuracy: the benchmark's mean over nodes)."""
    import numpy as np
    import torch

    from privfl.models import build_model

    model = build_model(spec("allreduce", 1, 1.0, 1.0, None, args).model, tuple(x.shape[1:]), NUM_CLASSES,
                        seed=args.seed)
    xs = torch.as_tensor(x)
    hits = []
    for params in r["_models"]:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in zip(r["_names"], params)}, strict=True)
        model.eval()
        with torch.no_grad():
            hits.append((model(xs).argmax(1).numpy() == y).astype(np.float64))
    return np.mean(hits, axis=0)


def paired_gap(sync: dict[str, Any], asy: dict[str, Any], n: int, args: argparse.Namespace,
               resamples: int = 4000) -> dict[str, Any]:
    """How precisely the test set measures the final gap: async − all-reduce on the same test records, with a
    paired bootstrap 95% interval over the records (the gap's sampling error from the test set alone; the
    training noise of each run adds to it), the records, and what one record is worth in pp."""
    import numpy as np

    x, y = test_records(n, args)
    a, b = correct_per_record(asy, x, y, args), correct_per_record(sync, x, y, args)
    d = a - b
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, n, 0xB007]))
    boot = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    return {"test_records": int(len(d)), "one_record_pp": round(100 / len(d), 3),
            "gap_pp": round(100 * float(d.mean()), 2),
            "gap_ci95_pp": [round(100 * float(q), 2) for q in np.quantile(boot, [0.025, 0.975])],
            "records_disagreeing": int(np.count_nonzero(np.abs(d) > 0.5))}


def cell(n: int, s: float, args: argparse.Namespace) -> dict[str, Any]:
    """Both strategies at (n, s), lr tuned per strategy on the full-budget runs, then the async
    deadline sweep: the shortest training deadline whose run (with its consensus) ends at target."""
    syncs = [run("allreduce", n, s, lr, None, args) for lr in args.lrs]
    sync = max(syncs, key=lambda r: (r["final_accuracy"], -r["virtual_time_end"]))
    # the full async deadline: a nominal-speed node's planned steps, each with its exchanges' round trips
    model_bytes = sync["bytes_sent"] / (n * args.steps) - 64  # one all-reduce upload, less its header
    frame = frame_bytes(sync["_shapes"], args)  # one async request or reply
    rtt = 2 * (args.latency + (frame + 64) / args.bandwidth)
    full = round(args.deadline_factor * args.steps * nominal_step(args.exchanges * rtt, args), 3)
    asyncs = [run("async_gossip", n, s, lr, full, args) for lr in args.lrs]
    asy = max(asyncs, key=lambda r: (r["final_accuracy"], -r["virtual_time_end"]))
    target = round(sync["final_accuracy"] - args.target_gap / 100, 4)
    for r in (*syncs, *asyncs):
        hit = first_at(r["_curve"], target)
        r["time_to_target_in_training"] = round(hit[0], 3) if hit else None
        r["epsilon_at_target_in_training"] = eps_summary(hit[2]) if hit else None
        r["rounds_to_target_in_training"] = hit[3] if hit else None
        r["time_to_accuracy"] = {f"{a:.2f}": (e[0] if (e := first_at(r["_curve"], a)) else None)
                                 for a in (0.6, 0.7, 0.75, 0.8, 0.85)}
    # a shorter run is what a deployment with an earlier deadline gets: training stops, then consensus
    sweep, by_deadline = [], None
    in_training = asy["time_to_target_in_training"]
    if asy["final_accuracy"] >= target:
        by_deadline = {"fraction": 1.0, "train_seconds": full, "virtual_time_end": asy["virtual_time_end"],
                       "final_accuracy": asy["final_accuracy"], "epsilon_end": asy["epsilon_end"]}
    # shorter deadlines only when the full one ends at target (a run cut earlier trains less)
    for f in (args.deadline_sweep if by_deadline is not None else []):
        if in_training is not None and f * full >= in_training:
            break
        r = run("async_gossip", n, s, asy["lr"], round(f * full, 3), args)
        sweep.append({"fraction": f, "train_seconds": round(f * full, 3), "virtual_time_end": r["virtual_time_end"],
                      "final_accuracy": r["final_accuracy"], "steps": r["steps"], "epsilon_end": r["epsilon_end"],
                      "wall_seconds": r["wall_seconds"]})
        if r["final_accuracy"] >= target:
            by_deadline = sweep[-1]
            break
    diagnosis = None
    if args.diagnose:  # the same async run (tuned lr, full deadline), gradients at the network's exact mean
        with gradients_at_network_mean():
            oracle = run("async_gossip", n, s, asy["lr"], full, args)
        diagnosis = {"async_gradient_at_network_mean_final_accuracy": oracle["final_accuracy"],
                     "gap_pp": round(100 * (oracle["final_accuracy"] - sync["final_accuracy"]), 2),
                     "epsilon_end": oracle["epsilon_end"], "note": "diagnostic only, not a protocol"}
    times = [t for t in (in_training, by_deadline and by_deadline["virtual_time_end"]) if t]
    ta, ts = (min(times) if times else None), sync["time_to_target_in_training"]
    sync["time_to_target"], sync["epsilon_at_target"] = ts, sync["epsilon_at_target_in_training"]
    asy["time_to_target"] = ta
    asy["epsilon_at_target"] = (asy["epsilon_at_target_in_training"] if ta is not None and ta == in_training
                                else by_deadline["epsilon_end"] if by_deadline else None)
    speedup = round(ts / ta, 2) if ts and ta else None
    gap = round(100 * (asy["final_accuracy"] - sync["final_accuracy"]), 2)
    # all-reduce sending async's smaller frames up and down each round: the same run (transfers add to
    # every round alike, compute draws unchanged), less the bytes saved on each round before its target
    same_frames = None
    if ts is not None and frame < model_bytes:
        same_frames = round(ts - sync["rounds_to_target_in_training"] * 2 * (model_bytes - frame) / args.bandwidth, 3)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("_")}  # noqa: E731
    return {
        "nodes": n, "straggler": s, "target_accuracy": target,
        "final_gap_on_test_records": paired_gap(sync, asy, n, args),
        "throughput_bound_fixed_times": round((s * (n - 1) + 1) / n, 2), "async_train_seconds": full,
        "allreduce": strip(sync), "async_gossip": strip(asy),
        "async_deadline_sweep": sweep, "async_target_by_deadline": by_deadline, "diagnosis": diagnosis,
        "speedup_to_target": speedup, "final_accuracy_gap_async_minus_allreduce_pp": gap,
        "message_bytes": {"allreduce": int(model_bytes), "async": frame,  # payloads; measured: wire incl. header
                          "async_measured_per_message": round(asy["bytes_sent"] / max(1, asy["_exchange_messages"]))},
        "allreduce_time_to_target_with_async_frames": same_frames,
        "speedup_vs_allreduce_with_async_frames": round(same_frames / ta, 2) if same_frames and ta else None,
        "async_wins": bool(speedup is not None and speedup > 1 and gap >= -args.target_gap),
        "lr_tuning": {k: {str(r["lr"]): {"final_accuracy": r["final_accuracy"],
                                         "time_to_target_in_training": r["time_to_target_in_training"]}
                          for r in rs} for k, rs in (("allreduce", syncs), ("async_gossip", asyncs))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="cells (4, 4) and (8, 4), 40 steps, one lr (a few minutes)")
    ap.add_argument("--cell", type=float, nargs=2, metavar=("N", "S"), help="one cell: N nodes, straggler S×")
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--stragglers", type=float, nargs="+", default=[2.0, 4.0, 10.0])
    ap.add_argument("--steps", type=int, default=60, help="planned local DP steps per node (spend --epsilon)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--sample-rate", type=float, default=0.5, help="Poisson rate (0.5 of ~90 records: batches ~45)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.7, 1.0], help="lr grid, the same for both")
    ap.add_argument("--exchanges", type=int, default=2, help="async: pairwise averages after each local step")
    ap.add_argument("--consensus", type=int, default=5, help="async: consensus exchanges after training")
    ap.add_argument("--deadline-factor", type=float, default=1.1,
                    help="async full deadline = this × a nominal node's planned steps and exchanges")
    ap.add_argument("--deadline-sweep", type=float, nargs="*", default=[0.5, 0.7, 0.9],
                    help="async: shorter deadlines (fractions of the full one) tried in order until one ends "
                         "at target")
    ap.add_argument("--step-time", choices=("exponential", "fixed"), default="exponential")
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                    help="async: exchanges on a communication thread beside the next step (AD-PSGD)")
    ap.add_argument("--latency", type=float, default=0.005, help="one-way link latency, s")
    ap.add_argument("--bandwidth", type=float, default=12.5e6, help="link bandwidth, bytes/s")
    ap.add_argument("--eval-every", type=float, default=0.25, help="virtual seconds between evaluations")
    ap.add_argument("--target-gap", type=float, default=1.0, help="target = all-reduce final accuracy − this (pp)")
    ap.add_argument("--bits", type=int, choices=(32, 8, 4), default=8,
                    help="async: exchange frames of every coordinate's offset from the public initial model "
                         "quantised to this many bits (8, the default: 4× fewer bytes), or 32: whole float32 models")
    ap.add_argument("--gradient-peers", type=int, default=8,
                    help="async: each step's gradient at the mean of the node's model and the last this many peer "
                         "models it received in exchanges (8, the default; 0: its own model, AD-PSGD)")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="both strategies: each node evaluates (and ends with) an exponential moving average of its "
                         "DP iterates with this decay ([strategy].params.ema_decay; async: the consensus averages "
                         "the EMAs); default off")
    ap.add_argument("--diagnose", action="store_true",
                    help="also run async with every gradient at the network's exact mean model (a diagnostic, "
                         "not a protocol): does that close the gap to all-reduce?")
    ap.add_argument("--dataset", choices=("digits", "synthetic"), default="digits",
                    help="synthetic: the larger-site set-up (--site-records per site, see synthetic_site)")
    ap.add_argument("--site-records", type=int, default=1500, help="synthetic: training records per site")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every cell at each of these seeds (overrides --seed); the goal cell is then "
                         "summarised over them, and the goal holds only if it holds on every seed")
    args = ap.parse_args()
    if args.bits == 32:
        args.bits = None  # whole float32 models
    if args.quick:
        args.steps, args.lrs = 40, args.lrs[:1]
        cells = [(4, 4.0), (8, 4.0)]
    elif args.cell:
        cells = [(int(args.cell[0]), float(args.cell[1]))]
    else:
        cells = [(n, s) for n in args.nodes for s in args.stragglers]
    logging.basicConfig(level=logging.WARNING)

    seeds = args.seeds if args.seeds else [args.seed]
    grid = []
    for seed in seeds:
        args.seed = seed
        for n, s in cells:
            grid.append({"seed": seed, **cell(n, s, args)})
            print(json.dumps({"progress": f"seed={seed} n={n} s={s:g}", "speedup": grid[-1]["speedup_to_target"],
                              "gap_pp": grid[-1]["final_accuracy_gap_async_minus_allreduce_pp"]}), file=sys.stderr)
    goal_cells = [c for c in grid if c["nodes"] == GOAL["nodes"] and c["straggler"] == GOAL["straggler"]]
    held = goal_summary = None
    if goal_cells:
        def holds(c: dict[str, Any]) -> bool:
            sp, gap = c["speedup_to_target"], c["final_accuracy_gap_async_minus_allreduce_pp"]
            return bool(sp is not None and sp >= GOAL["speedup"] and gap >= -GOAL["accuracy_gap_pp"])

        held = all(holds(c) for c in goal_cells)
        mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
        gaps = [c["final_accuracy_gap_async_minus_allreduce_pp"] for c in goal_cells]
        sd = statistics.stdev(gaps) if len(gaps) > 1 else None
        goal_summary = {
            "seeds": [c["seed"] for c in goal_cells], "held_per_seed": [holds(c) for c in goal_cells],
            "speedup_per_seed": [c["speedup_to_target"] for c in goal_cells],
            "gap_pp_per_seed": [c["final_accuracy_gap_async_minus_allreduce_pp"] for c in goal_cells],
            "speedup_vs_allreduce_with_async_frames_per_seed":
                [c["speedup_vs_allreduce_with_async_frames"] for c in goal_cells],
            "final_accuracy_mean": {k: mean([c[k]["final_accuracy"] for c in goal_cells])
                                    for k in ("allreduce", "async_gossip")},
            "gap_pp_mean": round(sum(c["final_accuracy_gap_async_minus_allreduce_pp"] for c in goal_cells)
                                 / len(goal_cells), 2),
            # the spread over seeds (data split, init, noise and step times all change with the seed) and the
            # test set's own resolution of each seed's gap (paired bootstrap over its records)
            "gap_pp_sd_over_seeds": round(sd, 2) if sd is not None else None,
            "gap_pp_mean_standard_error": round(sd / math.sqrt(len(goal_cells)), 2) if sd is not None else None,
            "gap_ci95_pp_per_seed_test_records": [c["final_gap_on_test_records"]["gap_ci95_pp"] for c in goal_cells],
            "test_records": goal_cells[0]["final_gap_on_test_records"]["test_records"],
            "one_record_pp": goal_cells[0]["final_gap_on_test_records"]["one_record_pp"],
            "target_missed_by_records": [
                None if c["async_gossip"]["final_accuracy"] >= c["target_accuracy"] else
                round((c["target_accuracy"] - c["async_gossip"]["final_accuracy"])
                      * c["final_gap_on_test_records"]["test_records"], 1) for c in goal_cells],
            "diagnosis_gap_pp_per_seed_gradient_at_network_mean": [c["diagnosis"] and c["diagnosis"]["gap_pp"]
                                                                   for c in goal_cells],
            "speedup_to_0.85_per_seed": [
                round(c["allreduce"]["time_to_accuracy"]["0.85"] / c["async_gossip"]["time_to_accuracy"]["0.85"], 2)
                if c["allreduce"]["time_to_accuracy"]["0.85"] and c["async_gossip"]["time_to_accuracy"]["0.85"]
                else None for c in goal_cells],
            "epsilon_end_per_seed": {k: [c[k]["epsilon_end"] for c in goal_cells]
                                     for k in ("allreduce", "async_gossip")},
        }
    out = {
        "setup": {"dataset": "digits (iid)" if args.dataset == "digits" else
                  f"synthetic 8x8, 10 classes, {args.site_records} train records per site (iid)",
                  "model": "cnn", "dp": "DP-SGD, psac, fast engine, batch 16",
                  "epsilon_budget_per_node": args.epsilon, "delta": 1e-5, "planned_steps": args.steps,
                  "sample_rate": args.sample_rate, "step_time": args.step_time, "step_cost_s": 0.05,
                  "link": {"latency_s": args.latency, "bandwidth_Bps": args.bandwidth},
                  "async": f"complete graph, {args.exchanges} exchanges per step, {args.consensus} consensus, "
                           f"overlap {args.overlap}, gradient at own + last {args.gradient_peers} peer models, frames "
                           + ("float32 models" if args.bits is None else f"{args.bits}-bit offsets from the init"),
                  "declared_site_size": {str(n): declared_size(n) if args.dataset == "digits" else args.site_records
                                         for n, _ in cells},
                  "allreduce": "average every step, waits for the slowest node", "lrs": args.lrs,
                  "ema_decay": args.ema_decay,
                  "target": f"all-reduce final accuracy − {args.target_gap} pp", "seeds": seeds,
                  "quick": args.quick},
        "goal": {**GOAL, "statement": "async ≥ 3× faster to target than all-reduce at n=16, s=4, final "
                                      "accuracy within 1 pp"},
        "goal_held": held,
        "goal_cell_over_seeds": goal_summary,
        "grid": grid,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
