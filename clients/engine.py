"""PrivacyEngine: make a user's own PyTorch training loop differentially private.

An Opacus-style front door to privfl's DP machinery, so an Opacus user changes one
import and a Flower user keeps their own ``train()``::

    engine = privfl.PrivacyEngine(seed=None)               # secure noise and batches
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.1, max_grad_norm=1.0,
        sample_rate=0.01,                                   # public: declared, never len(dataset)
        target_epsilon=3.0, delta=1e-5)                     # fail-closed budget
    for x, y in loader:                                     # the user's loop, unchanged
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()                                    # accounted *before* the noise is drawn
    engine.get_epsilon(1e-5)

What differs from Opacus, on purpose:

* the Poisson sampling rate q is public: ``sample_rate`` or ``expected_batch_size`` with
  ``declared_size`` (the site's declared record count); it is never derived from
  ``len(dataset)``, and ``make_private`` refuses to guess it. The noisy sum is divided by
  a public expected batch size too (``expected_batch_size``, else ``q · declared_size``,
  else the loader's configured ``batch_size``).
* clipping rules are privfl's (``"psac"`` by default, ``"flat"``, ``"autos"``); the
  per-sample gradients come from Opacus's ``GradSampleModule`` or privfl's fast ghost
  engine (:mod:`clients.ghost`), chosen per model (``engine="auto"``).
* noise and Poisson batches come from :class:`~clients.randomness.SecureRandom` unless a
  ``seed`` is given explicitly (then :class:`~clients.randomness.SeededRandom`;
  :attr:`PrivacyEngine.random_kind` says which).
* every optimizer step is accounted (and reported to ``on_dp_event``, e.g. a signed
  ledger) *before* its noise is drawn — write-ahead — and with a target ε the step that
  would exceed it raises :class:`~accounting.BudgetExhausted` instead of running. (A
  secure source may hold the next step's noise, drawn ahead in memory only; it reaches
  no gradient before its step is accounted.)
  :meth:`PrivacyEngine.reserve` accounts several steps at once (one ledger entry); the
  following optimizer steps then use that reservation.

Under privfl's runtime (a site session, :mod:`clients.session`, is active) the same code
binds to the site: ``PrivacyEngine()`` uses the site's accountant, budget, ledger hook and
randomness, and ``make_private(module=, optimizer=, data_loader=)`` takes σ, C, q and the
rest from the site's ``[dp]`` (a value that differs is refused). A new engine per fit on
the same model is fine: the previous engine's hooks are removed first. Outside a session
nothing changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from opacus import GradSampleModule
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from privfl.accounting import BudgetExhausted, BudgetGuard, PrivacyAccountant, calibrate_noise
from privfl.accounting.errors import ConfigError
from privfl.clients.clipping import CLIPPING_RULES, ClippingRule, clipping_rule
from privfl.clients.ghost import GhostDPOptimizer, GhostGradModule
from privfl.clients.optimizer import PerSampleWeightDPOptimizer
from privfl.clients.randomness import PoissonBatchSampler, RandomnessKind, RandomSource, random_source
from privfl.clients.session import SiteSession, current_session

log = logging.getLogger("privfl.clients")

DpEventHook = Callable[[dict[str, Any]], None]
EngineKind = Literal["auto", "opacus", "fast"]
#: the offset between a seeded engine's sampling seed and its noise seed (as DPClient always had)
NOISE_SEED_OFFSET = 7919

__all__ = ["NOISE_SEED_OFFSET", "PrivacyEngine", "mechanism_description", "validate_module"]

# One-line fixes for the layers Opacus's ModuleValidator refuses.
_FIXES: dict[str, str] = {
    "BatchNorm1d": "replace with GroupNorm",
    "BatchNorm2d": "replace with GroupNorm",
    "BatchNorm3d": "replace with GroupNorm",
    "SyncBatchNorm": "replace with GroupNorm",
    "InstanceNorm1d": "set track_running_stats=False",
    "InstanceNorm2d": "set track_running_stats=False",
    "InstanceNorm3d": "set track_running_stats=False",
    "LSTM": "replace with opacus.layers.DPLSTM",
    "GRU": "replace with opacus.layers.DPGRU",
    "MultiheadAttention": "replace with opacus.layers.DPMultiheadAttention",
}


def validate_module(module: nn.Module) -> None:
    """Refuse a module DP-SGD cannot train, with one line naming the layer and the fix.

    Runs Opacus's ``ModuleValidator`` rules layer by layer (so the layer's name is known).
    BatchNorm is refused even without trainable parameters: it mixes the records of a
    batch in the forward pass, so one record's gradient would depend on the others.
    """
    if not module.training:
        raise ConfigError("make_private: module: the model is in eval mode; call module.train() first")
    for name, sub in module.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is None:
            continue
        trainable = any(p.requires_grad for p in sub.parameters(recurse=False))
        mixes = isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
        if not (trainable or mixes):
            continue
        errors = validator(sub)
        if errors:
            kind = type(sub).__name__
            fix = _FIXES.get(kind, str(errors[0]).split(". ")[0])
            how = " (opacus.validators.ModuleValidator.fix)" if type(sub) in ModuleValidator.FIXERS else ""
            raise ConfigError(f"make_private: module: {kind} at {name or '<root>'} is not DP-compatible: "
                              f"{fix}{how}")


def mechanism_description(mechanism: str, clipping: str, max_grad_norm: float,
                          mechanism_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an auditor needs to know of a training mechanism (public; the ledger's fields)."""
    params = dict(mechanism_params or {})
    if mechanism == "topagg":
        k = int(params.get("k", 0))
        return {"local_mechanism": "topagg", "clipping": "topagg", "max_grad_norm": math.sqrt(k),
                "sensitivity": math.sqrt(k),
                "mechanism_params": {key: v for key, v in params.items() if v is not None}}
    if mechanism == "subspace":  # Gaussian on a public random k-coordinate mask: sensitivity C inside it
        from privfl.clients.subspace import describe as describe_subspace

        return {"local_mechanism": "gaussian_subspace", "clipping": clipping, "max_grad_norm": float(max_grad_norm),
                "sensitivity": float(max_grad_norm), "mechanism_params": describe_subspace(params)}
    return {"local_mechanism": "gaussian", "clipping": clipping, "max_grad_norm": float(max_grad_norm),
            "sensitivity": float(max_grad_norm), "mechanism_params": {}}


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"make_private: {name}: must be a finite number > 0, got {value!r}")
    return float(value)


