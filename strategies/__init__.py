"""How models meet: gossip topologies, compression, decentralized and Flower strategies."""

from privfl.strategies.base import (
    CollectiveRound,
    CollectiveStrategy,
    ModelMessage,
    NodeStrategy,
    Params,
    PeerNetwork,
    StepReport,
)
from privfl.strategies.cocod import CoCoDGossip, cocod_merge
from privfl.strategies.compression import (
    COMPRESSORS,
    AdaComp,
    CLTk,
    Compressed,
    CompressionError,
    Compressor,
    Identity,
    InnovationGossip,
    MalformedMessage,
    Quantize8,
    RandomK,
    Released,
    TopK,
    compressor_from_config,
    decompress,
    released,
)
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging, InProcessGrid, NodeEndpoint
from privfl.strategies.iterate_average import IterateAverage, ema_decay_setting
from privfl.strategies.periodic import AdaptivePeriod, AllReduce, PeriodicAveraging
from privfl.strategies.registry import (
    STRATEGIES,
    StrategyBuild,
    StrategyEntry,
    build_strategy,
    check_strategy,
    register_strategy,
)
from privfl.strategies.topology import TOPOLOGY_KINDS, Bipartition, Topology, TopologyError, build_topology

__all__ = [
    "CoCoDGossip", "cocod_merge",
    "AdaptivePeriod", "AllReduce", "FedAvgConfig", "FederatedAveraging", "InProcessGrid", "NodeEndpoint",
    "PeriodicAveraging", "IterateAverage", "ema_decay_setting",
    "COMPRESSORS", "TOPOLOGY_KINDS", "AdaComp", "Bipartition", "CLTk", "CollectiveRound",
    "CollectiveStrategy", "Compressed", "CompressionError", "Compressor", "Identity",
    "InnovationGossip", "MalformedMessage", "ModelMessage", "NodeStrategy", "Params", "PeerNetwork",
    "Quantize8", "RandomK", "Released", "StepReport", "TopK", "Topology", "TopologyError",
    "build_topology", "compressor_from_config", "decompress", "released",
    "STRATEGIES", "StrategyBuild", "StrategyEntry", "build_strategy", "check_strategy", "register_strategy",
]
