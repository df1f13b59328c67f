"""A site on several processes: ``[node] ranks = R``, or the node started under ``torchrun``.

The R processes of a site form one ``torch.distributed`` group (gloo on CPU, NCCL on GPU)
and train as one DP learner (:class:`privfl.clients.distributed.SiteRanks`: all-reduced
clipped sums, the noise once per step on rank 0, the site-level q and σ). Only rank 0 is a
node: it talks to other sites, keeps the ledger and holds the key. The other ranks
("workers") never build an identity, a ledger or a transport; they only join the group.

Who starts the workers:

* ``[node] ranks = R`` (not under torchrun): rank 0 forks R−1 workers itself, before it
  loads its identity (so no worker ever holds the node's key). The group meets on a
  ``TCPStore`` listening on 127.0.0.1 only, on a port the OS picks (a socket bound before
  the store, so no other process can take it), and gloo's own sockets are bound to the
  loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set). Workers die with rank 0: the
  kernel kills them when it exits (``PR_SET_PDEATHSIG``), a watchdog thread checks rank
  0's pid, and rank 0 releases them at the end of training and then waits for, or kills,
  each by pid.
* ``torchrun --nproc_per_node=R -m privfl node --config node.toml``: torchrun starts every
  rank (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` environment) and tears the
  group down when one fails; ``[node].ranks`` must then be 1 or R.

Each rank reads the site's records itself and keeps its share (record i on rank i mod R);
a worker applies the preprocessing rank 0 saved (never an estimate of its own: a DP
estimate is paid for once, by rank 0, in its ledger).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from privfl.clients.distributed import SiteRanks, rank_share
from privfl.errors import ConfigError, PrivflError

log = logging.getLogger("privfl.ranks")

#: how long rank 0 waits for its workers to join the group
JOIN_TIMEOUT_S = 120.0
#: the group's collective timeout: a worker waits this long for rank 0's next block of steps
#: (rank 0 gossips between blocks; the worker's watchdog covers rank 0's death)
COLLECTIVE_TIMEOUT = dt.timedelta(days=7)
#: a seeded worker's sampling seed is the node's seed + this × rank (its own independent coins)
WORKER_SEED_STRIDE = 100_003

__all__ = ["RankPlace", "RankWorkers", "RanksError", "SiteGroup", "join_site", "open_site_group",
           "rank_device", "rank_place", "run_worker"]


class RanksError(PrivflError):
    """A site's ranks could not start or meet; the message says which and why."""


