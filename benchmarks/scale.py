"""Simulator scale: wall time and peak memory of one epoch per node at 8, 16, 32, 64 nodes.

Each size runs in its own subprocess (``ru_maxrss`` is per process and only grows), which
builds the sites, the DP clients and the strategy, and runs every node for one local epoch
(``ceil(train rows / batch)`` DP steps) on the virtual clock, with an evaluation at the
start and at the end. The dataset is split across the nodes, so the total number of
training rows is the same at every size: what grows with N is the per-node overhead
(models, optimizers, accountants, strategy state, evaluation of N models).
Reports: wall seconds of ``run_simulation`` (setup included), peak RSS of the process,
RSS after imports (so the difference is the simulation's own), with ``--tracemalloc``
the Python-level peak (Python objects only: torch tensors live outside it; slows the run),
virtual time, steps.
Prints JSON.

    .venv/bin/python benchmarks/scale.py [--sizes 8 16 32 64] [--model cnn] [--strategy async_gossip]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(n: int, dataset: str, model: str, strategy: str, batch: int, trace: bool) -> dict[str, object]:
    """One size, measured inside this process."""
    import logging
    import tracemalloc

    logging.basicConfig(level=logging.WARNING)
    from privfl.clients import DPConfig
    from privfl.data import load_dataset, split_sites
    from privfl.preprocessing import PreprocessingSpec
    from privfl.sim import SimSpec, StopCriteria, run_simulation

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sites = split_sites(load_dataset(dataset, seed=0), n, "iid", seed=0, test_fraction=0.2)
    rows = max(len(s.train) for s in sites)
    steps = math.ceil(rows / batch)
    spec = SimSpec(dataset=dataset, num_nodes=n, partitioning="iid", preprocessing=PreprocessingSpec(scaling="none"),
                   model=model,
                   dp=DPConfig(noise_multiplier=1.0, target_epsilon=1e6, batch_size=batch, lr=0.1,
                               sample_rate=min(1.0, batch / rows),
                               engine="fast" if model != "logreg" else "opacus"),
                   strategy=strategy, local_steps=1, topology="random_regular", topology_params={"degree": 3},
                   stop=StopCriteria(max_steps=steps), seed=0)
    del sites
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    res = run_simulation(spec)
    wall = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1] if trace else None
    tracemalloc.stop()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "nodes": n,
        "steps_per_node": steps,
        "train_rows_per_node_max": rows,
        "total_steps": int(sum(res.summary["steps"].values())),
        "wall_seconds": round(wall, 2),
        "wall_ms_per_step": round(1000 * wall / max(1, sum(res.summary["steps"].values())), 2),
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
        "rss_after_imports_mib": round(rss_imports / 1024, 1),
        "tracemalloc_peak_mib": round(py_peak / 2**20, 1) if py_peak is not None else None,
        "virtual_time": round(float(res.summary["virtual_time"]), 3),
        "mean_accuracy": round(float(res.summary["mean_accuracy"]), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="cnn", choices=["logreg", "mlp", "cnn"])
    ap.add_argument("--strategy", default="async_gossip")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also trace Python allocations (slows the run: wall times then overstate)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.dataset, args.model, args.strategy, args.batch, args.tracemalloc)))
        return
    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--dataset", args.dataset, "--model", args.model,
               "--strategy", args.strategy, "--batch", str(args.batch)] \
            + (["--tracemalloc"] if args.tracemalloc else [])
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0:
            results.append({"nodes": n, "error": p.stderr.strip().splitlines()[-1:] or ["failed"]})
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    out = {"dataset": args.dataset, "model": args.model, "strategy": args.strategy, "batch": args.batch,
           "epochs_per_node": 1, "torch_threads": 1, "cpu_count": os.cpu_count(), "results": results}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
