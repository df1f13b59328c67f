"""Model changes on the wire: message framing, the lossless sparse encoder, FedAvg with upload = "update"."""

from __future__ import annotations

import flwr
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.clients import DPClient, DPConfig
from privfl.errors import ConfigError
from privfl.models import build_model
from privfl.strategies.compression import (
    AdaComp,
    Compressed,
    Exact,
    Identity,
    MalformedMessage,
    Quantize8,
    RandomK,
    TopK,
    decompress,
    released,
)
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging
from privfl.strategies.update_transfer import (
    COMPRESSED_TENSOR_TYPE,
    GlobalModelTracker,
    UpdateReceiver,
    frame_parameters,
    parameters_nbytes,
)

pytestmark = pytest.mark.timeout(120)

SHAPES = ((3, 4), (5,), (2, 1, 3))


def _arrays(rng: np.random.Generator, sparsity: float = 0.0) -> list[np.ndarray]:
    out = []
    for s in SHAPES:
        a = rng.standard_normal(s)
        a[rng.random(s) < sparsity] = 0.0
        out.append(a)
    return out


# ---- framing ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 1.0))
def test_every_kind_round_trips_exactly_through_bytes(seed: int, sparsity: float) -> None:
    rng = np.random.default_rng(seed)
    x = released(_arrays(rng, sparsity))
    for comp in (Identity(), Exact(), TopK(k=4), RandomK(k=3, seed=seed), Quantize8(), AdaComp(bin_size=4)):
        msg = comp.compress(x)
        data = msg.to_bytes()
        assert len(data) == msg.nbytes + 20  # payload plus the fixed header, nothing else
        back = Compressed.from_bytes(data, SHAPES)
        assert back.kind == msg.kind
        for a, b in zip(decompress(msg), decompress(back)):
            assert a.tobytes() == b.tobytes()


def test_malformed_frames_are_refused_before_decoding() -> None:
    msg = TopK(k=5).compress(released(_arrays(np.random.default_rng(0))))
    good = msg.to_bytes()
    with pytest.raises(MalformedMessage, match="header"):
        Compressed.from_bytes(good[:10], SHAPES)
    with pytest.raises(MalformedMessage, match="announces"):
        Compressed.from_bytes(good[:-1], SHAPES)
    bad_kind = bytearray(good)
    bad_kind[1] = 9
    with pytest.raises(MalformedMessage, match="kind"):
        Compressed.from_bytes(bytes(bad_kind), SHAPES)
    huge = bytearray(good)
    huge[4:8] = (10**6).to_bytes(4, "little")  # more indices than the model has elements
    with pytest.raises(MalformedMessage, match="exceed"):
        Compressed.from_bytes(bytes(huge), SHAPES)
    unsorted = bytearray(good)
    unsorted[20:24], unsorted[24:28] = good[24:28], good[20:24]  # swap the first two indices
    with pytest.raises(MalformedMessage, match="increasing"):
        Compressed.from_bytes(bytes(unsorted), SHAPES)
    nan = bytearray(good)
    nan[20 + 4 * 5: 20 + 4 * 5 + 4] = np.array([np.nan], "<f4").tobytes()  # first value
    with pytest.raises(MalformedMessage, match="non-finite"):
        Compressed.from_bytes(bytes(nan), SHAPES)
    with pytest.raises(MalformedMessage):  # the right bytes for another model are refused too
        Compressed.from_bytes(good, ((2,),))


# ---- the lossless encoder -------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 1.0))
def test_exact_is_lossless_and_never_larger_than_dense(seed: int, sparsity: float) -> None:
    x = released(_arrays(np.random.default_rng(seed), sparsity))
    msg = Exact().compress(x)
    flat32 = x.flat().astype(np.float32)
    assert np.concatenate([a.ravel() for a in decompress(msg)]).tobytes() == flat32.tobytes()
    nnz = int(np.count_nonzero(flat32))
    assert msg.nbytes == min(8 * nnz, 4 * flat32.size) or (msg.kind == "dense" and 8 * nnz == 4 * flat32.size)
    assert msg.nbytes <= 4 * flat32.size


