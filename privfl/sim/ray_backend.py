"""The simulator's Ray backend (``[simulation] backend = "ray"``): the nodes' training in Ray actors.

Only where training runs changes. The engine, the virtual clock, the event order and the
strategies stay in the driver process exactly as in the local backend (an evaluation's
models are scored by the actors, with the run's own evaluator built there: the same numbers);
each node's real client (its ``DPClient``, its accountant, its seeded noise and sampling
streams) lives in one of ``K`` Ray actors (:class:`NodeHost`, several nodes each, node
``i`` on actor ``i mod K``), built there from the same :class:`~privfl.sim.runner.SimSpec`
and seed as the local backend builds it, so the same seed gives the same metrics on both
backends. The engine talks to a :class:`RayNodeClient` per node: a Flower ``NumPyClient``
whose ``fit`` / ``evaluate`` call that node's actor.

Parallelism without changing any order: :func:`run_in_turns` runs a round's per-node work
(every node's ``begin_round`` in a synchronous round) as threads that take turns in node
order; a node gives up its turn only while its actor trains (:meth:`RayNodeClient.fit`
queues its call, then :func:`pause`; the queued calls go out as one ``call_many`` per actor
when the first paused node resumes), so the actors train concurrently while every
driver-side effect (sends, byte counters, clocks) happens in the same order as the
sequential loop. Asynchronous gossip's events and a collective strategy's calls (inside
the strategy's own loop) are sent one at a time, awaited at once.

Cluster: ``address`` None starts a local Ray instance on 127.0.0.1 and shuts it down after;
``"auto"`` or ``"HOST:PORT"`` joins a running cluster (``ray start --head --port=6379`` on one
machine, ``ray start --address=HEAD:6379`` on the others) and leaves it running. Every actor
asks for one CPU and, when the cluster has GPUs and the simulation runs on CUDA, an equal
fraction of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from flwr.client import NumPyClient

from privfl.accounting import BudgetExhausted
from privfl.errors import ConfigError, PrivflError

if TYPE_CHECKING:
    from privfl.sim.runner import SimSpec

__all__ = ["CallBatch", "NodeHost", "RayNodeClient", "pause", "ray_clients", "ray_session", "run_in_turns"]

_turn = threading.local()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError('[simulation].backend: "ray" needs Ray, which is not installed: '
                          "pip install privfl[ray]") from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse an unreachable ``HOST:PORT`` at once (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://") or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(f"[simulation].address: no Ray cluster reachable at {address!r} ({exc}); start one "
                          "with `ray start --head --port=6379`, or leave address out for a local one") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, initialised: an already-initialised Ray is used as it is (and left running); else
    ``address`` None starts a local instance on 127.0.0.1 (``num_cpus``: default all) and shuts
    it down on exit; ``"auto"`` / ``"HOST:PORT"`` joins that cluster (disconnecting on exit)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:  # the actors do the run's work: at Ray's default niceness (15) they starve under load
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False, _system_config={"worker_niceness": 0})
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, OSError, ValueError) as exc:
            raise ConfigError(f"[simulation].address: cannot join the Ray cluster at {address!r}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        _pool.clear()
        ray.shutdown()


def pause() -> None:
    """Inside :func:`run_in_turns`: give up this thread's turn until the others have had theirs
    (a remote call is in flight); elsewhere: nothing."""
    hand_back = getattr(_turn, "pause", None)
    if hand_back is not None:
        hand_back()


def run_in_turns(tasks: Sequence[Callable[[], None]], before_resume: Callable[[], None] | None = None) -> None:
    """Run ``tasks`` as threads, one at a time, turns going round in task order.

    A task runs until it calls :func:`pause` (or ends); the next task in order then runs, and
    a paused task resumes at its next turn (``before_resume()`` is called first: the Ray
    backend sends the calls the paused tasks queued, one batch per actor). So the sequence of
    effects between pauses is fixed by the task order alone, never by how long the work in
    flight during a pause takes. The first exception (in task order) is raised once every
    task has ended.
    """
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    go = [threading.Semaphore(0) for _ in tasks]  # the scheduler hands task k its turn
    back = threading.Semaphore(0)  # a task hands the turn back (paused or ended)
    done = [False] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)

    def pause_k(k: int) -> None:
        back.release()
        go[k].acquire()

    def body(k: int) -> None:
        _turn.pause = functools.partial(pause_k, k)
        go[k].acquire()
        try:
            tasks[k]()
        except BaseException as exc:  # noqa: BLE001  (re-raised by the scheduler, in task order)
            errors[k] = exc
        finally:
            done[k] = True
            back.release()

    threads = [threading.Thread(target=body, args=(k,), daemon=True, name=f"privfl-turn-{k}")
               for k in range(len(tasks))]
    for th in threads:
        th.start()
    order = deque(range(len(tasks)))
    started = [False] * len(tasks)
    while order:
        k = order.popleft()
        if started[k] and before_resume is not None:
            before_resume()
        started[k] = True
        go[k].release()
        back.acquire()
        if not done[k]:
            order.append(k)
    for th in threads:
        th.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


class NodeHost:
    """A Ray actor holding the real clients of some nodes, built here from the spec and seed.

    An actor outlives one simulation: :func:`ray_clients` keeps its actors for the Ray session
    and each run rebuilds the clients (:meth:`build`), so the runs of a ``privfl compare`` pay
    for starting the actors' processes once."""

    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}
        self.evaluator: Callable[[Any], tuple[float, float]] | None = None

    def build(self, spec: SimSpec, node_ids: list[str], indices: list[int]) -> dict[str, dict[str, float]]:
        """Build the clients of the nodes at ``indices`` (dropping any earlier run's); their states."""
        import torch

        from privfl.sim.runner import build_site_clients

        self.clients, self.evaluator = {}, None
        if spec.torch_threads:
            torch.set_num_threads(int(spec.torch_threads))
        self.clients, self.evaluator = build_site_clients(spec, node_ids, indices)
        return self.states()

    def evaluate_models(self, models: list[Any]) -> list[tuple[float, float]]:
        """(loss, accuracy) of each model with the run's evaluator (the driver's very computation)."""
        assert self.evaluator is not None
        return [self.evaluator(m) for m in models]

    def clear(self) -> None:
        """Drop the clients (the run ended)."""
        self.clients, self.evaluator = {}, None

    def states(self) -> dict[str, dict[str, float]]:
        """Every hosted node's :meth:`state`."""
        return {nid: self.state(nid) for nid in self.clients}

    def state(self, nid: str) -> dict[str, float]:
        """What the driver reads off a client between calls: ε spent and the last training loss
        (the loss stays in the simulation's researcher view, as in the local backend)."""
        c = self.clients[nid]
        out: dict[str, float] = {}
        for name in ("epsilon", "last_loss"):
            v = getattr(c, name, None)
            if v is not None:
                out[name] = float(v)
        return out

    def call_many(self, calls: list[tuple[str, str, tuple[Any, ...]]]) -> list[tuple[str, Any, dict[str, float]]]:
        """:meth:`call` for each ``(nid, method, args)``, in order (one round trip for a round's calls)."""
        return [self.call(nid, method, *args) for nid, method, args in calls]

    def call(self, nid: str, method: str, *args: Any) -> tuple[str, Any, dict[str, float]]:
        """``clients[nid].<method>(*args)``: ("ok", result, state), or ("budget", args) when the
        budget guard refused (re-raised as :class:`BudgetExhausted` in the driver)."""
        try:
            result = getattr(self.clients[nid], method)(*args)
        except BudgetExhausted as exc:
            return "budget", (exc.spent, exc.target, exc.delta, exc.steps), self.state(nid)
        return "ok", result, self.state(nid)


