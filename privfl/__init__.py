"""privfl: privacy-preserving learning across hospitals.

Sites train locally with differential privacy and combine models by peer-to-peer
gossip over mutually authenticated channels, or through a central Flower strategy.

This package's ``__init__`` stays light on purpose (every module imports
``privfl.errors``): the runtime's public entry points live in their modules —
``privfl.node.Node``, ``privfl.launch.launch_consortium``, ``privfl.sim.run_simulation``,
``privfl.experiment.load_experiment``, ``privfl.audit_run.run_audit``, ``privfl.pki``,
``privfl.transport`` — so that ``import privfl`` does not pull in torch.
"""

from privfl.errors import ConfigError, DataError, PrivflError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "PrivflError", "__version__"]
