"""One hospital's node process: DP training, gossip over mutual TLS, a signed privacy ledger.

Why this order at start: identity and trust first (a node that cannot prove who it is
must not open a port), then the consortium policy (refuse weaker DP settings), then the
ledger (refuse to run on a ledger that does not verify; rebuild the accountant from it so
a restart, a crash or a deleted checkpoint never resets the budget), then data, model,
DPClient (every DP event is written to the ledger *before* the steps run), the gossip
server and the strategy.

The run: ``strategy.step()`` in a loop until ``stop.max_steps`` local DP steps (counted
from the ledger, so across restarts), ``stop.max_seconds``, a
signal, or the budget (a strategy whose exchanges run on a communication thread beside the
next step, ``[strategy].params.overlap``, is ``settle()``-d at stop and before every checkpoint:
nothing stays in flight, and an exchange's error surfaces). Budget exhausted: fail closed —
no further step and no further model leaves the node (incoming exchanges are refused). Otherwise, once every neighbour
has finished training, active nodes do ``node.consensus_exchanges`` pure pairwise
averages (post-processing of already-noised models: no privacy cost) so the hospitals
end with (nearly) the same model; each node waits for its neighbours' goodbye before it
leaves, so nobody loses a partner mid-exchange. Unreachable peers are skipped with
backoff; every wait is bounded.

Outputs (``node.output``): ``ledger.jsonl``, ``checkpoint.pt`` (atomic), ``metrics.jsonl``
and ``metrics.csv``, ``final_model.npz``, ``final_model.pt`` (the model's own ``state_dict``;
``final_model.safetensors`` when safetensors is installed), ``preprocessing.json`` (the public
preprocessing the model expects), ``summary.json``, ``node.log`` (by the launcher).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import privfl
from privfl.accounting import DpEventKey, epsilon_of
from privfl.accounting.heads import sign_head
from privfl.accounting.ledger import (
    WRITE_FAILED,
    Ledger,
    LedgerError,
    LedgerPolicy,
    TornTailError,
    check_against_peers,
    check_checkpoint_steps,
)
from privfl.accounting.receipts import Receipt, append_receipt, receipts_path
from privfl.anchor_throttle import AnchorThrottle
from privfl.clients.distributed import rank_share
from privfl.clients.randomness import random_source
from privfl.data import Dataset, SiteData, SiteInputs
from privfl.errors import ConfigError, PrivflError
from privfl.models import build_model
from privfl.node_config import NodeConfig, load_node_config
from privfl.peer_network import AdvertisedPolicy, GrpcPeerNetwork
from privfl.pki import (
    NodeIdentity,
    PKIError,
    Roster,
    fingerprint,
    load_certificate,
    load_crl,
    load_private_key,
    load_roster,
    node_id_from_cert,
    verify_crl,
    verify_node_certificate,
)
from privfl.preprocessing import (
    Preprocessing,
    PreprocessingSpec,
    check_deployable,
    fit_preprocessing,
    load_preprocessing,
    save_preprocessing,
    spec_description,
)
from privfl.ranks import RankPlace, RankWorkers, SiteGroup, open_site_group, rank_device, rank_place, run_worker
from privfl.sim.engine import save_state_dict, state_dict_files
from privfl.site import ClientBuild, SiteClient, build_client, reads_site_data
from privfl.step_pacer import PacedClient, StepPacer
from privfl.strategies.base import NodeStrategy, Params, PeerNetwork
from privfl.strategies.gossip import AsyncGossip
from privfl.strategies.registry import StrategyBuild, build_node_strategy, check_strategy
from privfl.strategies.topology import Topology
from privfl.transport import LEDGER_DIGEST, PeerUnavailable

try:  # the output-folder lock; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("privfl.node")

LEDGER_FILE = "ledger.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
FINAL_MODEL = "final_model.npz"
FINAL_STATE_DICT = "final_model"  # + ".safetensors" when safetensors is installed, else ".pt" (torch.save)
SUMMARY_FILE = "summary.json"
PREPROCESSING_FILE = "preprocessing.json"
METRIC_FIELDS = ("time", "node", "phase", "steps", "loss", "accuracy", "test_loss", "epsilon", "delta",
                 "bytes_sent", "bytes_received", "exchanges", "served")
OUTPUT_LOCK = ".lock"
# what the node writes in its output folder (and the temporary names it renames from)
OUTPUT_FILES = (LEDGER_FILE, LEDGER_FILE + ".tmp", CHECKPOINT_FILE, CHECKPOINT_FILE + ".tmp", METRICS_JSONL,
                METRICS_CSV, FINAL_MODEL, "initial_model.npz", SUMMARY_FILE, SUMMARY_FILE + ".tmp",
                PREPROCESSING_FILE, PREPROCESSING_FILE + ".tmp", *state_dict_files(FINAL_STATE_DICT))
_HELD_LOCKS: dict[str, int] = {}  # lock file → descriptor, held until this process exits


class NodeError(PrivflError):
    """The node refuses to start or to continue; the message says why and names the file/field."""


# --------------------------------------------------------------------------- start-up checks


def _os_reason(exc: OSError) -> str:
    """An OS error in words on one line ("[Errno 28] No space left on device")."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None and exc.strerror else str(exc)


