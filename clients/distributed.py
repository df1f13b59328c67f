"""One site on several processes (H-ADPSGD's "super learner"): one DP learner over R ranks.

Zhang et al.'s hierarchical ADPSGD all-reduces inside a site and gossips between sites.
Here a hospital's R ranks (``torch.distributed``: gloo on CPU, NCCL on GPU) are one learner:

* rank r holds the site's records i with i ≡ r (mod R) (:func:`share_indices`) and
  Poisson-samples them with the site's public q, so every record is sampled with
  probability q exactly once per step: the union of the ranks' batches is one Poisson(q)
  sample of the site;
* each rank computes its clipped per-sample gradient sum; the sums are all-reduced (one
  flat SUM) every step;
* the Gaussian noise N(0, σ²C²) is drawn once per site step, on rank 0 only (as Opacus's
  ``DistributedDPOptimizer`` does); the other ranks add zeros (:class:`ZeroNoise`); and
  the division is by the site's public expected batch size, as in a single process.

So the update is the single-process update for the same batch and noise, and the site's
accountant — rank 0's, the only one that reports to the ledger — sees one
Poisson(q)-subsampled Gaussian(σ) step per step, exactly as for one process. The workers'
own accountants are local bookkeeping only (no budget guard, no ledger hook).

Rank 0 drives: before each block of steps it sends the step count, its model and its
optimizer state (:meth:`SiteRanks.start_steps`, called from ``DPClient.before_steps``); the
workers wait for it in :meth:`SiteRanks.serve` and leave when it sends 0 (:meth:`SiteRanks.stop`).
This module needs an initialised default process group; :mod:`privfl.ranks` makes one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from privfl.clients.randomness import RandomSource

if TYPE_CHECKING:  # pragma: no cover
    from privfl.clients.dp_client import DPClient

__all__ = ["SiteRanks", "ZeroNoise", "rank_share", "share_indices"]


def share_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """The records of a site of ``n`` that rank ``rank`` of ``world_size`` holds: i ≡ rank (mod R).

    The ranks' shares are disjoint and cover every record, so Poisson(q) sampling of each
    share is Poisson(q) sampling of the site.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return np.arange(rank, n, world_size, dtype=np.int64)


