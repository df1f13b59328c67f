"""DPClient: a Flower NumPyClient that trains locally with DP-SGD on Opacus.

The Opacus pieces (GradSampleModule, Poisson-sampled DPDataLoader, the optimizer) and
the accountant are built once and live as long as the client, so ε accumulates across
``fit`` calls and never restarts. The steps of a ``fit`` are reserved in the accountant
(and reported to ``on_dp_event``, e.g. the ledger) *before* they run: a crash mid-fit
can only over-count the budget, never under-count it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import flwr
import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accounting import BudgetExhausted, BudgetGuard, PrivacyAccountant, calibrate_noise
from clients.clipping import clipping_rule
from clients.ghost import make_ghost_private
from clients.optimizer import PerSampleWeightDPOptimizer
from privfl.errors import ConfigError

warnings.filterwarnings("ignore", message="(?i).*full backward hook.*")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")

NDArrays = list[np.ndarray]
DpEventHook = Callable[[dict[str, Any]], None]


@dataclass
class DPConfig:
    """Local training and differential-privacy settings of one site."""

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
    lr: float = 0.1
    momentum: float = 0.0
    accountant: str = "rdp"
    mechanism: str = "gaussian"
    mechanism_params: dict[str, Any] = field(default_factory=dict)
    #: "opacus": GradSampleModule hooks + PerSampleWeightDPOptimizer; "fast": clients.ghost
    #: (ghost norms, same noise and sensitivity, Linear/Conv2d/GroupNorm/LayerNorm only)
    engine: str = "opacus"

    def sample_rate(self, n_train: int) -> float:
        """Poisson sampling rate q = expected batch / local dataset size."""
        return min(1.0, self.batch_size / n_train)


class DPClient(flwr.client.NumPyClient):
    """Trains ``model`` on one site's data with per-sample clipping, noise and accounting."""

    def __init__(
        self,
        model: nn.Module,
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray] | None,
        config: DPConfig,
        seed: int = 0,
        device: torch.device | str | None = None,
        accountant: PrivacyAccountant | None = None,
        on_dp_event: DpEventHook | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device) if device is not None else _default_device()
        self.seed = seed
        self.on_dp_event = on_dp_event
        x, y = (torch.as_tensor(a) for a in train)
        self.n_train = len(y)
        if self.n_train == 0:
            raise ValueError("a site needs at least one training sample")
        self.test = None if test is None else tuple(torch.as_tensor(a) for a in test)
        self.module = model.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.sample_rate = config.sample_rate(self.n_train)
        self.accountant = accountant or PrivacyAccountant(config.accountant)  # type: ignore[arg-type]
        self._gen = torch.Generator().manual_seed(seed)
        dataset = TensorDataset(x.float(), y.long())
        base_opt = torch.optim.SGD(self.module.parameters(), lr=config.lr, momentum=config.momentum)
        self.train_module: nn.Module
        self.optimizer: torch.optim.Optimizer
        if config.enabled:
            self.noise_multiplier = self._resolve_noise()
            self.guard: BudgetGuard | None = BudgetGuard(self.accountant, config.target_epsilon, config.delta)
            if config.engine not in ("opacus", "fast"):
                raise ConfigError(f"dp.engine: unknown engine {config.engine!r}; choose 'opacus' or 'fast'")
            self.loader: DataLoader = DPDataLoader(dataset, sample_rate=self.sample_rate, generator=self._gen)
            noise_gen = torch.Generator(device=self.device).manual_seed(seed + 7919)
            self._noise_gen: torch.Generator | None = noise_gen
            if config.engine == "fast":
                if config.mechanism != "gaussian":
                    raise ConfigError(f"dp.engine: the 'fast' engine implements the gaussian mechanism only, "
                                      f"not {config.mechanism!r}; use engine = 'opacus'")
                self.train_module, self.optimizer = self._make_fast_dp(base_opt, noise_gen)
            else:
                self.train_module = GradSampleModule(self.module)
                self.optimizer = self._make_dp_optimizer(base_opt, noise_gen)
        else:
            self.noise_multiplier = 0.0
            self.guard = None
            self.train_module = self.module
            self._noise_gen = None
            self.loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=self._gen)
            self.optimizer = base_opt
        self._batches = iter(self.loader)
        self.exhausted = False

    # ---- construction helpers -------------------------------------------------------
    def _expected_batch(self) -> int:
        """The divisor of the noisy sum: the configured expected batch (public), not a count
        of the private data; the whole local set only when every record is sampled."""
        return max(1, self.config.batch_size if self.sample_rate < 1 else self.n_train)

    def _resolve_noise(self) -> float:
        c = self.config
        if c.noise_multiplier is not None:
            if not c.noise_multiplier > 0:
                raise ValueError(f"noise_multiplier must be > 0, got {c.noise_multiplier}")
            return float(c.noise_multiplier)
        if not c.planned_steps:
            raise ValueError("give dp.noise_multiplier, or dp.planned_steps to calibrate it from the target ε")
        return calibrate_noise(c.target_epsilon, c.delta, self.sample_rate, c.planned_steps, c.accountant)  # type: ignore[arg-type]

    def _make_dp_optimizer(self, base: torch.optim.Optimizer, gen: torch.Generator) -> torch.optim.Optimizer:
        c = self.config
        if c.mechanism == "topagg":
            from clients.topagg import TopAggDPOptimizer  # local imports keep this branch self-contained

            # σ = z·√k inside the optimizer; the accountant gets z (self.noise_multiplier)
            return TopAggDPOptimizer.from_params(
                base, c.mechanism_params, noise_multiplier=self.noise_multiplier,
                expected_batch_size=self._expected_batch(), generator=gen)
        if c.mechanism != "gaussian":
            from privfl.errors import ConfigError as _ConfigError

            raise _ConfigError(f"dp.mechanism: must be gaussian or topagg, got {c.mechanism!r}")
        rule = clipping_rule(c.clipping, psac_r=c.psac_r, autos_gamma=c.autos_gamma)
        return PerSampleWeightDPOptimizer(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=c.max_grad_norm,
            expected_batch_size=self._expected_batch(),
            generator=gen,
            clipping=rule,
        )

    def _make_fast_dp(self, base: torch.optim.Optimizer, gen: torch.Generator
                      ) -> tuple[nn.Module, torch.optim.Optimizer]:
        c = self.config
        return make_ghost_private(
            self.module, base, noise_multiplier=self.noise_multiplier, max_grad_norm=c.max_grad_norm,
            expected_batch_size=self._expected_batch(), generator=gen,
            clipping=clipping_rule(c.clipping, psac_r=c.psac_r, autos_gamma=c.autos_gamma))

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
        if self.guard is None:
            return requested
        if not self.guard.would_exceed(self.noise_multiplier, self.sample_rate, requested):
            return requested
        return min(requested, self.guard.max_steps(self.noise_multiplier, self.sample_rate, limit=requested))

    def _reserve(self, steps: int) -> None:
        """Account for ``steps`` before they run (write-ahead: crash-safe)."""
        self.accountant.step(self.noise_multiplier, self.sample_rate, steps)
        if self.on_dp_event is not None:
            event = {
                "mechanism": "poisson_gaussian",
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "steps": steps,
                "clipping": self.config.clipping,
                "max_grad_norm": self.config.max_grad_norm,
                "neighboring_relation": "add_or_remove_one",
                "accountant": self.accountant.method,
                "epsilon": self.epsilon,
                "delta": self.config.delta,
                "local_mechanism": self.config.mechanism,
            }
            if self.config.mechanism == "topagg":
                event["topagg_k"] = int(self.config.mechanism_params.get("k", 0))
            self.on_dp_event(event)

    # ---- training ---------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def train_steps(self, steps: int) -> dict[str, float]:
        """Run up to ``steps`` local steps; fewer when the budget ends. Raises BudgetExhausted at 0."""
        allowed = self.steps_allowed(steps)
        if allowed <= 0:
            self.exhausted = True
            assert self.guard is not None
            raise BudgetExhausted(self.guard.spent, self.config.target_epsilon,
                                  self.config.delta, self.accountant.steps)
        if self.config.enabled:
            self._reserve(allowed)
        self.train_module.train()
        losses = []
        for _ in range(allowed):
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
        if allowed < steps:
            self.exhausted = True
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(allowed)}

    def local_steps_from(self, config: dict[str, Any]) -> int:
        """Steps asked for by a fit config: ``local_steps``, else ``local_epochs`` × steps per epoch."""
        if "local_steps" in config:
            return int(config["local_steps"])
        epochs = float(config.get("local_epochs", 1))
        return max(1, int(round(epochs / self.sample_rate))) if self.config.enabled else \
            max(1, int(round(epochs * self.n_train / self.config.batch_size)))

    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        self.set_parameters(parameters)
        stats = self.train_steps(self.local_steps_from(config))
        metrics: dict[str, Any] = {
            "loss": stats["loss"],
            "steps": int(stats["steps"]),
            "total_steps": self.accountant.steps,
            "epsilon": self.epsilon if self.config.enabled else -1.0,
            "delta": self.config.delta,
            "dp": int(self.config.enabled),
            "budget_exhausted": int(self.exhausted),
        }
        return self.get_parameters({}), self.n_train, metrics

    @torch.no_grad()
    def evaluate(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        self.set_parameters(parameters)
        if self.test is None or len(self.test[1]) == 0:
            return 0.0, 0, {"accuracy": 0.0}
        loss, acc = evaluate_model(self.module, self.test[0], self.test[1], self.device)
        return loss, len(self.test[1]), {"accuracy": acc}

    # ---- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Accountant, optimizer and RNG state: what a restart needs besides the model.

        The sampling and noise generators are saved so a restored client continues their
        streams: replaying noise already used on earlier steps would correlate the noise
        of different releases.
        """
        state: dict[str, Any] = {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "optimizer": self.optimizer.state_dict(),
            "sampling_rng": self._gen.get_state().tolist(),
        }
        if self._noise_gen is not None:
            state["noise_rng"] = self._noise_gen.get_state().tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the accountant never goes backwards."""
        restored = PrivacyAccountant()
        restored.load_state_dict(state["accountant"])
        if restored.steps < self.accountant.steps:
            return  # our accountant already knows more (e.g. rebuilt from the ledger)
        self.accountant.load_state_dict(state["accountant"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "sampling_rng" in state:
            self._gen.set_state(torch.tensor(state["sampling_rng"], dtype=torch.uint8))
        if "noise_rng" in state and self._noise_gen is not None:
            self._noise_gen.set_state(torch.tensor(state["noise_rng"], dtype=torch.uint8))


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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
