"""Async gossip on a fixed public subspace mask, and the structured public mask.

Async subspace gossip averages pairs of nodes on the k values of one public mask held for the
whole run: the request and the reply are both subspace frames (4k bytes, or 4-bit codes),
every coordinate off the mask stays at the shared public initial model at every node, and a
mask that could change during the run is refused naming the field. The structured mask
(``whole``: small tensors kept whole, a random share of the big ones) is a function of the
public seed and the model's shapes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.client import NumPyClient

from privfl.accounting.subspace import subspace_k, subspace_mask
from privfl.clients import DPConfig
from privfl.errors import ConfigError
from privfl.sim import LinkSpec, SimSpec, SimWorld, StopCriteria, run_simulation
from privfl.strategies.base import ModelMessage
from privfl.strategies.compression import Compressed
from privfl.strategies.compression.message import FRAME_HEADER_BYTES
from privfl.strategies.compression.subspace import SubspaceK, segment_shapes
from privfl.strategies.gossip import AsyncGossip
from privfl.strategies.registry import StrategyBuild, build_node_strategy, check_strategy
from privfl.strategies.topology import build_topology

pytestmark = pytest.mark.timeout(60)

SHAPES = [(40, 50), (40,)]
D = 40 * 50 + 40
SEED, FRACTION = 5, 0.05
K = subspace_k(D, FRACTION)


def _init() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


class _MaskStep(NumPyClient):
    """Stands for a subspace DP step: moves only the public mask's coordinates (noised values, to the strategy)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.mask = subspace_mask(SEED, 0, SHAPES, FRACTION)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        flat = np.concatenate([p.reshape(-1) for p in parameters]).astype(np.float32)
        flat[self.mask] += self.rng.normal(size=K).astype(np.float32)
        return [flat[:2000].reshape(40, 50), flat[2000:]], 1, {"epsilon": 0.1, "steps": 1, "dp": 1}


def _nodes(n: int, bits: int | None) -> tuple[list[AsyncGossip], list[tuple[str, ModelMessage, ModelMessage | None]]]:
    """n async subspace nodes on a ring in one SimWorld; every exchange's (peer, request, reply) is recorded."""
    ids = [f"n{i}" for i in range(n)]
    topo = build_topology("ring", ids)
    world = SimWorld(ids, {i: topo.neighbors(i) for i in ids}, LinkSpec())
    seen: list[tuple[str, ModelMessage, ModelMessage | None]] = []
    nodes = []
    for i, nid in enumerate(ids):
        net = world.network(nid)
        inner = net.exchange

        def exchange(peer: str, msg: ModelMessage, inner: Any = inner) -> ModelMessage | None:
            reply = inner(peer, msg)
            seen.append((peer, msg, reply))
            return reply

        net.exchange = exchange  # type: ignore[method-assign]
        s = AsyncGossip(_MaskStep(i), net, _init(),
                        {"local_steps": 1, "seed": i, "peers": topo.neighbors(nid), "planned_steps": 20,
                         "compressor": SubspaceK(fraction=FRACTION, public_seed=SEED, period=20, bits=bits)})
        world.strategies[nid] = s
        nodes.append(s)
    return nodes, seen


def _flat(params: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in params])


