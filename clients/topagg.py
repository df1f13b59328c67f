"""TopAgg (DataLens, Wang et al., CCS 2021) as a record-level DP mechanism inside DP-SGD.

Each sample of a Poisson batch plays the part of a DataLens "teacher" (research note
§3.6, a reconstruction). Per step, on Opacus per-sample gradients:

1. **Top-k.** Each sample's gradient, flattened over the *whole model*, keeps its k
   coordinates of largest |g|; every other coordinate votes 0.
2. **Stochastic sign** (DataLens ``--stochastic``, §3.2 steps 2-3). The sample's bound is
   b_i = min(max_j |g_j|, b) (b = ``bound``; ``None`` = no cap, b_i is the sample's own
   max, DataLens ``--max_grad 0``). A kept coordinate g becomes +1 with probability
   clamp(½ + g/(2·b_i), 0, 1) and −1 otherwise, so E[vote] = clip(g, −b_i, b_i)/b_i;
   |g| ≥ b_i saturates to sign(g). If b_i = 0 the vote is a fair coin.
   Each sample's vote vector therefore has exactly k entries ±1, L2 norm √k.
3. **Sum** the votes over the batch: V = Σ_i v_i.
4. **Noise.** Ṽ = V + N(0, σ²) on *every* coordinate, σ = z·√k, z = ``noise_multiplier``.
   Adding or removing one record adds or removes one k-sparse ±1 vector, so the L2
   sensitivity is √k (add/remove) and the step is a Poisson-sampled Gaussian mechanism
   with noise multiplier σ/√k = z: the accountant is given z, exactly as for the
   Gaussian mechanism, so calibration works the same way for both.
5. **Threshold.** τ = β·B where β = ``threshold`` and B is the *expected* (public) batch
   size — DataLens's β·N_teachers with the Poisson batch's expectation, never its
   private realised size. Survivors are the coordinates with |Ṽ_j| ≥ τ; the update is
   ``scale``·sign(Ṽ_j) on survivors and 0 elsewhere (β = 0: every coordinate survives).
   The base optimizer then applies it: with plain SGD, x ← x − lr·scale·ternary.

Everything after step 4 is post-processing of the noised votes, so the sparse ternary
update (:meth:`TopAggDPOptimizer.last_update_sparse`) may be sent as is. This module
returns plain arrays; the runtime wraps them as a ``strategies.compression.Compressed``
of kind "ternary" (``clients`` must not import ``strategies``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _mark_as_processed,
)

from privfl.accounting.errors import ConfigError
from privfl.clients.randomness import RandomSource, SecureRandom

__all__ = [
    "SparseTernary",
    "TopAggDPOptimizer",
    "TopAggParams",
    "per_sample_votes",
    "sum_votes",
    "votes_to_dense",
]

log = logging.getLogger("privfl.clients")

_KNOWN_PARAMS = ("k", "threshold", "bound", "scale")


@dataclass(frozen=True)
class TopAggParams:
    """TopAgg's settings: top-k size, threshold fraction β, quantisation bound b, update scale."""

    k: int
    threshold: float = 0.0
    bound: float | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        where = "dp.mechanism_params"
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ConfigError(f"{where}.k (dp.topagg_k): TopAgg needs an integer k >= 1, got {self.k!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"{where}.threshold (dp.topagg_threshold): must be a finite number >= 0, "
                              f"got {self.threshold!r}")
        if self.bound is not None and not (isinstance(self.bound, (int, float)) and math.isfinite(self.bound)
                                           and self.bound > 0):
            raise ConfigError(f"{where}.bound: must be a finite number > 0 (or absent for no cap), got {self.bound!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"{where}.scale: must be a finite number > 0, got {self.scale!r}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> TopAggParams:
        """Parse ``DPConfig.mechanism_params``; unknown keys are an error (typos must not pass)."""
        unknown = sorted(set(params) - set(_KNOWN_PARAMS))
        if unknown:
            raise ConfigError(f"dp.mechanism_params: unknown TopAgg setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(_KNOWN_PARAMS)}")
        if "k" not in params:
            raise ConfigError("dp.mechanism_params.k (dp.topagg_k): required for mechanism 'topagg'")
        bound = params.get("bound")
        return cls(
            k=params["k"],
            threshold=params.get("threshold", 0.0),
            bound=None if bound in (None, 0, 0.0) else bound,
            scale=params.get("scale", 1.0),
        )


class SparseTernary(NamedTuple):
    """One parameter's released update: flat ``indices`` (strictly increasing), ±1 ``values``."""

    indices: np.ndarray  # int64, positions in the flattened parameter
    values: np.ndarray  # float32, each −1.0 or +1.0
    shape: tuple[int, ...]


def per_sample_votes(flat: torch.Tensor, k: int, bound: float | None = None,
                     source: RandomSource | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k stochastic-sign votes of each row of ``flat`` (n, d).

    Returns ``(indices, signs)``, both (n, k): the kept coordinates of each sample and
    their ±1 votes (see the module docstring, steps 1-2).
    """
    if flat.ndim != 2:
        raise ValueError(f"per-sample gradients must be (n, d), got shape {tuple(flat.shape)}")
    n, d = flat.shape
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if n == 0:
        return (torch.zeros((0, k), dtype=torch.long, device=flat.device),
                torch.zeros((0, k), dtype=flat.dtype, device=flat.device))
    kept, idx = flat.abs().topk(k, dim=1, sorted=False)
    vals = flat.gather(1, idx)
    b = kept.max(dim=1, keepdim=True).values  # the sample's own max |g|
    if bound is not None:
        b = b.clamp(max=bound)
    safe_b = torch.where(b > 0, b, torch.ones_like(b))
    p_plus = torch.where(b > 0, (0.5 + vals / (2 * safe_b)).clamp(0.0, 1.0), torch.full_like(vals, 0.5))
    u = (source or SecureRandom()).uniform(tuple(vals.shape), device=flat.device, dtype=flat.dtype)
    signs = torch.where(u < p_plus, 1.0, -1.0).to(flat.dtype)
    return idx, signs


def sum_votes(indices: torch.Tensor, signs: torch.Tensor, d: int) -> torch.Tensor:
    """V = Σ_i v_i as a dense (d,) vector."""
    out = torch.zeros(d, dtype=signs.dtype, device=signs.device)
    return out.index_add_(0, indices.reshape(-1), signs.reshape(-1))


def votes_to_dense(indices: torch.Tensor, signs: torch.Tensor, d: int) -> torch.Tensor:
    """Each sample's vote vector v_i as a dense (n, d) matrix (for tests and audits)."""
    out = torch.zeros((indices.shape[0], d), dtype=signs.dtype, device=signs.device)
    return out.scatter_(1, indices, signs)


class TopAggDPOptimizer(DPOptimizer):
    """DP-SGD whose per-sample sanitiser is TopAgg: sparse ternary updates, sensitivity √k.

    ``noise_multiplier`` is the *accounted* multiplier z; the noise std is z·√k. Opacus's
    step machinery (``pre_step``, step hooks, virtual steps) is kept: ``max_grad_norm`` is
    set to √k, the L2 norm bound of each sample's contribution, so Opacus's own
    "noise std = noise_multiplier × max_grad_norm" is exactly z·√k.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        expected_batch_size: int,
        k: int,
        threshold: float = 0.0,
        bound: float | None = None,
        scale: float = 1.0,
        random_source: RandomSource | None = None,
        node_id: str = "",
    ) -> None:
        self.topagg = TopAggParams(k=k, threshold=threshold, bound=bound, scale=scale)
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=math.sqrt(k),
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self.random_source: RandomSource = random_source or SecureRandom()
        self.dim = sum(p.numel() for p in self.params)
        if k > self.dim:
            raise ConfigError(f"dp.mechanism_params.k (dp.topagg_k): k={k} exceeds the model's "
                              f"{self.dim} trainable parameters")
        self.node_id = node_id
        self.last_noisy_votes: list[torch.Tensor] | None = None
        self._last_ternary: list[torch.Tensor] | None = None
        self.last_batch_size: int | None = None
        log.info("node %s: TopAgg optimizer k=%d threshold=%.4g·B (τ=%.4g) bound=%s z=%.4g noise std=%.4g d=%d",
                 node_id or "-", k, threshold, self.vote_threshold, bound, noise_multiplier, self.noise_std,
                 self.dim)

    @classmethod
    def from_params(cls, optimizer: torch.optim.Optimizer, params: Mapping[str, Any], *, noise_multiplier: float,
                    expected_batch_size: int, random_source: RandomSource | None = None,
                    node_id: str = "") -> TopAggDPOptimizer:
        """Build from ``DPConfig.mechanism_params`` (``k``, ``threshold``, optional ``bound``, ``scale``)."""
        p = TopAggParams.from_mapping(params)
        return cls(optimizer, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                   k=int(p.k), threshold=float(p.threshold), bound=p.bound, scale=float(p.scale),
                   random_source=random_source, node_id=node_id)

    # ---- conventions ------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.topagg.k)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the vote sum under add/remove-one: √k."""
        return math.sqrt(self.k)

    @property
    def noise_std(self) -> float:
        """σ = z·√k, the std of the Gaussian noise on each vote coordinate."""
        return float(self.noise_multiplier) * self.sensitivity

    @property
    def vote_threshold(self) -> float:
        """τ = β · expected batch size (public; never the realised Poisson batch size)."""
        return float(self.topagg.threshold) * float(self.expected_batch_size)

    # ---- Opacus hooks -----------------------------------------------------------------
    def pre_step(self, closure: Any = None) -> bool | None:
        """As Opacus, but an empty Poisson batch with no backward pass is a 0-sample batch."""
        if all(getattr(p, "grad_sample", None) is None for p in self.params):
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return super().pre_step(closure)

    def clip_and_accumulate(self) -> None:
        """Per-sample top-k stochastic-sign votes, summed over the batch into ``p.summed_grad``."""
        gs = self.grad_samples
        n = len(gs[0])
        dev = self.params[0].device
        dtype = self.params[0].dtype
        if n == 0:
            total = torch.zeros(self.dim, dtype=dtype, device=dev)
        else:
            flat = torch.cat([g.reshape(n, -1).to(dev, dtype) for g in gs], dim=1)
            idx, signs = per_sample_votes(flat, self.k, self.topagg.bound, self.random_source)
            total = sum_votes(idx, signs, self.dim)
        self.last_batch_size = n
        offset = 0
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            part = total[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.summed_grad = part if p.summed_grad is None else p.summed_grad + part
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """Ṽ = V + N(0, (z√k)²) on every coordinate; ``p.grad`` = scale·sign(Ṽ) where |Ṽ| ≥ τ."""
        tau = self.vote_threshold
        scale = float(self.topagg.scale)
        noisy_all, tern_all = [], []
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.random_source.normal_like(self.noise_std, p.summed_grad)
            noisy = p.summed_grad + noise
            tern = torch.where(noisy.abs() >= tau, torch.sign(noisy), torch.zeros_like(noisy))
            p.grad = (scale * tern).view_as(p)
            noisy_all.append(noisy.detach())
            tern_all.append(tern.detach())
            _mark_as_processed(p.summed_grad)
        self.last_noisy_votes = noisy_all
        self._last_ternary = tern_all

    def scale_grad(self) -> None:
        """No division by the batch size: the ternary update is already a direction."""

    # ---- release ----------------------------------------------------------------------
    def last_update_sparse(self) -> list[SparseTernary]:
        """The last step's update per parameter (in ``self.params`` order): survivors only.

        The dense update of a parameter is ``scale`` × values scattered at indices;
        everything here is post-processing of the noised votes.
        """
        if self._last_ternary is None:
            raise RuntimeError("no TopAgg step has run yet")
        out = []
        for t in self._last_ternary:
            flat = t.reshape(-1)
            idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
            out.append(SparseTernary(idx.cpu().numpy().astype(np.int64),
                                     flat[idx].cpu().numpy().astype(np.float32), tuple(t.shape)))
        return out

    def last_update_flat(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
        """The last update over the concatenation of all parameters: (int32 indices, ±1 float32 values, shapes).

        Indices are strictly increasing flat positions, as a "sparse" or "ternary"
        ``Compressed`` message expects (ternary: codes = packbits(values > 0), one scale
        per tensor = ``scale``).
        """
        parts = self.last_update_sparse()
        offsets = np.cumsum([0] + [int(np.prod(s.shape, dtype=np.int64)) for s in parts])
        idx = np.concatenate([s.indices + off for s, off in zip(parts, offsets)]) if parts else np.zeros(0)
        vals = np.concatenate([s.values for s in parts]) if parts else np.zeros(0)
        return idx.astype(np.int32), vals.astype(np.float32), [s.shape for s in parts]
