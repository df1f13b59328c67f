"""The canary training run of the one-run empirical privacy audit (Steinke, Nasr & Jagielski 2023).

One node's data, model and DP settings come from a TOML config ([data], [model], [dp],
as everywhere) plus an ``[audit]`` section. m canaries are made, each is included
independently with probability ½ (S_i = ±1) on top of the node's ordinary training
data, ONE model is trained with the real :class:`clients.DPClient` (real Opacus, real
accountant), each canary is scored by how much training lowered the loss of its label
(``loss_before − loss_after``: higher = looks included), and
:func:`accounting.audit_empirical.audit_one_run` turns the guesses on the k₊ highest /
k₋ lowest scores into an ε lower bound at confidence 1 − β, reported beside the
accountant's ε at the same δ. A lower bound above the formal ε is a bug signal.

Canary kinds (all are input-space canaries; the auditor only queries the final model):

* ``mislabeled``: m of the node's own training rows, each with a random wrong label;
  the ordinary data is the rest of the node's rows. Weakest, most realistic.
* ``ood``: m random inputs, N(0, canary_scale²) per feature, each with a random label.
* ``dirac``: the inputs get m extra features, zero for every ordinary row; canary i is
  ``canary_scale`` on extra feature i and zero elsewhere, with a random label. Only
  canary i ever moves the weights of its own feature, so the final model holds the
  canary's clipped gradient sum plus the DP noise and nothing else: close to the
  white-box "gradient canary" of the paper, realised through the data (logreg/mlp only).
* ``gradient`` (white-box): the inputs get m extra all-zero features as for ``dirac``, but
  canary i is no input at all: it is a gradient of norm C (the sensitivity) on one weight
  of the first layer, at extra feature i, added to the clipped per-sample sum of every
  step in which the canary is Poisson-sampled (rate q, like a record) — before the noise.
  Its score is minus the canary weight's total update. No ordinary record touches those
  weights, so this audits the Gaussian mechanism and its accountant directly (Opacus
  engine, gaussian mechanism only).

What keeps the audit honest: the sampling rate given to the client (``[dp].sample_rate``,
or batch_size over the *expected* training-set size, ordinary rows + m/2) and the number
of steps are fixed before S is drawn, and the noisy sum is divided by the public
batch_size, so nothing but the canaries' presence depends on S; k₊ and k₋ are fixed by
the config before any score exists. The DP noise is drawn from a secure source
(``[audit].noise = "secure"``, the default), so an attacker who knows every config value,
``[audit].seed`` included, cannot subtract it; ``"seeded"`` makes the noise reproducible
from the seed too, for regression tests only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privfl.accounting import BudgetExhausted, PrivacyAccountant
from privfl.accounting.audit_empirical import OneRunAudit, audit_one_run, draw_inclusion_signs
from privfl.clients import DPClient
from privfl.clients.dp_client import evaluate_model
from privfl.clients.randomness import random_source
from privfl.config import (
    DataSection,
    DPSection,
    ModelSection,
    apply_python_path,
    check_sections,
    from_table,
    read_toml,
)
from privfl.data import Dataset
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.preprocessing import preprocess_site

log = logging.getLogger("privfl.audit")

CANARY_KINDS = ("mislabeled", "ood", "dirac", "gradient")
ALLOWED_SECTIONS = ("data", "model", "dp", "audit")
#: ood: std of the random inputs (features are z-scored); dirac: the value on the canary's own
#: feature (large, so that nearly all of the clipped gradient lands on that feature's weights)
#: mislabeled: unused
#: gradient: unused (the canary gradient has norm C)
DEFAULT_SCALE = {"mislabeled": 1.0, "ood": 1.0, "dirac": 10.0, "gradient": 1.0}


@dataclass
class AuditSection:
    """How the canary audit is run. ``k_pos``/``k_neg`` = 0 mean m // 10 each (fixed before scoring)."""

    canaries: int = 200
    canary: str = "dirac"
    k_pos: int = 0
    k_neg: int = 0
    beta: float = 0.05
    epochs: float = 20.0
    steps: int = 0
    site: int = 0
    canary_scale: float = 0.0  # 0 = the kind's default (DEFAULT_SCALE)
    seed: int = 0
    node_id: str = ""
    noise: str = "secure"  # "secure": DP noise from OS entropy; "seeded": from seed (tests only)

    def validate(self, where: str) -> None:
        if self.noise not in ("secure", "seeded"):
            raise ConfigError(f"{where}.noise: must be secure or seeded, got {self.noise!r}")
        if self.canaries < 2:
            raise ConfigError(f"{where}.canaries: need at least 2 canaries, got {self.canaries}")
        if self.canary not in CANARY_KINDS:
            raise ConfigError(f"{where}.canary: must be one of {', '.join(CANARY_KINDS)}, got {self.canary!r}")
        for name in ("k_pos", "k_neg", "steps", "site"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        kp, kn = self.guesses()
        if kp + kn > self.canaries:
            raise ConfigError(f"{where}.k_pos: k_pos + k_neg = {kp + kn} exceeds canaries = {self.canaries}")
        if kp + kn == 0:
            raise ConfigError(f"{where}.k_pos: k_pos + k_neg must be >= 1")
        if not 0 < self.beta < 1:
            raise ConfigError(f"{where}.beta: must be in (0, 1), got {self.beta}")
        if self.steps == 0 and not self.epochs > 0:
            raise ConfigError(f"{where}.epochs: must be > 0 (or give steps), got {self.epochs}")
        if self.canary_scale < 0:
            raise ConfigError(f"{where}.canary_scale: must be > 0 (or 0 for the default), got {self.canary_scale}")

    def scale(self) -> float:
        """The canary scale: as configured, or the kind's default."""
        return self.canary_scale or DEFAULT_SCALE[self.canary]

    def guesses(self) -> tuple[int, int]:
        """(k₊, k₋) with the default m // 10 each side where the config leaves 0 (both 0 → both default)."""
        if self.k_pos == 0 and self.k_neg == 0:
            k = max(1, self.canaries // 10)
            return k, k
        return self.k_pos, self.k_neg


@dataclass
class AuditConfig:
    """A parsed audit config: the node's data, model and DP settings, and the audit itself."""

    data: DataSection = field(default_factory=lambda: DataSection(num_sites=1))
    model: ModelSection = field(default_factory=ModelSection)
    dp: DPSection = field(default_factory=DPSection)
    audit: AuditSection = field(default_factory=AuditSection)
    base_dir: Path | None = None

    def validate(self, source: str) -> None:
        """Cross-section checks (each error names its field)."""
        a = self.audit
        if a.site >= self.data.num_sites:
            raise ConfigError(f"{source}: [audit].site: {a.site} but [data].num_sites = {self.data.num_sites}")
        if a.canary in ("dirac", "gradient") and self.model.name not in ("logreg", "mlp"):
            raise ConfigError(f"{source}: [audit].canary: {a.canary!r} canaries need model logreg or mlp, "
                              f"not {self.model.name!r}")
        if a.canary == "gradient" and self.dp.enabled and (self.dp.engine not in ("auto", "opacus")
                                                          or self.dp.mechanism != "gaussian"):
            raise ConfigError(f"{source}: [audit].canary: 'gradient' canaries need dp.engine = 'opacus' "
                              f"(or 'auto', which they resolve to Opacus) and dp.mechanism = 'gaussian'")


def audit_config_from(table: dict[str, Any], source: str, base_dir: Path | None = None) -> AuditConfig:
    """An :class:`AuditConfig` from a parsed TOML table; unknown sections and keys are refused."""
    if base_dir is not None:
        apply_python_path(table, base_dir, source)
    check_sections(table, ALLOWED_SECTIONS, source)
    if "audit" not in table:
        raise ConfigError(f"{source}: [audit] section missing")
    kw: dict[str, Any] = {}
    for name, cls in (("data", DataSection), ("model", ModelSection), ("dp", DPSection), ("audit", AuditSection)):
        if name in table:
            kw[name] = from_table(cls, table[name], f"{source}: [{name}]")
    cfg = AuditConfig(**kw, base_dir=base_dir)
    cfg.validate(source)
    return cfg


def load_audit_config(path: str | Path) -> AuditConfig:
    """Read and validate an audit TOML file."""
    p = Path(path)
    return audit_config_from(read_toml(p), str(p), base_dir=p.parent)


@dataclass(frozen=True)
class Canaries:
    """Ordinary training rows, the m canaries, and the test rows, in the model's input shape."""

    ordinary_x: np.ndarray
    ordinary_y: np.ndarray
    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def make_canaries(kind: str, train: Dataset, test: Dataset, m: int, scale: float,
                  rng: np.random.Generator) -> Canaries:
    """Build the m canaries of ``kind`` for one node's train/test data (see the module docstring)."""
    c = train.num_classes
    if c < 2:
        raise ConfigError("[data]: the audit needs at least 2 classes")
    if kind == "mislabeled":
        if m > len(train) - 1:
            raise ConfigError(f"[audit].canaries: {m} mislabeled canaries need more than {m} training rows "
                              f"at the node; it has {len(train)}")
        idx = rng.permutation(len(train))
        cidx, oidx = np.sort(idx[:m]), np.sort(idx[m:])
        wrong = (train.y[cidx] + rng.integers(1, c, size=m)) % c
        return Canaries(train.x[oidx], train.y[oidx], train.x[cidx], wrong.astype(np.int64), test.x, test.y)
    labels = rng.integers(0, c, size=m).astype(np.int64)
    if kind == "ood":
        x = (rng.standard_normal((m, *train.x.shape[1:])) * scale).astype(np.float32)
        return Canaries(train.x, train.y, x, labels, test.x, test.y)
    if kind in ("dirac", "gradient"):
        d = int(np.prod(train.x.shape[1:]))
        pad = lambda a: np.concatenate(  # noqa: E731
            [a.reshape(len(a), d), np.zeros((len(a), m), dtype=np.float32)], axis=1)
        x = np.zeros((m, d + m), dtype=np.float32)
        x[np.arange(m), d + np.arange(m)] = scale  # for 'gradient' only the shape matters
        return Canaries(pad(train.x), train.y, x, labels, pad(test.x), test.y)
    raise ConfigError(f"[audit].canary: must be one of {', '.join(CANARY_KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class AuditRunResult:
    """The audit's bound, the formal ε it is compared with, and what the run did."""

    audit: OneRunAudit
    formal_epsilon: float | None  # None when DP is off (no finite guarantee)
    dp_enabled: bool
    canary: str
    node_id: str
    steps: int
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    clipping: str
    included: int
    test_accuracy: float
    mean_score_included: float
    mean_score_excluded: float
    seconds: float
    scores: list[float] = field(repr=False, default_factory=list)
    inclusion: list[int] = field(repr=False, default_factory=list)

    @property
    def epsilon_lb(self) -> float:
        """The empirical lower bound on ε at confidence 1 − β."""
        return self.audit.epsilon_lb

    @property
    def exceeds_formal(self) -> bool:
        """The lower bound exceeds the accountant's ε: DP or accounting is broken."""
        return self.audit.exceeds_upper_bound

    def to_dict(self, with_scores: bool = False) -> dict[str, Any]:
        """JSON-serialisable form (scores and inclusion signs only when asked)."""
        d = {k: getattr(self, k) for k in (
            "formal_epsilon", "dp_enabled", "canary", "node_id", "steps", "noise_multiplier",
            "sample_rate", "max_grad_norm", "clipping", "included", "test_accuracy",
            "mean_score_included", "mean_score_excluded", "seconds")}
        d.update(self.audit.to_dict())
        d["exceeds_formal"] = self.exceeds_formal
        if with_scores:
            d["scores"], d["inclusion"] = list(self.scores), list(self.inclusion)
        return d


def _first_linear(module: nn.Module) -> nn.Linear:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return layer
    raise ConfigError("[model].name: 'gradient' canaries need a model with a Linear first layer")


class _GradientCanaries:
    """White-box canaries: norm-C gradients on private weights, Poisson-sampled into each step's sum.

    With DP on they enter the clipped per-sample sum (``p.summed_grad``) before Opacus adds the
    noise; with DP off they are added to the mean gradient as one more batch member (C / B).
    """

    def __init__(self, client: DPClient, d: int, included: np.ndarray, q: float, seed: int) -> None:
        m = len(included)
        self.weight = _first_linear(client.module).weight
        rows = np.random.default_rng(seed + 104729).integers(0, self.weight.shape[0], size=m)
        self.rows = torch.as_tensor(rows, device=self.weight.device)
        self.cols = torch.as_tensor(d + np.arange(m), device=self.weight.device)
        self.included, self.q = included, q
        self.c = float(client.config.max_grad_norm)
        self.rng = np.random.default_rng(seed + 15485863)
        self.start = self.weight.detach()[self.rows, self.cols].clone()
        self.hits = np.zeros(m, dtype=np.int64)
        opt = client.optimizer
        if client.config.enabled:
            orig = opt.clip_and_accumulate  # type: ignore[attr-defined]  # a DPOptimizer (Opacus's API)

            def clip_and_accumulate() -> None:
                orig()
                g = self._draw()
                if g is not None:
                    self.weight.summed_grad = self.weight.summed_grad + g  # type: ignore[attr-defined]

            opt.clip_and_accumulate = clip_and_accumulate  # type: ignore[attr-defined]
        else:
            orig_step = opt.step
            batch = client.config.batch_size

            def step(*args: Any, **kwargs: Any) -> Any:
                g = self._draw()
                if g is not None and self.weight.grad is not None:
                    self.weight.grad.add_(g / batch)
                return orig_step(*args, **kwargs)

            opt.step = step  # type: ignore[method-assign]

    def _draw(self) -> torch.Tensor | None:
        """This step's canary gradient: C on the weight of each included canary sampled (rate q)."""
        hit = self.included & (self.rng.random(len(self.included)) < self.q)
        if not hit.any():
            return None
        self.hits += hit
        g = torch.zeros_like(self.weight)
        idx = torch.as_tensor(np.flatnonzero(hit), device=g.device)
        g[self.rows[idx], self.cols[idx]] = self.c
        return g

    @torch.no_grad()
    def scores(self) -> np.ndarray:
        """Minus each canary weight's total update (SGD moves against the canary's +C gradient)."""
        now = self.weight.detach()[self.rows, self.cols]
        return (self.start - now).cpu().numpy().astype(np.float64)


@torch.no_grad()
def _label_losses(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> np.ndarray:
    """Per-row cross-entropy of label ``y`` under ``model`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    out = model(torch.as_tensor(x).float().to(device))
    losses = nn.functional.cross_entropy(out, torch.as_tensor(y).long().to(device), reduction="none")
    model.train(was_training)
    return losses.detach().cpu().numpy().astype(np.float64)


def run_audit(cfg: AuditConfig, seed: int | None = None, device: torch.device | str | None = None,
              torch_threads: int = 1) -> AuditRunResult:
    """Insert canaries, train once with the node's DP settings, score, and bound ε (see module docstring).

    ``seed`` overrides ``[audit].seed`` (canaries and inclusion; sampling and noise too only
    with ``[audit].noise = "seeded"``). Torch runs
    with ``torch_threads`` intra-op threads for the duration (restored after): the models are
    tiny, and more threads only contend (a run took 16–27 s instead of ~1.5 s on a loaded
    2-core machine).
    """
    threads = torch.get_num_threads()
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    try:
        return _run_audit(cfg, seed, device)
    finally:
        torch.set_num_threads(threads)


def _run_audit(cfg: AuditConfig, seed: int | None, device: torch.device | str | None) -> AuditRunResult:
    t0 = time.perf_counter()
    a = cfg.audit
    seed = a.seed if seed is None else seed
    node = a.node_id or f"site{a.site}"
    sites = cfg.data.sites(cfg.base_dir)
    if a.site >= len(sites):
        raise ConfigError(f"[audit].site: {a.site} but the data has {len(sites)} sites")
    # the node's own preprocessing, fitted on its ordinary rows (public ranges, or a DP estimate
    # whose event goes into the accountant below); the canaries live in the preprocessed space
    noise_seed = seed if a.noise == "seeded" else None
    site, pre = preprocess_site(cfg.data.preprocessing_spec(cfg.base_dir), sites[a.site],
                                source=random_source(None if noise_seed is None else noise_seed + 4243),
                                dataset_name=cfg.data.builtin_name())
    rng = np.random.default_rng(seed)
    can = make_canaries(a.canary, site.train, site.test, a.canaries, a.scale(), rng)
    signs = draw_inclusion_signs(a.canaries, rng)
    inc = signs > 0
    if a.canary == "gradient":  # gradient canaries are no records: they enter in the optimizer
        train_x, train_y = can.ordinary_x, can.ordinary_y
    else:
        train_x = np.concatenate([can.ordinary_x, can.x[inc]])
        train_y = np.concatenate([can.ordinary_y, can.y[inc]])

    expected_n = len(can.ordinary_y) + a.canaries / 2
    dp = cfg.dp.to_dp_config()
    q = dp.sample_rate if dp.sample_rate is not None else min(1.0, dp.batch_size / expected_n)
    dp_cfg = dataclasses.replace(dp, sample_rate=q, declared_size=None)
    if a.canary == "gradient" and dp_cfg.engine == "auto":
        dp_cfg.engine = "opacus"  # the canaries enter through Opacus's clip_and_accumulate
    steps = a.steps or max(1, int(round(a.epochs * expected_n / dp.batch_size)))
    if dp_cfg.enabled and dp_cfg.noise_multiplier is None and dp_cfg.planned_steps is None:
        dp_cfg.planned_steps = steps  # calibrate σ from target ε over the audit's own steps
    accountant = PrivacyAccountant(dp_cfg.accountant)  # type: ignore[arg-type]
    if pre.dp_event is not None:  # preprocessing + training together fit the target ε, as on a node
        accountant.step(pre.dp_event.noise_multiplier, pre.dp_event.sample_rate, pre.dp_event.steps)
        if dp_cfg.enabled:
            dp_cfg.noise_multiplier = dp_cfg.resolved_noise(prior=accountant.events)

    model = build_model(cfg.model.spec, tuple(can.x.shape[1:]), site.train.num_classes, args=cfg.model.args,
                        seed=cfg.model.seed, hidden=tuple(cfg.model.hidden))
    try:
        client = DPClient(model, (train_x, train_y), (can.test_x, can.test_y), dp_cfg,
                          seed=noise_seed, device=device, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"[dp]: {exc}") from None
    log.info("audit node=%s canary=%s m=%d included=%d steps=%d dp=%s sigma=%.4g q=%.4g",
             node, a.canary, a.canaries, int(inc.sum()), steps, dp_cfg.enabled, client.noise_multiplier, q)
    gradient = None
    if a.canary == "gradient":
        gradient = _GradientCanaries(client, can.x.shape[1] - a.canaries, inc, q, seed)
    else:
        before = _label_losses(client.module, can.x, can.y, client.device)
    try:
        _, _, metrics = client.fit(client.get_parameters({}), {"local_steps": steps})
    except BudgetExhausted as exc:
        raise ConfigError(f"[dp].target_epsilon: no step fits the budget ({exc})") from None
    if gradient is not None:
        scores = gradient.scores()
    else:
        scores = before - _label_losses(client.module, can.x, can.y, client.device)
    formal = client.epsilon if dp_cfg.enabled else None
    k_pos, k_neg = a.guesses()
    result = audit_one_run(scores, signs, k_pos, k_neg, dp_cfg.delta, a.beta, formal)
    _, acc = evaluate_model(client.module, torch.as_tensor(can.test_x), torch.as_tensor(can.test_y), client.device)
    out = AuditRunResult(
        audit=result, formal_epsilon=formal, dp_enabled=dp_cfg.enabled, canary=a.canary, node_id=node,
        steps=int(metrics["steps"]), noise_multiplier=float(client.noise_multiplier), sample_rate=q,
        max_grad_norm=dp_cfg.max_grad_norm, clipping=dp_cfg.clipping, included=int(inc.sum()),
        test_accuracy=float(acc), mean_score_included=float(scores[inc].mean()) if inc.any() else math.nan,
        mean_score_excluded=float(scores[~inc].mean()) if (~inc).any() else math.nan,
        seconds=time.perf_counter() - t0, scores=scores.tolist(), inclusion=signs.astype(int).tolist(),
    )
    log.info("audit node=%s eps_lb=%.4f formal_eps=%s delta=%g r=%d v=%d", node, result.epsilon_lb,
             "none" if formal is None else f"{formal:.4f}", dp_cfg.delta, result.r, result.v)
    if out.exceeds_formal:
        log.error("audit node=%s: empirical eps_lb %.4f EXCEEDS the accountant's eps %.4f: DP or accounting broken",
                  node, result.epsilon_lb, formal)
    return out
