"""Simulation: every node in one process on a virtual clock; real clients, simulated time."""

from privfl.sim.engine import Engine, SimulationResult, StopCriteria, consensus_distance, write_results
from privfl.sim.network import SimNetwork, SimWorld
from privfl.sim.profiles import (
    DEFAULT_STEP_COST,
    PROFILES,
    STEP_TIMES,
    LinkSpec,
    StepTimes,
    compute_speeds,
    default_step_cost,
)
from privfl.sim.runner import (
    STRATEGIES,
    SimContext,
    SimSpec,
    StrategyEntry,
    evaluation_records,
    node_ids_of,
    register_strategy,
    run_simulation,
)

__all__ = [
    "DEFAULT_STEP_COST",
    "PROFILES",
    "STEP_TIMES",
    "STRATEGIES",
    "Engine",
    "LinkSpec",
    "SimContext",
    "SimNetwork",
    "SimSpec",
    "SimWorld",
    "SimulationResult",
    "StepTimes",
    "StopCriteria",
    "StrategyEntry",
    "compute_speeds",
    "consensus_distance",
    "default_step_cost",
    "evaluation_records",
    "node_ids_of",
    "register_strategy",
    "run_simulation",
    "write_results",
]
