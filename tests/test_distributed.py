"""A site on two real processes (gloo on 127.0.0.1) is one DP learner.

* the update of 2 ranks equals the single-process update for the same sampled batch and
  the same (seeded) noise — fast and Opacus engines, momentum, an empty share included;
* the site's accountant (rank 0's) holds the single-process events, so ε is identical;
* the ranks' shares cover every record exactly once;
* a worker rank 0 forked listens on the loopback only, leaves stop signals to rank 0, and
  dies with rank 0 (SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from privfl.clients import DPClient, DPConfig
from privfl.clients.distributed import rank_share, share_indices
from privfl.models import build_model

ENGINES = ("fast", "opacus")
N, D, SEED = 40, 6, 5
#: each step's sampled batch (site indices); step 2 holds even records only: rank 1's share is empty
BATCHES = [[0, 1, 3, 4, 7, 10, 13, 22, 31], [2, 5, 6, 9, 17, 18, 25, 33, 38, 39], [0, 2, 4, 8, 12, 30]]

#: ``python -c RANK_SCRIPT OUT``: rank 0 of a 2-rank site; it forks rank 1 itself (privfl.ranks).
#: Per engine, rank 0 runs train_steps (which hands the block to rank 1), then releases it and
#: writes its result; then it prints READY and waits, rank 1 waiting for its next block
RANK_SCRIPT = r'''
import json, os, sys, time
import numpy as np, torch
from tests.test_distributed import BATCHES, ENGINES, SEED, data, config, batch_iter
from privfl.clients import DPClient
from privfl.clients.distributed import SiteRanks, rank_share
from privfl.models import build_model
from privfl.ranks import RankPlace, RankWorkers, join_site
torch.set_num_threads(1)
out = sys.argv[1]

def run(place, workers=None):
    join_site(place, torch.device("cpu"), workers)
    rank, world = place.rank, place.world_size
    x, y = data()
    for engine in ENGINES:
        share = rank_share((x, y), rank, world)
        client = DPClient(build_model("mlp", (x.shape[1],), 2, seed=0, hidden=(8,)), share, None, config(engine),
                          seed=SEED if rank == 0 else SEED + 1, device="cpu")
        client._batches = batch_iter(x, y, BATCHES, rank, world)
        ranks = SiteRanks(rank, world, torch.device("cpu"))
        ranks.attach(client)
        if rank == 0:
            client.train_steps(len(BATCHES))
            ranks.stop()
            np.savez(os.path.join(out, f"{engine}.npz"), *client.get_parameters({}))
            events = [[k.noise_multiplier, k.sample_rate, n] for k, n in client.accountant.events.items()]
            json.dump({"events": events, "epsilon": client.epsilon}, open(os.path.join(out, f"{engine}.json"), "w"))
        else:
            assert ranks.serve() == len(BATCHES)
    if rank == 0:
        print("READY", workers.pids[0], workers.port, flush=True)
        time.sleep(120)
    else:
        ranks.serve()  # rank 0's next block: it never comes (rank 0 is killed)

run(RankPlace(0, 2, 0, "privfl"), RankWorkers(2, run))
'''


def data() -> tuple[np.ndarray, np.ndarray]:
    """A tiny site: N records, D features, 2 classes (deterministic)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return x, (x[:, 0] + 0.3 * rng.normal(size=N) > 0).astype(np.int64)


def config(engine: str) -> DPConfig:
    return DPConfig(clipping="psac", noise_multiplier=1.3, max_grad_norm=0.5, batch_size=8, sample_rate=0.2,
                    lr=0.5, momentum=0.5, target_epsilon=50.0, delta=1e-3, engine=engine)


