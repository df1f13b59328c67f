"""Per-sample clipping rules: each maps per-sample gradient norms to weights.

A rule returns w(n) with n·w(n) < C for every n ≥ 0, so the weighted per-sample
gradients have norm below C: the add/remove sensitivity of their sum is C and the
Gaussian noise N(0, σ²C²) gives the usual subsampled-Gaussian guarantee for every rule.

The bound is made strict in floating point, not only on paper: the weights are capped at
C·(1 − CLIP_MARGIN)/n, a margin that covers the rounding of a float32 gradient norm
(relative error ~1e-6 for 10⁷ coordinates) and of the weight itself. Without it DP-PSAC's
n·w(n) reaches 1.0000007·C in float32 once n ≳ 1e4. The weights are computed in the
norms' own dtype when that is float32 or float64 (the cap's two roundings add at most
2·2⁻²⁴ ≈ 1.2e-7 in float32, far inside the margin; the weights were rounded to float32
anyway), else in float64. On the CPU they are computed with numpy on the norms' memory:
the same IEEE float32/float64 operations for a batch-sized vector at a fraction of torch's
per-operation cost (a DP step computes them once per step; each division then rounds once,
where torch's ``c / tensor`` rounds a reciprocal and a product).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

FLAT_EPS = 1e-6
#: relative gap kept below C by every rule (see the module docstring)
CLIP_MARGIN = 1e-5

#: the norms as a torch tensor or (on the CPU) a numpy array: the rules' formulas use operators only
Norms = TypeVar("Norms", torch.Tensor, np.ndarray)


class ClippingRule(ABC):
    """Maps per-sample gradient norms to the weights that scale those gradients.

    A new rule implements :meth:`raw_weights`, which receives a torch tensor or (on the
    CPU) a numpy array: write its formula with arithmetic operators, or branch on the type
    where a function is needed (as :class:`FlatClipping` does for its clamp).
    """

    name: str

    def weights(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Per-sample weights (``norms``' dtype); every ``norms[i] * weights[i]`` is below ``max_grad_norm``."""
        dtype = norms.dtype if norms.dtype in (torch.float32, torch.float64) else torch.float64
        n = norms.detach().to(dtype)
        if n.device.type == "cpu":
            return torch.from_numpy(self.capped_weights(n.numpy(), float(max_grad_norm))).to(norms.dtype)
        return self.capped_weights(n, float(max_grad_norm)).to(norms.dtype)

    def capped_weights(self, norms: Norms, max_grad_norm: float) -> Norms:
        """min(w(n), C·(1 − CLIP_MARGIN)/n) in ``norms``' float dtype, for a tensor or a numpy array."""
        if isinstance(norms, torch.Tensor):
            cap = max_grad_norm * (1.0 - CLIP_MARGIN) / norms.clamp(min=torch.finfo(norms.dtype).tiny)
            return torch.minimum(self.raw_weights(norms, max_grad_norm), cap)
        cap_a = np.maximum(norms, np.finfo(norms.dtype).tiny)
        with np.errstate(over="ignore"):  # C/tiny may round to inf, as torch's does silently: no cap then
            np.divide(max_grad_norm * (1.0 - CLIP_MARGIN), cap_a, out=cap_a)
        return np.minimum(self.raw_weights(norms, max_grad_norm), cap_a, out=cap_a)

    @abstractmethod
    def raw_weights(self, norms: Norms, max_grad_norm: float) -> Norms:
        """The rule's formula for w(n), in ``norms``' dtype (``weights`` makes the bound strict)."""


@dataclass(frozen=True)
class FlatClipping(ClippingRule):
    """Abadi et al.: g ↦ g · min(1, C/‖g‖) (as Opacus computes it)."""

    name: str = "flat"

    def raw_weights(self, norms: Norms, max_grad_norm: float) -> Norms:
        w = max_grad_norm / (norms + FLAT_EPS)
        return w.clamp(max=1.0) if isinstance(w, torch.Tensor) else np.minimum(w, 1.0, out=w)


@dataclass(frozen=True)
class PSACClipping(ClippingRule):
    """DP-PSAC (Xia et al., AAAI 2023): g ↦ C·g / (‖g‖ + r/(‖g‖ + r))."""

    r: float = 0.1
    name: str = "psac"

    def __post_init__(self) -> None:
        if not (self.r > 0 and math.isfinite(self.r)):
            raise ValueError(f"psac r must be a finite number > 0, got {self.r}")

    def raw_weights(self, norms: Norms, max_grad_norm: float) -> Norms:
        return max_grad_norm / (norms + self.r / (norms + self.r))


@dataclass(frozen=True)
class AutoSClipping(ClippingRule):
    """Auto-S / NSGD normalisation (Bu et al.; Das et al.): g ↦ C·g / (‖g‖ + γ)."""

    gamma: float = 0.01
    name: str = "autos"

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"autos gamma must be a finite number > 0, got {self.gamma}")

    def raw_weights(self, norms: Norms, max_grad_norm: float) -> Norms:
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
