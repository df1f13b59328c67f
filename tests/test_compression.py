"""Compression of released values: Released-only API, exact codecs and byte counts,
contraction, error feedback, AdaComp, CLT-k and compressed-innovation gossip."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privfl.errors import ConfigError
from privfl.strategies.compression import (
    AdaComp,
    CLTk,
    Compressed,
    CompressionError,
    Compressor,
    Identity,
    InnovationGossip,
    MalformedMessage,
    Quantize8,
    RandomK,
    Released,
    TopK,
    compressor_from_config,
    decompress,
    released,
)
from privfl.strategies.compression.message import pack_codes, unpack_codes
from privfl.strategies.topology import Topology

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = arrays(np.float32, st.integers(1, 60), elements=finite32)


def flat(arrays_: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays_]).astype(np.float64)


def model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]


ALL = [
    lambda: Identity(),
    lambda: TopK(k=4),
    lambda: RandomK(k=4, seed=1),
    lambda: Quantize8(),
    lambda: AdaComp(bin_size=4),
    lambda: CLTk(k=4),
]


# -- the Released gate ---------------------------------------------------------------


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize(
    "raw",
    [model(), model()[0], (model()[0],), np.zeros(3)],
    ids=["list", "ndarray", "tuple", "zeros"],
)
def test_compress_refuses_raw_arrays(make, raw) -> None:
    comp: Compressor = make()
    with pytest.raises(TypeError, match="accepts only Released"):
        comp.compress(raw)
    assert comp.residual_norm() == 0.0  # nothing entered the memory


def test_cltk_and_gossip_refuse_raw_arrays() -> None:
    comp = CLTk(k=2)
    with pytest.raises(TypeError, match="only Released"):
        comp.select_indices(model())
    with pytest.raises(TypeError, match="only Released"):
        comp.compress_with_indices(model(), np.array([0, 1], dtype=np.int32))
    g = InnovationGossip("a", {"b": 0.5}, TopK(k=2, error_feedback=False), gamma=0.5)
    for call in (g.make_message, g.consensus_step):
        with pytest.raises(TypeError, match="only Released"):
            call(model())


def test_released_cannot_be_forged_or_mutated() -> None:
    with pytest.raises(TypeError, match="made only by"):
        Released(model())
    with pytest.raises(TypeError, match="subclassed"):

        class Fake(Released):  # noqa: F841
            pass

    src = model()
    rel = released(src, source="dp-sgd")
    src[0][0, 0] = 1e9  # the caller's buffer changes later ...
    assert rel.arrays[0][0, 0] != 1e9  # ... the release does not
    with pytest.raises(ValueError):
        rel.arrays[0][0, 0] = 1.0
    with pytest.raises(AttributeError):
        rel._arrays = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(rel)
    assert rel.source == "dp-sgd" and rel.shapes == ((3, 4), (5,)) and rel.size == 17


def test_released_validates_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        released([np.array([1.0, np.nan])])
    with pytest.raises(TypeError, match="float dtype"):
        released([np.array([1, 2])])
    with pytest.raises(TypeError, match="numpy array"):
        released([[1.0, 2.0]])  # type: ignore[list-item]


# -- codecs and byte counts -------------------------------------------------------------


@SETTINGS
@given(vectors, st.data())
def test_sparse_round_trip_is_exact(x: np.ndarray, data: st.DataObject) -> None:
    d = x.size
    k = data.draw(st.integers(1, d))
    msg = TopK(k=k, error_feedback=False).compress(released([x]))
    dec = decompress(msg)[0]
    assert dec.dtype == np.float32 and dec.shape == x.shape
    np.testing.assert_array_equal(dec[msg.indices], x[msg.indices])
    mask = np.ones(d, bool)
    mask[msg.indices] = False
    assert (dec[mask] == 0).all()
    # the same message rebuilt from its wire fields (as the transport would) decodes identically
    again = Compressed("sparse", msg.shapes, indices=msg.indices.copy(), values=msg.values.copy())
    np.testing.assert_array_equal(decompress(again)[0], dec)
    if k == d:
        np.testing.assert_array_equal(dec, x)


def test_nbytes_exact_for_every_kind() -> None:
    x = released(model())  # d = 17, T = 2
    assert Identity().compress(x).nbytes == 4 * 17
    assert TopK(k=5).compress(x).nbytes == 5 * 4 + 5 * 4
    assert RandomK(ratio=0.5).compress(x).nbytes == 8 * 8  # k = int(0.5 * 17) = 8
    assert Quantize8().compress(x).nbytes == 17 + 2 * 2 * 4
    ada = AdaComp(bin_size=4).compress(x)
    k = len(ada.indices)
    assert ada.kind == "ternary" and ada.nbytes == 4 * k + (k + 7) // 8 + 4 * 2
    leader = CLTk(k=6)
    idx = leader.select_indices(x)
    assert idx.nbytes == 24
    assert leader.compress_with_indices(x, idx).nbytes == 6 * 4  # values only: indices were broadcast
    assert CLTk(k=6).compress(x).nbytes == 6 * 8
    for msg in (Identity().compress(x), TopK(k=5).compress(x), Quantize8().compress(x), ada):
        arrays_ = (msg.indices, msg.values, msg.codes, msg.scales)
        assert msg.nbytes == sum(a.nbytes for a in arrays_)
        assert msg.dense_nbytes == 68


def test_malformed_messages_are_refused() -> None:
    shapes = ((4,),)
    i32, f32 = np.int32, np.float32
    bad = [
        dict(indices=np.array([0, 1], dtype=np.int64), values=np.array([1, 2], f32)),  # dtype
        dict(indices=np.array([2, 1], i32), values=np.array([1, 2], f32)),  # order
        dict(indices=np.array([1, 1], i32), values=np.array([1, 2], f32)),  # duplicate
        dict(indices=np.array([0, 4], i32), values=np.array([1, 2], f32)),  # range
        dict(indices=np.array([-1, 2], i32), values=np.array([1, 2], f32)),  # negative
        dict(indices=np.array([0, 1], i32), values=np.array([1], f32)),  # length
        dict(indices=np.array([0, 1], i32), values=np.array([1, np.inf], f32)),  # finite
    ]
    for fields in bad:
        with pytest.raises(MalformedMessage):
            Compressed("sparse", shapes, **fields)
    with pytest.raises(MalformedMessage, match="lengths"):
        Compressed("quant8", shapes, codes=np.zeros(3, np.uint8), scales=np.zeros(2, f32))
    with pytest.raises(MalformedMessage, match="unknown message kind"):
        Compressed("pickle", shapes)
    with pytest.raises(ValueError):  # MalformedMessage is also a ValueError
        Compressed("dense", shapes, values=np.zeros(5, f32))


# -- contraction --------------------------------------------------------------------------


@SETTINGS
@given(vectors, st.data())
def test_topk_is_a_delta_contraction(x: np.ndarray, data: st.DataObject) -> None:
    d = x.size
    k = data.draw(st.integers(1, d))
    c = flat(decompress(TopK(k=k, error_feedback=False).compress(released([x]))))
    xf = x.astype(np.float64)
    assert np.sum((xf - c) ** 2) <= (1 - k / d) * np.sum(xf**2) * (1 + 1e-12)


@SETTINGS
@given(arrays(np.float32, st.integers(2, 30), elements=finite32), st.data())
def test_randomk_contraction_in_expectation(x: np.ndarray, data: st.DataObject) -> None:
    d = x.size
    k = data.draw(st.integers(1, d - 1))
    comp = RandomK(k=k, seed=data.draw(st.integers(0, 1000)), error_feedback=False)
    xf = x.astype(np.float64)
    norm2 = np.sum(xf**2)
    rel = released([x])
    errs = np.array([np.sum((xf - flat(decompress(comp.compress(rel)))) ** 2) for _ in range(400)])
    assert (errs <= norm2 * (1 + 1e-12)).all()  # every draw only removes mass
    # E‖x − C(x)‖² = (1 − k/d)‖x‖²; allow 5 standard errors of the Monte-Carlo mean
    se = errs.std() / np.sqrt(len(errs))
    assert errs.mean() <= (1 - k / d) * norm2 + 5 * se + 1e-9 * norm2


def test_unbiased_randomk_is_unbiased() -> None:
    x = np.linspace(-2, 3, 20)
    comp = RandomK(k=5, seed=3, unbiased=True)
    assert not comp.error_feedback
    rel = released([x])
    mean = np.mean([flat(decompress(comp.compress(rel))) for _ in range(4000)], axis=0)
    # per-coordinate std of the estimate: |x|·sqrt(d/k − 1)/sqrt(4000) ≤ 3·1.73/63 ≈ 0.08
    np.testing.assert_allclose(mean, x, atol=0.4)
    assert np.abs(mean - x).mean() < 0.1
    with pytest.raises(CompressionError, match="not a contraction"):
        RandomK(k=5, unbiased=True, error_feedback=True)


# -- quantisation -------------------------------------------------------------------------


@SETTINGS
@given(st.lists(arrays(np.float32, st.integers(1, 40), elements=finite32), min_size=1, max_size=3),
       st.sampled_from([8, 4, 2, 1]))
def test_quantize_error_bound(tensors: list[np.ndarray], bits: int) -> None:
    msg = Quantize8(bits=bits).compress(released(tensors))
    d = sum(t.size for t in tensors)
    assert msg.kind == f"quant{bits}"
    assert msg.codes.dtype == np.uint8 and msg.nbytes == (d * bits + 7) // 8 + 8 * len(tensors)
    back = Compressed.from_bytes(msg.to_bytes(), [t.shape for t in tensors])  # packed codes survive framing
    assert all(a.tobytes() == b.tobytes() for a, b in zip(decompress(msg), decompress(back)))
    dec = decompress(msg)
    for t, (x, q) in enumerate(zip(tensors, dec)):
        x64 = x.astype(np.float64)
        step = (x64.max() - x64.min()) / (2**bits - 1)
        assert float(msg.scales[2 * t + 1]) <= step * (1 + 1e-6) + 1e-30
        # nearest rounding: half a step, plus float32 output rounding
        assert np.all(np.abs(q.astype(np.float64) - x64) <= step / 2 * (1 + 1e-5) + 1e-6 * np.abs(x64) + 1e-30)


def test_quantize8_constant_tensor_is_exact_and_stochastic_is_unbiased() -> None:
    const = np.full(7, 2.5, np.float32)
    np.testing.assert_array_equal(decompress(Quantize8().compress(released([const])))[0], const)
    x = np.linspace(0, 1, 256 * 3 + 1)[1::3][:50]  # values off the code grid
    comp = Quantize8(stochastic=True, seed=0)
    rel = released([x])
    draws = np.array([flat(decompress(comp.compress(rel))) for _ in range(2000)])
    step = (x.max() - x.min()) / 255
    assert np.abs(draws - x).max() < step * (1 + 1e-5)
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=step * 0.1)


# -- error feedback -------------------------------------------------------------------------


def test_error_feedback_accumulates_and_is_eventually_sent() -> None:
    x = np.array([1.0, 0.5, 0.25, 0.125], np.float32)
    comp = TopK(k=1)
    rel = released([x])
    sent_total = np.zeros(4)
    sent_at: dict[int, int] = {}
    for t in range(1, 41):
        msg = comp.compress(rel)
        sent_total += flat(decompress(msg))
        for i in msg.indices:
            sent_at.setdefault(int(i), t)
        # no mass is lost: what was sent plus what is remembered is all that came in
        np.testing.assert_allclose(sent_total + comp.residual_snapshot(), t * x.astype(np.float64), atol=1e-9)
        if t == 1:
            assert set(msg.indices) == {0} and comp.residual_norm() > 0
        if 3 not in sent_at:  # the smallest coordinate builds up in the memory until it is sent
            assert comp.residual_snapshot()[3] == pytest.approx(t * 0.125)
    assert set(sent_at) == {0, 1, 2, 3}  # even the smallest coordinate got out
    # long-run rates match the input (error feedback is unbiased in the limit)
    np.testing.assert_allclose(sent_total / 40, x, atol=1.0 / 40 + 1e-9)
    with pytest.raises(ValueError):
        comp.residual_snapshot()[0] = 0.0  # read-only view; the memory changes only in compress()


def test_shape_change_is_refused_until_reset() -> None:
    comp = TopK(k=2)
    comp.compress(released(model()))
    with pytest.raises(CompressionError, match="differ from the bound shapes"):
        comp.compress(released([np.zeros(9)]))
    comp.reset()
    assert comp.residual_norm() == 0.0
    comp.compress(released([np.zeros(9)]))
    with pytest.raises(CompressionError, match="k=12 exceeds"):
        TopK(k=12).compress(released([np.zeros(9)]))


# -- AdaComp --------------------------------------------------------------------------------


def test_adacomp_bins_hand_example() -> None:
    x = np.array([3, -1, 0.5, 2, 0.1, 0.2, -0.3, 0.05], np.float64)
    msg = AdaComp(bin_size=4).compress(released([x]))
    # bin 1: max 3, |2x| ≥ 3 -> {3, 2}; bin 2: max 0.3, |2x| ≥ 0.3 -> {0.2, -0.3}
    assert msg.indices.tolist() == [0, 3, 5, 6]
    scale = np.float32(np.mean([3, 2, 0.2, 0.3]))
    np.testing.assert_array_equal(decompress(msg)[0], np.array([1, 0, 0, 1, 0, 1, -1, 0], np.float32) * scale)
    assert msg.nbytes == 4 * 4 + 1 + 4


@SETTINGS
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-10, 10)),
       arrays(np.float64, 30, elements=st.floats(-10, 10)))
def test_adacomp_bin_size_one_rule_and_no_mass_lost(first: np.ndarray, second_full: np.ndarray) -> None:
    second = second_full[: first.size]
    comp = AdaComp(bin_size=1)
    comp.compress(released([first]))
    residue = comp.residual_snapshot().copy()
    msg = comp.compress(released([second]))
    g = residue + second
    expected = np.flatnonzero((np.abs(g + second) >= np.abs(g)) & (g != 0))
    assert msg.indices.tolist() == expected.tolist()
    np.testing.assert_allclose(comp.residual_snapshot() + flat(decompress(msg)), g, atol=1e-9)


def test_adacomp_bins_are_per_tensor_and_float_mode() -> None:
    x = [np.array([5.0, 0.0, 0.0]), np.array([0.0, 0.01])]
    msg = AdaComp(bin_size=50, quantize=False).compress(released(x))
    # one bin per tensor: each tensor's own maximum is sent, not only the global one
    assert msg.kind == "sparse" and msg.indices.tolist() == [0, 4]
    np.testing.assert_allclose(flat(decompress(msg)), [5.0, 0, 0, 0, 0.01], rtol=1e-7)


# -- CLT-k ------------------------------------------------------------------------------------


def test_cltk_followers_use_the_leaders_indices_and_commute_with_averaging() -> None:
    nodes = [f"h{i}" for i in range(4)]
    assert [CLTk.leader_of(t, nodes) for t in range(6)] == ["h0", "h1", "h2", "h3", "h0", "h1"]
    comps = [CLTk(k=5) for _ in nodes]
    updates = [released(model(seed)) for seed in range(4)]
    leader = CLTk.leader_of(2, nodes)
    li = nodes.index(leader)
    idx = comps[li].select_indices(updates[li])
    np.testing.assert_array_equal(idx, TopK(k=5).compress(updates[li]).indices)  # the leader's own top-k
    msgs = [c.compress_with_indices(u, idx) for c, u in zip(comps, updates)]
    for m in msgs:
        np.testing.assert_array_equal(m.indices, idx)
        assert m.shared_indices and m.nbytes == 5 * 4
    # (1/n) Σ CLT(p_i) == CLT((1/n) Σ p_i): one mask, so compression commutes with averaging
    avg_of_msgs = np.mean([flat(decompress(m)) for m in msgs], axis=0)
    mean_update = np.mean([u.flat() for u in updates], axis=0)
    expected = np.zeros_like(mean_update)
    expected[idx] = mean_update[idx]
    np.testing.assert_allclose(avg_of_msgs, expected, atol=1e-6)
    # selection does not touch the memory; compression fills it with what was not sent
    assert comps[li].residual_norm() > 0
    with pytest.raises(MalformedMessage):
        comps[0].compress_with_indices(updates[0], np.array([3, 1], np.int32))
    with pytest.raises(MalformedMessage):
        comps[0].compress_with_indices(updates[0], np.array([0, 99], np.int32))


def test_cltk_low_pass_memory() -> None:
    x = np.array([4.0, 3.0, 2.0, 1.0])
    comp = CLTk(k=1, beta=0.25)
    msg = comp.compress_with_indices(released([x]), np.array([0], np.int32))
    np.testing.assert_allclose(comp.residual_snapshot(), 0.25 * (x - flat(decompress(msg))))
    before = comp.residual_snapshot().copy()
    msg2 = comp.compress_with_indices(released([x]), np.array([1], np.int32))
    p = before + x
    np.testing.assert_allclose(comp.residual_snapshot(), 0.75 * before + 0.25 * (p - flat(decompress(msg2))))


# -- compressed-innovation gossip -----------------------------------------------------------


def run_choco(compressor_factory, gamma: float, rounds: int, n: int = 8,
              d: int = 40) -> tuple[list, np.ndarray, float, list]:
    topo = Topology.ring([f"n{i}" for i in range(n)])
    nodes = [InnovationGossip.from_topology(topo, f"n{i}", compressor_factory(), gamma) for i in range(n)]
    rng = np.random.default_rng(42)
    xs = [released([rng.normal(size=(d // 2, 2))]) for _ in range(n)]
    mean = np.mean([x.flat() for x in xs], axis=0)
    dev0 = max(np.abs(x.flat() - mean).max() for x in xs)
    for _ in range(rounds):
        msgs = [g.make_message(x) for g, x in zip(nodes, xs)]
        for g in nodes:
            for j in g.neighbors:
                g.receive(j, msgs[int(j[1:])])
        xs = [g.consensus_step(x) for g, x in zip(nodes, xs)]
    return xs, mean, dev0, nodes


def test_choco_topk_reaches_consensus_on_a_ring() -> None:
    xs, mean, dev0, nodes = run_choco(lambda: TopK(ratio=0.25, error_feedback=False), gamma=0.3, rounds=300)
    assert all(type(x) is Released for x in xs)  # mixed models are still releasable
    dev = max(np.abs(x.flat() - mean).max() for x in xs)
    assert dev < 1e-6 * dev0  # six orders of magnitude
    np.testing.assert_allclose(np.mean([x.flat() for x in xs], axis=0), mean, atol=1e-12)  # mean kept
    # every neighbour's copy of x̂_j equals j's own copy
    for g in nodes:
        for j in g.neighbors:
            own = nodes[int(j[1:])].estimate(j)
            for a, b in zip(g.estimate(j), own):
                np.testing.assert_array_equal(a, b)


def test_choco_with_8bit_quantisation_converges() -> None:
    xs, mean, dev0, _ = run_choco(lambda: Quantize8(), gamma=0.5, rounds=150)
    dev = max(np.abs(x.flat() - mean).max() for x in xs)
    assert dev < 1e-4 * dev0


def test_choco_with_4bit_stochastic_quantisation_converges() -> None:
    xs, mean, dev0, _ = run_choco(lambda: Quantize8(bits=4, stochastic=True), gamma=0.5, rounds=200)
    dev = max(np.abs(x.flat() - mean).max() for x in xs)
    assert dev < 1e-3 * dev0


@SETTINGS
@given(st.sampled_from([4, 2, 1]), st.integers(0, 50), st.integers(0, 2**31 - 1))
def test_code_packing_round_trips(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == (n * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


def test_quantize_refuses_other_bit_widths() -> None:
    for bad in (3, 16, 0, True):
        with pytest.raises(CompressionError, match="bits"):
            Quantize8(bits=bad)


def test_innovation_gossip_guards() -> None:
    with pytest.raises(CompressionError, match="error memory"):
        InnovationGossip("a", {"b": 0.5}, TopK(k=2), gamma=0.5)
    with pytest.raises(CompressionError, match="error memory"):
        InnovationGossip("a", {"b": 0.5}, AdaComp(), gamma=0.5)
    with pytest.raises(CompressionError, match="gamma"):
        InnovationGossip("a", {"b": 0.5}, Identity(), gamma=0.0)
    with pytest.raises(CompressionError, match="sum to"):
        InnovationGossip("a", {"b": 0.7, "c": 0.7}, Identity(), gamma=0.5)
    g = InnovationGossip("a", {"b": 0.5}, Identity(), gamma=1.0)
    msg = g.make_message(released([np.ones(3)]))
    with pytest.raises(MalformedMessage, match="not a neighbour"):
        g.receive("z", msg)
    other = Identity().compress(released([np.ones(4)]))
    with pytest.raises(MalformedMessage, match="shapes"):
        g.receive("b", other)
    g.receive("b", Identity().compress(released([np.full(3, 3.0)])))
    out = g.consensus_step(released([np.ones(3)]))
    np.testing.assert_allclose(out.flat(), 1 + 0.5 * (3 - 1))  # x + γ w (x̂_b − x̂_a)


# -- factory ----------------------------------------------------------------------------------


def test_compressor_from_config() -> None:
    assert isinstance(compressor_from_config("topk", ratio=0.1), TopK)
    assert isinstance(compressor_from_config("Top-K", k=3), TopK)
    assert isinstance(compressor_from_config("scalecom", k=3, beta=0.1), CLTk)
    assert isinstance(compressor_from_config("q8", stochastic=True), Quantize8)
    assert isinstance(compressor_from_config("none"), Identity)
    assert isinstance(compressor_from_config("adacomp", bin_size=500), AdaComp)
    assert isinstance(compressor_from_config("randomk", k=2, seed=4), RandomK)
    with pytest.raises(ConfigError, match="unknown compressor 'zip'.*topk"):
        compressor_from_config("zip")
    with pytest.raises(ConfigError, match="does not take parameter.*ratios"):
        compressor_from_config("topk", ratios=0.1)
    with pytest.raises(ConfigError, match="exactly one of k or ratio"):
        compressor_from_config("topk")
    with pytest.raises(ConfigError, match="ratio must be in"):
        compressor_from_config("topk", ratio=1.5)
    with pytest.raises(ConfigError, match="bin_size"):
        compressor_from_config("adacomp", bin_size=0)
    with pytest.raises(ConfigError, match="beta"):
        compressor_from_config("cltk", k=2, beta=0)
