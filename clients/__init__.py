"""Site-side training: DP optimizers with per-sample clipping rules and the DPClient."""

from privfl.clients.clipping import (
    CLIPPING_RULES,
    AutoSClipping,
    ClippingRule,
    FlatClipping,
    PSACClipping,
    clipping_rule,
)
from privfl.clients.dp_client import DPClient, DPConfig, evaluate_model
from privfl.clients.engine import PrivacyEngine
from privfl.clients.ghost import GhostDPOptimizer, GhostGradModule, make_ghost_private
from privfl.clients.optimizer import PerSampleWeightDPOptimizer
from privfl.clients.topagg import (
    SparseTernary,
    TopAggDPOptimizer,
    TopAggParams,
    per_sample_votes,
    sum_votes,
    votes_to_dense,
)

__all__ = [
    "CLIPPING_RULES",
    "AutoSClipping",
    "ClippingRule",
    "DPClient",
    "DPConfig",
    "FlatClipping",
    "GhostDPOptimizer",
    "GhostGradModule",
    "PSACClipping",
    "PerSampleWeightDPOptimizer",
    "PrivacyEngine",
    "SparseTernary",
    "TopAggDPOptimizer",
    "TopAggParams",
    "clipping_rule",
    "evaluate_model",
    "per_sample_votes",
    "sum_votes",
    "votes_to_dense",
    "make_ghost_private",
]
