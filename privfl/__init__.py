"""privfl: privacy-preserving learning across hospitals.

Sites train locally with differential privacy and combine models by peer-to-peer
gossip over mutually authenticated channels, or through a central Flower strategy.
"""

from privfl.errors import ConfigError, DataError, PrivflError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "PrivflError", "__version__"]