def _empty_batch_layout(dataset: Dataset) -> tuple[list[tuple[int, ...]] | None, list[Any] | None]:
    """Shapes/dtypes of an empty first batch (the layout of one record, never its values)."""
    try:
        first = dataset[0]
    except Exception:  # noqa: BLE001 - a dataset without integer indexing: let collate decide
        return None, None
    if isinstance(first, (tuple, list)):
        return [(0, *shape_safe(x)) for x in first], [dtype_safe(x) for x in first]
    return None, None


class PrivacyEngine:
    """DP-SGD for a user's own training loop: privfl's clipping, accountant, budget guard and ledger hook.

    ``accountant``: ``"rdp"`` (default), ``"pld"``, or a :class:`~accounting.PrivacyAccountant`
    to share (e.g. one rebuilt from a ledger, so a restart never resets the budget).
    ``seed``: None draws noise and batches from fresh secure sources; an integer asks
    explicitly for reproducible seeded streams (Poisson batches from ``seed``, noise from
    ``seed + 7919``, as :class:`~clients.DPClient` draws them). ``on_dp_event``: called
    with each DP event (the fields :class:`~clients.DPClient` reports) before it runs;
    if it raises, the step does not run.

    Made while a site session is active (:func:`~clients.session.current_session`), the
    engine binds to it: the site's accountant (``accountant`` may only name the same
    one), budget guard, ``on_dp_event`` (called first; a user hook after it) and
    randomness (a ``seed`` is refused: the site decides).
    """

    def __init__(self, accountant: str | PrivacyAccountant | None = None, *, seed: int | None = None,
                 on_dp_event: DpEventHook | None = None) -> None:
        self._session: SiteSession | None = current_session()
        self._retired = False  # set by the session when a newer engine made this model private
        session = self._session
        if session is not None:
            seed = self._bind(session, accountant, seed)
        elif accountant is None:
            self.accountant = PrivacyAccountant("rdp")
        elif isinstance(accountant, PrivacyAccountant):
            self.accountant = accountant
        elif accountant in ("rdp", "pld"):
            self.accountant = PrivacyAccountant(accountant)  # type: ignore[arg-type]
        else:
            raise ConfigError(f"PrivacyEngine: accountant: must be 'rdp', 'pld' or a PrivacyAccountant, "
                              f"got {accountant!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"PrivacyEngine: seed: must be an integer or None, got {seed!r}")
        self.seed = seed
        self.on_dp_event = on_dp_event
        if session is not None:
            self.on_dp_event = _session_hook(session, on_dp_event)
        self.sampling_source: RandomSource = random_source(seed)
        self.noise_source: RandomSource | None = None  # made in make_private, on the model's device
        self.guard: BudgetGuard | None = None
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.max_grad_norm: float | None = None
        self.delta: float | None = None
        self.target_epsilon: float | None = None
        self.engine_kind: str | None = None  # "opacus" or "fast" once made private
        self.planned_steps: int | None = None  # set by make_private_with_epsilon
        self.optimizer: torch.optim.Optimizer | None = None
        self._description: dict[str, Any] = {}
        self._steps = 0  # training steps this engine accounted (reserved or taken)
        self._prepaid = 0  # accounted steps not yet taken (see reserve)

    def _bind(self, session: SiteSession, accountant: str | PrivacyAccountant | None, seed: int | None) -> int | None:
        """Take the session's accountant and randomness; return this engine's seed (None: secure)."""
        if accountant is not None and accountant is not session.accountant \
                and accountant != session.accountant.method:
            raise ConfigError(f"PrivacyEngine: accountant={accountant!r}: under privfl the site's accountant "
                              f"([dp].accountant = {session.accountant.method!r}, rebuilt from the ledger) is used; "
                              "omit accountant")
        if seed is not None:
            where = ("this site's noise and batches are secure (operating-system entropy)" if session.seed is None
                     else "the site's seeded session gives each engine its own streams")
            raise ConfigError(f"PrivacyEngine: seed={seed!r}: under privfl {where}; remove seed")
        self.accountant = session.accountant
        return session.next_seed()

    # ---- public state --------------------------------------------------------------------
    @property
    def random_kind(self) -> RandomnessKind:
        """"secure" or "seeded": where this engine's noise and batches come from."""
        return self.sampling_source.kind

    @property
    def steps(self) -> int:
        """DP training steps this engine has accounted (reserved ahead or taken)."""
        return self._steps

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (every event of the accountant, add/remove-one)."""
        if not 0 < delta < 1:
            raise ConfigError(f"get_epsilon: delta: must be in (0, 1), got {delta!r}")
        if self._session is not None and not self._session.enabled:
            return math.inf  # [dp].enabled = false: no guarantee at all
        return self.accountant.get_epsilon(delta)

    def mechanism_description(self) -> dict[str, Any]:
        """The public description of the training mechanism in each training event."""
        return dict(self._description)

    # ---- making private ------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
        sample_rate: float | None = None,
        expected_batch_size: float | None = None,
        declared_size: int | None = None,
        clipping: str | None = None,
        psac_r: float | None = None,
        autos_gamma: float | None = None,
        engine: EngineKind | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        mechanism: str | None = None,
        mechanism_params: Mapping[str, Any] | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap ``module``, ``optimizer`` and ``data_loader`` for DP-SGD; train through what it returns.

        The sampling rate is declared: ``sample_rate`` (q), or ``expected_batch_size`` /
        ``declared_size``. The noisy sum is divided by ``expected_batch_size``, else
        ``q · declared_size``, else ``data_loader.batch_size`` (all public). ``engine``:
        ``"auto"`` uses the fast ghost engine when it supports every layer (else Opacus,
        with one log line naming the layer), ``"opacus"``/``"fast"`` force one.
        ``target_epsilon`` (with ``delta``) turns on the fail-closed budget guard.
        ``mechanism="topagg"`` (with ``mechanism_params``) is privfl's TopAgg sanitiser
        (Opacus per-sample gradients only). Returns (module, optimizer, data_loader).

        Outside a site session ``noise_multiplier`` and ``max_grad_norm`` are required and
        the defaults are psac clipping (r = 0.1, γ = 0.01), ``engine="auto"``, gaussian.
        Under a session every DP argument defaults to the site's ``[dp]``; one that differs
        is refused; with ``[dp].enabled = false`` the three objects come back unchanged.
        """
        if self.optimizer is not None:
            raise ConfigError("make_private: this PrivacyEngine already made a model private; use one engine per model")
        session = self._session
        if session is not None:
            if not session.enabled:
                log.info("privacy engine: [dp].enabled = false: make_private returns the model, optimizer and "
                         "loader unchanged (no DP)")
                return module, optimizer, data_loader
            site = session.private_arguments({
                "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "sample_rate": sample_rate,
                "expected_batch_size": expected_batch_size, "declared_size": declared_size, "clipping": clipping,
                "psac_r": psac_r, "autos_gamma": autos_gamma, "engine": engine, "mechanism": mechanism,
                "mechanism_params": mechanism_params, "target_epsilon": target_epsilon, "delta": delta})
            noise_multiplier, max_grad_norm = site["noise_multiplier"], site["max_grad_norm"]
            sample_rate, expected_batch_size = site["sample_rate"], site["expected_batch_size"]
            declared_size, clipping, psac_r = site["declared_size"], site["clipping"], site["psac_r"]
            autos_gamma, engine, mechanism = site["autos_gamma"], site["engine"], site["mechanism"]
            mechanism_params, target_epsilon, delta = site["mechanism_params"], site["target_epsilon"], site["delta"]
            if isinstance(getattr(data_loader, "dataset", None), Dataset) and hasattr(data_loader.dataset, "__len__"):
                session.check_records(len(data_loader.dataset))  # type: ignore[arg-type]
            module = session.take_module(module)
        else:
            for name, value in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm)):
                if value is None:
                    raise ConfigError(f"make_private: {name}: required (outside privfl's runtime no site [dp] "
                                      "gives it)")
            clipping = "psac" if clipping is None else clipping
            psac_r = 0.1 if psac_r is None else psac_r
            autos_gamma = 0.01 if autos_gamma is None else autos_gamma
            engine = "auto" if engine is None else engine
            mechanism = "gaussian" if mechanism is None else mechanism
        if not poisson_sampling:
            raise ConfigError("make_private: poisson_sampling: must be True; privfl accounts Poisson-sampled "
                              "steps only (a shuffled fixed-size loader would not match its accounting)")
        if not isinstance(data_loader, DataLoader):
            raise ConfigError("make_private: data_loader: must be a torch DataLoader, "
                              f"got {type(data_loader).__name__}")
        dataset = data_loader.dataset
        if isinstance(dataset, IterableDataset):
            raise ConfigError("make_private: data_loader: Poisson sampling needs a map-style Dataset, "
                              "not an IterableDataset")
        sigma = _positive("noise_multiplier", noise_multiplier)
        if isinstance(max_grad_norm, (list, tuple)):
            raise ConfigError("make_private: max_grad_norm: one number (per-layer clipping is not supported)")
        c = _positive("max_grad_norm", max_grad_norm)
        if clipping not in CLIPPING_RULES and mechanism in ("gaussian", "subspace"):
            raise ConfigError(f"make_private: clipping: unknown rule {clipping!r}; choose one of "
                              f"{', '.join(CLIPPING_RULES)}")
        if engine not in ("auto", "opacus", "fast"):
            raise ConfigError(f"make_private: engine: unknown engine {engine!r}; choose 'auto', 'opacus' or 'fast'")
        if mechanism not in ("gaussian", "topagg", "subspace"):
            raise ConfigError(f"make_private: mechanism: must be 'gaussian', 'topagg' or 'subspace', got {mechanism!r}")
        if mechanism == "subspace":
            if engine == "fast":
                raise ConfigError("make_private: engine: the 'fast' engine does not implement mechanism 'subspace' "
                                  "(dp.subspace); use engine='opacus' or 'auto'")
            from privfl.clients.subspace import check_subspace_params

            check_subspace_params(mechanism_params or {}, "make_private: mechanism_params")
        if mechanism == "topagg" and engine == "fast":
            raise ConfigError("make_private: engine: the 'fast' engine implements the gaussian mechanism only, "
                              "not 'topagg'; use engine='opacus'")
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"make_private: loss_reduction: must be 'mean' or 'sum', got {loss_reduction!r}")
        q, divisor = self._public_rates(sample_rate, expected_batch_size, declared_size, data_loader)
        if target_epsilon is not None:
            _positive("target_epsilon", target_epsilon)
            if delta is None:
                raise ConfigError("make_private: delta: required with target_epsilon (the δ of the budget)")
        if delta is not None:
            if not 0 < delta < 1:
                raise ConfigError(f"make_private: delta: must be in (0, 1), got {delta!r}")
            if declared_size is not None and delta >= 1 / declared_size:
                raise ConfigError(f"make_private: delta: δ={delta:g} must be below 1/declared_size "
                                  f"= {1 / declared_size:g}")
        validate_module(module)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("make_private: module: the model has no trainable parameters")
        device = params[0].device
        noise_source = random_source(None if self.seed is None else self.seed + NOISE_SEED_OFFSET, device)
        rule = (clipping_rule(clipping, psac_r=psac_r, autos_gamma=autos_gamma)
                if mechanism in ("gaussian", "subspace") else None)

        dp_module, dp_optimizer = self._wrap(module, optimizer, engine, mechanism, mechanism_params, rule,
                                             sigma, c, divisor, noise_source, loss_reduction)
        loader = self._poisson_loader(data_loader, q)

        self.noise_source = noise_source
        self.noise_multiplier, self.sample_rate, self.expected_batch_size, self.max_grad_norm = sigma, q, divisor, c
        self.delta = None if delta is None else float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.guard = None if target_epsilon is None else BudgetGuard(self.accountant, float(target_epsilon),
                                                                     float(delta))  # type: ignore[arg-type]
        if session is not None:
            self.guard = session.guard  # one budget for every engine of the site
        self._description = mechanism_description(mechanism, clipping, c, mechanism_params)
        self.optimizer = dp_optimizer
        self._attach_accounting(dp_optimizer)
        if session is not None:
            session.register(module, dp_module, self)
        log.debug("privacy engine: %s engine, %s clipping, σ=%.4g, C=%.4g, q=%.4g, E[B]=%.4g, %s randomness",
                  self.engine_kind, self._description["clipping"], sigma, c, q, divisor, self.random_kind)
        return dp_module, dp_optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        max_grad_norm: float,
        epochs: float | None = None,
        steps: int | None = None,
        sample_rate: float | None = None,
        expected_batch_size: float | None = None,
        declared_size: int | None = None,
        **kwargs: Any,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """:meth:`make_private` with σ calibrated so ``epochs`` (or ``steps``) steps spend at most ``target_epsilon``.

        σ comes from public values only (q, the planned steps, ε, δ, and the events the
        accountant already holds); an epoch is ``1/q`` steps. The budget guard is on at
        (``target_epsilon``, ``target_delta``). The planned steps are in :attr:`planned_steps`.
        """
        if self._session is not None:
            raise ConfigError("make_private_with_epsilon: under privfl the site's [dp] sets σ (noise_multiplier, or "
                              "planned_steps to calibrate it); call make_private(module=, optimizer=, data_loader=)")
        if (epochs is None) == (steps is None):
            raise ConfigError("make_private_with_epsilon: give exactly one of epochs or steps")
        q, _ = self._public_rates(sample_rate, expected_batch_size, declared_size, data_loader)
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"make_private_with_epsilon: steps: must be an integer >= 1, got {steps!r}")
            planned = steps
        else:
            planned = max(1, math.ceil(_positive("epochs", epochs) / q - 1e-9))
        _positive("target_epsilon", target_epsilon)
        if not 0 < target_delta < 1:
            raise ConfigError(f"make_private_with_epsilon: target_delta: must be in (0, 1), got {target_delta!r}")
        try:
            sigma = calibrate_noise(target_epsilon, target_delta, q, planned, self.accountant.method,
                                    prior=self.accountant.events)
        except ValueError as exc:
            raise ConfigError(f"make_private_with_epsilon: target_epsilon: {exc}") from None
        out = self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                noise_multiplier=sigma, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                                expected_batch_size=expected_batch_size, declared_size=declared_size,
                                target_epsilon=target_epsilon, delta=target_delta, **kwargs)
        self.planned_steps = planned
        return out

    # ---- accounting ----------------------------------------------------------------------
    def account_event(self, purpose: str, noise_multiplier: float, sample_rate: float, steps: int = 1,
                      **details: Any) -> dict[str, Any]:
        """Account ``steps`` Poisson-sampled Gaussian events, then report them (write-ahead).

        For privfl's own releases besides training steps (e.g. a DP evaluation count);
        with a budget it fails closed first (:class:`~accounting.BudgetExhausted`).
        ``details`` carry the mechanism description the ledger records.
        """
        self._account(noise_multiplier, sample_rate, steps)
        event = {
            "purpose": purpose,
            "mechanism": "poisson_gaussian",
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
            "neighboring_relation": "add_or_remove_one",
            "accountant": self.accountant.method,
            "epsilon": None if self.delta is None else self.accountant.get_epsilon(self.delta),
            "delta": self.delta,
            "randomness": self.random_kind,
            **details,
        }
        if self.on_dp_event is not None:
            self.on_dp_event(event)
        return event

    def _account(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Check the budget (fail closed) and count ``steps`` events in the accountant; report nothing."""
        self._check_live()
        if self.guard is not None:
            try:
                self.guard.check(noise_multiplier, sample_rate, steps)
            except BudgetExhausted:
                if self._session is not None:
                    self._session.exhausted = True
                raise
        self.accountant.step(noise_multiplier, sample_rate, steps)

    def reserve(self, steps: int) -> dict[str, Any]:
        """Account ``steps`` training steps now (one event); the next ``steps`` optimizer steps use them.

        Fails closed with a budget: :class:`~accounting.BudgetExhausted` if they do not all fit.
        """
        sigma, q = self._require_private()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"reserve: steps: must be an integer >= 1, got {steps!r}")
        if self._session is not None:
            self._session.check_fit_steps(steps)
        event = self.account_event("training", sigma, q, steps, **self._description)
        self._count(steps)
        self._prepaid += steps
        return event

    def steps_allowed(self, requested: int) -> int:
        """How many of ``requested`` further training steps fit in the budget (all without one)."""
        sigma, q = self._require_private()
        if self.guard is None or not self.guard.would_exceed(sigma, q, requested):
            return requested
        return min(requested, self.guard.max_steps(sigma, q, limit=requested))

    def _before_noise(self) -> None:
        """Runs in every DP optimizer step before its noise is drawn: use a reservation or account one step."""
        self._check_live()
        if self._prepaid > 0:
            self._prepaid -= 1
            return
        sigma, q = self._require_private()
        if self._session is not None:
            self._session.check_fit_steps(1)
        if self.on_dp_event is None:  # nobody to report to: no event to build (nor its ε to compute)
            self._account(sigma, q, 1)
        else:
            self.account_event("training", sigma, q, 1, **self._description)  # fails closed first
        self._count(1)

    def _check_live(self) -> None:
        """Refuse a step of an engine whose model a newer engine of its session made private."""
        if self._retired:
            raise ConfigError("PrivacyEngine: a newer PrivacyEngine made this model private; step through the "
                              "optimizer that engine returned")

    def _count(self, steps: int) -> None:
        """Count accounted training steps here and in the site session (if any)."""
        self._steps += steps
        if self._session is not None:
            self._session.count_steps(steps)

    def _attach_accounting(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook :meth:`_before_noise` into the optimizer's step, ahead of the noise."""
        if isinstance(optimizer, GhostDPOptimizer):
            pre_step = optimizer.pre_step  # computes norms, draws the noise, writes p.grad

            def accounted_pre_step() -> None:
                self._before_noise()
                pre_step()

            optimizer.pre_step = accounted_pre_step  # type: ignore[method-assign]
        else:
            add_noise = optimizer.add_noise  # type: ignore[attr-defined]  # Opacus: skipped steps draw none

            def accounted_add_noise() -> None:
                self._before_noise()
                add_noise()

            optimizer.add_noise = accounted_add_noise  # type: ignore[attr-defined]

    def _require_private(self) -> tuple[float, float]:
        if self.noise_multiplier is None or self.sample_rate is None:
            raise ConfigError("PrivacyEngine: call make_private first")
        return self.noise_multiplier, self.sample_rate

    # ---- construction helpers ------------------------------------------------------------
    @staticmethod
    def _public_rates(sample_rate: float | None, expected_batch_size: float | None, declared_size: int | None,
                      data_loader: DataLoader) -> tuple[float, float]:
        """(q, divisor of the noisy sum), from declared values only — never from len(dataset)."""
        if declared_size is not None and (isinstance(declared_size, bool) or not isinstance(declared_size, int)
                                          or declared_size < 1):
            raise ConfigError(f"make_private: declared_size: must be an integer >= 1, got {declared_size!r}")
        if expected_batch_size is not None:
            _positive("expected_batch_size", expected_batch_size)
        if sample_rate is not None:
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
                    or not 0 < sample_rate <= 1:
                raise ConfigError(f"make_private: sample_rate: must be in (0, 1], got {sample_rate!r}")
            q = float(sample_rate)
        elif expected_batch_size is not None and declared_size is not None:
            q = min(1.0, float(expected_batch_size) / declared_size)
        else:
            raise ConfigError("make_private: sample_rate: required: a public Poisson sampling rate in (0, 1] "
                              "(or expected_batch_size with declared_size, the site's public record count); "
                              "privfl never derives it from the private number of records (len(dataset))")
        if expected_batch_size is not None:
            divisor = float(expected_batch_size)
        elif declared_size is not None:
            divisor = max(1e-12, q * declared_size)
        elif data_loader.batch_size is not None:
            divisor = float(data_loader.batch_size)
        else:
            raise ConfigError("make_private: expected_batch_size: required when the data loader has no "
                              "batch_size and no declared_size is given (the public divisor of the noisy sum)")
        return q, divisor

    def _wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer, engine: str, mechanism: str,
              mechanism_params: Mapping[str, Any] | None, rule: ClippingRule | None, sigma: float, c: float,
              divisor: float, noise_source: RandomSource,
              loss_reduction: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The per-sample-gradient module and DP optimizer of the chosen engine."""
        if engine in ("auto", "fast") and mechanism == "gaussian":
            try:
                ghost = GhostGradModule(module, loss_reduction=loss_reduction)
            except ConfigError as exc:
                if engine == "fast":
                    raise ConfigError(f"make_private: engine='fast': {exc}") from None
                log.info("privacy engine: %s; falling back to Opacus per-sample gradients", exc)
            else:
                self.engine_kind = "fast"
                return ghost, GhostDPOptimizer(optimizer, ghost, noise_multiplier=sigma, max_grad_norm=c,
                                               expected_batch_size=divisor, clipping=rule,  # type: ignore[arg-type]
                                               random_source=noise_source, loss_reduction=loss_reduction)
        gsm = GradSampleModule(module, loss_reduction=loss_reduction)
        self.engine_kind = "opacus"
        if mechanism == "topagg":
            from privfl.clients.topagg import TopAggDPOptimizer  # only TopAgg users pay for it

            return gsm, TopAggDPOptimizer.from_params(optimizer, dict(mechanism_params or {}),
                                                      noise_multiplier=sigma,
                                                      expected_batch_size=divisor,  # type: ignore[arg-type]
                                                      random_source=noise_source)
        if mechanism == "subspace":
            from privfl.clients.subspace import SubspaceDPOptimizer

            return gsm, SubspaceDPOptimizer.from_params(optimizer, dict(mechanism_params or {}),
                                                        noise_multiplier=sigma, max_grad_norm=c,
                                                        expected_batch_size=divisor, random_source=noise_source,
                                                        clipping=rule, loss_reduction=loss_reduction)
        return gsm, PerSampleWeightDPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=c,
                                               expected_batch_size=divisor, random_source=noise_source,
                                               clipping=rule, loss_reduction=loss_reduction)

    def _poisson_loader(self, data_loader: DataLoader, q: float) -> DataLoader:
        """A Poisson loader over ``data_loader``'s dataset: batches from this engine's sampling source.

        ``len(dataset)`` only sizes the index universe the coins are drawn over (as it must);
        q is the declared one. The collate function is wrapped so an empty batch keeps the
        batch's structure (a noise-only step, never a skipped one).
        """
        dataset = data_loader.dataset
        shapes, dtypes = _empty_batch_layout(dataset)
        collate = wrap_collate_with_empty(collate_fn=data_loader.collate_fn, sample_empty_shapes=shapes,
                                          dtypes=dtypes)
        sampler = PoissonBatchSampler(len(dataset), q, self.sampling_source)  # type: ignore[arg-type]
        extra: dict[str, Any] = {}
        if data_loader.num_workers > 0:
            extra = {"prefetch_factor": data_loader.prefetch_factor,
                     "persistent_workers": data_loader.persistent_workers}
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data_loader.num_workers,
                          pin_memory=data_loader.pin_memory, timeout=data_loader.timeout,
                          worker_init_fn=data_loader.worker_init_fn,
                          multiprocessing_context=data_loader.multiprocessing_context, **extra)

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Accountant, optimizer and (seeded only) RNG state: what a restart needs besides the model.

        A seeded engine saves its streams so a restored one continues them (replayed noise
        would correlate releases); a secure one saves nothing of its streams.
        """
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self._steps,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "sampling_rng": self.sampling_source.state_dict(),
            "noise_rng": {} if self.noise_source is None else self.noise_source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state; an accountant that knows more is kept (ε never goes back).

        Reservations are not restored: a restored engine accounts its steps again.
        """
        restored = PrivacyAccountant()
        restored.load_state_dict(state["accountant"])
        if restored.steps < self.accountant.steps:
            return  # ours already knows more (e.g. rebuilt from the ledger): the state is stale
        self.accountant.load_state_dict(state["accountant"])
        self._steps = max(self._steps, int(state.get("steps", 0)))
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(state.get("sampling_rng"), dict):
            self.sampling_source.load_state_dict(state["sampling_rng"])
        if self.noise_source is not None and isinstance(state.get("noise_rng"), dict):
            self.noise_source.load_state_dict(state["noise_rng"])


def _session_hook(session: SiteSession, user: DpEventHook | None) -> DpEventHook:
    """The site's hook first (the write-ahead ledger, read at each event), then the user's own."""
    def hook(event: dict[str, Any]) -> None:
        session.emit(event)
        if user is not None:
            user(event)

    return hook
