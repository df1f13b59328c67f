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
from accounting.audit import AuditIssue, AuditReport, audit_ledger
from accounting.audit_empirical import OneRunAudit, audit_one_run, epsilon_lower_bound
from accounting.calibration import calibrate_noise
from accounting.ledger import (
    DP_PURPOSES,
    LEDGER_FORMAT,
    RANDOMNESS_KINDS,
    Ledger,
    LedgerError,
    LedgerPolicy,
    TornTailError,
)

__all__ = [
    "DP_PURPOSES",
    "LEDGER_FORMAT",
    "RANDOMNESS_KINDS",
    "AuditIssue",
    "AuditReport",
    "Ledger",
    "LedgerError",
    "LedgerPolicy",
    "OneRunAudit",
    "TornTailError",
    "audit_ledger",
    "audit_one_run",
    "epsilon_lower_bound",
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
