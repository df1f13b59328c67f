"""DPClient: a Flower NumPyClient that trains locally with DP-SGD, built on :class:`~clients.engine.PrivacyEngine`.

The client is thin: its training loop is an ordinary PyTorch loop over the module,
optimizer and Poisson loader that ``PrivacyEngine.make_private`` returns (per-sample
gradients from Opacus or the fast ghost engine, the clipping rule, the secure or seeded
random source, the accountant, the budget guard and the ``on_dp_event`` hook all live in
the engine). They are built once and live as long as the client, so ε accumulates across
``fit`` calls and never restarts. The steps of a ``fit`` are reserved in the accountant
(and reported to ``on_dp_event``, e.g. the ledger) *before* they run
(:meth:`PrivacyEngine.reserve`): a crash mid-fit can only over-count the budget, never
under-count it.

What it releases (see the README's threat model): ``fit`` returns the noised model, a
public weight (the declared site size, or 1) and public values only (ε, δ, steps,
flags) — never the training loss or the realised record count. ``evaluate`` releases
nothing by default (evaluation stays on the site: :meth:`DPClient.evaluate_local`); with
``eval_noise_multiplier`` set it releases a Gaussian-noised correct count over a public
denominator, its cost composed into the same accountant first. The sampling rate q,
the divisor of the noisy sum and σ all come from public declarations, never from the
number of records the site holds. Noise and batches come from a secure random source
unless a ``seed`` is given explicitly (simulations, tests).

Training and test data are ``(x, y)`` numpy arrays or torch ``Dataset``s yielding
``(input, label)`` pairs (e.g. images read from disk by a user's data factory).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flwr
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from privfl.accounting import BudgetExhausted, BudgetGuard, PrivacyAccountant, calibrate_noise
from privfl.accounting.errors import ConfigError
from privfl.accounting.releases import build_public_fit_metrics
from privfl.clients.engine import PrivacyEngine, mechanism_description
from privfl.clients.losses import Loss
from privfl.clients.optimizers import build_optimizer, check_optimizer
from privfl.clients.randomness import RandomSource, random_source

warnings.filterwarnings("ignore", message="(?i).*full backward hook.*")

NDArrays = list[np.ndarray]
DpEventHook = Callable[[dict[str, Any]], None]



@dataclass
class DPConfig:
    """Local training and differential-privacy settings of one site (all public).

    The sampling rate is declared, never derived from the records: ``sample_rate`` (q),
    or ``batch_size / declared_size`` where ``declared_size`` is the site's public
    declared record count. The noisy sum is divided by the public expected batch:
    ``q · declared_size`` when a size is declared, else ``batch_size``.
    """

    enabled: bool = True
    clipping: str = "psac"
    max_grad_norm: float = 1.0
    psac_r: float = 0.1
    autos_gamma: float = 0.01
    noise_multiplier: float | None = None
    target_epsilon: float = 3.0
    delta: float = 1e-5
    planned_steps: int | None = None
    batch_size: int = 64
    sample_rate: float | None = None
    declared_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.0
    accountant: str = "rdp"
    mechanism: str = "gaussian"
    mechanism_params: dict[str, Any] = field(default_factory=dict)
    #: "auto" (default): the fast engine when it supports every layer, else Opacus (one log
    #: line says which; TopAgg always runs on Opacus); "opacus": GradSampleModule hooks +
    #: PerSampleWeightDPOptimizer; "fast": clients.ghost (ghost norms, same noise and
    #: sensitivity, Linear/Conv2d/GroupNorm/LayerNorm only)
    engine: str = "auto"
    #: None: evaluation stays local; else the noise multiplier of the released correct count
    eval_noise_multiplier: float | None = None
    #: the public denominator of a released accuracy (a declared test-set size)
    eval_denominator: int | None = None
    #: "sgd" (with ``momentum``), "adam", "adamw" or a user factory "pkg.module:name"
    #: called as ``factory(params, lr=lr, **optimizer_args)``
    optimizer: str = "sgd"
    optimizer_args: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "dp") -> None:
        """Raise ConfigError naming ``<where>.<field>`` for the first bad value."""
        for name in ("max_grad_norm", "psac_r", "autos_gamma", "target_epsilon", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{where}.{name}: must be a finite number > 0, got {v!r}")
        if not (0 <= self.momentum < 1):
            raise ConfigError(f"{where}.momentum: must be in [0, 1), got {self.momentum!r}")
        check_optimizer(self.optimizer, self.momentum, where)
        if not 0 < self.delta < 1:
            raise ConfigError(f"{where}.delta: must be in (0, 1), got {self.delta!r}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size!r}")
        if self.noise_multiplier is not None and not (
                self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"{where}.noise_multiplier: must be a finite number > 0, got {self.noise_multiplier!r}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"{where}.sample_rate: must be in (0, 1], got {self.sample_rate!r}")
        if self.declared_size is not None and self.declared_size < 1:
            raise ConfigError(f"{where}.declared_size: must be >= 1, got {self.declared_size!r}")
        if self.declared_size is not None and self.delta >= 1 / self.declared_size:
            raise ConfigError(f"{where}.delta: δ={self.delta:g} must be below 1/declared_size "
                              f"= {1 / self.declared_size:g}")
        if self.enabled and self.sample_rate is None and self.declared_size is None:
            raise ConfigError(f"{where}.sample_rate: required: a public Poisson sampling rate in (0, 1] "
                              "(or declared_size, the site's public record count, with batch_size); "
                              "it is never derived from the private number of records")
        if self.eval_noise_multiplier is not None:
            if not (self.eval_noise_multiplier > 0 and math.isfinite(self.eval_noise_multiplier)):
                raise ConfigError(f"{where}.eval_noise_multiplier: must be a finite number > 0, "
                                  f"got {self.eval_noise_multiplier!r}")
            if not self.eval_denominator or self.eval_denominator < 1:
                raise ConfigError(f"{where}.eval_denominator: required with eval_noise_multiplier: the public "
                                  "(declared) test-set size the released accuracy is divided by")

    def public_sample_rate(self) -> float:
        """q: declared, or batch_size / declared_size (capped at 1)."""
        if self.sample_rate is not None:
            return float(self.sample_rate)
        if self.declared_size is None:
            raise ConfigError("dp.sample_rate: required (or dp.declared_size)")
        return min(1.0, self.batch_size / self.declared_size)

    def expected_batch_size(self) -> float:
        """The public divisor of the noisy gradient sum: q · declared_size, else batch_size."""
        if self.declared_size is not None:
            return max(1e-12, self.public_sample_rate() * self.declared_size)
        return float(self.batch_size)

    def public_weight(self) -> int:
        """The FedAvg weight a site may release: its declared size, or 1 (equal weights)."""
        return int(self.declared_size) if self.declared_size is not None else 1

    def resolved_noise(self, prior: dict[Any, int] | None = None) -> float:
        """σ: configured, or calibrated from (q, planned_steps, ε, δ) and ``prior`` events — all public."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if not self.planned_steps:
            raise ConfigError("dp.noise_multiplier: give it, or dp.planned_steps to calibrate σ from the target ε")
        try:
            return calibrate_noise(self.target_epsilon, self.delta, self.public_sample_rate(), self.planned_steps,
                                   self.accountant, prior=prior)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"dp.target_epsilon: {exc}") from None