def _get(ray: Any, refs: Any) -> Any:
    """``ray.get(refs)``, re-raising a user-facing privfl error an actor raised as itself (one
    line naming the field, as the local backend says it), not wrapped in Ray's task error."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, PrivflError):
            raise cause from None
        raise


class CallBatch:
    """Calls queued by paused :func:`run_in_turns` tasks, sent as one ``call_many`` per actor."""

    def __init__(self, ray: Any = None, actors: Sequence[Any] = ()) -> None:
        self._ray = ray
        self._actors = list(actors)
        self._queued: list[tuple[Any, tuple[str, str, tuple[Any, ...]], list[Any]]] = []

    def queue(self, actor: Any, nid: str, method: str, args: tuple[Any, ...]) -> list[Any]:
        """Queue one call; the returned slot holds ``[ref, index]`` once :meth:`send` has run."""
        slot: list[Any] = []
        self._queued.append((actor, (nid, method, args), slot))
        return slot

    def send(self) -> None:
        """Send every queued call, one batch per actor (in queue order within each batch)."""
        queued, self._queued = self._queued, []
        by_actor: dict[int, tuple[Any, list[tuple[tuple[str, str, tuple[Any, ...]], list[Any]]]]] = {}
        for actor, call, slot in queued:
            by_actor.setdefault(id(actor), (actor, []))[1].append((call, slot))
        for actor, calls in by_actor.values():
            ref = actor.call_many.remote([c for c, _ in calls])
            for index, (_, slot) in enumerate(calls):
                slot.extend((ref, index))

    def evaluate_many(self, models: Sequence[Any]) -> list[tuple[float, float]]:
        """Score ``models`` on the actors, model ``j`` on actor ``j mod K`` (the engine's
        :attr:`~privfl.sim.engine.Engine.evaluate_many` for the Ray backend)."""
        k = len(self._actors)
        chunks = [list(models[a::k]) for a in range(k)]
        refs = [a.evaluate_models.remote(c) for a, c in zip(self._actors, chunks) if c]
        parts = _get(self._ray, refs)
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(models)
        for a, part in enumerate(parts):
            for j, score in enumerate(part):
                out[a + j * k] = score
        return out

    def run_each(self, tasks: Sequence[Callable[[], None]]) -> None:
        """:func:`run_in_turns` with this batch sent before a paused task resumes (the engine's
        :attr:`~privfl.sim.engine.Engine.run_each` for the Ray backend)."""
        run_in_turns(tasks, before_resume=self.send)


class RayNodeClient(NumPyClient):
    """One node's client in the driver: a proxy whose calls run on the node's :class:`NodeHost`.

    Inside :func:`run_in_turns` a call is queued in ``batch`` and the task pauses (the batch
    goes out, one round trip per actor, when the first paused task resumes); elsewhere it is
    one remote call, awaited at once."""

    def __init__(self, ray: Any, actor: Any, node_id: str, state: dict[str, float],
                 batch: CallBatch | None = None) -> None:
        self._ray = ray
        self._actor = actor
        self.node_id = node_id
        self._state = dict(state)
        self._batch = batch

    @property
    def epsilon(self) -> float | None:
        """ε the node's accountant has spent (as of the last call)."""
        return self._state.get("epsilon")

    @property
    def last_loss(self) -> float | None:
        """The node's last local training loss (as of the last call)."""
        return self._state.get("last_loss")

    def _call(self, method: str, *args: Any) -> Any:
        if self._batch is not None and getattr(_turn, "pause", None) is not None:
            slot = self._batch.queue(self._actor, self.node_id, method, args)
            pause()  # the other nodes' turns; the batch is sent before this task resumes
            kind, result, state = _get(self._ray, slot[0])[slot[1]]
        else:
            kind, result, state = _get(self._ray, self._actor.call.remote(self.node_id, method, *args))
        self._state = state
        if kind == "budget":
            raise BudgetExhausted(*result)
        return result

    def fit(self, parameters: Any, config: dict[str, Any]) -> Any:
        return self._call("fit", parameters, config)

    def evaluate(self, parameters: Any, config: dict[str, Any]) -> Any:
        return self._call("evaluate", parameters, config)

    def get_parameters(self, config: dict[str, Any]) -> Any:
        return self._call("get_parameters", config)

    def evaluate_local(self, parameters: Any = None) -> tuple[float, float]:
        """The site's own evaluation (the researcher's view; see the runner's evaluator)."""
        return self._call("evaluate_local", parameters)  # type: ignore[no-any-return]

    def parameter_names(self) -> list[str]:
        return self._call("parameter_names")  # type: ignore[no-any-return]


