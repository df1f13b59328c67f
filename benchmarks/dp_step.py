"""DP-SGD step cost: non-private vs Opacus hooks vs Opacus ghost clipping vs privfl's engines.

For the digits CNN and the breast-cancer MLP at batch 64, and a GroupNorm ResNet-style CNN
on synthetic 3×32×32 inputs (``resnet``, batch 32 by default), times one training step
(zero_grad + forward + backward + optimizer step) of: the non-private model; privfl's Opacus
path and its fast (ghost-norm) engine, per clipping rule; Opacus's own ghost clipping
(``opacus.PrivacyEngine.make_private(..., grad_sample_mode="ghost")``, flat clipping, its
default non-secure noise); and privfl's default path (``privfl.PrivacyEngine().make_private``
with no engine/clipping given: ``engine="auto"``, psac, secure noise, every step accounted).
All variants run in one process, interleaved (each repetition runs every variant once, in a
fresh seeded random order: no variant always follows the same one), so machine noise hits
them alike; figures are medians of wall time and of the thread's CPU time. Secure noise is
drawn ahead by the noise worker process (Linux; a background thread elsewhere:
:class:`~clients.randomness.SecureRandom`'s prefetch, batches of whole vectors, the next batch
drawn while one is served); a variant with secure noise runs two steps back to back and times
the second, as in a training loop. ``fast_psac_secure_sync`` draws it in the step instead.
The worker's (or background thread's) CPU is not in the thread-CPU clock: ``noise_sampler``
times the secure sampler alone (per step, for the model's parameter count) and
``*_with_sampler`` / ``*_all_threads`` add it back. Prints JSON. On glibc, large per-step
buffers are mmap'ed and page-faulted afresh each step;
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (recorded in the output) change that.

    .venv/bin/python benchmarks/dp_step.py [--reps 300] [--resnet-reps 40] [--threads 1]
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


class _Block(nn.Module):
    """A ResNet basic block with GroupNorm (conv-GN-ReLU-conv-GN, plus a 1×1 projection when needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(8, cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(h)) + self.short(x))


class ResNetGN(nn.Module):
    """A small GroupNorm ResNet for 3×32×32 inputs: stem 16, stages 16/32/64 (stride 1/2/2), pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.GroupNorm(8, 16), nn.ReLU())
        self.blocks = nn.Sequential(_Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _build(model_name: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    if model_name == "resnet":
        torch.manual_seed(0)
        return ResNetGN(classes)
    return build_model(model_name, shape, classes, seed=0)


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """digits as 1×8×8 images in [0, 1]; breast cancer standardised; resnet: synthetic 3×32×32 normal."""
    from sklearn.datasets import load_breast_cancer, load_digits
    if name == "resnet":
        g = torch.Generator().manual_seed(0)
        return torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    if name == "cnn":
        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return x, torch.tensor(d.target, dtype=torch.long)
    b = load_breast_cancer()
    xs = (b.data - b.data.mean(0)) / b.data.std(0)
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(b.target, dtype=torch.long)


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
               crit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Step:
    """One training step over the next batch (``crit``: default cross-entropy; Opacus's ghost
    criterion wrapper runs its own two backward passes inside ``backward``)."""
    crit = crit or nn.CrossEntropyLoss()
    it = iter(range(10**9))

    def step() -> None:
        xb, yb = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        crit(model(xb), yb).backward()
        opt.step()

    return step


def _opacus_ghost_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, sigma: float,
                       clip: float, lr: float, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    """Opacus's own ghost clipping: its criterion wrapper runs the two backward passes."""
    import opacus
    from torch.utils.data import DataLoader, TensorDataset

    gm, opt, crit, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch), criterion=nn.CrossEntropyLoss(),
        noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode="ghost")
    return _make_step(gm, opt, batches, crit)