class DPClient(flwr.client.NumPyClient):
    """Trains ``model`` on one site's data with per-sample clipping, noise and accounting.

    ``train`` / ``test``: ``(x, y)`` arrays, torch ``Dataset``s of ``(input, label)``, or
    DataLoaders over them (their Dataset is used: DP-SGD draws its own Poisson batches).
    ``criterion``: the training loss (mean over the batch; default cross-entropy).
    ``seed``: None (the default) draws noise and batches from a fresh secure source;
    an integer asks explicitly for a reproducible seeded stream (``random_kind``
    says which, and the node writes it into its ledger). With DP on, the module,
    optimizer and loader come from :attr:`privacy_engine` (a :class:`PrivacyEngine`).
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[np.ndarray, np.ndarray] | Dataset | DataLoader,
        test: tuple[np.ndarray, np.ndarray] | Dataset | DataLoader | None,
        config: DPConfig,
        seed: int | None = None,
        device: torch.device | str | None = None,
        accountant: PrivacyAccountant | None = None,
        on_dp_event: DpEventHook | None = None,
        criterion: Loss | None = None,
    ) -> None:
        self.config = config
        config.validate()
        self.device = torch.device(device) if device is not None else _default_device()
        self.seed = seed
        self.on_dp_event = on_dp_event
        dataset = _as_dataset(train, "train")
        self.n_train = len(dataset)  # type: ignore[arg-type]  # private: used on the site only, never released
        if self.n_train == 0:
            raise ValueError("a site needs at least one training sample")
        if config.enabled and config.delta >= 1 / self.n_train:
            raise ConfigError(f"dp.delta: δ={config.delta:g} is not below 1/n for this site's training records; "
                              "choose a smaller δ")
        #: the test split as tensors when given as arrays (None for a Dataset: see test_dataset)
        self.test: tuple[torch.Tensor, ...] | None = None
        self.test_dataset: Dataset | None = None
        if isinstance(test, DataLoader):
            test = test.dataset
        if isinstance(test, Dataset):
            self.test_dataset = test
        elif test is not None:
            self.test = tuple(torch.as_tensor(a) for a in test)
        self.module = model.to(self.device)
        self.criterion: Loss = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.accountant = accountant or PrivacyAccountant(config.accountant)  # type: ignore[arg-type]
        self.last_loss = math.nan  # the last fit's mean training loss: local, never released
        self.training_steps = 0  # DP training steps this client reserved (not preprocessing/evaluation)
        base_opt = build_optimizer(config.optimizer, self.module.parameters(), config.lr, config.momentum,
                                   config.optimizer_args)
        self.train_module: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.privacy_engine: PrivacyEngine | None = None
        if config.enabled:
            if config.engine not in ("opacus", "fast", "auto"):
                raise ConfigError(f"dp.engine: unknown engine {config.engine!r}; choose 'auto', 'opacus' or 'fast'")
            if config.mechanism not in ("gaussian", "topagg", "subspace"):
                raise ConfigError(f"dp.mechanism: must be gaussian or topagg (or subspace, from dp.subspace), "
                                  f"got {config.mechanism!r}")
            if config.engine == "fast" and config.mechanism != "gaussian":
                raise ConfigError(f"dp.engine: the 'fast' engine implements the gaussian mechanism only, "
                                  f"not {config.mechanism!r}; use engine = 'opacus'")
            self.sample_rate = config.public_sample_rate()
            self.noise_multiplier = config.resolved_noise()
            engine = PrivacyEngine(self.accountant, seed=seed, on_dp_event=self._emit)
            self.module.train()
            try:
                self.train_module, self.optimizer, self.loader = engine.make_private(
                    module=self.module, optimizer=base_opt,
                    data_loader=DataLoader(dataset, batch_size=config.batch_size),
                    noise_multiplier=self.noise_multiplier, max_grad_norm=config.max_grad_norm,
                    sample_rate=self.sample_rate, expected_batch_size=self._expected_batch(),
                    clipping=config.clipping, psac_r=config.psac_r, autos_gamma=config.autos_gamma,
                    engine=config.engine,  # type: ignore[arg-type]
                    target_epsilon=config.target_epsilon, delta=config.delta,
                    mechanism=config.mechanism, mechanism_params=config.mechanism_params)
            except ConfigError as exc:
                raise ConfigError(_as_dp_field(str(exc))) from None
            self.privacy_engine = engine
            self.guard: BudgetGuard | None = engine.guard
            self.sampling_source: RandomSource = engine.sampling_source
            assert engine.noise_source is not None
            self.noise_source: RandomSource = engine.noise_source
        else:
            self.sampling_source = random_source(seed)
            self.noise_source = random_source(None if seed is None else seed + 7919, self.device)
            self.sample_rate = min(1.0, config.batch_size / self.n_train)
            self.noise_multiplier = 0.0
            self.guard = None
            self.train_module = self.module
            gen = torch.Generator().manual_seed(
                seed if seed is not None else int.from_bytes(np.random.bytes(4), "little"))
            self.loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=gen)
            self.optimizer = base_opt
        self._batches = iter(self.loader)
        self.exhausted = False
        #: called with the number of steps about to run, once they are reserved (a multi-rank
        #: site's rank 0 hands them to its workers: :class:`~clients.distributed.SiteRanks`)
        self.before_steps: Callable[[int], None] | None = None

    # ---- construction helpers -------------------------------------------------------
    @property
    def random_kind(self) -> str:
        """"secure" or "seeded": where this client's noise and batches come from."""
        return self.noise_source.kind

    def _emit(self, event: dict[str, Any]) -> None:
        """Forward a DP event to :attr:`on_dp_event` (read at each event: it may be set later)."""
        if self.on_dp_event is not None:
            self.on_dp_event(event)

    def _expected_batch(self) -> float:
        """The divisor of the noisy sum: public (see :meth:`DPConfig.expected_batch_size`)."""
        return self.config.expected_batch_size()

    # ---- parameters -------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        """Names of the arrays ``get_parameters`` returns, in order."""
        return list(self.module.state_dict().keys())

    def get_parameters(self, config: dict[str, Any]) -> NDArrays:
        return [v.detach().cpu().numpy().copy() for v in self.module.state_dict().values()]

    def set_parameters(self, parameters: NDArrays) -> None:
        """Load ``parameters`` (in ``get_parameters`` order) into the model."""
        keys = self.parameter_names()
        if len(parameters) != len(keys):
            raise ValueError(f"expected {len(keys)} arrays, got {len(parameters)}")
        state = {k: torch.as_tensor(np.asarray(v)).to(self.device) for k, v in zip(keys, parameters)}
        self.module.load_state_dict(state, strict=True)

    # ---- privacy ----------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """ε spent so far at the configured δ (∞ when DP is off)."""
        if not self.config.enabled:
            return math.inf
        return self.accountant.get_epsilon(self.config.delta)

    def steps_allowed(self, requested: int) -> int:
        """How many of ``requested`` steps fit in the remaining budget."""
        if self.privacy_engine is None:
            return requested
        return self.privacy_engine.steps_allowed(requested)

    def mechanism_description(self) -> dict[str, Any]:
        """What an auditor needs to know of the training mechanism (public)."""
        c = self.config
        return mechanism_description(c.mechanism, c.clipping, c.max_grad_norm, c.mechanism_params)

    def _reserve(self, steps: int) -> None:
        """Account for ``steps`` training steps before they run (write-ahead: crash-safe)."""
        assert self.privacy_engine is not None
        self.privacy_engine.reserve(steps)
        self.training_steps += steps

    # ---- training ---------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def train_steps(self, steps: int) -> dict[str, float]:
        """Run up to ``steps`` local steps; fewer when the budget ends. Raises BudgetExhausted at 0.

        The returned (and :attr:`last_loss`) mean loss is local to the site: never released.
        """
        allowed = self.steps_allowed(steps)
        if allowed <= 0:
            self.exhausted = True
            assert self.guard is not None
            raise BudgetExhausted(self.guard.spent, self.config.target_epsilon,
                                  self.config.delta, self.accountant.steps)
        if self.config.enabled:
            self._reserve(allowed)
        if self.before_steps is not None:
            self.before_steps(allowed)
        losses = self.run_steps(allowed)
        if allowed < steps:
            self.exhausted = True
        self.last_loss = float(np.mean(losses)) if losses else float("nan")
        return {"loss": self.last_loss, "steps": float(allowed)}

    def run_steps(self, steps: int) -> list[float]:
        """Take ``steps`` optimizer steps on Poisson batches, already accounted; returns the (local) losses."""
        self.train_module.train()
        losses = []
        for _ in range(steps):
            xb, yb = self._next_batch()
            xb, yb = xb.to(self.device), yb.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            out = self.train_module(xb)
            if len(yb):
                loss = self.criterion(out, yb)
                losses.append(float(loss.detach()))
            else:
                # An empty Poisson batch still takes a (noise-only) step: skipping it would
                # make the released model depend on whether the batch was empty.
                loss = out.sum() * 0.0
            loss.backward()
            self.optimizer.step()
        return losses

    def local_steps_from(self, config: dict[str, Any]) -> int:
        """Steps asked for by a fit config: ``local_steps``, else ``local_epochs`` × (1/q) steps."""
        if "local_steps" in config:
            return int(config["local_steps"])
        epochs = float(config.get("local_epochs", 1))
        return max(1, int(round(epochs / self.sample_rate))) if self.config.enabled else \
            max(1, int(round(epochs * self.n_train / self.config.batch_size)))

    def public_fit_metrics(self, steps: int) -> dict[str, Any]:
        """The metrics a fit result carries: public values only (:data:`PUBLIC_FIT_METRICS`)."""
        c = self.config
        return build_public_fit_metrics(steps, self.training_steps, self.epsilon, c.delta, c.enabled, self.exhausted)

    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """Train, and release the noised model with a public weight and public metrics."""
        self.set_parameters(parameters)
        stats = self.train_steps(self.local_steps_from(config))
        return self.get_parameters({}), self.config.public_weight(), self.public_fit_metrics(int(stats["steps"]))

    def _test_size(self) -> int:
        """Records in the site's test split (private: never released)."""
        if self.test is not None:
            return len(self.test[1])
        return 0 if self.test_dataset is None else len(self.test_dataset)  # type: ignore[arg-type]

    @torch.no_grad()
    def evaluate_local(self, parameters: NDArrays | None = None) -> tuple[float, float]:
        """(test loss, accuracy) on the site's own test split: for the site alone, never released."""
        if parameters is not None:
            self.set_parameters(parameters)
        if self._test_size() == 0:
            return math.nan, math.nan
        if self.test is not None:
            return evaluate_model(self.module, self.test[0], self.test[1], self.device)
        assert self.test_dataset is not None
        return evaluate_dataset(self.module, self.test_dataset, self.device)

    @torch.no_grad()
    def evaluate(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """What the server may see of an evaluation: nothing by default, else a DP accuracy.

        With ``eval_noise_multiplier`` σₑ: correct count + N(0, σₑ²) (sensitivity 1 under
        add/remove one test record), divided by the public ``eval_denominator``, clipped
        to [0, 1]; the event is accounted (and budget-checked) before the release. The
        returned loss is 1 − that accuracy (post-processing), the example count the public
        denominator. Without it: ``(0.0, 0, {})`` — Flower's convention for "no result".
        """
        c = self.config
        if c.eval_noise_multiplier is None or not c.enabled:
            return 0.0, 0, {}
        self.set_parameters(parameters)
        if self.guard is not None and self.guard.would_exceed(c.eval_noise_multiplier, 1.0, 1):
            return 0.0, 0, {}
        correct = 0
        n_test = self._test_size()
        if n_test:
            _, acc = self.evaluate_local()
            correct = int(round(acc * n_test))
        assert self.privacy_engine is not None
        self.privacy_engine.account_event("evaluation", float(c.eval_noise_multiplier), 1.0, 1,
                                          local_mechanism="gaussian_count", clipping="count", max_grad_norm=1.0,
                                          sensitivity=1.0, mechanism_params={})
        noisy = correct + float(self.noise_source.normal(float(c.eval_noise_multiplier), (1,), dtype=torch.float64))
        acc_dp = min(1.0, max(0.0, noisy / float(c.eval_denominator)))  # type: ignore[arg-type]
        return 1.0 - acc_dp, int(c.eval_denominator), {"accuracy": acc_dp, "dp": 1}  # type: ignore[arg-type]

    # ---- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Accountant, optimizer and (seeded only) RNG state: what a restart needs besides the model.

        A seeded client saves its streams so a restored client continues them: replaying
        noise already used would correlate the noise of different releases. A secure
        client saves nothing of its stream: a restart draws a fresh key.
        """
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "training_steps": self.training_steps,
            "optimizer": self.optimizer.state_dict(),
            "sampling_rng": self.sampling_source.state_dict(),
            "noise_rng": self.noise_source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the accountant never goes backwards."""
        restored = PrivacyAccountant()
        restored.load_state_dict(state["accountant"])
        if restored.steps < self.accountant.steps:
            return  # our accountant already knows more (e.g. rebuilt from the ledger)
        self.accountant.load_state_dict(state["accountant"])
        self.training_steps = max(self.training_steps, int(state.get("training_steps", 0)))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(state.get("sampling_rng"), dict):
            self.sampling_source.load_state_dict(state["sampling_rng"])
        if isinstance(state.get("noise_rng"), dict):
            self.noise_source.load_state_dict(state["noise_rng"])


def _as_dp_field(msg: str) -> str:
    """An engine refusal named by the config field it came from ("make_private: clipping: …" → "dp.clipping: …")."""
    if not msg.startswith("make_private: "):
        return msg
    rest = msg[len("make_private: "):]
    field_name, sep, detail = rest.partition(": ")
    if field_name.startswith("engine="):
        return detail if detail.startswith("dp.engine") else f"dp.engine: {detail}"
    if field_name == "module":
        return f"model: {detail}"
    if sep and field_name in DPConfig.__dataclass_fields__:
        return f"dp.{rest}"
    return f"dp: {rest}"


def _as_dataset(data: tuple[np.ndarray, np.ndarray] | Dataset | DataLoader, name: str) -> Dataset:
    """A torch Dataset of (input, label): arrays become float inputs and int64 labels; a
    DataLoader gives its Dataset (DP-SGD draws its own Poisson batches over it)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        try:
            len(data)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{name}: a Dataset with a length is needed (Poisson sampling draws over its "
                              "indices)") from None
        return data
    x, y = (torch.as_tensor(a) for a in data)
    return TensorDataset(x.float(), y.long())


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   batch: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch].float().to(device), y[i:i + batch].long().to(device)
        out = model(xb)
        total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train()
    return total_loss / len(y), correct / len(y)


@torch.no_grad()
def evaluate_dataset(model: nn.Module, dataset: Dataset, device: torch.device,
                     batch: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a Dataset of (input, label)."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for xb, yb in DataLoader(dataset, batch_size=batch):
        xb, yb = xb.float().to(device), torch.as_tensor(yb).long().to(device)
        out = model(xb)
        total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    model.train()
    return total_loss / n, correct / n


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