@dataclass(frozen=True)
class RankPlace:
    """Where this process stands in its site: rank, world size, local rank, who launched the ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "single", "privfl" (rank 0 forks its workers) or "torchrun"
    master_port: int = 0  # a worker rank 0 forked: the port of rank 0's loopback store
    parent_pid: int = 0  # a worker rank 0 forked: rank 0's pid

    @property
    def is_worker(self) -> bool:
        return self.rank > 0


def rank_place(ranks: int, where: str, environ: Mapping[str, str] | None = None) -> RankPlace:
    """This process's place: from torchrun's (or rank 0's) environment, else ``[node].ranks``."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", env["RANK"]))
        except ValueError:
            raise ConfigError(f"{where}: RANK/WORLD_SIZE/LOCAL_RANK in the environment are not integers") from None
        if not 0 <= rank < world:
            raise ConfigError(f"{where}: RANK={rank} is not in 0..WORLD_SIZE-1 ({world})")
        if ranks not in (1, world):
            raise ConfigError(f"{where}: {ranks} but torchrun started {world} processes; set ranks = {world} or 1")
        return RankPlace(rank, world, local, "torchrun" if world > 1 else "single")
    return RankPlace(0, ranks, 0, "privfl" if ranks > 1 else "single")


def rank_device(device: torch.device, place: RankPlace, where: str = "[node].ranks") -> torch.device:
    """A rank's device: its own GPU (``cuda:local_rank``) when the site trains on CUDA (NCCL needs
    one GPU per rank on a machine: more ranks than GPUs is refused, naming ``where``)."""
    if device.type != "cuda" or place.world_size == 1:
        return device
    gpus = torch.cuda.device_count()
    if place.launcher == "privfl" and place.world_size > gpus:
        raise ConfigError(f"{where}: {place.world_size} ranks on CUDA need {place.world_size} GPUs, this machine "
                          f"has {gpus}; use fewer ranks, or [node].device = \"cpu\"")
    return torch.device("cuda", place.local_rank % max(1, gpus))


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# --------------------------------------------------------------------------- rank 0's workers


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent exits (crash included); and a
    watchdog thread exits it when rank 0's pid is no longer its parent (the belt to those braces)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # rank 0 died before the prctl took effect
        os._exit(3)
    _watch_parent(parent)


def _worker_main(target: Callable[[RankPlace], Any], place: RankPlace) -> None:  # pragma: no cover - a child
    """A forked worker: tie its life to rank 0's, then run ``target``.

    Ctrl-C, SIGTERM and SIGHUP sent to the node's process group are rank 0's to act on (it
    finishes the current block, then releases the workers): a worker ignores them, so a
    graceful stop never breaks a step half-way; it dies with rank 0 all the same.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(place.parent_pid)
    target(place)


class RankWorkers:
    """The R−1 worker processes rank 0 forked, and the loopback store they meet on.

    Forked (not spawned anew): a worker starts with rank 0's imports already loaded, so a
    site's ranks meet in well under a second instead of re-importing torch, Opacus and Flower
    per rank. Rank 0 forks them before it loads its identity, so no worker ever holds the
    node's key. ``target(place)`` is what each runs (:func:`run_worker` for a node).
    """

    def __init__(self, world_size: int, target: Callable[[RankPlace], Any]) -> None:
        self.world_size = world_size
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))  # loopback only; the OS picks a free port, held from now on
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self.store = dist.TCPStore("127.0.0.1", self.port, world_size, is_master=True, wait_for_workers=False,
                                   timeout=COLLECTIVE_TIMEOUT, master_listen_fd=self._sock.fileno())
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on the loopback too
        ctx = multiprocessing.get_context("fork")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for r in range(1, world_size):
            place = RankPlace(r, world_size, r, "privfl", master_port=self.port, parent_pid=os.getpid())
            proc = ctx.Process(target=_worker_main, args=(target, place), name=f"privfl-rank{r}", daemon=False)
            proc.start()
            self.procs.append(proc)
        self._closed = False
        atexit.register(self.close, 5.0)
        log.info("site ranks: forked %d worker(s) (pids %s), store 127.0.0.1:%d", world_size - 1,
                 ",".join(str(p) for p in self.pids), self.port)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid or 0) for p in self.procs]

    def wait_joined(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait (bounded) until every worker has reached the store; a worker that exits first is an error."""
        deadline = time.monotonic() + timeout
        for r, p in enumerate(self.procs, start=1):
            while not self.store.check([f"privfl/joined/{r}"]):
                if p.exitcode is not None:
                    raise RanksError(f"site rank {r} (pid {p.pid}) exited with code {p.exitcode} before joining")
                if time.monotonic() > deadline:
                    raise RanksError(f"site rank {r} (pid {p.pid}) did not join within {timeout:.0f} s")
                time.sleep(0.02)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for each worker to exit (bounded), then SIGTERM, then SIGKILL — by pid."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.terminate()
                p.join(timeout=2.0)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5.0)
        try:
            self._sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- the group


@dataclass
class SiteGroup:
    """A site's ranks once they met: the DP learner's collectives and (rank 0) its forked workers."""

    place: RankPlace
    ranks: SiteRanks
    workers: RankWorkers | None = None
    _stopped: bool = False

    def stop(self) -> None:
        """Rank 0: release the workers (training is over), wait for them, leave the group. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.ranks.stop()
        except RuntimeError as exc:  # a worker already gone: nothing to release
            log.warning("site ranks: could not release the workers: %s", exc)
        if self.workers is not None:
            self.workers.close()
        _leave()


def _leave() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # pragma: no cover - a broken group
            pass


def join_site(place: RankPlace, device: torch.device, workers: RankWorkers | None = None) -> None:
    """Join the site's default process group.

    Rank 0 with ``workers`` it forked: wait (bounded) until they reached its loopback store,
    then meet them there. A worker rank 0 forked: reach that store, meet.
    Under torchrun: ``env://``.
    """
    if workers is not None:
        workers.wait_joined()
        _join(place, device, workers.store)
    elif place.is_worker and place.launcher == "privfl":
        store = dist.TCPStore("127.0.0.1", place.master_port, place.world_size, is_master=False,
                              timeout=dt.timedelta(seconds=JOIN_TIMEOUT_S))
        store.set(f"privfl/joined/{place.rank}", "1")
        _join(place, device, store)
    else:
        _join(place, device, None)


def _join(place: RankPlace, device: torch.device, store: dist.Store | None) -> None:
    """Join the site's default process group (env:// under torchrun and in workers; ``store`` on rank 0)."""
    backend = _backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=place.rank, world_size=place.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, init_method="env://", rank=place.rank, world_size=place.world_size,
                                timeout=COLLECTIVE_TIMEOUT)