def _actor_resources(ray: Any, actors: int, device: str) -> dict[str, float]:
    """One CPU per actor; an equal share of the cluster's GPUs when the simulation runs on CUDA."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus > 0 and device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": min(1.0, gpus / actors)}
    return {"num_cpus": 1}


def default_actors(ray: Any) -> int:
    """The cluster's CPUs (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


#: the actors kept for the Ray session: (session key, resources, actors)
_pool: list[tuple[tuple[str, str], dict[str, float], list[Any]]] = []


def _session_key(ray: Any) -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return str(ctx.get_job_id()), str(ctx.get_node_id())


def _actors(ray: Any, k: int, resources: dict[str, float]) -> list[Any]:
    """``k`` NodeHost actors with ``resources`` each: this session's kept ones when they fit, else new."""
    key = _session_key(ray)
    if _pool and (_pool[0][0] != key or _pool[0][1] != resources or len(_pool[0][2]) != k):
        if _pool[0][0] == key:
            for a in _pool[0][2]:
                ray.kill(a)
        _pool.clear()
    if not _pool:
        remote = ray.remote(**resources)(NodeHost)
        _pool.append((key, dict(resources), [remote.remote() for _ in range(k)]))
    return _pool[0][2]


@contextlib.contextmanager
def ray_clients(spec: SimSpec, node_ids: list[str]) -> Iterator[tuple[dict[str, NumPyClient], CallBatch]]:
    """Every node's proxy client, its real client in one of ``spec.actors`` Ray actors (default:
    the cluster's CPUs, never more than the nodes), node ``i`` on actor ``i mod K``, and their
    :class:`CallBatch` (whose ``run_each`` the engine's synchronous rounds use). On exit the
    actors drop the clients (they are kept for the next run of this Ray session), and a Ray
    instance this started stops."""
    with ray_session(spec.address) as ray:
        k = min(len(node_ids), spec.actors or default_actors(ray))
        device = spec.device
        if device.startswith("cuda"):
            device = "cuda"  # Ray gives each actor its GPU share as the actor's only visible device
        host_spec = spec if device == spec.device else dataclasses.replace(spec, device=device)
        actors = _actors(ray, k, _actor_resources(ray, k, spec.device))
        groups = [[i for i in range(len(node_ids)) if i % k == a] for a in range(k)]
        try:
            states: dict[str, dict[str, float]] = {}
            for part in _get(ray, [a.build.remote(host_spec, node_ids, g) for a, g in zip(actors, groups)]):
                states.update(part)
            batch = CallBatch(ray, actors)
            clients: dict[str, NumPyClient] = {}
            for a, group in zip(actors, groups):
                for i in group:
                    clients[node_ids[i]] = RayNodeClient(ray, a, node_ids[i], states[node_ids[i]], batch)
            yield {nid: clients[nid] for nid in node_ids}, batch
        finally:
            try:
                ray.get([a.clear.remote() for a in actors])
            except Exception:  # noqa: BLE001  (an actor died: forget the set, keep the run's own error)
                _pool.clear()


def check_backend(backend: str, address: str | None, actors: int | None, where: str = "[simulation]") -> None:
    """Refuse a bad ``[simulation]`` backend, address or actor count, or Ray absent when asked for
    (one line, naming ``<where>.<field>``)."""
    if backend not in ("local", "ray"):
        raise ConfigError(f'{where}.backend: must be "local" or "ray", got {backend!r}')
    if address is not None and (not isinstance(address, str) or not address):
        raise ConfigError(f'{where}.address: "auto" or "HOST:PORT", got {address!r}')
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise ConfigError(f"{where}.actors: must be a positive integer, got {actors!r}")
    if backend == "local" and (address is not None or actors is not None):
        raise ConfigError(f'{where}.address / {where}.actors: only with {where}.backend = "ray"')
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(f'{where}.backend: "ray" needs Ray, which is not installed: '
                              "pip install privfl[ray]") from None
