"""privfl: privacy-preserving learning across hospitals.

Sites train locally with differential privacy and combine models by peer-to-peer
gossip over mutually authenticated channels, or through a central Flower strategy.

This package's ``__init__`` stays light on purpose (every module imports
``privfl.errors``): the runtime's public entry points live in their modules —
``privfl.node.Node``, ``privfl.launch.launch_consortium``, ``privfl.sim.run_simulation``,
``privfl.experiment.load_experiment``, ``privfl.audit_run.run_audit``, ``privfl.pki``,
``privfl.transport`` — so that ``import privfl`` does not pull in torch.
``privfl.PrivacyEngine`` (``clients.engine``) is the one exception, and it is lazy: torch
and Opacus load on first access, never at ``import privfl``.
"""

from typing import Any

from privfl.errors import ConfigError, DataError, PrivflError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "PrivacyEngine", "PrivflError", "__version__"]


def __getattr__(name: str) -> Any:
    """``privfl.PrivacyEngine`` on first use (it imports torch and Opacus; ``import privfl`` does not)."""
    if name == "PrivacyEngine":
        from privfl.clients.engine import PrivacyEngine

        return PrivacyEngine
    raise AttributeError(f"module 'privfl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"PrivacyEngine"})