def test_exact_refuses_raw_arrays() -> None:
    with pytest.raises(TypeError, match="Released"):
        Exact().compress([np.zeros(3)])  # type: ignore[arg-type]


# ---- server/client model tracking --------------------------------------------------------------
def test_tracker_and_receiver_hold_bit_identical_models() -> None:
    rng = np.random.default_rng(1)
    init = [a.astype(np.float32) for a in _arrays(rng)]
    tracker = GlobalModelTracker(init)
    a, late = UpdateReceiver(Exact()), UpdateReceiver(Exact())
    first = tracker.downlink("a")
    assert first.tensor_type != COMPRESSED_TENSOR_TYPE  # nothing held yet: the whole model
    a.receive(first)
    late.receive(tracker.downlink("late"))
    for _ in range(3):
        agg = [m + rng.standard_normal(m.shape).astype(np.float32) * (rng.random(m.shape) < 0.2)
               for m in tracker.model]
        tracker.advance(agg)
        msg = tracker.downlink("a")
        assert msg.tensor_type == COMPRESSED_TENSOR_TYPE
        assert parameters_nbytes(msg) < sum(m.nbytes for m in init)
        held = a.receive(msg)
        for h, m in zip(held, tracker.model):
            assert h.dtype == np.float32 and h.tobytes() == m.tobytes()
    # "late" missed three versions: it gets the whole model again, and nothing is lost
    whole = tracker.downlink("late")
    assert whole.tensor_type != COMPRESSED_TENSOR_TYPE
    for h, m in zip(late.receive(whole), tracker.model):
        assert h.tobytes() == m.tobytes()
    # holding the current version: an empty change (header only)
    assert parameters_nbytes(tracker.downlink("a")) == 20
    with pytest.raises(ValueError, match="holds no model"):
        UpdateReceiver(Exact()).receive(frame_parameters(Exact().compress(released(init))))


# ---- FedAvg with update transfer -------------------------------------------------------------
class SparseStepClient(flwr.client.NumPyClient):
    """Adds a fixed change at a few coordinates to whatever model it is sent."""

    def __init__(self, change: list[np.ndarray], n: int) -> None:
        self.change, self.n = change, n

    def get_parameters(self, config):
        return [np.zeros_like(c) for c in self.change]

    def fit(self, parameters, config):
        return [p + c for p, c in zip(parameters, self.change)], self.n, {"steps": 1}

    def evaluate(self, parameters, config):
        return 0.0, self.n, {"accuracy": 0.0}


def _sparse_clients(rng: np.random.Generator, d: int = 1000, nnz: int = 10) -> dict[str, SparseStepClient]:
    out = {}
    for i, name in enumerate(("a", "b", "c")):
        c = np.zeros(d, np.float32)
        c[rng.choice(d, nnz, replace=False)] = rng.standard_normal(nnz)
        out[name] = SparseStepClient([c.reshape(10, 100)], n=i + 1)
    return out


def test_fedavg_update_transfer_matches_whole_models_with_far_fewer_bytes() -> None:
    clients = _sparse_clients(np.random.default_rng(2))
    init = [np.zeros((10, 100), np.float32)]
    runs = {}
    for upload in ("model", "update"):
        strat = FederatedAveraging(FedAvgConfig(local_steps=1, min_fit_clients=3, min_available_clients=3,
                                                evaluate=False, upload=upload))
        outs = [strat.run_round(clients, {k: init for k in clients}, round=r) for r in (1, 2, 3)]
        runs[upload] = outs
    for whole, changed in zip(runs["model"], runs["update"]):
        for node in clients:
            np.testing.assert_allclose(changed.params[node][0], whole.params[node][0], rtol=1e-6, atol=1e-6)
            assert whole.bytes_up[node] == 4000
            assert changed.bytes_up[node] == 20 + 8 * 10  # ten changed coordinates, index + value each
    first, later = runs["update"][0], runs["update"][1]
    for node in clients:
        assert first.bytes_down[node] == 4000  # round 1: nobody holds a model yet
        # later rounds: the global change, the union of three 10-coordinate supports at most
        assert 20 + 8 * 10 <= later.bytes_down[node] <= 20 + 8 * 30


