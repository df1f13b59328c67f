"""Privacy accounting: RDP/PLD accountant, budget guard, calibration, ledger and audit."""

from privfl.accounting.accountant import (
    NEIGHBORING_RELATION,
    DpEventKey,
    Method,
    PrivacyAccountant,
    epsilon_of,
    sampled_gaussian_event,
)
from privfl.accounting.audit import (
    SINGLE_LEDGER_NOTE,
    AuditIssue,
    AuditReport,
    ConsortiumPolicy,
    audit_ledger,
)
from privfl.accounting.audit_consortium import (
    ConsortiumProblem,
    ConsortiumReport,
    NodeSummary,
    audit_consortium,
)
from privfl.accounting.audit_empirical import OneRunAudit, audit_one_run, epsilon_lower_bound
from privfl.accounting.budget import BudgetExhausted, BudgetGuard
from privfl.accounting.calibration import calibrate_noise
from privfl.accounting.ledger import (
    ANCHORS_FINAL_FILE,
    DP_PURPOSES,
    LEDGER_FORMAT,
    RANDOMNESS_KINDS,
    Ledger,
    LedgerError,
    LedgerPolicy,
    TornTailError,
    check_against_peers,
    check_checkpoint_steps,
)

__all__ = [
    "ANCHORS_FINAL_FILE",
    "DP_PURPOSES",
    "LEDGER_FORMAT",
    "RANDOMNESS_KINDS",
    "AuditIssue",
    "AuditReport",
    "ConsortiumPolicy",
    "Ledger",
    "LedgerError",
    "LedgerPolicy",
    "OneRunAudit",
    "SINGLE_LEDGER_NOTE",
    "ConsortiumProblem",
    "ConsortiumReport",
    "NodeSummary",
    "TornTailError",
    "audit_consortium",
    "audit_ledger",
    "check_against_peers",
    "check_checkpoint_steps",
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