@pytest.mark.parametrize("bits", [None, 4])
def test_async_subspace_sends_only_the_k_mask_values_both_ways_and_keeps_the_rest_at_init(bits: int | None) -> None:
    nodes, seen = _nodes(4, bits)
    init, mask = _flat(_init()), subspace_mask(SEED, 0, SHAPES, FRACTION)
    off = np.ones(D, bool)
    off[mask] = False
    for _ in range(5):
        for s in nodes:
            s.step()
    assert len(seen) == 20 and all(reply is not None for _, _, reply in seen)
    want = 4 * K if bits is None else (4 * K + 7) // 8 + 8 * len(SHAPES)
    for _, req, reply in seen:
        assert reply is not None and req.params is None and reply.params is None  # no dense model either way
        for m in (req, reply):
            assert isinstance(m.payload, Compressed) and m.payload.shapes == segment_shapes(mask, tuple(SHAPES))
            assert m.nbytes == want and len(m.payload.to_bytes()) == FRAME_HEADER_BYTES + want
    assert sum(s.bytes_sent for s in nodes) == 2 * 20 * want
    for s in nodes:  # off the mask every node is still the public initial model, bit for bit
        assert np.array_equal(_flat(s.params)[off], init[off])
        assert s.subspace.off_mask_at_init(s.params)
    # one pure exchange: both ends hold the pair's average on the mask (float32: exactly; 4-bit: to the rounding)
    a, b = nodes[0], nodes[1]
    xa, xb = _flat(a.params), _flat(b.params)
    assert a.average_with("n1")
    ya, yb = _flat(a.params), _flat(b.params)
    avg = (xa[mask] + xb[mask]) / 2
    tol = 1e-6 if bits is None else 0.5 * max(np.ptp(xa[mask] - init[mask]), np.ptp(xb[mask] - init[mask])) / 15 + 1e-6
    assert np.max(np.abs(ya[mask] - avg)) <= tol and np.max(np.abs(yb[mask] - avg)) <= tol
    assert np.array_equal(ya[off], init[off]) and np.array_equal(yb[off], init[off])


def test_a_mask_that_could_change_during_the_run_is_refused_naming_the_field() -> None:
    world = SimWorld(["a", "b"], {"a": ["b"], "b": ["a"]}, LinkSpec())
    comp = SubspaceK(fraction=FRACTION, public_seed=SEED, period=10)
    for planned in (150, None):
        with pytest.raises(ConfigError, match=r"^\[strategy\]\.params\.period: "):
            AsyncGossip(_MaskStep(0), world.network("a"), _init(), {"compressor": comp, "planned_steps": planned})
    # through the registry: the settings are checked when read, the fixed mask when built
    params = {"compressor": "subspace", "fraction": FRACTION, "public_seed": SEED, "period": 10, "bits": 4}
    check_strategy("async_gossip", params, "node")
    topo = build_topology("ring", ["a", "b"])

    def build(**kw: Any) -> Any:
        b = dict(name="async_gossip", driver="node", params=params, node_id="a", topology=topo,
                 client=_MaskStep(0), network=world.network("a"), initial=_init())
        b.update(kw)
        return build_node_strategy(StrategyBuild(**b))

    with pytest.raises(ConfigError, match=r"^\[strategy\]\.params\.period: .*planned steps \(150\), got 10"):
        build(planned_steps=150)
    with pytest.raises(ConfigError, match=r"^\[node\]\.init_seed: "):
        build(planned_steps=10, shared_init=False)
    assert build(planned_steps=10).subspace is not None
    refused = r"^\[strategy\]\.params\.compressor: async_gossip cannot compress \('topk'\)"
    with pytest.raises(ConfigError, match=refused):
        check_strategy("async_gossip", {"compressor": "topk"}, "simulate")
    with pytest.raises(ConfigError, match=r"^\[strategy\]\.params\.fraction: .*compressor = \"subspace\""):
        check_strategy("async_gossip", {"fraction": 0.1}, "simulate")
    with pytest.raises(ConfigError, match=r"fraction"):
        check_strategy("async_gossip", {"compressor": "subspace", "fraction": 2.0, "public_seed": 1}, "simulate")


def test_async_subspace_simulation_moves_only_the_mask_and_refuses_a_changing_one() -> None:
    sub = {"fraction": 0.2, "seed": 3, "period": 6}
    dp = DPConfig(noise_multiplier=1.0, batch_size=16, sample_rate=0.14, lr=0.5, target_epsilon=50.0,
                  mechanism="subspace", mechanism_params=sub, engine="opacus")
    params = {"compressor": "subspace", "fraction": 0.2, "public_seed": 3, "period": 6, "bits": 4}
    spec = SimSpec(num_nodes=3, model="logreg", strategy="async_gossip", strategy_params=params, dp=dp,
                   stop=StopCriteria(max_steps=6), eval_every_rounds=6, seed=1)
    res = run_simulation(spec)
    frozen = run_simulation(SimSpec(**{**spec.__dict__, "dp": DPConfig(**{**dp.__dict__, "lr": 1e-30})}))
    init = _flat(frozen.models[frozen.node_ids[0]])  # off the mask nothing ever moves it: the shared initial model
    shapes = tuple(tuple(a.shape) for a in res.models[res.node_ids[0]])
    mask = subspace_mask(3, 0, shapes, 0.2)
    off = np.ones(init.size, bool)
    off[mask] = False
    moved = [_flat(m) for m in res.models.values()]
    assert all(np.array_equal(x[off], init[off]) for x in moved)  # every node: init off the mask
    assert any(not np.array_equal(x[mask], init[mask]) for x in moved)  # and trained on it
    with pytest.raises(ConfigError, match=r"\[strategy\]\.params\.period"):
        run_simulation(SimSpec(**{**spec.__dict__, "stop": StopCriteria(max_steps=7)}))


