"""Subspace DP-SGD: each step clips and noises only k coordinates drawn from a PUBLIC seed.

Compression chosen *before* the noise, not after it. Each DP step is restricted to a
random coordinate mask M_t that is a function of ``(seed, t // period)`` alone — a public
seed and the public step count, never the data or the gradients — so every node that
shares the seed draws the same mask, a neighbour can derive the indices itself (they
cost nothing on the wire) and the shared support commutes with averaging. With ``whole`` > 0
the mask is *structured* (``accounting.subspace.subspace_mask``): every parameter tensor of at
most ``whole`` coordinates is kept whole and the rest of the k coordinates is drawn from the
bigger tensors — a function of the seed, the step and the model's public shapes, never of data.

Per step (Opacus per-sample gradients, :class:`SubspaceDPOptimizer`):

1. each per-sample gradient g_i is restricted to the mask, g_i|M;
2. the clipping rule is applied to g_i|M with norms taken *inside the subspace*, so every
   clipped contribution has ‖·‖ ≤ C: the L2 sensitivity (add/remove one record) is C;
3. Gaussian noise N(0, σ²C²) is added to the k kept coordinates only (no d/k rescaling),
   and the sum is divided by the public expected batch, as for the dense mechanism.

The released step is the Gaussian mechanism with sensitivity C on ℝᵏ (the mask is
public and data-independent), so the accountant event is the dense one: Poisson-sampled
Gaussian with the same (σ, q). Outside the mask the step is exactly zero (plain SGD).

Following Zhu & Blaschko (arXiv 2112.00845) and the "masking precedes clipping" recipe
(shared/research/wave2-findings.md §2.1). The matching wire format is
``strategies.compression.subspace.SubspaceK`` (the k values of the shared mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privfl.accounting.subspace import (
    SUBSPACE_KEYS,
    check_subspace_params,
    subspace_indices,
    subspace_k,
    subspace_mask,
)
from privfl.clients.optimizer import PerSampleWeightDPOptimizer

#: the key of the mask counter in the optimizer's state dict (what a node's checkpoint keeps)
STEPS_KEY = "subspace_steps_taken"

__all__ = ["STEPS_KEY", "SUBSPACE_KEYS", "SubspaceDPOptimizer", "check_subspace_params", "subspace_indices",
           "subspace_k", "subspace_mask"]


class SubspaceDPOptimizer(PerSampleWeightDPOptimizer):
    """DP-SGD restricted to a public random coordinate mask per step (see the module docstring)."""

    def __init__(self, *args: Any, fraction: float, seed: int, period: int = 1, whole: int = 0,
                 **kwargs: Any) -> None:
        checked = check_subspace_params({"fraction": fraction, "seed": seed, "period": period, "whole": whole},
                                        "mechanism_params")
        super().__init__(*args, **kwargs)
        self.fraction, self.seed, self.period = checked["fraction"], checked["seed"], checked["period"]
        self.whole = checked["whole"]
        self._numels = [int(p.numel()) for p in self.params]
        self._shapes = [tuple(int(s) for s in p.shape) for p in self.params]
        self.dimension = int(sum(self._numels))
        self.k = int(self.flat_indices(0).size)  # subspace_k(d, fraction); the structured mask keeps as many
        #: optimizer steps taken (public: the mask index is ``steps_taken // period``)
        self.steps_taken = 0
        self._cached: tuple[int, list[torch.Tensor]] | None = None

    @classmethod
    def from_params(cls, optimizer: torch.optim.Optimizer, params: Mapping[str, Any],
                    **kwargs: Any) -> SubspaceDPOptimizer:
        """Build from ``mechanism_params`` (``fraction``, ``seed``, optional ``period``)."""
        checked = check_subspace_params(params, "mechanism_params")
        return cls(optimizer, **checked, **kwargs)

    @property
    def mask_index(self) -> int:
        """Which mask the next step uses: ``steps_taken // period`` (public)."""
        return self.steps_taken // self.period

    def flat_indices(self, index: int | None = None) -> np.ndarray:
        """The mask's flat coordinates over the concatenated parameters (this step's by default)."""
        return subspace_mask(self.seed, self.mask_index if index is None else index, self._shapes,
                             self.fraction, self.whole)

    def masks(self, index: int | None = None) -> list[torch.Tensor]:
        """One boolean tensor per parameter (its shape), True on the kept coordinates."""
        index = self.mask_index if index is None else index
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        flat = torch.zeros(self.dimension, dtype=torch.bool)
        flat[torch.from_numpy(self.flat_indices(index))] = True
        out, start = [], 0
        for p, n in zip(self.params, self._numels):
            out.append(flat[start:start + n].view_as(p).to(p.device))
            start += n
        self._cached = (index, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus ``steps_taken``, so a restored node derives the same next masks."""
        return {**super().state_dict(), STEPS_KEY: int(self.steps_taken)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the mask counter never goes backwards)."""
        state = dict(state_dict)
        steps = state.pop(STEPS_KEY, None)
        super().load_state_dict(state)
        if steps is not None:
            self.steps_taken = max(self.steps_taken, int(steps))

    def clip_and_accumulate(self) -> None:
        """Restrict every per-sample gradient to the mask, then clip inside the subspace (norm ≤ C)."""
        for p, m in zip(self.params, self.masks()):
            _check_processed_flag(p.grad_sample)
            gs = self._get_flat_grad_sample(p)
            p.grad_sample = gs * m.unsqueeze(0).to(gs.dtype)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        """``p.grad`` = Σ clipped + N(0, (σC)²) on the k kept coordinates only (zero elsewhere)."""
        std = self.noise_multiplier * self.max_grad_norm
        masks = self.masks()
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        kept = [p.summed_grad[m] for p, m in zip(self.params, masks)]
        noises = (self.random_source.normal_like_each(std, kept) if std > 0
                  else [torch.zeros_like(g) for g in kept])
        for p, m, noise in zip(self.params, masks, noises):
            g = torch.zeros_like(p.summed_grad)
            g[m] = p.summed_grad[m] + noise
            p.grad = g.view_as(p)
            _mark_as_processed(p.summed_grad)
        self.steps_taken += 1


def describe(params: Mapping[str, Any]) -> dict[str, Any]:
    """The public mechanism parameters a ledger records for a subspace mechanism (``whole`` only when set)."""
    checked = check_subspace_params(params, "mechanism_params")
    return {k: checked[k] for k in sorted(checked) if k != "whole" or checked[k]}

