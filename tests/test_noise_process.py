"""The noise worker process: its own key, the law, each batch once, a killed worker, a fork, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest
import torch

import privfl.clients.randomness as randomness
from privfl.clients import noise_process
from privfl.clients.randomness import SecureRandom
from tests.helpers import run_in_fork
from tests.test_randomness import _check_standard_normal, _fixed_key_sources

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the noise worker needs memfd_create")]

REFS = [torch.zeros(40_000, dtype=torch.float64)]  # one vector a batch (over PREFETCH_BATCH_VALUES)


@pytest.fixture(autouse=True)
def fresh_worker(monkeypatch: pytest.MonkeyPatch):
    """A CPU to spare, and a worker of this test's own, closed (by pid) when the test ends."""
    monkeypatch.setattr(randomness, "_spare_cpu", lambda: True)
    monkeypatch.setattr(randomness, "_WORKER_FAILURE_LOGGED", False)
    noise_process.shutdown()
    yield
    noise_process.shutdown()


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (reaped by nobody yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def _wait_ended(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _ended(pid):
            return True
        time.sleep(0.02)
    return False


def test_noise_drawn_ahead_comes_from_the_workers_own_key(monkeypatch):
    """Two sources on one fixed key read one stream in-process; what the worker draws ahead for them is
    neither that stream nor shared between them, and keeps the law."""
    a, b, c = _fixed_key_sources(monkeypatch, 3)
    a.prefetch = b.prefetch = True
    first_a, first_b = a.normal_like_each(1.0, REFS)[0], b.normal_like_each(1.0, REFS)[0]
    assert torch.equal(first_a, first_b)  # drawn in the step, on the shared fixed key
    assert all(type(batch.future).__name__ == "_WorkerDraw" for batch in a._ahead + b._ahead)
    w = noise_process.worker()
    assert w is not None and w.pid != os.getpid()
    ahead = [src.normal_like_each(1.0, REFS)[0].clone() for src in (a, b) for _ in range(3)]
    flat = torch.cat(ahead).numpy()
    assert np.unique(flat).size == flat.size  # no value served twice, across sources or batches
    c._standard_normal(40_000)  # c is where a and b stood after their first draw on the fixed key
    assert not np.isin(c._standard_normal(40_000).numpy(), flat).any()
    _check_standard_normal(flat)
    assert [x.dtype for x in ahead] == [torch.float64] * 6


def test_float32_noise_from_the_worker_keeps_sigma(monkeypatch):
    src = SecureRandom()
    refs = [torch.zeros(300, 120), torch.zeros(50)]
    draws = [torch.cat([t.reshape(-1) for t in src.normal_like_each(0.25, refs)]) for _ in range(5)]
    assert all(d.dtype == torch.float32 for d in draws)
    _check_standard_normal(torch.cat(draws[1:]).double().numpy() / 0.25)


def test_a_killed_worker_is_replaced_by_draws_in_this_process(caplog):
    src = SecureRandom()
    src.normal_like_each(1.0, REFS)
    w = noise_process.worker()
    assert w is not None
    os.kill(w.pid, signal.SIGKILL)
    assert _wait_ended(w.pid)
    with caplog.at_level(logging.WARNING, logger="privfl.clients.randomness"):
        got = [src.normal_like_each(1.0, REFS)[0].clone() for _ in range(6)]
    warnings = [r.getMessage() for r in caplog.records if "noise worker" in r.getMessage()]
    assert len(warnings) == 1 and f"pid {w.pid}" in warnings[0]  # said once, with the worker's pid
    assert noise_process.worker() is None  # a failed worker is not used again
    assert all(type(batch.future).__name__ == "Future" for batch in src._ahead)  # the thread draws ahead now
    flat = torch.cat(got).numpy()
    assert np.unique(flat).size == flat.size
    _check_standard_normal(flat)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_uses_the_parents_worker():
    src = SecureRandom()
    src.normal_like_each(1.0, REFS)
    parent_worker = noise_process.worker()
    assert parent_worker is not None
    def child() -> bytes:  # its own worker, and noise unlike the parent's
        before = noise_process._WORKER
        vals = [src.normal_like_each(1.0, REFS)[0][:4].numpy().tobytes() for _ in range(3)]
        mine = noise_process.worker()
        return f"{before is None} {mine.pid if mine else 0} ".encode().ljust(64) + b"".join(vals)

    data = run_in_fork(child)
    assert len(data) == 64 + 96
    dropped, child_worker = data[:64].split()[:2]
    assert dropped == b"True" and int(child_worker) not in (0, parent_worker.pid)
    assert _wait_ended(int(child_worker))  # the child's worker ended with the child
    mine = [src.normal_like_each(1.0, REFS)[0][:4].numpy().tobytes() for _ in range(3)]
    assert not set(mine) & {data[64 + 32 * i:64 + 32 * (i + 1)] for i in range(3)}
    assert noise_process.worker() is parent_worker and not _ended(parent_worker.pid)


def test_shutdown_ends_the_worker():
    SecureRandom().normal_like_each(1.0, REFS)
    w = noise_process.worker()
    assert w is not None and not _ended(w.pid)
    noise_process.shutdown()
    assert _wait_ended(w.pid, 5)
    assert noise_process._WORKER is None


def test_the_worker_loads_the_sampler_without_torch():
    """``python -I`` on the torch-free kernel: a light process (no libtorch mapped), whatever the parent imported."""
    SecureRandom().normal_like_each(1.0, REFS)
    w = noise_process.worker()
    assert w is not None
    assert w.submit(8, 1.0, np.float64).result().shape == (8,)  # it has started and drawn
    with open(f"/proc/{w.pid}/maps") as f:
        maps = f.read()
    assert "libcrypto" in maps or "_rust" in maps  # cryptography's ChaCha20 is loaded
    assert "libtorch" not in maps and "torch" not in maps
