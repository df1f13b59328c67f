"""Per-sample clipping rules: each maps per-sample gradient norms to weights.

A rule returns w(n) with n·w(n) ≤ C for every n ≥ 0, so the weighted per-sample
gradients have norm at most C: the add/remove sensitivity of their sum is C and the
Gaussian noise N(0, σ²C²) gives the usual subsampled-Gaussian guarantee for every rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

FLAT_EPS = 1e-6


class ClippingRule(ABC):
    """Maps per-sample gradient norms to the weights that scale those gradients."""

    name: str

    @abstractmethod
    def weights(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Per-sample weights; every ``norms[i] * weights[i]`` is at most ``max_grad_norm``."""


@dataclass(frozen=True)
class FlatClipping(ClippingRule):
    """Abadi et al.: g ↦ g · min(1, C/‖g‖) (as Opacus computes it)."""

    name: str = "flat"

    def weights(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        return (max_grad_norm / (norms + FLAT_EPS)).clamp(max=1.0)


@dataclass(frozen=True)
class PSACClipping(ClippingRule):
    """DP-PSAC (Xia et al., AAAI 2023): g ↦ C·g / (‖g‖ + r/(‖g‖ + r))."""

    r: float = 0.1
    name: str = "psac"

    def __post_init__(self) -> None:
        if not self.r > 0:
            raise ValueError(f"psac r must be > 0, got {self.r}")

    def weights(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        return max_grad_norm / (norms + self.r / (norms + self.r))


@dataclass(frozen=True)
class AutoSClipping(ClippingRule):
    """Auto-S / NSGD normalisation (Bu et al.; Das et al.): g ↦ C·g / (‖g‖ + γ)."""

    gamma: float = 0.01
    name: str = "autos"

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"autos gamma must be > 0, got {self.gamma}")

    def weights(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        return max_grad_norm / (norms + self.gamma)


CLIPPING_RULES = ("flat", "psac", "autos")


def clipping_rule(name: str, psac_r: float = 0.1, autos_gamma: float = 0.01) -> ClippingRule:
    """The clipping rule called ``name``."""
    if name == "flat":
        return FlatClipping()
    if name == "psac":
        return PSACClipping(psac_r)
    if name == "autos":
        return AutoSClipping(autos_gamma)
    raise ValueError(f"unknown clipping rule {name!r}: choose one of {', '.join(CLIPPING_RULES)}")
