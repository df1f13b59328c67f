"""A short GPU check of privfl's DP engines on a user-style model (what ``scripts/gpu-check.sh`` runs).

Why: the test suite runs on CPU; this is the check to run once on a machine with CUDA.
It trains a small CNN with GroupNorm for a few DP steps on the device with both engines
("opacus": per-sample gradients by hooks; "fast": ghost norms) from the same seeded
streams (``clients.randomness.SeededRandom``: one for the Poisson batches, one for the
noise, on the device), and checks that

* both engines give the same update (to rounding),
* the noise of an empty Poisson step has std σ·C on the device, for each engine,
* every parameter stayed on the device.

Prints one JSON object (each check, its value, its tolerance and whether it held) and
exits 0 when every check held, 1 otherwise. Without CUDA it prints that it skipped and
exits 0. ``--device cpu`` runs the same checks on the CPU (to check the checker).
Nothing here reaches the network: the data are random tensors built here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run from a checkout
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SIGMA, CLIP = 1.5, 0.7


class SmallCNN(nn.Module):
    """A user-style model: two convolutions with GroupNorm, then a linear head (1×8×8 → 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 16, 3), nn.GroupNorm(4, 16), nn.ReLU())
        self.head = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def _data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)


def _client(engine: str, device: str, sample_rate: float, lr: float, batch_size: int) -> Any:
    from privfl.clients import DPClient, DPConfig

    cfg = DPConfig(noise_multiplier=SIGMA, max_grad_norm=CLIP, clipping="flat", sample_rate=sample_rate,
                   batch_size=batch_size, lr=lr, target_epsilon=1e6, delta=1e-5, engine=engine)
    # seed=11: the batches and the noise come from SeededRandom streams (the noise one on the device)
    return DPClient(_model(), _data(), None, cfg, seed=11, device=device)


def _flat(params: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in params])


def run_checks(device: str) -> list[dict[str, Any]]:
    """The checks on ``device``; each a dict with name, value, tolerance and held."""
    checks: list[dict[str, Any]] = []
    start = _flat([p.detach().cpu().numpy() for p in _model().state_dict().values()])
    # 1. the same update from both engines (a few real steps: non-empty Poisson batches)
    updates = {}
    for engine in ("opacus", "fast"):
        c = _client(engine, device, sample_rate=0.25, lr=0.5, batch_size=64)
        params, _, _ = c.fit(c.get_parameters({}), {"local_steps": 3})
        on_device = all(p.device.type == torch.device(device).type for p in c.module.parameters())
        checks.append({"name": f"{engine}: parameters on {device}", "value": on_device, "tolerance": None,
                       "held": bool(on_device)})
        used = getattr(getattr(c, "privacy_engine", None), "engine_kind", engine)  # never a silent fallback
        seeded = c.noise_source.kind == "seeded" and c.sampling_source.kind == "seeded"
        checks.append({"name": f"{engine}: that engine ran, from seeded streams", "value": used,
                       "randomness": c.noise_source.kind, "tolerance": None, "held": bool(used == engine and seeded)})
        updates[engine] = _flat(params) - start
    diff = float(np.abs(updates["opacus"] - updates["fast"]).max())
    scale = float(np.abs(updates["opacus"]).max())
    tol = 1e-4 * max(1.0, scale)
    checks.append({"name": "opacus and fast give the same update (max abs difference)", "value": diff,
                   "tolerance": tol, "update_max_abs": scale, "held": bool(math.isfinite(diff) and diff <= tol)})
    # 2. an empty Poisson step (q tiny): the update is the noise alone, lr = 1, divisor batch_size = 1
    for engine in ("opacus", "fast"):
        c = _client(engine, device, sample_rate=1e-9, lr=1.0, batch_size=1)
        params, _, _ = c.fit(c.get_parameters({}), {"local_steps": 1})
        noise = -(_flat(params) - start)
        std = float(noise.std())
        rel = abs(std / (SIGMA * CLIP) - 1.0)
        tol = 5.0 / math.sqrt(2 * noise.size)  # five standard errors of a sample std
        checks.append({"name": f"{engine}: noise std of an empty step is sigma*C", "value": std,
                       "expected": SIGMA * CLIP, "relative_error": rel, "tolerance": tol, "parameters": int(noise.size),
                       "held": bool(rel <= tol)})
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="privfl GPU check: both DP engines on CUDA")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the checker")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": True, "reason": "no CUDA device on this machine: skipped",
                          "torch": torch.__version__}))
        return 0
    checks = run_checks(args.device)
    ok = all(c["held"] for c in checks)
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"skipped": False, "device": args.device, "device_name": name, "torch": torch.__version__,
                      "ok": ok, "checks": checks}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
