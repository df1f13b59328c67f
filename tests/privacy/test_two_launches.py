"""Two launches of one consortium config draw different noise.

Differencing the releases of two runs cancels any noise they share, so a curious party
holding both would see the clipped gradients. Each launch here is prepared by
``privfl launch``'s own ``prepare_run`` and its first node is built from the generated
node.toml exactly as ``python -m privfl.node`` builds it; both then take one DP step
from the same public start. The released changes must differ by about √2 × the norm of
one release's noise, which is what two independent draws give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privfl.launch import prepare_run
from privfl.node import Node
from privfl.node_config import load_node_config
from tests.helpers import patched_copy

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals-gossip" / "consortium.toml"
SIGMA = 30.0  # noise dominates: the batches' gradients move a release by at most 2·C·B_max·lr/B


def _release(tmp_path: Path, name: str) -> tuple[np.ndarray, float]:
    cfg_path = patched_copy(EXAMPLE, tmp_path / f"{name}.toml", [
        ("noise_multiplier = 0.0", f"noise_multiplier = {SIGMA}"),
        ('name = "logreg"', 'name = "mlp"'),  # 4,130 parameters: the norm of the noise is sharp
    ])
    plan = prepare_run(cfg_path, runs_dir=tmp_path / "runs", run_name=name)
    node = Node(load_node_config(plan.node_configs[plan.node_ids[0]]))
    try:
        c = node.client
        start = [p.copy() for p in node.initial_params]
        out, _, _ = c.fit(start, {"local_steps": 1})
        dp = node.cfg.common.dp
        scale = dp.lr * SIGMA * dp.max_grad_norm / c._expected_batch()  # per-coordinate noise std of a release
        return np.concatenate([(o - s).ravel() for o, s in zip(out, start)]), scale
    finally:
        node.ledger.close()  # type: ignore[union-attr]
        node.network.client.close()  # type: ignore[union-attr]


def test_two_launches_of_one_config_draw_independent_noise(tmp_path: Path) -> None:
    a, scale = _release(tmp_path, "first")
    b, _ = _release(tmp_path, "second")
    d = a.size
    one = scale * np.sqrt(d)  # expected norm of one release's noise
    diff = float(np.linalg.norm(a - b))
    # identical noise would leave only the (small) gradient difference; independent noise gives √2·one
    assert d > 4000
    assert diff == pytest.approx(np.sqrt(2) * one, rel=0.1), (diff, one, d)
    assert diff > 0.5 * one
