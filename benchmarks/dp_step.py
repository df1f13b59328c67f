"""DP-SGD step cost: non-private vs Opacus hooks vs the fast (ghost-norm) engine.

For the digits CNN and the breast-cancer MLP at batch 64, and each clipping rule, times one
training step (zero_grad + forward + backward + optimizer step). All variants run in one
process, interleaved (each repetition runs every variant once, in a rotating order), so
machine noise hits them alike; figures are medians of wall time and of the thread's CPU time.
Prints JSON. On glibc, large per-step buffers are mmap'ed and page-faulted afresh each step;
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (recorded in the output) change that.

    .venv/bin/python benchmarks/dp_step.py [--reps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privfl.clients.clipping import CLIPPING_RULES, clipping_rule  # noqa: E402
from privfl.clients.ghost import make_ghost_private  # noqa: E402
from privfl.clients.optimizer import PerSampleWeightDPOptimizer  # noqa: E402
from privfl.clients.randomness import SecureRandom, SeededRandom  # noqa: E402
from privfl.models import build_model  # noqa: E402

warnings.filterwarnings("ignore")

Step = Callable[[], None]


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """digits as 1×8×8 images in [0, 1]; breast cancer standardised."""
    from sklearn.datasets import load_breast_cancer, load_digits
    if name == "cnn":
        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return x, torch.tensor(d.target, dtype=torch.long)
    b = load_breast_cancer()
    xs = (b.data - b.data.mean(0)) / b.data.std(0)
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(b.target, dtype=torch.long)


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> Step:
    crit = nn.CrossEntropyLoss()
    it = iter(range(10**9))

    def step() -> None:
        xb, yb = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        crit(model(xb), yb).backward()
        opt.step()

    return step


def _variants(model_name: str, shape: tuple[int, ...], classes: int, batches: list, sigma: float,
              clip: float, lr: float) -> dict[str, Step]:
    from opacus import GradSampleModule

    out: dict[str, Step] = {}
    m = build_model(model_name, shape, classes, seed=0)
    out["nonprivate"] = _make_step(m, torch.optim.SGD(m.parameters(), lr=lr), batches)
    for rule in CLIPPING_RULES:
        m = build_model(model_name, shape, classes, seed=0)
        gsm = GradSampleModule(m)
        opt = PerSampleWeightDPOptimizer(torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                         max_grad_norm=clip, expected_batch_size=64,
                                         random_source=SeededRandom(1), clipping=clipping_rule(rule))
        out[f"opacus_{rule}"] = _make_step(gsm, opt, batches)
        m = build_model(model_name, shape, classes, seed=0)
        gm, gopt = make_ghost_private(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                      max_grad_norm=clip, expected_batch_size=64, clipping=clipping_rule(rule),
                                      random_source=SeededRandom(1))
        out[f"fast_{rule}"] = _make_step(gm, gopt, batches)
    # what a deployed node runs: the same step with noise from the secure ChaCha20 source
    for engine in ("opacus", "fast"):
        m = build_model(model_name, shape, classes, seed=0)
        if engine == "opacus":
            opt = PerSampleWeightDPOptimizer(torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                             max_grad_norm=clip, expected_batch_size=64,
                                             random_source=SecureRandom(), clipping=clipping_rule("psac"))
            out["opacus_psac_secure"] = _make_step(GradSampleModule(m), opt, batches)
        else:
            gm, gopt = make_ghost_private(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                          max_grad_norm=clip, expected_batch_size=64,
                                          clipping=clipping_rule("psac"), random_source=SecureRandom())
            out["fast_psac_secure"] = _make_step(gm, gopt, batches)
    return out


def bench_model(model_name: str, shape: tuple[int, ...], classes: int, reps: int, warmup: int,
                batch: int = 64) -> dict[str, object]:
    x, y = _data(model_name)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(64):
        idx = torch.randperm(len(y), generator=g)[:batch]
        batches.append((x[idx].contiguous(), y[idx].contiguous()))
    steps = _variants(model_name, shape, classes, batches, sigma=1.0, clip=1.0, lr=0.05)
    names = list(steps)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position bias
        for k in order:
            c0, t0 = time.thread_time(), time.perf_counter()
            steps[k]()
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if r >= warmup:
                wall[k].append(dt)
                cpu[k].append(dc)
    out: dict[str, object] = {"model": model_name, "input_shape": list(shape), "batch": batch, "reps": reps}
    for label, times in (("wall", wall), ("thread_cpu", cpu)):
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        base = med["nonprivate"]
        rules: dict[str, object] = {}
        for rule in CLIPPING_RULES:
            rules[rule] = {
                "nonprivate_ms": round(base, 4),
                "opacus_ms": round(med[f"opacus_{rule}"], 4),
                "fast_ms": round(med[f"fast_{rule}"], 4),
                "opacus_ratio": round(med[f"opacus_{rule}"] / base, 3),
                "fast_ratio": round(med[f"fast_{rule}"] / base, 3),
                "fast_speedup_vs_opacus": round(med[f"opacus_{rule}"] / med[f"fast_{rule}"], 3),
            }
        out[label] = rules
        # the cost of the secure noise source a deployed node uses (psac, same step otherwise)
        out[f"{label}_secure_noise"] = {
            eng: {"seeded_ms": round(med[f"{eng}_psac"], 4), "secure_ms": round(med[f"{eng}_psac_secure"], 4),
                  "secure_ratio_vs_nonprivate": round(med[f"{eng}_psac_secure"] / base, 3),
                  "secure_over_seeded": round(med[f"{eng}_psac_secure"] / med[f"{eng}_psac"], 3)}
            for eng in ("opacus", "fast")}
    out["wall_iqr_ms"] = {k: [round(float(np.percentile(v, 25)) * 1e3, 4), round(float(np.percentile(v, 75)) * 1e3, 4)]
                          for k, v in wall.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="cnn,mlp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = list(os.getloadavg())
    specs = {"cnn": ((1, 8, 8), 10), "mlp": ((30,), 2)}
    results = []
    for name in args.models.split(","):
        shape, classes = specs[name]
        results.append(bench_model(name, shape, classes, args.reps, args.warmup))
    targets = {"cnn": 1.5, "mlp": 2.0}
    for r in results:
        t = targets[str(r["model"])]
        r["target_ratio"] = t
        for label in ("wall", "thread_cpu"):
            r[f"fast_meets_target_{label}"] = all(v["fast_ratio"] <= t  # type: ignore[index]
                                                   for v in r[label].values())  # type: ignore[union-attr]
    import opacus
    print(json.dumps({
        "benchmark": "dp_step",
        "torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version(),
        "threads": args.threads, "step": "zero_grad + forward + backward + optimizer.step, median",
        "clocks": "wall = perf_counter; thread_cpu = this thread's CPU time (less sensitive to other load)",
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "loadavg_before": load0, "loadavg_after": list(os.getloadavg()),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
