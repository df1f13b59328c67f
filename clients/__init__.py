"""Site-side training: DP optimizers with per-sample clipping rules and the DPClient."""

from clients.clipping import (
    CLIPPING_RULES,
    AutoSClipping,
    ClippingRule,
    FlatClipping,
    PSACClipping,
    clipping_rule,
)
from clients.dp_client import DPClient, DPConfig, evaluate_model
from clients.optimizer import PerSampleWeightDPOptimizer

__all__ = [
    "CLIPPING_RULES",
    "AutoSClipping",
    "ClippingRule",
    "DPClient",
    "DPConfig",
    "FlatClipping",
    "PSACClipping",
    "PerSampleWeightDPOptimizer",
    "clipping_rule",
    "evaluate_model",
]