@pytest.mark.timeout(60)
def test_async_subspace_request_and_reply_travel_as_frames_over_real_mtls(tmp_path: Path) -> None:
    from tests.test_compressed_transport import _Pair

    pair = _Pair(tmp_path / "pki")
    try:
        nets = pair.nets
        strats = {}
        for i, n in enumerate(("a", "b")):
            strats[n] = AsyncGossip(_MaskStep(i), nets[n], _init(),
                                    {"planned_steps": 20, "peers": [m for m in nets if m != n],
                                     "compressor": SubspaceK(fraction=FRACTION, public_seed=SEED, period=20, bits=4)})
            nets[n].attach(strats[n])
        for s in strats.values():
            s.params = s.client.fit(s.params, {})[0]  # a step on the mask at each node
        assert strats["a"].average_with("b") and strats["b"].served == 1
        want = FRAME_HEADER_BYTES + (4 * K + 7) // 8 + 8 * len(SHAPES)
        assert [r[4] for r in pair.released["a"]] == [want]  # the request: a's k values only
        assert [r[4] for r in pair.released["b"]] == [want]  # the reply: b's pre-average k values only
        init, mask = _flat(_init()), subspace_mask(SEED, 0, SHAPES, FRACTION)
        ya, yb = _flat(strats["a"].params), _flat(strats["b"].params)
        off = np.ones(D, bool)
        off[mask] = False
        assert np.array_equal(ya[off], init[off]) and np.array_equal(yb[off], init[off])
        assert np.max(np.abs(ya[mask] - yb[mask])) < 0.5  # both near the pair's average (4-bit rounding)
    finally:
        pair.close()


# ---- the structured public mask ---------------------------------------------------------------
CNN = [(16, 1, 3, 3), (16,), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (32,), (64, 512), (64,), (10, 64), (10,)]


def test_structured_mask_keeps_small_tensors_whole_and_depends_on_public_values_only() -> None:
    d = sum(int(np.prod(s)) for s in CNN)
    m = subspace_mask(7, 0, CNN, 0.07, whole=1024)
    assert m.size == subspace_k(d, 0.07) and np.all(np.diff(m) > 0)
    counts = [c for (c,) in segment_shapes(m, tuple(CNN))]
    sizes = [int(np.prod(s)) for s in CNN]
    assert all(c == n for c, n in zip(counts, sizes) if n <= 1024)  # every small tensor whole
    assert all(0 < c < n for c, n in zip(counts, sizes) if n > 1024)  # a share of each big one
    assert np.array_equal(m, subspace_mask(7, 0, CNN, 0.07, whole=1024))  # any node derives the same
    assert not np.array_equal(m, subspace_mask(8, 0, CNN, 0.07, whole=1024))
    assert np.array_equal(subspace_mask(7, 3, CNN, 0.07), subspace_mask(7, 3, CNN, 0.07, whole=0))
    with pytest.raises(ConfigError, match=r"subspace\.whole"):
        subspace_mask(7, 0, CNN, 0.01, whole=1024)  # the whole tensors alone exceed k
    comp = SubspaceK(fraction=0.07, public_seed=7, whole=1024, period=150)
    assert comp.frame_shapes(0, tuple(CNN)) == segment_shapes(m, tuple(CNN))


