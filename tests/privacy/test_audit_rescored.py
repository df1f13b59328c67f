"""The empirical audit, rescored by an attacker who knows every config value.

White-box gradient canaries: canary i adds a norm-C gradient to one weight that no record
touches, so that weight's total update is (lr/B)·(C·hits + Σ noise). An attacker who can
recompute the noise subtracts it and separates included from excluded canaries perfectly.
With the default secure noise the rescored lower bound stays below the formal ε; with
``[audit].noise = "seeded"`` (the control) the same attacker breaks it — so the test can fail.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privfl.accounting.audit_empirical import epsilon_lower_bound
from privfl.audit_run import AuditRunResult, audit_config_from, run_audit
from privfl.clients.randomness import SeededRandom

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "audit" / "audit.toml"
SEED = 3


def _table(**overrides: Any) -> dict[str, Any]:
    t = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    for key, val in overrides.items():
        sec, field = key.split("__")
        t[sec][field] = val
    return t


def _attacker_rescores(res: AuditRunResult, table: dict[str, Any], d: int, classes: int) -> np.ndarray:
    """Subtract the noise the attacker recomputes from the public config and ``[audit].seed``."""
    m = int(table["audit"]["canaries"])
    sigma, c = float(table["dp"]["noise_multiplier"]), float(table["dp"]["max_grad_norm"])
    lr, batch = float(table["dp"]["lr"]), float(table["dp"]["batch_size"])
    rows = np.random.default_rng(SEED + 104729).integers(0, classes, size=m)  # public: from the seed
    cols = d + np.arange(m)
    noise = SeededRandom(SEED + 7919)  # the stream a seeded DPClient uses for its noise
    shapes = [(classes, d + m), (classes,)]  # logreg: weight, bias, in Opacus's parameter order
    total = np.zeros(m)
    for _ in range(res.steps):
        for shape in shapes:
            z = noise.normal(sigma * c, shape).numpy()
            if shape == shapes[0]:
                total += z[rows, cols]
    return np.asarray(res.scores) - lr / batch * total


def _run(noise: str) -> tuple[AuditRunResult, np.ndarray, dict[str, Any]]:
    table = _table(audit__canary="gradient", audit__noise=noise, dp__noise_multiplier=3.0)
    cfg = audit_config_from(table, "audit.toml")
    res = run_audit(cfg, seed=SEED)
    rescored = _attacker_rescores(res, table, d=64, classes=10)
    return res, rescored, table


def test_attacker_knowing_every_config_value_stays_below_formal_epsilon() -> None:
    res, rescored, table = _run("secure")
    k_pos, k_neg = int(table["audit"]["k_pos"]), int(table["audit"]["k_neg"])
    assert res.formal_epsilon is not None
    lb = epsilon_lower_bound(rescored, res.inclusion, k_pos, k_neg, 1e-5, float(table["audit"]["beta"]))
    assert lb <= res.formal_epsilon, (lb, res.formal_epsilon)
    assert res.epsilon_lb <= res.formal_epsilon


def test_control_seeded_noise_is_broken_by_the_same_attacker() -> None:
    res, rescored, table = _run("seeded")
    k_pos, k_neg = int(table["audit"]["k_pos"]), int(table["audit"]["k_neg"])
    assert res.formal_epsilon is not None
    lb = epsilon_lower_bound(rescored, res.inclusion, k_pos, k_neg, 1e-5, float(table["audit"]["beta"]))
    assert lb > res.formal_epsilon, (lb, res.formal_epsilon)