def _hold_lock(path: Path, busy: str, cannot: str) -> bool:
    """Take an exclusive ``flock`` on ``path`` (created, our pid written in it) until the process exits.

    Another process holding it: NodeError ``busy`` (``{pid}`` filled in from the file).
    The file cannot be created or written: NodeError ``cannot`` (``{reason}`` filled in),
    or False when ``cannot`` is empty (a best-effort lock). The same process taking it
    again (a Node rebuilt in-process) is a no-op.
    """
    key = os.path.abspath(path)
    if fcntl is None or key in _HELD_LOCKS:
        return True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if not cannot:
            return False
        raise NodeError(cannot.format(reason=_os_reason(exc))) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        except OSError:
            pid = "?"
        os.close(fd)
        raise NodeError(busy.format(pid=pid)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        if not cannot:
            return False
        raise NodeError(cannot.format(reason=_os_reason(exc))) from None
    _HELD_LOCKS[key] = fd
    return True


def prepare_output(cfg: NodeConfig) -> Path:
    """Check and lock ``[node].output`` before the node writes anything; returns the folder.

    One-line errors: the path is a file, the folder cannot be created or written (read-only,
    full), one of the node's output files is a directory, or another privfl node process
    already runs with this output folder (an exclusive ``flock`` on ``<output>/.lock``,
    held for the life of the process and released by the OS when it exits).
    """
    out, where = cfg.output_dir, f"{cfg.path}: [node].output"
    if out.exists() and not out.is_dir():
        raise NodeError(f"{where}: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NodeError(f"{where}: cannot create the folder {out}: {_os_reason(exc)}") from None
    for name in OUTPUT_FILES:
        f = out / name
        if (f.exists() or f.is_symlink()) and not f.is_file():
            what = "a directory" if f.is_dir() else "not a regular file"
            raise NodeError(f"{where}: {f} is {what}; the node writes its {name} there")
    _hold_lock(out / OUTPUT_LOCK, f"{where}: another privfl node (pid {{pid}}) is running with output folder {out}",
               f"{where}: cannot write in the folder {out}: {{reason}}")
    return out


def hold_identity(identity: NodeIdentity) -> None:
    """One node identity (its certificate) runs once on this machine: a second node process with the
    same certificate is refused, whatever its output folder or port (a lock in the temp folder,
    keyed by the certificate's SHA-256; best effort: skipped when that folder is not writable)."""
    try:
        fp = fingerprint(identity.cert_pem).split(":")[-1]
    except PKIError:  # pragma: no cover - load_identity checked it
        return
    path = Path(tempfile.gettempdir()) / f"privfl-node-{fp[:32]}.lock"
    if not _hold_lock(path, f"another privfl node (pid {{pid}}) is running as node {identity.node_id!r} with the "
                            f"same certificate on this machine (lock {path})", ""):
        log.warning("node %s: cannot take the identity lock %s; not checking for a second process with this "
                    "certificate", identity.node_id, path)


def load_identity(cfg: NodeConfig) -> tuple[NodeIdentity, Roster, bytes]:
    """The node's identity, roster and CRL, with every check a peer would make of us.

    One-line errors name the ``[identity]`` field: unreadable or malformed files, a key
    that does not belong to the certificate, a certificate naming another node id, or one
    the roster does not pin / the CRL revokes.
    """
    src = cfg.path

    def read(name: str) -> bytes:
        p: Path = getattr(cfg, f"{name}_path")
        try:
            return p.read_bytes()
        except OSError as exc:
            raise NodeError(f"{src}: [identity].{name}: cannot read {p}: {exc.strerror}") from None

    cert_pem, key_pem, ca_pem, crl_pem = read("cert"), read("key"), read("ca"), read("crl")
    try:
        cert = load_certificate(cert_pem)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].cert: {cfg.cert_path}: {exc}") from None
    try:
        key = load_private_key(key_pem)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].key: {cfg.key_path}: {exc}") from None
    try:
        ca = load_certificate(ca_pem)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].ca: {cfg.ca_path}: {exc}") from None
    from cryptography.hazmat.primitives import serialization as ser

    spki = (ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise NodeError(f"{src}: [identity].key: {cfg.key_path} is not the key of the certificate {cfg.cert_path}")
    try:
        cert_id = node_id_from_cert(cert)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].cert: {cfg.cert_path}: {exc}") from None
    if cert_id != cfg.node.id:
        raise NodeError(f"{src}: [node].id: {cfg.node.id!r} but the certificate {cfg.cert_path} names node {cert_id!r}")
    try:
        roster = load_roster(cfg.roster_path)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].roster: {exc}") from None
    try:
        verify_crl(load_crl(crl_pem), ca)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].crl: {cfg.crl_path}: {exc}") from None
    try:
        verify_node_certificate(cert, ca, roster, crl_pem)
    except PKIError as exc:
        raise NodeError(f"{src}: [identity].cert: {cfg.cert_path} is refused by the roster/CA/CRL: {exc}") from None
    return NodeIdentity(cfg.node.id, cert_pem, key_pem, ca_pem), roster, crl_pem


def resolved_noise(cfg: NodeConfig, prior: dict[Any, int] | None = None) -> float:
    """The node's noise multiplier: configured, or calibrated from public values alone.

    (q, planned_steps, ε, δ) and the public cost of a DP preprocessing estimate
    (``prior``) — never the number of records the site holds, so σ reveals nothing of it.
    """
    try:
        return cfg.common.dp.to_dp_config().resolved_noise(prior)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.path}: [dp]: {exc}") from None


def check_one_step_fits(cfg: NodeConfig, sigma: float) -> None:
    """Refuse a budget that allows not even one DP step at the declared σ and q (it would start,
    take none and end "budget exhausted" with nothing learnt); all public values."""
    dp = cfg.common.dp
    if not dp.enabled or not sigma > 0:
        return
    q = dp.to_dp_config().public_sample_rate()
    one = epsilon_of({DpEventKey(sigma, q): 1}, dp.delta, method=dp.accountant)  # type: ignore[arg-type]
    if one > dp.target_epsilon:
        raise NodeError(f"{cfg.path}: [dp].target_epsilon: ε = {dp.target_epsilon:g} allows no DP step: one step "
                        f"at σ = {sigma:g}, q = {q:g} costs ε = {one:.3g} (δ = {dp.delta:g}); raise "
                        "target_epsilon or noise_multiplier, or set noise_multiplier = 0 to calibrate σ")


def check_policy(cfg: NodeConfig, roster: Roster, sigma: float) -> None:
    """Refuse DP settings weaker than the consortium minimum (the roster's ``[policy]``)."""
    dp, pol, src = cfg.common.dp, roster.policy, cfg.path
    if not dp.enabled:
        raise NodeError(f"{src}: [dp].enabled: a node releases models to its peers and must train with DP "
                        "(no-DP baselines are for privfl simulate/compare)")
    if cfg.common.stop.target_accuracy > 0:
        raise NodeError(f"{src}: [stop].target_accuracy: a node would stop when its own test accuracy (not "
                        "DP) reaches the target, and its peers and its ledger see when: that releases a "
                        "statistic of its records; stop on [stop].max_steps (target accuracy is for privfl "
                        "simulate/compare)")
    paced = cfg.node.step_seconds * cfg.common.strategy.local_steps
    if paced >= cfg.node.peer_timeout / 2:
        raise NodeError(f"{src}: [node].step_seconds: {cfg.node.step_seconds:g} s × [strategy].local_steps "
                        f"{cfg.common.strategy.local_steps} = {paced:g} s, a model's wait for its slot, must stay "
                        f"below half of [node].peer_timeout ({cfg.node.peer_timeout:g} s) or peers time out")
    if pol.min_noise_multiplier is not None and sigma < pol.min_noise_multiplier:
        raise NodeError(f"{src}: [dp].noise_multiplier: {sigma:g} is below the consortium minimum "
                        f"{pol.min_noise_multiplier:g} (roster {cfg.roster_path} [policy].min_noise_multiplier)")
    if pol.max_epsilon is not None and dp.target_epsilon > pol.max_epsilon:
        raise NodeError(f"{src}: [dp].target_epsilon: {dp.target_epsilon:g} exceeds the consortium maximum "
                        f"{pol.max_epsilon:g} (roster {cfg.roster_path} [policy].max_epsilon)")
    if pol.delta is not None and dp.delta > pol.delta:
        raise NodeError(f"{src}: [dp].delta: {dp.delta:g} exceeds the consortium δ {pol.delta:g} "
                        f"(roster {cfg.roster_path} [policy].delta)")
    check_one_step_fits(cfg, sigma)  # after the consortium's refusals, which say more