def _variants(model_name: str, shape: tuple[int, ...], classes: int, batches: list, sigma: float,
              clip: float, lr: float, data: tuple[torch.Tensor, torch.Tensor], batch: int
              ) -> tuple[dict[str, Step], str]:
    from opacus import GradSampleModule
    from torch.utils.data import DataLoader, TensorDataset

    import privfl

    out: dict[str, Step] = {}
    m = _build(model_name, shape, classes)
    out["nonprivate"] = _make_step(m, torch.optim.SGD(m.parameters(), lr=lr), batches)
    for rule in CLIPPING_RULES:
        m = _build(model_name, shape, classes)
        gsm = GradSampleModule(m)
        opt = PerSampleWeightDPOptimizer(torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                         max_grad_norm=clip, expected_batch_size=batch,
                                         random_source=SeededRandom(1), clipping=clipping_rule(rule))
        out[f"opacus_{rule}"] = _make_step(gsm, opt, batches)
        m = _build(model_name, shape, classes)
        gm, gopt = make_ghost_private(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                      max_grad_norm=clip, expected_batch_size=batch, clipping=clipping_rule(rule),
                                      random_source=SeededRandom(1))
        out[f"fast_{rule}"] = _make_step(gm, gopt, batches)
    # what a deployed node runs: the same step with noise from the secure ChaCha20 source
    for engine in ("opacus", "fast", "fast_sync"):
        m = _build(model_name, shape, classes)
        if engine == "fast_sync":  # the secure noise drawn inside the step (no prefetch)
            gm, gopt = make_ghost_private(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                          max_grad_norm=clip, expected_batch_size=batch,
                                          clipping=clipping_rule("psac"), random_source=SecureRandom(prefetch=False))
            out["fast_psac_secure_sync"] = _make_step(gm, gopt, batches)
        elif engine == "opacus":
            opt = PerSampleWeightDPOptimizer(torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                             max_grad_norm=clip, expected_batch_size=batch,
                                             random_source=SecureRandom(), clipping=clipping_rule("psac"))
            out["opacus_psac_secure"] = _make_step(GradSampleModule(m), opt, batches)
        else:
            gm, gopt = make_ghost_private(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma,
                                          max_grad_norm=clip, expected_batch_size=batch,
                                          clipping=clipping_rule("psac"), random_source=SecureRandom())
            out["fast_psac_secure"] = _make_step(gm, gopt, batches)
    out["opacus_ghost"] = _opacus_ghost_step(_build(model_name, shape, classes), *data, batch, sigma, clip, lr,
                                             batches)
    # privfl's default path: nothing but σ, C and q given (engine "auto", psac, secure noise, accounted)
    m = _build(model_name, shape, classes)
    engine = privfl.PrivacyEngine()
    dm, dopt, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=lr),
                                      data_loader=DataLoader(TensorDataset(*data), batch_size=batch),
                                      noise_multiplier=sigma, max_grad_norm=clip, sample_rate=batch / len(data[1]))
    out["default"] = _make_step(dm, dopt, batches)
    return out, str(engine.engine_kind)


def _sampler_us(n_params: int, sizes: list[int], reps: int = 200) -> dict[str, float]:
    """The noise of one step alone: median µs (thread CPU and wall) of the secure sampler and the seeded one."""
    refs = [torch.zeros(s) for s in sizes]
    out: dict[str, float] = {"values": n_params}
    for name, src in (("secure", SecureRandom(prefetch=False)), ("seeded", SeededRandom(1))):
        wall, cpu = [], []
        for r in range(reps + 10):
            c0, t0 = time.thread_time(), time.perf_counter()
            src.normal_like_each(1.0, refs)
            if r >= 10:
                wall.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
        out[f"{name}_wall_us"] = round(statistics.median(wall) * 1e6, 1)
        out[f"{name}_thread_cpu_us"] = round(statistics.median(cpu) * 1e6, 1)
    return out


#: variants whose noise is secure (prefetched): run twice back to back, the second step timed
_BACK_TO_BACK = ("opacus_psac_secure", "fast_psac_secure", "fast_psac_secure_sync", "default")


