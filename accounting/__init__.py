"""Privacy accounting: RDP/PLD accountant, budget guard, calibration, ledger and audit."""

from accounting.accountant import (
    NEIGHBORING_RELATION,
    DpEventKey,
    Method,
    PrivacyAccountant,
    epsilon_of,
    sampled_gaussian_event,
)
from accounting.budget import BudgetExhausted, BudgetGuard
from accounting.calibration import calibrate_noise

__all__ = [
    "NEIGHBORING_RELATION",
    "BudgetExhausted",
    "BudgetGuard",
    "DpEventKey",
    "Method",
    "PrivacyAccountant",
    "calibrate_noise",
    "epsilon_of",
    "sampled_gaussian_event",
]
