"""A DPOptimizer whose per-sample clipping is any :class:`ClippingRule`.

``clip_and_accumulate`` applies the rule; ``add_noise`` adds N(0, σ²C²) exactly as
Opacus's does, but drawn from a :class:`~clients.randomness.RandomSource` (secure by
default) instead of a ``torch.Generator``; ``scale_grad`` (divide by the public expected
batch size) is inherited unchanged, so the σ the accountant sees is the σ of the noise.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

from privfl.clients.clipping import ClippingRule, FlatClipping
from privfl.clients.randomness import RandomSource, SecureRandom


class PerSampleWeightDPOptimizer(DPOptimizer):
    """DP-SGD optimizer with a pluggable per-sample clipping rule."""

    def __init__(self, *args: object, clipping: ClippingRule | None = None,
                 random_source: RandomSource | None = None, **kwargs: object) -> None:
        if kwargs.get("generator") is not None:
            raise ValueError("pass random_source (a clients.randomness.RandomSource), not a torch generator")
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.clipping: ClippingRule = clipping or FlatClipping()
        self.random_source: RandomSource = random_source or SecureRandom()
        self.last_per_sample_norms: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def per_sample_norms(self) -> torch.Tensor:
        """L2 norm of each sample's gradient over the whole model."""
        per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples]
        dev = per_param[0].device
        return torch.stack([n.to(dev) for n in per_param], dim=1).norm(2, dim=1)

    def clip_and_accumulate(self) -> None:
        """Weight each per-sample gradient by the rule and sum them into ``p.summed_grad``."""
        if len(self.grad_samples[0]) == 0:
            weights = torch.zeros((0,), device=self.grad_samples[0].device)
            self.last_per_sample_norms = weights
        else:
            norms = self.per_sample_norms()
            weights = self.clipping.weights(norms, self.max_grad_norm)
            self.last_per_sample_norms = norms.detach()
        self.last_weights = weights.detach()
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            gs = self._get_flat_grad_sample(p).to(p.dtype)
            g = torch.einsum("i,i...", weights.to(gs.device, p.dtype), gs)
            p.summed_grad = g if p.summed_grad is None else p.summed_grad + g
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """``p.grad`` = Σ clipped + N(0, (σC)²), the noise from :attr:`random_source`."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        sums = [p.summed_grad for p in self.params]
        noises = self.random_source.normal_like_each(std, sums) if std > 0 else [torch.zeros_like(g) for g in sums]
        for p, noise in zip(self.params, noises):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
