"""Fail-closed privacy budget: no step is taken that would pass the node's (ε, δ)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privfl.accounting.accountant import PrivacyAccountant


class BudgetExhausted(RuntimeError):
    """The next DP step would exceed the privacy budget; training must stop."""

    def __init__(self, spent: float, target: float, delta: float, steps: int) -> None:
        self.spent = spent
        self.target = target
        self.delta = delta
        self.steps = steps
        super().__init__(
            f"privacy budget exhausted: spent ε={spent:.4f} of ε={target:g} at δ={delta:g} "
            f"after {steps} steps; the next step would exceed it, so training stops"
        )


@dataclass
class BudgetGuard:
    """Asks the accountant, before every step, whether the step fits in the budget."""

    accountant: PrivacyAccountant
    target_epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def spent(self) -> float:
        """ε spent so far at this guard's δ."""
        return self.accountant.get_epsilon(self.delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """Whether ``steps`` more steps would take ε above the target (fail closed: a NaN ε exceeds it)."""
        after = self.accountant.epsilon_after(self.delta, noise_multiplier, sample_rate, steps)
        return not after <= self.target_epsilon

    def check(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Raise :class:`BudgetExhausted` if ``steps`` more steps do not fit."""
        if self.would_exceed(noise_multiplier, sample_rate, steps):
            raise BudgetExhausted(self.spent, self.target_epsilon, self.delta, self.accountant.steps)

    def max_steps(self, noise_multiplier: float, sample_rate: float, limit: int = 10**7) -> int:
        """The largest number of further steps that fits in the budget (bisection)."""
        if self.would_exceed(noise_multiplier, sample_rate, 1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and not self.would_exceed(noise_multiplier, sample_rate, hi):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.would_exceed(noise_multiplier, sample_rate, mid):
                hi = mid
            else:
                lo = mid
        return lo