def rank_share(train: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s share of a site's training data: ``(x, y)`` arrays sliced, a Dataset as a Subset."""
    if world_size == 1:
        return train
    if isinstance(train, tuple):
        idx = share_indices(len(train[1]), rank, world_size)
        return tuple(np.asarray(a)[idx] for a in train)
    if isinstance(train, Dataset):
        return Subset(train, share_indices(len(train), rank, world_size).tolist())  # type: ignore[arg-type]
    raise TypeError(f"cannot share {type(train).__name__} across ranks: give (x, y) arrays or a torch Dataset")


class ZeroNoise(RandomSource):
    """The noise source of ranks other than 0: zeros (the site's one noise draw is rank 0's)."""

    def __init__(self, kind: Any) -> None:
        self.kind = kind  # the site's kind, for the record

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise RuntimeError("ZeroNoise draws no uniforms: a worker's batches come from its own sampling source")

    def normal(self, std: float, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, device=device, dtype=dtype)

    def normal_like_each(self, std: float, refs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros_like(r) for r in refs]


class SiteRanks:
    """This process's place among a site's ranks, over the default ``torch.distributed`` group.

    ``device``: where the collectives' tensors live (CPU for gloo, this rank's GPU for NCCL).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        if world_size < 2:
            raise ValueError("SiteRanks needs at least two ranks")
        if not dist.is_initialized():
            raise RuntimeError("SiteRanks: initialise the default process group first (privfl.ranks)")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.steps_run = 0  # DP steps this rank took with the others
        self._client: DPClient | None = None

    @property
    def is_leader(self) -> bool:
        """Rank 0: talks to other sites, keeps the ledger and the key, draws the noise."""
        return self.rank == 0

    # ---- wiring a client ------------------------------------------------------------------
    def attach(self, client: DPClient) -> None:
        """Make ``client``'s DP optimizer one rank of the site's learner.

        Every rank: its optimizer step all-reduces the (noised on rank 0 only) gradient
        before the update. Rank 0: each block of steps is first handed to the workers.
        Other ranks: zero noise, and no budget guard or ledger hook of their own.
        """
        engine = client.privacy_engine
        if engine is None or engine.engine_kind is None:
            raise ValueError("SiteRanks: the client must train with DP (a PrivacyEngine made private)")
        if client.config.mechanism != "gaussian":
            raise ValueError(f"SiteRanks: dp.mechanism {client.config.mechanism!r}: several ranks per site "
                             "implement the gaussian mechanism only")
        opt: Any = client.optimizer
        params = list(opt.params)
        if not self.is_leader:
            opt.random_source = ZeroNoise(client.random_kind)
            engine.guard = None  # the site's budget is rank 0's; rank 0 sends only steps it reserved
            client.guard = None
            engine.on_dp_event = None
            client.on_dp_event = None
        pre_step: Callable[[], Any] = opt.pre_step  # the engine's accounted pre_step (ghost), or Opacus's

        def reduced_pre_step() -> Any:
            ok = pre_step()
            if ok is not False:  # Opacus returns False only for a skipped (accumulating) step
                self.all_reduce_grads(params)
            return ok

        opt.pre_step = reduced_pre_step
        self._client = client
        if self.is_leader:
            client.before_steps = self.start_steps

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Σ over ranks of every ``p.grad`` (one flat all-reduce), written back in place."""
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            raise RuntimeError("SiteRanks: a parameter has no gradient after the DP step")
        flat = torch.cat([g.reshape(-1) for g in grads if g is not None]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            g = p.grad
            assert g is not None
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.device)
            offset += n

    # ---- rank 0 drives, workers follow -------------------------------------------------------
    def start_steps(self, steps: int) -> None:
        """Rank 0: tell the workers to take ``steps`` steps, from rank 0's model and optimizer state."""
        client = self._require_client()
        opt_blob = _optimizer_blob(client.optimizer)
        self._broadcast_command(steps, len(opt_blob))
        self._sync_state(client, opt_blob)
        self.steps_run += steps

    def serve(self) -> int:
        """A worker: take the blocks of steps rank 0 sends until it sends 0; returns the steps taken."""
        client = self._require_client()
        engine = client.privacy_engine
        assert engine is not None
        while True:
            steps, blob_len = self._broadcast_command(0, 0)
            if steps <= 0:
                return self.steps_run
            self._sync_state(client, bytes(blob_len))
            engine.reserve(steps)  # local bookkeeping only (no guard, no hook): the optimizer steps use it
            client.run_steps(steps)
            self.steps_run += steps

    def stop(self) -> None:
        """Rank 0: release the workers (they return from :meth:`serve`)."""
        self._broadcast_command(0, 0)

    # ---- collectives ---------------------------------------------------------------------------
    def _require_client(self) -> DPClient:
        if self._client is None:
            raise RuntimeError("SiteRanks: attach a client first")
        return self._client

    def _broadcast_command(self, steps: int, blob_len: int) -> tuple[int, int]:
        cmd = torch.tensor([steps, blob_len], dtype=torch.int64, device=self.device)
        dist.broadcast(cmd, src=0)
        return int(cmd[0]), int(cmd[1])

    def _sync_state(self, client: DPClient, opt_blob: bytes) -> None:
        """Rank 0's model (parameters and buffers, one flat broadcast per dtype) and optimizer state."""
        tensors = list(client.module.state_dict().values())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device)
                dist.broadcast(flat, src=0)
                if not self.is_leader:
                    offset = 0
                    for t in group:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()
        if opt_blob:
            buf = torch.frombuffer(bytearray(opt_blob), dtype=torch.uint8).to(self.device)
            dist.broadcast(buf, src=0)
            if not self.is_leader:
                state = torch.load(io.BytesIO(buf.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
                client.optimizer.load_state_dict(state)


def _optimizer_blob(optimizer: torch.optim.Optimizer) -> bytes:
    """Rank 0's optimizer state as ``torch.save`` bytes (empty when it has none, e.g. plain SGD)."""
    state = optimizer.state_dict()
    if not state.get("state"):
        return b""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