def test_fedavg_topagg_uploads_only_the_coordinates_its_votes_kept(sites) -> None:
    s = sites[0]
    cfg = DPConfig(noise_multiplier=1.0, batch_size=32, sample_rate=0.2, lr=0.05, target_epsilon=50.0,
                   mechanism="topagg", mechanism_params={"k": 3, "threshold": 0.1})
    clients = {f"h{i}": DPClient(build_model("logreg", s.train.x.shape[1:], 2, seed=0),
                                 (site.train.x, site.train.y), (site.test.x, site.test.y), cfg, seed=i)
               for i, site in enumerate(sites)}
    init = clients["h0"].get_parameters({})
    d = sum(a.size for a in init)
    strat = FederatedAveraging(FedAvgConfig(local_steps=1, min_fit_clients=len(clients),
                                            min_available_clients=len(clients), evaluate=False, upload="update"))
    before = [a.copy() for a in init]
    out = strat.run_round(clients, {k: init for k in clients}, round=1)
    for node, client in clients.items():
        step = client.optimizer.last_update_flat()[0]  # the TopAgg survivors of the one local step
        assert 0 < len(step) < d
        assert out.bytes_up[node] == 20 + 8 * len(step) < 4 * d
    # the aggregate is Flower's weighted mean of the rebuilt models
    assert any(not np.array_equal(a, b) for a, b in zip(out.params["h0"], before))


def test_fedavg_upload_settings_are_validated_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="fedavg.upload"):
        FedAvgConfig(upload="diff").validate()
    with pytest.raises(ConfigError, match="fedavg.compressor.*upload"):
        FedAvgConfig(compressor="topk", compression_params={"ratio": 0.1}).validate()
    with pytest.raises(ConfigError, match="fedavg.compressor.*unknown"):
        FedAvgConfig(upload="update", compressor="zip").validate()
    with pytest.raises(ConfigError, match="fedavg.compressor.*cltk"):
        FedAvgConfig(upload="update", compressor="cltk", compression_params={"ratio": 0.1}).validate()
    with pytest.raises(ConfigError, match="fedavg.compressor.*ratio"):
        FedAvgConfig(upload="update", compressor="topk", compression_params={"ratio": 2.0}).validate()
    FedAvgConfig(upload="update", compressor="topk", compression_params={"ratio": 0.1}).validate()


def test_lossy_downlink_keeps_clients_and_server_identical_and_sends_the_rest_later() -> None:
    rng = np.random.default_rng(3)
    init = [np.zeros(200, np.float32)]
    tracker = GlobalModelTracker(init, TopK(k=5, error_feedback=True))
    client = UpdateReceiver(Exact())
    client.receive(tracker.downlink("a"))
    target = rng.standard_normal(200).astype(np.float32)
    tracker.advance([target])  # one big change, then none: error feedback must deliver all of it
    for _ in range(60):
        msg = tracker.downlink("a")
        assert parameters_nbytes(msg) == 20 + 8 * 5
        held = client.receive(msg)
        assert held[0].tobytes() == tracker.model[0].tobytes()
        tracker.advance([tracker.model[0]])  # the aggregate equals the global model: no new change
    np.testing.assert_allclose(tracker.model[0], target, atol=1e-6)


def test_downlink_compressor_needs_update_transfer() -> None:
    with pytest.raises(ConfigError, match="fedavg.downlink_compressor"):
        FedAvgConfig(downlink_compressor="quantize8").validate()
    with pytest.raises(ConfigError, match="fedavg.downlink_compressor.*unknown"):
        FedAvgConfig(upload="update", downlink_compressor="gzip").validate()
