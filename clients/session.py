"""The site session: what binds a user's own ``privfl.PrivacyEngine()`` to the node it runs on.

A hospital may bring its own Flower client (``[client].app``); its ``train()`` builds
``privfl.PrivacyEngine()`` and calls ``make_private`` itself, often once per fit on the
same model (the Flower quickstart pattern). privfl's runtime opens a :class:`SiteSession`
around every call into that code (``with session.active(): ...``, or
:func:`site_session`), and each engine made while it is active binds to it:

* the session's accountant (one per node, rebuilt from the ledger on a restart), so ε
  accumulates across fits and engines, and one fail-closed budget guard over it;
* the session's ``on_dp_event`` (the node's write-ahead ledger), read at each event;
* the session's randomness: secure unless the session is seeded; a seeded session
  gives its k-th engine the streams of seed ``seed + 104729·k`` (never one stream twice);
  a seed the user passes to the engine is refused;
* the site's ``[dp]`` settings: σ, C, q, the expected batch, clipping, engine, mechanism,
  ε and δ; what the user omits is taken from ``[dp]``, a value that differs is refused;
* one model made private by a newer engine loses the older engine's hooks first.

A :class:`ContextVar` holds the active session, so a session is per thread / task; an
engine keeps the session it was made in.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from privfl.accounting import BudgetGuard, PrivacyAccountant
from privfl.accounting.errors import ConfigError

if TYPE_CHECKING:  # clients.dp_client imports clients.engine, which imports this module
    from privfl.clients.dp_client import DPConfig
    from privfl.clients.engine import PrivacyEngine

log = logging.getLogger("privfl.clients")

DpEventHook = Callable[[dict[str, Any]], None]
#: a seeded session's k-th engine draws from seed + SEED_STRIDE·k (a prime > the engine's noise offset)
SEED_STRIDE = 104729

__all__ = ["SEED_STRIDE", "SiteSession", "current_session", "site_session"]

_CURRENT: ContextVar[SiteSession | None] = ContextVar("privfl_site_session", default=None)


def current_session() -> SiteSession | None:
    """The site session active in this context, or None (then engines stand alone)."""
    return _CURRENT.get()


@contextmanager
def site_session(config: DPConfig, accountant: PrivacyAccountant, seed: int | None = None,
                 device: torch.device | str | None = None,
                 on_dp_event: DpEventHook | None = None) -> Iterator[SiteSession]:
    """Open a :class:`SiteSession` for the block: ``privfl.PrivacyEngine()`` made inside binds to it."""
    session = SiteSession(config, accountant, seed=seed, device=device, on_dp_event=on_dp_event)
    with session.active():
        yield session


class _Private:
    """One model made private in this session, held weakly (a client rebuilt per fit must not leak)."""

    def __init__(self, module: nn.Module, wrapper: nn.Module, engine: PrivacyEngine) -> None:
        self.module = weakref.ref(module)
        self.wrapper = weakref.ref(wrapper)
        self.engine = weakref.ref(engine)


@dataclass(eq=False)
class SiteSession:
    """One site's DP context for user code: accountant, budget guard, ledger hook, randomness, ``[dp]``.

    ``on_dp_event`` is read at each event (the runtime may set it after building the
    session). :attr:`training_steps` counts the DP training steps its engines accounted.
    """

    config: DPConfig
    accountant: PrivacyAccountant
    seed: int | None = None
    device: torch.device | str | None = None
    on_dp_event: DpEventHook | None = None
    training_steps: int = 0
    #: engines made in this session (a seeded session's next engine uses the streams of this index)
    engines_made: int = 0
    #: set when an engine of this session refused a step for the budget
    exhausted: bool = False
    guard: BudgetGuard | None = field(init=False, default=None)
    noise_multiplier: float = field(init=False, default=0.0)
    sample_rate: float = field(init=False, default=0.0)
    expected_batch_size: float = field(init=False, default=0.0)
    #: the state_dict names of the first model an engine of this session made private
    first_names: list[str] | None = field(init=False, default=None)
    #: while a driver collects them (a list), the models made private, held strongly until it checks them
    fit_models: list[nn.Module] | None = field(init=False, default=None, repr=False)
    #: while a driver's fit runs: (training steps at its start, the steps it asked for); a step
    #: beyond them is refused (the steps per fit are public, never a loop over the records)
    fit_limit: tuple[int, int] | None = field(init=False, default=None)
    _private: list[_Private] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"site session: seed: must be an integer or None, got {self.seed!r}")
        if not isinstance(self.accountant, PrivacyAccountant):
            raise ConfigError(f"site session: accountant: must be a PrivacyAccountant, got "
                              f"{type(self.accountant).__name__}")
        self.config.validate()
        if self.config.enabled:
            self.noise_multiplier = self.config.resolved_noise()
            self.sample_rate = self.config.public_sample_rate()
            self.expected_batch_size = self.config.expected_batch_size()
            self.guard = BudgetGuard(self.accountant, float(self.config.target_epsilon), float(self.config.delta))

    # ---- activation --------------------------------------------------------------------
    @contextmanager
    def active(self) -> Iterator[SiteSession]:
        """Make this the current session for the block (re-entrant, per thread / task)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    # ---- what engines ask of their session ---------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether the site trains with DP (``[dp].enabled``)."""
        return bool(self.config.enabled)

    @property
    def random_kind(self) -> str:
        """"seeded" or "secure": where this session's engines draw noise and batches from."""
        return "secure" if self.seed is None else "seeded"

    def next_seed(self) -> int | None:
        """The seed of the next engine (None: secure); every engine gets its own streams."""
        k = self.engines_made
        self.engines_made += 1
        return None if self.seed is None else self.seed + SEED_STRIDE * k

    def emit(self, event: dict[str, Any]) -> None:
        """Report a DP event to the site's hook (before the step runs: write-ahead)."""
        if self.on_dp_event is not None:
            self.on_dp_event(event)

    def count_steps(self, steps: int) -> None:
        """Record ``steps`` DP training steps an engine of this session accounted."""
        self.training_steps += int(steps)

    def check_fit_steps(self, steps: int) -> None:
        """Refuse ``steps`` more training steps beyond what the running fit asked for (fail closed,
        before they are accounted): a loop that ignores ``config["local_steps"]`` would otherwise
        spend the whole budget in one fit, and its step count would follow the record count."""
        if self.fit_limit is None:
            return
        start, asked = self.fit_limit
        if self.training_steps + int(steps) > start + asked:
            raise ConfigError(f"[client].app: its fit tried DP step {self.training_steps - start + 1} but was asked "
                              f"for config['local_steps'] = {asked}; stop after local_steps optimizer steps (the "
                              "steps per fit are public: a loop over the site's records would make them its size)")

    def steps_allowed(self, requested: int) -> int:
        """How many of ``requested`` further training steps fit in the site's budget."""
        if self.guard is None or not self.guard.would_exceed(self.noise_multiplier, self.sample_rate, requested):
            return requested
        return min(requested, self.guard.max_steps(self.noise_multiplier, self.sample_rate, limit=requested))

    def private_arguments(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``make_private``'s DP arguments from ``[dp]``: omitted ones filled in, differing ones refused.

        ``given`` maps make_private's argument names to the user's values (None: omitted).
        """
        c = self.config
        params = dict(c.mechanism_params or {})
        site: dict[str, tuple[Any, str, str]] = {  # argument -> (site value, [dp] field, how it is shown)
            "noise_multiplier": (self.noise_multiplier, "noise_multiplier", f"σ={self.noise_multiplier:g}"),
            "max_grad_norm": (float(c.max_grad_norm), "max_grad_norm", f"C={float(c.max_grad_norm):g}"),
            "sample_rate": (self.sample_rate, "sample_rate", f"q={self.sample_rate:g}"),
            "expected_batch_size": (self.expected_batch_size, "batch_size",
                                    f"expected batch {self.expected_batch_size:g}"),
            "declared_size": (c.declared_size, "declared_size", "unset" if c.declared_size is None
                              else str(c.declared_size)),
            "clipping": (c.clipping, "clipping", repr(c.clipping)),
            "psac_r": (float(c.psac_r), "psac_r", f"{float(c.psac_r):g}"),
            "autos_gamma": (float(c.autos_gamma), "autos_gamma", f"{float(c.autos_gamma):g}"),
            "engine": (c.engine, "engine", repr(c.engine)),
            "mechanism": (c.mechanism, "mechanism", repr(c.mechanism)),
            "mechanism_params": (params, "mechanism_params", repr(params)),
            "target_epsilon": (float(c.target_epsilon), "target_epsilon", f"ε={float(c.target_epsilon):g}"),
            "delta": (float(c.delta), "delta", f"δ={float(c.delta):g}"),
        }
        out: dict[str, Any] = {}
        for name, (value, dp_field, shown) in site.items():
            user = given.get(name)
            if user is not None and not _same(user, value):
                raise ConfigError(f"make_private: {name}={user!r} differs from the site's [dp].{dp_field} ({shown}); "
                                  "under privfl the site's [dp] decides")
            out[name] = value
        return out

    def check_records(self, num_records: int) -> None:
        """δ must be below 1/n for the site's records (checked on the site, never released)."""
        if num_records and self.config.delta >= 1 / num_records:
            raise ConfigError(f"dp.delta: δ={self.config.delta:g} is not below 1/n for this site's training "
                              "records; choose a smaller δ")

    # ---- one model, many engines -------------------------------------------------------
    def take_module(self, module: nn.Module) -> nn.Module:
        """The plain model to make private: an earlier engine's hooks on it are removed first.

        Accepts the plain model or the wrapper an earlier engine of this session returned;
        the earlier engine is retired (its optimizer refuses further steps).
        """
        live: list[_Private] = []
        for entry in self._private:
            plain, wrapper, engine = entry.module(), entry.wrapper(), entry.engine()
            if plain is None or wrapper is None:
                continue  # the model is gone (e.g. a client rebuilt for each fit)
            if module is wrapper:
                module = plain
            if module is plain:
                _remove_hooks(wrapper)
                if engine is not None:
                    engine._retired = True  # noqa: SLF001 - the engine's own flag, set by its session
                continue
            live.append(entry)
        self._private = live
        return module

    def register(self, module: nn.Module, wrapper: nn.Module, engine: PrivacyEngine) -> None:
        """Remember that ``engine`` made ``module`` private through ``wrapper`` (its hooks)."""
        if self.first_names is None:
            self.first_names = list(module.state_dict().keys())
        self._private.append(_Private(module, wrapper, engine))
        if self.fit_models is not None:
            self.fit_models.append(module)

    @property
    def modules(self) -> list[nn.Module]:
        """The plain models this session's engines made private that are still alive, oldest first."""
        return [m for m in (entry.module() for entry in self._private) if m is not None]


def _same(user: Any, site: Any) -> bool:
    """Whether a user's make_private value is the site's (numbers up to rounding)."""
    if isinstance(site, float) and isinstance(user, (int, float)) and not isinstance(user, bool):
        return math.isclose(float(user), site, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(site, dict):
        return isinstance(user, Mapping) and dict(user) == site
    return bool(user == site)


def _remove_hooks(wrapper: nn.Module) -> None:
    """Take an engine's hooks (and per-sample state) off the model it wrapped."""
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    from privfl.clients.ghost import GhostGradModule

    if isinstance(wrapper, AbstractGradSampleModule):
        wrapper._close()  # noqa: SLF001 - Opacus's own cleanup: hooks and grad_sample attributes
    elif isinstance(wrapper, GhostGradModule):
        for handle in wrapper._handles:  # noqa: SLF001 - the ghost engine's forward hooks
            handle.remove()
        wrapper._handles = []  # noqa: SLF001
        wrapper.clear()