def bench_model(model_name: str, shape: tuple[int, ...], classes: int, reps: int, warmup: int,
                batch: int = 64) -> dict[str, object]:
    x, y = _data(model_name)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(64):
        idx = torch.randperm(len(y), generator=g)[:batch]
        batches.append((x[idx].contiguous(), y[idx].contiguous()))
    steps, default_engine = _variants(model_name, shape, classes, batches, sigma=1.0, clip=1.0, lr=0.05,
                                      data=(x, y), batch=batch)
    names = list(steps)
    order_rng = np.random.default_rng(0)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + reps):
        order = [names[i] for i in order_rng.permutation(len(names))]  # no fixed neighbour or position
        for k in order:
            if k in _BACK_TO_BACK:
                steps[k]()  # the step during which the timed step's noise is drawn ahead
            c0, t0 = time.thread_time(), time.perf_counter()
            steps[k]()
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if r >= warmup:
                wall[k].append(dt)
                cpu[k].append(dc)
    out: dict[str, object] = {"model": model_name, "input_shape": list(shape), "batch": batch, "reps": reps}
    sizes = [p.numel() for p in _build(model_name, shape, classes).parameters()]
    sampler = _sampler_us(sum(sizes), sizes)
    # whether the secure variants' noise was drawn ahead (model-sized vectors, a CPU left free)
    prefetched = SecureRandom().draws_ahead(sum(sizes))
    out["noise_sampler"] = {**sampler, "prefetched": prefetched}
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
        out[f"{label}_secure_noise"]["fast_sync"] = {  # type: ignore[index]
            "secure_sync_ms": round(med["fast_psac_secure_sync"], 4),
            "secure_sync_ratio_vs_nonprivate": round(med["fast_psac_secure_sync"] / base, 3),
            "secure_sync_over_seeded": round(med["fast_psac_secure_sync"] / med["fast_psac"], 3)}
        out[f"{label}_default"] = {
            "engine": default_engine, "default_ms": round(med["default"], 4),
            "opacus_ghost_ms": round(med["opacus_ghost"], 4),
            "default_ratio": round(med["default"] / base, 3),
            "opacus_ghost_ratio": round(med["opacus_ghost"] / base, 3),
            "default_speedup_vs_opacus_ghost": round(med["opacus_ghost"] / med["default"], 3),
            # the background thread's sampling added back: for thread_cpu, the step's CPU over all threads
            "default_ratio_with_sampler": round((med["default"] + prefetched * sampler[f"secure_{label}_us"] / 1e3)
                                                / base, 3),
            "fast_flat_speedup_vs_opacus_ghost": round(med["opacus_ghost"] / med["fast_flat"], 3)}
    out["wall_iqr_ms"] = {k: [round(float(np.percentile(v, 25)) * 1e3, 4), round(float(np.percentile(v, 75)) * 1e3, 4)]
                          for k, v in wall.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet-reps", type=int, default=40, help="repetitions for the (slower) resnet")
    ap.add_argument("--models", default="cnn,mlp,resnet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = list(os.getloadavg())
    specs = {"cnn": ((1, 8, 8), 10), "mlp": ((30,), 2), "resnet": ((3, 32, 32), 10)}
    results = []
    for name in args.models.split(","):
        shape, classes = specs[name]
        reps, warmup = (args.resnet_reps, min(args.warmup, 5)) if name == "resnet" else (args.reps, args.warmup)
        results.append(bench_model(name, shape, classes, reps, warmup))
    targets = {"cnn": 1.5, "mlp": 2.0, "resnet": 1.5}
    goal: dict[str, object] = {}
    for r in results:
        t = targets[str(r["model"])]
        r["target_ratio"] = t
        for label in ("wall", "thread_cpu"):
            r[f"fast_meets_target_{label}"] = all(v["fast_ratio"] <= t  # type: ignore[index]
                                                   for v in r[label].values())  # type: ignore[union-attr]
        d = {label: r[f"{label}_default"] for label in ("wall", "thread_cpu")}
        goal[str(r["model"])] = {
            "target_ratio": t, "engine": d["wall"]["engine"],  # type: ignore[index]
            **{f"default_ratio_{k}": v["default_ratio"] for k, v in d.items()},  # type: ignore[index]
            **{f"opacus_ghost_ratio_{k}": v["opacus_ghost_ratio"] for k, v in d.items()},  # type: ignore[index]
            **{f"meets_target_{k}": v["default_ratio"] <= t for k, v in d.items()},  # type: ignore[index]
            "default_ratio_thread_cpu_all_threads": d["thread_cpu"]["default_ratio_with_sampler"],  # type: ignore[index]
            "meets_target_thread_cpu_all_threads":
                d["thread_cpu"]["default_ratio_with_sampler"] <= t,  # type: ignore[index,operator]
            "secure_sync_ratio_wall": r["wall_secure_noise"]["fast_sync"]["secure_sync_ratio_vs_nonprivate"],  # type: ignore[index]
            **{f"ahead_of_opacus_ghost_{k}": v["default_ms"] < v["opacus_ghost_ms"]  # type: ignore[index]
               for k, v in d.items()},
        }
    per_model = [g for g in goal.values() if isinstance(g, dict)]
    for label in ("wall", "thread_cpu"):  # ≤ the target on every model and ahead of Opacus's ghost clipping
        goal[f"held_{label}"] = all(g[f"meets_target_{label}"] and g[f"ahead_of_opacus_ghost_{label}"]
                                    for g in per_model)
    goal["held_thread_cpu_all_threads"] = all(g["meets_target_thread_cpu_all_threads"] for g in per_model)
    from privfl.clients import noise_process

    drawer = "the noise worker process" if noise_process.worker() is not None else "a background thread"
    goal["noise"] = ("secure (ChaCha20, 4 Marsaglia-polar summands in float64), drawn ahead by "
                     f"{drawer} when a CPU is free (batches of whole vectors of >= "
                     f"{SecureRandom.PREFETCH_BATCH_VALUES:,} values, the next batch drawn while one is served)")
    import opacus
    print(json.dumps({
        "benchmark": "dp_step",
        "torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version(),
        "threads": args.threads, "step": "zero_grad + forward + backward + optimizer.step, median",
        "clocks": "wall = perf_counter; thread_cpu = this thread's CPU time (less sensitive to other load)",
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "loadavg_before": load0, "loadavg_after": list(os.getloadavg()),
        "goal": goal,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
