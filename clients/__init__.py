"""Site-side training: DP optimizers with per-sample clipping rules and the DPClient."""

from privfl.clients.app_client import AppClient, ClientAppError, UserApp, load_client_app
from privfl.clients.clipping import (
    CLIPPING_RULES,
    AutoSClipping,
    ClippingRule,
    FlatClipping,
    PSACClipping,
    clipping_rule,
)
from privfl.clients.distributed import SiteRanks, rank_share, share_indices
from privfl.clients.dp_client import DPClient, DPConfig, evaluate_model
from privfl.clients.engine import PrivacyEngine
from privfl.clients.ghost import GhostDPOptimizer, GhostGradModule, make_ghost_private
from privfl.clients.optimizer import PerSampleWeightDPOptimizer
from privfl.clients.session import SiteSession, current_session, site_session
from privfl.clients.topagg import (
    SparseTernary,
    TopAggDPOptimizer,
    TopAggParams,
    per_sample_votes,
    sum_votes,
    votes_to_dense,
)

__all__ = [
    "AppClient",
    "CLIPPING_RULES",
    "ClientAppError",
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
    "SiteRanks",
    "SiteSession",
    "SparseTernary",
    "TopAggDPOptimizer",
    "TopAggParams",
    "UserApp",
    "clipping_rule",
    "current_session",
    "evaluate_model",
    "load_client_app",
    "per_sample_votes",
    "rank_share",
    "share_indices",
    "site_session",
    "sum_votes",
    "votes_to_dense",
    "make_ghost_private",
]