def ledger_policy(cfg: NodeConfig, roster: Roster, sigma: float) -> LedgerPolicy:
    """The privacy policy pinned in the ledger header."""
    dp = cfg.common.dp
    floor = roster.policy.min_noise_multiplier if roster.policy.min_noise_multiplier is not None else sigma
    rule = "topagg" if dp.mechanism == "topagg" else dp.clipping
    return LedgerPolicy(target_epsilon=float(dp.target_epsilon), delta=float(dp.delta),
                        min_noise_multiplier=float(floor), allowed_clipping_rules=(rule,),
                        accountant=dp.accountant)


def open_ledger(path: Path, identity: NodeIdentity, policy: LedgerPolicy, randomness: str,
                preprocessing: dict[str, Any] | None = None) -> Ledger:
    """Open (or create) the node's ledger; repair a torn tail with a logged note; refuse anything else.

    The header records the randomness kind and the public preprocessing description.
    """
    key = load_private_key(identity.key_pem)
    extra: dict[str, Any] = {"randomness": randomness, "preprocessing": preprocessing}
    try:
        try:
            return Ledger.open_or_create(path, key, identity.cert_pem, policy, privfl.__version__,
                                         node_id=identity.node_id, **extra)
        except TornTailError as exc:
            log.warning("node %s: ledger %s has a torn last line (%d bytes, a crash during an append); "
                        "repairing it explicitly", identity.node_id, path, exc.torn_bytes)
            Ledger.repair_torn_tail(path, key).close()
            log.warning("node %s: ledger %s torn tail repaired (a 'torn_tail_repaired' note was appended)",
                        identity.node_id, path)
            return Ledger.open_or_create(path, key, identity.cert_pem, policy, privfl.__version__,
                                         node_id=identity.node_id, **extra)
    except LedgerError as exc:
        if exc.kind == WRITE_FAILED:
            raise NodeError(f"node {identity.node_id}: {exc.reason}; refusing to start") from None
        raise NodeError(f"ledger {path} failed verification, refusing to start: {exc}") from None
    except OSError as exc:  # creating the ledger on a full or read-only disk
        raise NodeError(f"node {identity.node_id}: cannot write the ledger {path}: {_os_reason(exc)}; "
                        "refusing to start") from None
    except ValueError as exc:
        raise NodeError(f"ledger {path}: {exc}") from None


def topology_of(cfg: NodeConfig, node_ids: Sequence[str]) -> Topology:
    """The consortium graph over the roster's node ids (same on every node, and in the simulator)."""
    return cfg.common.topology.build(node_ids)


def strategy_build(cfg: NodeConfig, topology: Topology, client: SiteClient, network: PeerNetwork, params: Params,
                   seed: int, compressor_seed: int, public_initial: Params | None = None) -> StrategyBuild:
    """What a node asks the strategy registry for: ``[strategy]`` as written, its topology,
    ``[node].sync_timeout`` for a round's wait, and compressed gossip starting from the shared
    initial model unless ``[node].init_seed`` gives the node its own."""
    c = cfg.common
    return StrategyBuild(c.strategy.name, "node", c.strategy.params, c.strategy.local_steps, seed=seed,
                         compressor_seed=compressor_seed, timeout=cfg.node.sync_timeout,
                         shared_init=cfg.node.init_seed < 0, node_id=cfg.node.id, topology=topology,
                         client=client, network=network, initial=params,
                         planned_steps=c.dp.planned_steps or c.stop.max_steps or None, public_initial=public_initial)


# --------------------------------------------------------------------------- the node