def test_structured_mask_of_the_dp_step_is_the_same_at_two_sites_with_different_data() -> None:
    from tests.test_subspace_dp import _private, _step

    sub = {"fraction": 0.1, "seed": 3, "whole": 20}
    a = _private(params=sub, data_seed=0, seed=1)
    b = _private(params=sub, data_seed=99, seed=2, scale=10.0)
    shapes = [tuple(p.shape) for p in a[1].parameters()]
    for eng, *_ in (a, b):
        eng.reserve(3)
    for step in range(3):
        ia, ib = a[2].flat_indices(), b[2].flat_indices()
        assert np.array_equal(ia, ib) and np.array_equal(ia, subspace_mask(3, step, shapes, 0.1, whole=20))
        assert a[2].k == ia.size == subspace_k(387, 0.1)
        _step(*a[1:4])
        _step(*b[1:4])
        for _, dm, opt, *_ in (a, b):  # the step moved nothing off the mask
            grad = np.concatenate([p.grad.reshape(-1).numpy() for p in dm.parameters()])
            assert np.all(grad[np.setdiff1d(np.arange(387), ia)] == 0.0) and opt.steps_taken == step + 1


def test_a_resumed_node_quantises_against_the_shared_initial_model_not_its_resumed_one() -> None:
    world = SimWorld(["a", "b"], {"a": ["b"], "b": ["a"]}, LinkSpec())
    init = _init()
    resumed = _MaskStep(7).fit(_MaskStep(8).fit(init, {})[0], {})[0]  # a checkpoint two steps in
    comp = {"compressor": SubspaceK(fraction=FRACTION, public_seed=SEED, period=20, bits=4), "planned_steps": 20}
    a = AsyncGossip(_MaskStep(0), world.network("a"), init, {**comp, "peers": ["b"]})
    b = AsyncGossip(_MaskStep(1), world.network("b"), resumed, {**comp, "public_initial": init})
    world.strategies.update(a=a, b=b)
    mask = subspace_mask(SEED, 0, SHAPES, FRACTION)
    avg = (_flat(init)[mask] + _flat(resumed)[mask]) / 2
    assert a.average_with("b")
    step = np.ptp(_flat(resumed)[mask] - _flat(init)[mask]) / 15  # the 4-bit step of b's offsets
    assert np.max(np.abs(_flat(a.params)[mask] - avg)) <= step / 2 + 1e-5
    assert np.max(np.abs(_flat(b.params)[mask] - avg)) <= 1e-6  # a's offsets are all zero: exact


@pytest.mark.parametrize("bits", [None, 4])
def test_a_frame_decodes_to_the_peer_model_the_gradient_point_keeps(bits: int | None) -> None:
    """``gradient_peers`` keeps a peer's model as its frame carries it: the public init off the mask, the frame's
    k values on it (float32: exactly; quantised: to half a step): b keeps a's request, a keeps b's reply."""
    world = SimWorld(["a", "b"], {"a": ["b"], "b": ["a"]}, LinkSpec())
    comp = {"planned_steps": 20, "gradient_peers": 1}
    a = AsyncGossip(_MaskStep(0), world.network("a"), _init(),
                    {**comp, "peers": ["b"], "compressor": SubspaceK(fraction=FRACTION, public_seed=SEED, period=20,
                                                                     bits=bits)})
    b = AsyncGossip(_MaskStep(1), world.network("b"), _init(),
                    {**comp, "compressor": SubspaceK(fraction=FRACTION, public_seed=SEED, period=20, bits=bits)})
    world.strategies.update(a=a, b=b)
    a.params = a.client.fit(a.params, {})[0]
    sent = _flat(a.params)
    assert a.average_with("b")
    (kept,) = b._peer_models
    init, mask = _flat(_init()), subspace_mask(SEED, 0, SHAPES, FRACTION)
    off = np.ones(D, bool)
    off[mask] = False
    assert [k.dtype for k in kept] == [np.float32, np.float32] and [k.shape for k in kept] == [tuple(s) for s in SHAPES]
    assert np.array_equal(_flat(kept)[off], init[off])
    tol = 1e-7 if bits is None else 0.5 * np.ptp(sent[mask] - init[mask]) / 15 + 1e-6
    assert np.max(np.abs(_flat(kept)[mask] - sent[mask])) <= tol
    (reply,) = a._peer_models  # and the reply a got: b's pre-average model, the public init (b never trained)
    assert np.array_equal(_flat(reply), init)
