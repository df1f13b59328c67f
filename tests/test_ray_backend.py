"""The simulator's Ray backend: same seed, same metrics as the local backend; clear refusals.

The Ray tests start one local Ray instance on 127.0.0.1 for the module (2 CPUs, no
dashboard) and stop it at the end; they are skipped when the ``privfl[ray]`` extra is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.sim import SimSpec, StopCriteria, run_simulation
from privfl.sim.ray_backend import check_backend, pause, run_in_turns
from tests.helpers import TINY_EXPERIMENT, invoke_main

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="the Ray backend needs the privfl[ray] extra "
                                                    "(pip install privfl[ray]); Ray is not installed")


# ---- without Ray ------------------------------------------------------------------------
def test_turns_fix_the_order_of_effects_whatever_the_remote_work_takes() -> None:
    """Effects between pauses happen in task order, however long each task's 'remote' wait is."""
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.02) for _ in range(8)]
    log: list[str] = []

    def task(k: int) -> None:
        log.append(f"before{k}")
        done = threading.Event()
        threading.Thread(target=lambda: (time.sleep(delays[k]), done.set())).start()  # the remote work
        pause()
        done.wait()
        log.append(f"after{k}")

    run_in_turns([lambda k=k: task(k) for k in range(8)])  # type: ignore[misc]
    assert log == [f"before{k}" for k in range(8)] + [f"after{k}" for k in range(8)]


def test_turns_raise_the_first_error_in_task_order_after_every_task_ended() -> None:
    ended: list[int] = []

    def task(k: int) -> None:
        pause()
        ended.append(k)
        if k in (1, 3):
            raise ValueError(f"task {k}")

    with pytest.raises(ValueError, match="task 1"):
        run_in_turns([lambda k=k: task(k) for k in range(5)])  # type: ignore[misc]
    assert ended == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("args, field", [
    (("dask", None, None), "[simulation].backend"),
    (("ray", None, 0), "[simulation].actors"),
    (("ray", "", None), "[simulation].address"),
    (("local", "auto", None), "[simulation].address"),
])
def test_backend_refusals_name_the_field(args: tuple[Any, ...], field: str) -> None:
    if args[0] == "ray" and not HAVE_RAY:
        pytest.skip("Ray is not installed")
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_backend(*args)


def test_ray_backend_without_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError) as e:
        SimSpec(backend="ray", dp=DPConfig(noise_multiplier=1.0, sample_rate=0.1)).validate()
    msg = str(e.value)
    assert "\n" not in msg and "[simulation].backend" in msg and "pip install privfl[ray]" in msg


@needs_ray
def test_unreachable_address_is_refused_at_once() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    from privfl.sim.ray_backend import ray_session

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"\[simulation\]\.address.*127\.0\.0\.1:{port}"):
        with ray_session(f"127.0.0.1:{port}"):
            pass
    assert time.perf_counter() - t0 < 10 and not ray.is_initialized()


# ---- with a local Ray instance ------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    if not HAVE_RAY:
        pytest.skip("the Ray backend needs the privfl[ray] extra (pip install privfl[ray])")
    import ray

    from privfl.sim import ray_backend

    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False, _system_config={"worker_niceness": 0})
    try:
        yield ray
    finally:
        ray_backend._pool.clear()
        ray.shutdown()


def _spec(strategy: str, **dp: Any) -> SimSpec:
    cfg = {"noise_multiplier": 1.0, "target_epsilon": 50.0, "batch_size": 16, "sample_rate": 0.1, "lr": 0.2, **dp}
    return SimSpec(dataset="breast_cancer", num_nodes=4, model="logreg", dp=DPConfig(**cfg), strategy=strategy,
                   local_steps=2, topology="ring", stop=StopCriteria(max_steps=8), eval_every_rounds=2,
                   eval_every=0.01 if strategy == "async_gossip" else None, seed=3)


def _same(a: Any, b: Any) -> None:
    assert a.rows == b.rows and len(a.rows) > 4
    drop = ("wall_seconds", "client_setup_seconds", "backend")
    sa = {k: v for k, v in a.summary.items() if k not in drop}
    sb = {k: v for k, v in b.summary.items() if k not in drop}
    assert json.dumps(sa, sort_keys=True, default=str) == json.dumps(sb, sort_keys=True, default=str)
    assert all(json.dumps([m.tolist() for m in a.models[n]]) == json.dumps([m.tolist() for m in b.models[n]])
               for n in a.models)


@needs_ray
@pytest.mark.parametrize("strategy, dp", [
    ("sync_gossip", {}),  # begin_round of every node in turns: the actors train concurrently
    ("async_gossip", {"target_epsilon": 0.6}),  # the budget guard stops nodes inside the actors
    ("fedavg", {}),
])
def test_same_seed_same_metrics_on_both_backends(ray_cluster: Any, strategy: str, dp: dict[str, Any]) -> None:
    spec = _spec(strategy, **dp)
    local = run_simulation(spec)
    on_ray = run_simulation(dataclasses.replace(spec, backend="ray", actors=2))
    assert on_ray.summary["backend"] == "ray"
    _same(local, on_ray)
    if strategy == "async_gossip":
        assert local.summary["stop_reasons"] and set(on_ray.summary["stop_reasons"].values()) != {"max_steps"}


@needs_ray
def test_compare_on_ray_writes_what_the_local_backend_writes(ray_cluster: Any, tmp_path: Path) -> None:
    """``privfl compare`` with [simulation] backend = "ray": the same metrics file as locally."""
    out = {}
    for backend in ("local", "ray"):
        extra = 'backend = "ray"\nactors = 2\n' if backend == "ray" else ""
        cfg = tmp_path / f"{backend}.toml"
        cfg.write_text(TINY_EXPERIMENT.format(seed=1) + extra + "\n[compare]\nstrategies = [\"async_gossip\", "
                       "\"sync_gossip\"]\n")
        res = invoke_main(["compare", "-c", str(cfg), "--out", str(tmp_path / backend), "--no-progress"])
        assert res.exit_code == 0, res.output
        (made,) = (tmp_path / backend).glob("*")
        out[backend] = {p.relative_to(made).as_posix(): p.read_text() for p in made.rglob("metrics.csv")}
    assert len(out["ray"]) == 2 and out["ray"] == out["local"]


@needs_ray
def test_a_refusal_inside_an_actor_is_the_local_backends_one_line(ray_cluster: Any) -> None:
    spec = _spec("sync_gossip", delta=0.05)  # above 1/n of a site's records: the client refuses it
    with pytest.raises(ConfigError) as local:
        run_simulation(spec)
    with pytest.raises(ConfigError) as on_ray:
        run_simulation(dataclasses.replace(spec, backend="ray", actors=2))
    assert type(on_ray.value) is ConfigError and str(on_ray.value) == str(local.value)
    assert "delta" in str(local.value) and "\n" not in str(on_ray.value)