class Node:
    """A node built from its config: call :meth:`run` (blocking) and :meth:`request_stop` from a signal."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.node_id = cfg.node.id
        self.out = cfg.output_dir
        self._stop_requested = threading.Event()
        self._t0 = time.monotonic()
        self._last_ckpt = time.monotonic()
        self.metrics_rows: list[dict[str, Any]] = []
        self.stop_reason = ""
        self.ledger: Ledger | None = None
        self.network: GrpcPeerNetwork | None = None
        self._ledger_failure: str | None = None  # set once a ledger write fails: nothing more runs or leaves
        self.place = RankPlace()  # this site's ranks ([node].ranks or torchrun): rank 0 is this node
        self._workers: RankWorkers | None = None  # the workers this node spawned ([node].ranks > 1)
        self.group: SiteGroup | None = None  # the site's ranks once they met
        try:
            self._setup()
        except BaseException:
            self._stop_ranks()
            raise

    # ---- set-up ---------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, c = self.cfg, self.cfg.common
        try:  # the strategy registry's refusal, before anything is written
            check_strategy(c.strategy.name, c.strategy.params, "node")
        except ConfigError as exc:
            raise ConfigError(f"{cfg.path}: {exc}") from None
        self.place = rank_place(cfg.node.ranks, f"{cfg.path}: [node].ranks")
        self.device = rank_device(cfg.device, self.place, f"{cfg.path}: [node].ranks")  # refused before a fork
        if self.place.launcher == "privfl":  # forked before the key is loaded: no worker ever holds it
            self._workers = RankWorkers(self.place.world_size, lambda place: run_worker(cfg, place))
        prepare_output(cfg)  # before anything is written
        self.identity, self.roster, crl = load_identity(cfg)
        hold_identity(self.identity)
        if self.node_id not in self.roster.nodes:
            raise NodeError(f"{cfg.path}: [node].id: {self.node_id!r} is not in the roster {cfg.roster_path}")
        # data: every node uses the same data seed, so the partitions agree; preprocessing is
        # public (declared statistics) or a DP estimate whose cost is in the ledger
        spec = c.data.preprocessing_spec(cfg.path.parent)
        check_deployable(spec, f"{cfg.path}: [data]")
        self.out.mkdir(parents=True, exist_ok=True)
        self.site, pre, fresh = self._site_data(spec)
        prior = {DpEventKey(pre.dp_event.noise_multiplier, 1.0): 1} if pre.dp_event is not None else None
        self.sigma = resolved_noise(cfg, prior)
        check_policy(cfg, self.roster, self.sigma)
        self.ledger = open_ledger(self.out / LEDGER_FILE, self.identity, ledger_policy(cfg, self.roster, self.sigma),
                                  cfg.randomness, pre.describe())
        if fresh and pre.dp_event is not None:
            self._record_preprocessing(pre)
        elif fresh:  # public ranges (or none): saved too, so the final model comes with what it needs
            save_preprocessing(pre, self.out / PREPROCESSING_FILE)
        accountant = self.ledger.rebuild_accountant()
        self.steps_before = self.ledger.steps
        model = None  # a user's client without [model].factory holds its own model
        if self.site is not None or c.model.factory:
            model = build_model(c.model.spec, self.site.in_shape if self.site else (),
                                self.site.num_classes if self.site else 0, seed=cfg.init_seed,
                                args=c.model.args, hidden=tuple(c.model.hidden))
        dpc = c.dp.to_dp_config()
        dpc.noise_multiplier = self.sigma
        if cfg.seed is not None:
            log.warning("node %s: [node].seed = %d: SEEDED noise and sampling — anyone who knows the seed can "
                        "recompute them; for tests only (the ledger says 'seeded' and the audit fails it)",
                        self.node_id, cfg.seed)
        site = self.site
        if self.place.world_size > 1 and self.site is not None:
            if c.dp.delta >= 1 / self.site.train_size:  # the site's records, not this rank's share
                raise ConfigError(f"{cfg.path}: [dp].delta: δ={c.dp.delta:g} is not below 1/n for this site's "
                                  "training records; choose a smaller δ")
            site = dataclasses.replace(self.site, train=rank_share(self.site.train, 0, self.place.world_size))
        if c.client.app:
            log.info("node %s: training with the hospital's own client %s under privfl.PrivacyEngine", self.node_id,
                     c.client.app)
        if c.client.app and model is None:
            torch.manual_seed(cfg.init_seed)  # public: a user's client building its own model starts like its peers
        self.client = build_client(ClientBuild(
            dpc, cfg.site_index, c.data.num_sites, c.strategy.local_steps, model=model, site=site,
            loss=c.model.loss, app=c.client.app, run_config=c.client.run_config,
            seed=None if cfg.seed is None else cfg.seed + 1000 * self.steps_before, device=self.device,
            accountant=accountant, on_dp_event=self._on_dp_event, where=f"{cfg.path}: [client]"))
        self.client.training_steps = self.steps_before
        self.names = self.client.parameter_names()
        params = self.client.get_parameters({})
        self.initial_params = [p.copy() for p in params]
        resumed = self._load_checkpoint()
        if resumed is not None:
            params = resumed
        if self.place.world_size > 1:
            self.group = open_site_group(self.place, self.device, self.client, self.steps_before, self.sigma,
                                         self._workers)
        eps = self.client.epsilon
        records = (f"{self.site.train_size} train / {self.site.test_size} test records (local)" if self.site
                   else f"records loaded by {c.client.app}")
        log.info("node %s: site %d, %s, device %s, σ=%.4g, q=%.4g, %s randomness, ledger steps=%d ε=%.4f of %g "
                 "(δ=%g)%s", self.node_id, cfg.site_index, records, self.device, self.sigma, self.client.sample_rate,
                 self.client.random_kind, self.steps_before, eps, c.dp.target_epsilon, c.dp.delta,
                 ", resumed from checkpoint" if resumed is not None else "")
        self.topology = topology_of(cfg, list(self.roster.nodes))
        summary = self.topology.summary()
        log.info("node %s: topology %s", self.node_id, summary)
        print(f"[{self.node_id}] topology: {summary}", flush=True)
        neighbors = self.topology.neighbors(self.node_id)
        ledger = self.ledger
        self._anchors = AnchorThrottle(lambda: (ledger.steps, ledger.ends_with_close), self._write_anchor,
                                       newest=ledger.last_anchor, sync=ledger.sync)
        self._pacer = StepPacer(self.node_id, cfg.node.step_seconds)
        self.network = GrpcPeerNetwork(
            self.identity, self.roster, crl, neighbors, self.names, params,
            policy=AdvertisedPolicy(self.sigma, c.dp.target_epsilon, c.dp.delta),
            listen=cfg.node.listen or None, timeout=cfg.node.peer_timeout, on_release=self._on_release,
            ledger_head=lambda: ledger.head, on_peer_head=self._on_peer_head, head_for=self._held_head,
            on_receipt=self._on_receipt, on_goodbye=self._anchors.commit, crl_path=cfg.crl_path,
            roster_path=cfg.roster_path)
        paced = PacedClient(self.client, self._pacer, lambda: ledger.steps) if self._pacer.active else self.client
        self.strategy: NodeStrategy = build_node_strategy(strategy_build(
            cfg, self.topology, paced, self.network,  # type: ignore[arg-type]  # a SiteClient by delegation
            params, self._strategy_seed(0), self._strategy_seed(7919),
            public_initial=self.initial_params))
        self._log_compression(resumed=resumed is not None)
        self.network.attach(self.strategy)

    def _log_compression(self, resumed: bool) -> None:
        """Log compressed sync_gossip's settings; warn where the public estimates may start out of step.

        ``shared_init`` defaults to true when every node builds its initial model from
        ``model.seed`` (no ``[node].init_seed``): then all nodes start from the same
        public model and the estimates of each other can start there too.
        """
        if self.cfg.strategy_params.compressor is None:
            return
        scfg = self.strategy.config
        shared = bool(scfg["shared_init"])
        if shared and self.cfg.node.init_seed >= 0:
            log.warning("node %s: [strategy].params.shared_init with [node].init_seed set: every node must use "
                        "the same init_seed, or the public estimates start out of step", self.node_id)
        if resumed:
            log.warning("node %s: resumed compressed sync_gossip: the public estimates of neighbours restart "
                        "from %s and may be out of step with theirs", self.node_id,
                        "this checkpoint" if shared else "zero")
        log.info("node %s: sync_gossip compressed with %s, gamma=%g, shared_init=%s", self.node_id,
                 scfg["compressor"].describe(), scfg["gamma"], shared)

    def _strategy_seed(self, offset: int) -> int:
        """A seed for post-processing randomness (peer choice, compressor masks): from the
        explicit ``[node].seed`` in a seeded test node, else from OS entropy."""
        return self.cfg.seed + offset if self.cfg.seed is not None else secrets.randbits(62)

    def _site_data(self, spec: PreprocessingSpec) -> tuple[SiteInputs | None, Preprocessing, bool]:
        """This site's records, preprocessed: the user's ``[data].factory`` Datasets as they are,
        or its partition of a shipped set / file with public or DP preprocessing; None when the
        hospital's own ``[client].app`` loads its records itself.

        Returns (site inputs, preprocessing, preprocessing fitted now)."""
        cfg, data = self.cfg, self.cfg.common.data
        if not reads_site_data(self.cfg.common.client.app, data.factory):
            return None, dataclasses.replace(Preprocessing("none", "none", ()), spec=spec), True
        if data.factory:
            fs = data.factory_site(cfg.site_index, cfg.path.parent, f"{cfg.path}: [data]")
            pre = dataclasses.replace(Preprocessing("none", "none", fs.in_shape), spec=spec)
            return SiteInputs.of_factory(fs, data.num_classes), pre, True
        raw = data.sites(cfg.path.parent)[cfg.site_index]
        pre, fresh = self._preprocessing(spec, raw.train.x, data.source)
        return SiteInputs.of_arrays(SiteData(raw.site, _mapped(raw.train, pre), _mapped(raw.test, pre))), pre, fresh

    def _preprocessing(self, spec: PreprocessingSpec, train_x: np.ndarray, dataset: str) -> tuple[Preprocessing, bool]:
        """The site's preprocessing: reloaded from its saved public description when this node
        estimated it before (a DP estimate is never paid for twice), else fitted now.

        Returns (preprocessing, fitted now)."""
        path = self.out / PREPROCESSING_FILE
        if path.exists():
            try:
                saved = load_preprocessing(path)
            except (OSError, ValueError, ConfigError) as exc:
                raise NodeError(f"{path}: unreadable saved preprocessing ({exc}); remove it only together with a "
                                "new ledger") from None
            # only a DP estimate is reused; public ranges cost nothing and are fitted (and saved) afresh
            if saved.kind == "dp" and saved.describe().get("spec") == spec_description(spec):
                log.info("node %s: preprocessing %s reloaded from %s", self.node_id, saved.kind, path)
                return saved, False
            if saved.kind == "dp":
                log.info("node %s: [data] preprocessing changed since %s was saved; fitting it again", self.node_id,
                         path)
        source = random_source(None if self.cfg.seed is None else self.cfg.seed + 4243)
        pre = fit_preprocessing(spec, train_x, source=source, base_dir=self.cfg.path.parent, dataset_name=dataset)
        return pre, True

    def _record_preprocessing(self, pre: Preprocessing) -> None:
        """Write a fresh DP preprocessing estimate's event to the ledger, then save the estimate."""
        assert self.ledger is not None and pre.dp_event is not None
        ev = pre.dp_event
        acc = self.ledger.rebuild_accountant()
        acc.step(ev.noise_multiplier, 1.0, 1)
        self.ledger.append_dp_event(ev.noise_multiplier, 1.0, 1, "value_clip", ev.sensitivity,
                                    epsilon=acc.get_epsilon(self.cfg.common.dp.delta), purpose="preprocessing",
                                    sensitivity=ev.sensitivity, local_mechanism=ev.query, mechanism_params={})
        self.ledger.sync()
        save_preprocessing(pre, self.out / PREPROCESSING_FILE)
        log.info("node %s: DP preprocessing estimate (%s, σ=%.4g, sensitivity %.4g) recorded in the ledger",
                 self.node_id, ev.query, ev.noise_multiplier, ev.sensitivity)

    def _on_dp_event(self, event: dict[str, Any]) -> None:
        """Write-ahead: the DPClient calls this before the steps (or a DP release) run; a ledger
        that cannot be written raises NodeError here, so the steps never run."""
        ledger = self.ledger
        assert ledger is not None
        self._ledger_write(lambda: ledger.append_dp_event(
            event["noise_multiplier"], event["sample_rate"], int(event["steps"]), event["clipping"],
            event["max_grad_norm"], epsilon=event["epsilon"], purpose=event["purpose"],
            sensitivity=event["sensitivity"], local_mechanism=event["local_mechanism"],
            mechanism_params=event.get("mechanism_params") or {}), f"the {event['purpose']} step(s) did not run")

    def _on_release(self, peer: str, seq: int, round: int, digest: str, nbytes: int) -> None:
        """Every model released to a peer gets a ledger entry first (never its values); a ledger that
        cannot be written raises NodeError here, so the model does not leave. (The step pacing,
        ``[node].step_seconds``, is in the training thread: :class:`~privfl.step_pacer.PacedClient`.)"""
        ledger = self.ledger
        assert ledger is not None
        self._ledger_write(lambda: ledger.append_message(
            peer, seq, round, digest=digest, size=nbytes, digest_algorithm=LEDGER_DIGEST),
                           f"the model for {peer} did not leave")

    def _on_peer_head(self, peer: str, index: int, entry_hash: bytes, signature: bytes) -> None:
        """Anchor: record the signed ledger head a peer sent (evidence of its history), at most
        one per peer per entry of our own (:class:`~privfl.anchor_throttle.AnchorThrottle`: a
        peer cannot flood our ledger); after our close entry it goes to the late-anchor file."""
        self._anchors.offer(peer, index, entry_hash, signature)

    def _write_anchor(self, peer: str, index: int, entry_hash: bytes, signature: bytes) -> None:
        """Write one peer head with the peer's signature of it (chain, or late-anchor file)."""
        ledger = self.ledger
        assert ledger is not None
        try:
            self._ledger_write(lambda: ledger.append_anchor(peer, index, entry_hash, signature),
                               f"the ledger head of {peer} was not recorded")
        except ValueError as exc:
            log.warning("node %s: ignoring a malformed ledger head from %s: %s", self.node_id, peer, exc)

    def _on_receipt(self, peer: str, index: int, entry_hash: bytes, signature: bytes) -> None:
        """Keep a neighbour's receipt for our goodbye's head (verified by the network): proof that it
        received our close head, should its record of it go missing (:mod:`accounting.receipts`)."""
        assert self.ledger is not None
        head = (index, entry_hash)
        receipt = Receipt(peer, self.node_id, index, entry_hash.hex(), signature.hex(),
                          sign_head(load_private_key(self.identity.key_pem), self.node_id, head).hex())
        try:
            append_receipt(receipts_path(self.ledger.path), receipt)
        except LedgerError as exc:  # our own evidence only: the run goes on without it
            log.error("node %s: the receipt of %s was not kept: %s", self.node_id, peer, exc.reason)
            return
        log.info("node %s: %s signed a receipt for our ledger head at entry %d", self.node_id, peer, index)

    def _held_head(self, peer: str) -> tuple[int, bytes, bytes] | None:
        """What we answer to ``peer``'s head query: its newest head we hold, with its signature."""
        assert self.ledger is not None
        head = self.ledger.last_anchor(peer)
        return None if head is None else (head[0], head[1], self.ledger.last_anchor_signature(peer))

    def _check_peer_heads(self) -> None:
        """Refuse to train when a neighbour holds a ledger head this node's ledger lacks or
        contradicts (the ledger was cut short or rolled back)."""
        assert self.network is not None and self.ledger is not None
        heads: dict[str, tuple[int, bytes] | None] = {}
        for peer in self.network.neighbors():
            try:
                heads[peer] = self.network.query_head(peer, timeout=min(5.0, self.cfg.node.peer_timeout))
            except PeerUnavailable:
                heads[peer] = None
        problem = check_against_peers(self.ledger, heads)
        if problem is not None:
            raise NodeError(f"node {self.node_id}: refusing to train: {problem}")
        held = {p: h[0] for p, h in heads.items() if h is not None}
        log.info("node %s: ledger consistent with the heads neighbours hold (%s)", self.node_id,
                 ", ".join(f"{p}@{i}" for p, i in sorted(held.items())) or "none held yet")

    def reload_trust(self) -> bool:
        """Re-read the roster and CRL files (SIGHUP); a revoked peer is refused from now on."""
        return self.network.reload_trust() if self.network is not None else False

    def _ledger_write(self, write: Callable[[], Any], refused: str) -> None:
        """Run one ledger append; fail closed when the ledger cannot be written.

        The first failure stops the node: no model is served any more, the run loop stops,
        and this and every later write raise NodeError (one line: the ledger file and the
        OS reason), which ``python -m privfl.node`` prints and exits 2 on.
        """
        if self._ledger_failure is not None:
            raise NodeError(self._ledger_failure)
        try:
            write()
        except LedgerError as exc:
            if exc.kind != WRITE_FAILED:
                raise
            self._ledger_failure = (f"node {self.node_id}: {exc.reason}: {refused}; the node stopped (fail closed); "
                                    "restart it once the ledger can be written (it keeps every recorded step)")
            if self.network is not None:
                self.network.serving_models = False
            self._stop_requested.set()
            log.error("%s", self._ledger_failure)
            raise NodeError(self._ledger_failure) from None

    # ---- checkpoints ---------------------------------------------------------------------
    def _load_checkpoint(self) -> list[np.ndarray] | None:
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            names = list(state["names"])
            params = [t.numpy().copy() for t in state["params"]]
        except Exception as exc:  # a corrupt checkpoint is not fatal: the ledger keeps the budget
            log.warning("node %s: ignoring unreadable checkpoint %s: %s", self.node_id, path, exc)
            return None
        if names != self.names or any(p.shape != q.shape for p, q in zip(params, self.initial_params)):
            log.warning("node %s: ignoring checkpoint %s: it is of another model", self.node_id, path)
            return None
        assert self.ledger is not None
        ahead = check_checkpoint_steps(self.ledger, int(state.get("steps", 0)))
        if ahead is not None:
            raise NodeError(f"node {self.node_id}: {path}: {ahead}")
        self.client.load_state_dict(state["client"])  # never moves the accountant backwards
        log.info("node %s: resumed model from checkpoint %s (saved at step %d)", self.node_id, path,
                 int(state.get("steps", 0)))
        return params

    def checkpoint(self) -> None:
        """Save the latest model and DPClient state atomically (tmp file, then os.replace);
        NodeError naming the file when it cannot be written (a full disk)."""
        path = self.out / CHECKPOINT_FILE
        tmp = path.with_name(path.name + ".tmp")
        self.strategy.settle()  # exchanges still in flight (overlap) land first; their error is raised here
        state = {"names": self.names, "params": [torch.from_numpy(np.array(p)) for p in self._snapshot()],
                 "client": self.client.state_dict(), "steps": self.total_steps}
        buf = io.BytesIO()
        torch.save(state, buf)  # serialise in memory: a failed write is then an OSError with its errno
        try:
            with open(tmp, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise NodeError(f"node {self.node_id}: cannot write the checkpoint {path}: {_os_reason(exc)}") from None
        self._last_ckpt = time.monotonic()
        log.debug("node %s: checkpoint at step %d", self.node_id, self.total_steps)

    def _snapshot(self) -> list[np.ndarray]:
        return self.strategy.snapshot()

    # ---- metrics ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """DP steps taken by this node over all its runs (the ledger's count)."""
        assert self.ledger is not None
        return self.ledger.steps

    def evaluate(self, phase: str = "train") -> dict[str, Any]:
        """Evaluate the current model on the node's own test split and append a metrics row."""
        assert self.network is not None
        params = self._snapshot()
        loss, acc = self.client.evaluate_local(params)  # the site's own view: stays on the node
        traffic = self.network.counters.total()
        row = {"time": round(time.monotonic() - self._t0, 4), "node": self.node_id, "phase": phase,
               "steps": self.total_steps, "loss": _num(self.strategy.last_loss),
               "accuracy": _num(acc), "test_loss": _num(loss),
               "epsilon": _num(self.client.epsilon), "delta": self.cfg.common.dp.delta,
               "bytes_sent": traffic.bytes_sent, "bytes_received": traffic.bytes_received,
               "exchanges": int(self.strategy.exchanges), "served": int(self.strategy.served)}
        self.metrics_rows.append(row)
        with open(self.out / METRICS_JSONL, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not (self.out / METRICS_CSV).exists()
        with open(self.out / METRICS_CSV, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        return row

    # ---- control -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the node to stop after the current step (signal handlers call this)."""
        self._stop_requested.set()

    def _stop_reason(self) -> str | None:
        stop = self.cfg.common.stop
        if self._stop_requested.is_set():
            return "signal"
        if self.total_steps >= stop.max_steps:
            return "max_steps"
        if time.monotonic() - self._t0 >= stop.max_seconds:
            return "max_seconds"
        return None

    def _wait_for(self, kind: str, peers: Sequence[str], timeout: float, give_up_after: int | None = 3) -> set[str]:
        """Wait (bounded) until every peer in ``peers`` has sent ``kind`` (or, for ``hello``, answered ours).

        Peers we have not heard from are pinged with ``hello`` once a second; with
        ``give_up_after`` a peer that cannot be reached that many times in a row counts as
        gone. Returns the peers not considered gone.
        """
        assert self.network is not None
        net = self.network
        reached: set[str] = set()
        pending = set(peers) - net.heard(kind)
        failures: dict[str, int] = {p: 0 for p in peers}
        deadline = time.monotonic() + timeout
        next_ping = 0.0
        while pending and time.monotonic() < deadline and not self._stop_requested.is_set():
            if time.monotonic() >= next_ping:
                got = net.notify("hello", sorted(pending), timeout=min(2.0, self.cfg.node.peer_timeout))
                for p in pending - got:
                    failures[p] += 1
                for p in got:
                    failures[p] = 0
                if kind == "hello":
                    reached |= got
                next_ping = time.monotonic() + 1.0
            pending = {p for p in pending if give_up_after is None or failures[p] < give_up_after}
            pending -= net.heard(kind) | reached
            if pending:
                time.sleep(0.05)
        gone = {p for p, f in failures.items() if give_up_after is not None and f >= give_up_after}
        if gone:
            log.info("node %s: peers %s unreachable while waiting for %s; not waiting for them", self.node_id,
                     ",".join(sorted(gone)), kind)
        left = set(peers) - net.heard(kind) - reached - gone
        if left:
            log.info("node %s: gave up waiting for %s from %s", self.node_id, kind, ",".join(sorted(left)))
        return set(peers) - gone - left

    def _consensus_phase(self) -> int:
        """After training: pure pairwise averaging with finished neighbours (post-processing)."""
        strat = self.strategy
        n = self.cfg.node.consensus_exchanges
        if strat.synchronous:  # pure mixing rounds (cocod); a strategy without them does nothing
            rounds = 0
            while rounds < n and not self._stop_requested.is_set():
                strat.consensus_round()
                rounds += 1
            return rounds
        if not isinstance(strat, AsyncGossip) or n <= 0 or not strat.active or not strat.peers:
            return 0
        rng = random.Random(self._strategy_seed(17))
        done, attempts = 0, 0
        live = [p for p in strat.peers]
        while done < n and attempts < 4 * n and live and not self._stop_requested.is_set():
            attempts += 1
            peer = rng.choice(live)
            ok = strat.average_with(peer)  # averaging only, no training
            if ok:
                done += 1
            else:
                time.sleep(rng.uniform(0.005, 0.03))
        log.info("node %s: consensus phase: %d pure averaging exchanges (%d attempts)", self.node_id, done, attempts)
        return done

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Serve, train until a stop criterion, finish with consensus, write outputs; returns the summary."""
        assert self.network is not None and self.ledger is not None
        net, cfg = self.network, self.cfg
        port = net.start()
        log.info("node %s: serving on port %d; neighbours %s", self.node_id, port, ",".join(net.neighbors()))
        try:
            self._t0 = time.monotonic()
            if net.neighbors() and cfg.node.wait_for_peers > 0:
                log.info("node %s: waiting up to %.0f s for neighbours %s ([node].wait_for_peers)", self.node_id,
                         cfg.node.wait_for_peers, ",".join(net.neighbors()))
                up = self._wait_for("hello", net.neighbors(), cfg.node.wait_for_peers, give_up_after=None)
                log.info("node %s: %d of %d neighbours reachable at start", self.node_id, len(up),
                         len(net.neighbors()))
                if not up and not self._stop_requested.is_set():
                    self._alone_at_start(cfg.node.wait_for_peers)
            if net.neighbors():
                self._check_peer_heads()
            self._t0 = time.monotonic()
            self._pacer.start(self.total_steps)
            if self._pacer.active:
                log.info("node %s: fixed-time steps: no model leaves before %g s per DP step ([node].step_seconds)",
                         self.node_id, self._pacer.step_seconds)
            if not (self.out / "initial_model.npz").exists():
                np.savez(self.out / "initial_model.npz", **dict(zip(self.names, self._snapshot())))  # type: ignore[arg-type]  # numpy's stub: **arrays
            self.evaluate("start")
            self._train_loop()
            self._finish()
            if self._ledger_failure is not None:  # a release refused in a server thread
                raise NodeError(self._ledger_failure)
        except BaseException:
            self._shut_down(clean=False)
            raise
        self._shut_down(clean=True)
        return self.summary()

    def _alone_at_start(self, waited: float) -> None:
        """No neighbour answered within ``[node].wait_for_peers``. A fresh node refuses to train
        (training alone would spend the site's budget on a model no peer ever averages: a wrong
        roster address or a firewall would use up ε silently); a restarted one, whose peers may
        have finished, goes on alone with a warning. ``wait_for_peers = 0`` trains alone on purpose."""
        assert self.network is not None
        where = ", ".join(f"{p} at {self.roster.address_of(p)}" for p in self.network.neighbors())
        if self.steps_before == 0:
            raise NodeError(
                f"{self.cfg.path}: [node].wait_for_peers: no neighbour answered within {waited:g} s ({where}); "
                "no DP step was taken. Check the roster addresses and that the peers "
                "run, or set [node].wait_for_peers = 0 to train alone")
        log.warning("node %s: no neighbour answered within %g s (%s); resuming alone after %d steps",
                    self.node_id, waited, where, self.steps_before)

    def _shut_down(self, clean: bool) -> None:
        """Checkpoint (not after a refused ledger write: the client's state would count a step the
        ledger lacks), stop serving, close the ledger. After a failure (``clean`` False) the first
        error is what the node exits with; later ones are logged on one line."""
        assert self.network is not None and self.ledger is not None
        try:
            if self._ledger_failure is None:
                self.checkpoint()
        except PrivflError as exc:
            if clean:
                raise
            log.error("%s", exc)
        finally:
            self._stop_ranks()
            self.network.close()
            if self._ledger_failure is None:
                try:
                    self._anchors.flush()  # no head arrives any more: the goodbye heads kept back
                except NodeError:  # _ledger_write logged it and set _ledger_failure (raised below)
                    pass
            try:
                self.ledger.close()
            except LedgerError as exc:
                if clean and self._ledger_failure is None:
                    raise NodeError(f"node {self.node_id}: {exc.reason}") from None
                log.error("node %s: %s", self.node_id, exc.reason)
        if clean and self._ledger_failure is not None:  # the kept heads could not be written
            raise NodeError(self._ledger_failure)

    def _train_loop(self) -> None:
        assert self.ledger is not None and self.network is not None
        stop, c = self.cfg.common.stop, self.cfg.common
        local = c.strategy.local_steps
        steps_since_eval = 0
        while True:
            reason = self._stop_reason()
            if reason is not None:
                self.stop_reason = reason
                break
            if hasattr(self.strategy, "local_steps"):
                self.strategy.local_steps = max(1, min(local, stop.max_steps - self.total_steps))  # type: ignore[attr-defined]
            report = self.strategy.step()
            steps_since_eval += 1
            if self.strategy.stopped:
                self.stop_reason = "budget_exhausted"
                self.network.serving_models = False  # fail closed: nothing more leaves this node
                log.warning("node %s: %s", self.node_id, self.strategy.stop_reason)
                self.evaluate("train")
                break
            if steps_since_eval >= self.cfg.node.eval_every:
                steps_since_eval = 0
                row = self.evaluate("train")
                log.debug("node %s: step %d loss %.4f acc %.3f ε %.4f peers %s", self.node_id, row["steps"],
                          report.loss, row["accuracy"], row["epsilon"], ",".join(report.peers))
            if time.monotonic() - self._last_ckpt >= self.cfg.node.checkpoint_every:
                self.checkpoint()
        self.strategy.settle()  # nothing stays in flight once training stops
        log.info("node %s: training stopped: %s after %d steps, ε=%.4f", self.node_id, self.stop_reason,
                 self.total_steps, self.client.epsilon)
        self._stop_ranks()  # the site's other ranks are done: consensus and the goodbye are rank 0's alone
        ledger = self.ledger
        self._ledger_write(lambda: ledger.append_stop(self.stop_reason, steps=self.total_steps),
                           "the stop was not recorded")
        self.checkpoint()

    def _stop_ranks(self) -> None:
        """Release the site's other ranks and wait for (or kill) the workers this node spawned."""
        if self.group is not None:
            self.group.stop()
        elif self._workers is not None:
            self._workers.close(timeout=0.1)

    def _finish(self) -> None:
        """Tell neighbours we are done, average to consensus (unless fail-closed), say goodbye."""
        assert self.network is not None
        net, ncfg = self.network, self.cfg.node
        nbrs = net.neighbors()
        if self.stop_reason == "signal":
            net.notify("done", timeout=1.0)
            self._close_ledger_chain()
            net.goodbye(timeout=1.0, witnesses=0)  # stopped by a signal: no witness round before the grace ends
            return
        net.notify("done", timeout=min(2.0, ncfg.peer_timeout))
        if self.stop_reason != "budget_exhausted" and nbrs:
            self._wait_for("done", nbrs, ncfg.consensus_wait)
            self._consensus_phase()
        # the close entry comes once no neighbour asks for more consensus exchanges, so that
        # no model leaves after it
        net.notify("settled", timeout=min(2.0, ncfg.peer_timeout))
        if nbrs:
            self._wait_for("settled", nbrs, ncfg.consensus_wait)
        self._close_ledger_chain()
        net.goodbye(timeout=min(2.0, ncfg.peer_timeout))  # carries the close entry's head
        if nbrs:
            self._wait_for("bye", nbrs, ncfg.linger)  # their heads: late anchors, outside our chain
        self.evaluate("final")

    def _close_ledger_chain(self) -> None:
        """Write the ledger's close entry: nothing more leaves this node (no model is served),
        and the goodbye that follows carries this entry's head, so the last line of the ledger
        is held by the neighbours too (a cut of even one line is caught by the consortium audit)."""
        assert self.network is not None and self.ledger is not None
        ledger = self.ledger
        self.network.serving_models = False
        self._anchors.flush()  # the heads kept back go in before the close entry
        self._ledger_write(lambda: ledger.append_close(self.stop_reason, steps=self.total_steps),
                           "the close entry was not recorded")

    def summary(self) -> dict[str, Any]:
        """Write the final model (npz, and the user's ``state_dict`` as ``final_model.pt`` /
        ``.safetensors``) and summary.json; returns the summary."""
        params = self._snapshot()
        names = self.client.parameter_names()  # a user client's own names are known once it trained
        names = names if len(names) == len(params) else self.names
        np.savez(self.out / FINAL_MODEL, **dict(zip(names, params)))  # type: ignore[arg-type]  # numpy's stub: **arrays
        model_file = save_state_dict(names, params, self.out / FINAL_STATE_DICT)
        log.info("node %s: final model written to %s (load_state_dict keys of the model; preprocessing in %s)",
                 self.node_id, model_file, self.out / PREPROCESSING_FILE)
        last = self.metrics_rows[-1] if self.metrics_rows else {}
        traffic = self.network.counters.total() if self.network else None
        summary = {
            "node": self.node_id, "site_index": self.cfg.site_index, "strategy": self.cfg.common.strategy.name,
            "topology": self.topology.name, "spectral_gap": self.topology.spectral_gap(),
            "neighbors": self.topology.neighbors(self.node_id), "stop_reason": self.stop_reason,
            "steps": self.total_steps, "steps_this_run": self.total_steps - self.steps_before,
            "epsilon": _num(self.client.epsilon), "target_epsilon": self.cfg.common.dp.target_epsilon,
            "delta": self.cfg.common.dp.delta, "noise_multiplier": self.sigma,
            "sample_rate": self.client.sample_rate, "accuracy": last.get("accuracy"),
            "test_loss": last.get("test_loss"), "train_records": self.site.train_size if self.site else None,
            "test_records": self.site.test_size if self.site else None,
            "bytes_sent": traffic.bytes_sent if traffic else 0,
            "bytes_received": traffic.bytes_received if traffic else 0,
            "exchanges": int(self.strategy.exchanges),
            "served": int(self.strategy.served),
            "refused_peers_policy": sorted(self.network.refused_policy) if self.network else [],
            "ledger": str(self.out / LEDGER_FILE), "ledger_entries": self.ledger.num_entries if self.ledger else 0,
            "model": str(model_file), "preprocessing": str(self.out / PREPROCESSING_FILE),
            "device": str(self.device), "ranks": self.place.world_size,
            "wall_seconds": round(time.monotonic() - self._t0, 3), "software_version": privfl.__version__,
        }
        tmp = self.out / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / SUMMARY_FILE)
        log.info("node %s: finished: %s, steps=%d, ε=%.4f, accuracy=%s", self.node_id, self.stop_reason,
                 self.total_steps, summary["epsilon"], summary["accuracy"])
        return summary


def worker_site_inputs(cfg: NodeConfig) -> SiteInputs:
    """A site rank > 0's records, read as rank 0 reads them, with the preprocessing rank 0 saved
    (never fitted again: a DP estimate is paid for once, in rank 0's ledger)."""
    data = cfg.common.data
    if data.factory:
        fs = data.factory_site(cfg.site_index, cfg.path.parent, f"{cfg.path}: [data]")
        return SiteInputs.of_factory(fs, data.num_classes)
    raw = data.sites(cfg.path.parent)[cfg.site_index]
    pre = load_preprocessing(cfg.output_dir / PREPROCESSING_FILE)
    return SiteInputs.of_arrays(SiteData(raw.site, _mapped(raw.train, pre), _mapped(raw.test, pre)))


def _mapped(d: Dataset, pre: Preprocessing) -> Dataset:
    """``d`` with the site's preprocessing applied to its features."""
    return Dataset(pre.apply(d.x), d.y, d.num_classes, d.name)


def _num(x: Any) -> float | None:
    """A JSON-safe number (None for NaN/inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_node(config: str | Path, install_signals: bool = True) -> dict[str, Any]:
    """Load the config, build the node and run it to the end; SIGINT/SIGTERM stop it gracefully."""
    cfg = load_node_config(config)
    logging.getLogger("privfl").setLevel(cfg.log_level)
    torch.set_num_threads(1)
    place = rank_place(cfg.node.ranks, f"{cfg.path}: [node].ranks")
    if place.is_worker:  # a site rank > 0: trains with rank 0, talks to no other site
        return run_worker(cfg, place)
    try:
        return _run(cfg, install_signals)
    except OSError as exc:  # any other output the disk refuses (metrics, models, summary): one line
        raise NodeError(f"node {cfg.node.id}: cannot write {exc.filename or cfg.output_dir}: "
                        f"{_os_reason(exc)}") from None


def _run(cfg: NodeConfig, install_signals: bool) -> dict[str, Any]:
    """Build the node and run it (see :func:`run_node`)."""
    node = Node(cfg)
    if install_signals and threading.current_thread() is threading.main_thread():
        def _handler(signum: int, _frame: Any) -> None:
            log.info("node %s: signal %d: stopping after the current step", node.node_id, signum)
            node.request_stop()
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda _s, _f: node.reload_trust())  # a new CRL or roster
    return node.run()


__all__ = ["Node", "NodeError", "check_policy", "load_identity", "open_ledger", "run_node", "topology_of"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m privfl.node --config FILE`` (what the launcher spawns): one clean line on bad input."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m privfl.node", description="Run one privfl node.")
    parser.add_argument("--config", "-c", required=True, help="the node's TOML config")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from privfl.logs import configure_logging

    configure_logging(os.environ.get("PRIVFL_LOG", "INFO"), force=True)  # one line per record (privfl.logs)
    try:
        summary = run_node(args.config)
    except PrivflError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({k: summary[k] for k in ("node", "stop_reason", "steps", "epsilon", "accuracy")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