def _setup_tensor(device: torch.device, steps_before: int = 0, sigma: float = 0.0) -> torch.Tensor:
    return torch.tensor([float(steps_before), float(sigma)], dtype=torch.float64, device=device)


def open_site_group(place: RankPlace, device: torch.device, client: Any, steps_before: int, sigma: float,
                    workers: RankWorkers | None) -> SiteGroup:
    """Rank 0: meet the workers (forked earlier, or torchrun's), send them the public set-up
    (ledger steps, σ) and make ``client`` the leader of the site's learner."""
    try:
        join_site(place, device, workers)
        dist.broadcast(_setup_tensor(device, steps_before, sigma), src=0)
        ranks = SiteRanks(place.rank, place.world_size, device)
        ranks.attach(client)
    except BaseException:
        _leave()
        if workers is not None:
            workers.close(timeout=0.1)
        raise
    log.info("site ranks: %d ranks (%s, %s) train as one learner; this is rank 0", place.world_size,
             _backend(device), place.launcher)
    return SiteGroup(place, ranks, workers)


# --------------------------------------------------------------------------- a worker


def _watch_parent(parent: int) -> None:
    """Exit this worker as soon as rank 0 (``parent``) is gone (no orphans)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="privfl-rank0-watch", daemon=True).start()


def run_worker(cfg: Any, place: RankPlace) -> dict[str, Any]:
    """A rank > 0: join the group, build the site's model and DPClient on this rank's share, and
    take the steps rank 0 sends until it says stop. Never opens a port to another site."""
    from privfl.models import build_model
    from privfl.node import worker_site_inputs
    from privfl.site import ClientBuild, build_client

    device = rank_device(cfg.device, place)
    join_site(place, device)
    setup = _setup_tensor(device)
    dist.broadcast(setup, src=0)  # rank 0 has its ledger and σ by now: its preprocessing is saved
    steps_before, sigma = int(setup[0]), float(setup[1])
    c = cfg.common
    site = worker_site_inputs(cfg)
    share = dataclasses.replace(site, train=rank_share(site.train, place.rank, place.world_size))
    model = build_model(c.model.spec, site.in_shape, site.num_classes, seed=cfg.init_seed, args=c.model.args,
                        hidden=tuple(c.model.hidden))
    dpc = c.dp.to_dp_config()
    dpc.noise_multiplier = sigma
    seed = None if cfg.seed is None else cfg.seed + 1000 * steps_before + WORKER_SEED_STRIDE * place.rank
    client = build_client(ClientBuild(dpc, cfg.site_index, c.data.num_sites, c.strategy.local_steps, model=model,
                                      site=share, loss=c.model.loss, seed=seed, device=device,
                                      where=f"{cfg.path}: [client]"))
    ranks = SiteRanks(place.rank, place.world_size, device)
    ranks.attach(client)  # type: ignore[arg-type]
    log.info("node %s: site rank %d of %d (%s) ready", cfg.node.id, place.rank, place.world_size, device)
    try:
        steps = ranks.serve()
    finally:
        _leave()
    log.info("node %s: site rank %d took %d steps; rank 0 stopped", cfg.node.id, place.rank, steps)
    return {"node": cfg.node.id, "rank": place.rank, "stop_reason": "rank0_stopped", "steps": steps,
            "epsilon": None, "accuracy": None}