def batch_iter(x: np.ndarray, y: np.ndarray, batches: list[list[int]], rank: int, world: int):
    """Rank ``rank``'s part of each given site batch, as its DPClient would draw it from its share."""
    for b in batches:
        local = [i // world for i in b if i % world == rank]
        sx, sy = rank_share((x, y), rank, world)
        yield torch.as_tensor(sx[local]), torch.as_tensor(sy[local])


def _env() -> dict[str, str]:
    """This environment, with the repository importable (the scripts import tests.test_distributed)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("GLOO_SOCKET_IFNAME", None)  # privfl.ranks sets it itself
    return env


def listening(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on (TCP, IPv4 and IPv6), from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                if len(addr) == 8:
                    host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                else:
                    host = socket.inet_ntop(socket.AF_INET6, b"".join(
                        bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8)))
                found.append(f"{host}:{int(port, 16)}")
    return found


def test_shares_cover_every_record_once() -> None:
    for n, world in ((40, 2), (41, 3), (5, 4)):
        shares = [share_indices(n, r, world) for r in range(world)]
        together = np.concatenate(shares)
        assert sorted(together.tolist()) == list(range(n))  # disjoint, and nobody left out
    x, y = data()
    sx, sy = rank_share((x, y), 1, 2)
    assert np.array_equal(sx, x[1::2]) and np.array_equal(sy, y[1::2])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reference(engine: str) -> tuple[DPClient, list[np.ndarray], list[np.ndarray]]:
    """One process, the whole site, the same batches and seed: (client, start params, end params)."""
    x, y = data()
    ref = DPClient(build_model("mlp", (D,), 2, seed=0, hidden=(8,)), (x, y), None, config(engine), seed=SEED,
                   device="cpu")
    start = [p.copy() for p in ref.get_parameters({})]
    ref._batches = batch_iter(x, y, BATCHES, 0, 1)
    ref.train_steps(len(BATCHES))
    return ref, start, ref.get_parameters({})


@pytest.mark.timeout(120)
def test_two_ranks_are_one_learner_on_loopback_and_die_with_rank0(tmp_path: Path) -> None:
    rank0 = subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    worker, seen = None, []
    try:
        assert rank0.stdout is not None
        for raw in rank0.stdout:  # bounded by the test's timeout
            seen.append(raw.decode())
            if seen[-1].startswith("READY"):
                _, pid, port = seen[-1].split()
                worker = int(pid)
                break
        assert worker is not None, "".join(seen)
        # (a) the DP update of 2 ranks is the single-process update; (b) the same accountant events, the same ε
        for engine in ENGINES:
            ref, start, want = _reference(engine)
            got = list(np.load(tmp_path / f"{engine}.npz").values())
            assert len(got) == len(want)
            for g, w, s in zip(got, want, start):
                assert not np.allclose(w, s)  # it trained
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=engine)
            rec = json.loads((tmp_path / f"{engine}.json").read_text())
            assert rec["events"] == [[k.noise_multiplier, k.sample_rate, n] for k, n in ref.accountant.events.items()]
            assert rec["events"] == [[1.3, 0.2, len(BATCHES)]]  # one Poisson(q)-Gaussian(σ) event per step
            assert rec["epsilon"] == ref.epsilon
        # the worker and rank 0 listen on the loopback only (the store too, not on every interface)
        for pid in (worker, rank0.pid):
            addrs = listening(pid)
            assert all(a.startswith("127.0.0.1:") for a in addrs), (pid, addrs)
        assert f"127.0.0.1:{port}" in listening(rank0.pid)
        assert _alive(worker)  # waiting for rank 0's next block
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a stop is rank 0's to act on
            os.kill(worker, sig)
        time.sleep(0.3)
        assert _alive(worker)
        rank0.send_signal(signal.SIGKILL)  # a crash: rank 0 has no chance to release it
        rank0.wait(timeout=10)
        end = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived rank 0"
    finally:
        if rank0.poll() is None:
            rank0.kill()
            rank0.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_ranks_config_refusals_name_the_field(tmp_path: Path) -> None:
    from privfl.errors import ConfigError
    from privfl.launch import dump_toml
    from privfl.node_config import load_node_config
    from privfl.pki import init_consortium
    from privfl.ranks import rank_place

    init_consortium("unit", ["h-a"], tmp_path / "pki", base_port=47350)
    pki = tmp_path / "pki"

    def load(node: dict, **extra: dict) -> None:
        tables = {"node": {"id": "h-a", "output": str(tmp_path / "out"), **node},
                  "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                               "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"),
                               "crl": str(pki / "crl.pem")},
                  "data": {"source": "breast_cancer", "num_sites": 1, "site_index": 0}, "model": {"name": "logreg"},
                  "dp": {"noise_multiplier": 2.0, "sample_rate": 0.1, **extra.get("dp", {})},
                  **{k: v for k, v in extra.items() if k != "dp"}}
        (tmp_path / "node.toml").write_text(f'python_path = ["{tmp_path / "proj"}"]\n\n' + dump_toml(tables))
        load_node_config(tmp_path / "node.toml")

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "ranks_app.py").write_text("def client_fn(context):\n    raise NotImplementedError\n")

    load({"ranks": 2})  # accepted
    with pytest.raises(ConfigError, match=r"\[node\]\.ranks: must be an integer >= 1"):
        load({"ranks": 0})
    with pytest.raises(ConfigError, match=r"\[node\]\.ranks: 2 ranks implement the gaussian mechanism only"):
        load({"ranks": 2}, dp={"mechanism": "topagg", "topagg_k": 4})
    with pytest.raises(ConfigError, match=r"\[node\]\.ranks: 2 ranks need privfl's own DPClient"):
        load({"ranks": 2}, client={"app": "ranks_app:client_fn"})
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert rank_place(1, "[node].ranks", torchrun) == rank_place(2, "[node].ranks", torchrun)
    assert rank_place(2, "[node].ranks", torchrun).launcher == "torchrun"
    assert rank_place(2, "[node].ranks", torchrun).is_worker
    with pytest.raises(ConfigError, match=r"\[node\]\.ranks: 3 but torchrun started 2 processes"):
        rank_place(3, "[node].ranks", torchrun)
    assert rank_place(2, "[node].ranks", {}).launcher == "privfl"
    # NCCL needs a GPU per rank: more ranks than GPUs is refused before any worker is forked
    from privfl.ranks import RankPlace, rank_device

    if torch.cuda.device_count() < 3:
        with pytest.raises(ConfigError, match=r"\[node\]\.ranks: 3 ranks on CUDA need 3 GPUs, this machine has"):
            rank_device(torch.device("cuda"), RankPlace(0, 3, 0, "privfl"))
    assert rank_device(torch.device("cpu"), RankPlace(0, 3, 0, "privfl")) == torch.device("cpu")
