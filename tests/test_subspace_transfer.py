"""Subspace DP-SGD on the wire: framed k-value messages, FedAvg both directions, the mask counter on restart.

A subspace message carries only the k values of the round's public mask; the indices are
derived at both ends. Checked: the frame is the 20-byte header plus 4k bytes (or the 4-bit
codes), it rebuilds only against the round's mask; FedAvg uploads and broadcasts exactly
those k values and ends at the same global model as whole-model FedAvg (bit-identical at
clients and server); coordinates a client moved off the mask never leave it; and the DP
optimizer's mask counter survives its state dict (a restarted node derives the same masks).
"""

from __future__ import annotations

from typing import Any

import flwr
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfl.accounting.subspace import subspace_indices, subspace_k
from privfl.clients.engine import PrivacyEngine
from privfl.clients.subspace import STEPS_KEY, SubspaceDPOptimizer
from privfl.errors import ConfigError
from privfl.strategies.compression import Compressed, MalformedMessage, decompress, released
from privfl.strategies.compression.message import FRAME_HEADER_BYTES
from privfl.strategies.compression.subspace import SubspaceK
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging
from privfl.strategies.subspace_transfer import SubspaceModelTracker

pytestmark = pytest.mark.timeout(60)

SHAPES = ((20, 30), (30,), (30, 10), (10,))
D = 20 * 30 + 30 + 300 + 10
FRACTION, SEED = 0.1, 5
#: a coordinate on none of rounds 0-2's masks (where the leaky client below moves)
OFF = int(np.setdiff1d(np.arange(D), np.concatenate([subspace_indices(SEED, r, D, FRACTION) for r in range(3)]))[0])


def _unflat(flat: np.ndarray) -> list[np.ndarray]:
    out, start = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(flat[start:start + n].reshape(s).astype(np.float32))
        start += n
    return out


def test_a_subspace_frame_is_the_header_plus_the_k_values_and_rebuilds_only_on_its_rounds_mask() -> None:
    x = np.random.default_rng(0).normal(size=D)
    k = subspace_k(D, FRACTION)
    for bits, payload in ((None, 4 * k), (4, (4 * k + 7) // 8 + 8 * len(SHAPES))):
        comp = SubspaceK(fraction=FRACTION, public_seed=SEED, bits=bits)
        msgs = [comp.compress(released(_unflat(x), "dp-sgd model")) for _ in range(2)]
        for r, msg in enumerate(msgs):
            frame = msg.to_bytes()
            assert len(frame) == FRAME_HEADER_BYTES + payload == FRAME_HEADER_BYTES + msg.nbytes
            back = comp.expand(Compressed.from_bytes(frame, comp.frame_shapes(r, SHAPES)), r, SHAPES)
            idx = subspace_indices(SEED, r, D, FRACTION)
            assert np.array_equal(back.indices, idx)  # the receiver's own derived indices
            got = np.concatenate([a.ravel() for a in decompress(back)])
            off = np.setdiff1d(np.arange(D), idx)
            assert np.all(got[off] == 0.0)
            tol = 1e-6 if bits is None else (x[idx].max() - x[idx].min()) / 15
            assert np.max(np.abs(got[idx] - x[idx])) <= tol
        # the model's own shapes refuse a values-only frame (it is read with the round's mask:
        # the frame does not carry the round, the message around it does), and so does a
        # message over other per-tensor counts
        with pytest.raises(MalformedMessage):
            Compressed.from_bytes(msgs[0].to_bytes(), SHAPES)
        assert comp.frame_shapes(0, SHAPES) != comp.frame_shapes(1, SHAPES)
        with pytest.raises(MalformedMessage, match="shared mask"):
            comp.expand(msgs[0], 1, SHAPES)


class MaskClient(flwr.client.NumPyClient):
    """Adds a fixed change on the round's public mask (as a subspace DP-SGD round does), plus ``leak`` off it."""

    def __init__(self, rng: np.random.Generator, n: int, leak: float = 0.0) -> None:
        self.rng, self.n, self.leak = rng, n, leak

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.zeros(s, np.float32) for s in SHAPES]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        change = np.zeros(D)
        idx = subspace_indices(SEED, int(config["server_round"]) - 1, D, FRACTION)
        change[idx] = self.rng.normal(size=len(idx))
        if self.leak:
            change[OFF] += self.leak
        return [p + c for p, c in zip(parameters, _unflat(change))], self.n, {"steps": 1}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        return 0.0, self.n, {}


def _fedavg(upload: str, leak: float = 0.0, bits: int | None = None, rounds: int = 3, downlink: str = "subspace",
            replace_at: int | None = None) -> tuple[Any, list[Any]]:
    """FedAvg over three MaskClients; ``replace_at``: from that round on, client "b" is a new object (a
    restarted client, with its own fresh endpoint and receiver)."""
    clients = {name: MaskClient(np.random.default_rng(i), n=i + 1, leak=leak if i == 0 else 0.0)
               for i, name in enumerate(("a", "b", "c"))}
    params: dict[str, Any] = {}
    if upload == "update":
        sub = {"fraction": FRACTION, "public_seed": SEED, **({} if bits is None else {"bits": bits})}
        params = {"compressor": "subspace", "compression_params": sub, "downlink_compressor": downlink,
                  **({"downlink_params": sub} if downlink == "subspace" else {})}
    strat = FederatedAveraging(FedAvgConfig(local_steps=1, min_fit_clients=3, min_available_clients=3,
                                            evaluate=False, upload=upload, **params))
    init = [np.zeros(s, np.float32) for s in SHAPES]
    out = []
    for r in range(1, rounds + 1):
        if r == replace_at:
            clients["b"] = MaskClient(np.random.default_rng(11), n=2)
        out.append(strat.run_round(clients, {k: init for k in clients}, round=r))
    return strat, out


def _same_models(one: list[Any], two: list[Any]) -> None:
    for w, s in zip(one, two):
        for node in ("a", "b", "c"):
            for a, b in zip(w.params[node], s.params[node]):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_fedavg_subspace_uploads_with_an_ordinary_downlink_land_on_the_servers_round() -> None:
    """k-value uploads with whole-model changes coming down (``downlink_compressor = "exact"``): the server
    declares the version it sends, so every client frames round v's upload on round v's mask (without it
    a client stayed on round 0's mask and the server put its values on another round's coordinates)."""
    _, whole = _fedavg("model")
    strat, sub = _fedavg("update", downlink="exact")
    _same_models(whole, sub)
    assert all(ep.receiver.version == 2 for ep in strat._endpoints.values())


def test_a_replaced_client_gets_the_whole_model_and_the_servers_version() -> None:
    """A client object replaced mid-run (fresh endpoint and receiver) is sent the whole model of the current
    version and uploads on that round's mask: the run equals the whole-model run with the same replacement."""
    _, whole = _fedavg("model", replace_at=3)
    strat, sub = _fedavg("update", replace_at=3)
    _same_models(whole, sub)
    assert sub[2].bytes_down["b"] == 4 * D and all(ep.receiver.version == 2 for ep in strat._endpoints.values())


def test_a_receiver_refuses_a_change_that_does_not_lead_from_its_version_to_the_declared_one() -> None:
    from privfl.strategies.subspace_transfer import SubspaceReceiver
    from privfl.strategies.update_transfer import frame_parameters

    sub = SubspaceK(fraction=FRACTION, public_seed=SEED)
    init = [np.zeros(s, np.float32) for s in SHAPES]
    tracker = SubspaceModelTracker(init, SubspaceK(fraction=FRACTION, public_seed=SEED),
                                   SubspaceK(fraction=FRACTION, public_seed=SEED))
    rx = SubspaceReceiver(sub, SubspaceK(fraction=FRACTION, public_seed=SEED))
    rx.receive(tracker.downlink("a"), version=0)
    for _ in range(2):
        tracker.advance([a + 1 for a in tracker.model])
    with pytest.raises(ValueError, match="holds global version 0.*version 2"):
        rx.receive(tracker._last_change, version=2)  # the change 1 -> 2, to a client holding version 0
    assert rx.receive(frame_parameters(Compressed("sparse", SHAPES)), version=0)  # nothing changed: fine
    with pytest.raises(ValueError, match="must declare its model version"):
        SubspaceReceiver(sub).receive(tracker.downlink("b"))


def test_fedavg_sends_only_the_k_values_of_the_rounds_mask_both_ways_and_matches_whole_models() -> None:
    k = subspace_k(D, FRACTION)
    _, whole = _fedavg("model")
    strat, sub = _fedavg("update")
    assert isinstance(strat.tracker, SubspaceModelTracker)
    for r, (w, s) in enumerate(zip(whole, sub)):
        for node in ("a", "b", "c"):
            for a, b in zip(w.params[node], s.params[node]):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)  # the same global model
            assert w.bytes_up[node] == 4 * D
            assert s.bytes_up[node] == FRAME_HEADER_BYTES + 4 * k  # k float32 values, no indices
            assert s.bytes_down[node] == (4 * D if r == 0 else FRAME_HEADER_BYTES + 4 * k)
    # every client rebuilt exactly the server's model of the version it was sent (round 3 got version 2)
    for ep in strat._endpoints.values():
        for held, glob in zip(ep.receiver.held, sub[1].params["a"]):
            assert held.tobytes() == glob.tobytes()
        assert ep.receiver.version == 2


def test_fedavg_subspace_drops_what_a_client_moved_off_the_mask_and_quantises_at_four_bits() -> None:
    _, leaky = _fedavg("update", leak=5.0, rounds=2)
    flat = [np.concatenate([a.ravel() for a in out.params["b"]]) for out in leaky]
    assert all(f[OFF] == 0.0 for f in flat)  # what client a moved off the mask never left it
    k = subspace_k(D, FRACTION)
    strat, four = _fedavg("update", bits=4, rounds=2)
    segments = strat.tracker._up.frame_shapes(1, SHAPES)
    assert sum(s[0] for s in segments) == k and len(segments) == len(SHAPES)
    assert four[1].bytes_up["a"] == FRAME_HEADER_BYTES + (4 * k + 7) // 8 + 8 * len(SHAPES)
    assert four[1].bytes_down["a"] == FRAME_HEADER_BYTES + (4 * k + 7) // 8 + 8 * len(SHAPES)
    _, whole = _fedavg("model", rounds=2)
    # 4-bit values: the same model up to the quantisation step (values are N(0, 1): step < 0.6 up, then down)
    assert np.max(np.abs(np.concatenate([a.ravel() for a in four[1].params["a"]])
                         - np.concatenate([a.ravel() for a in whole[1].params["a"]]))) < 1.0


def test_fedavg_subspace_settings_are_refused_naming_the_field() -> None:
    sub = {"fraction": 0.1, "public_seed": 1}
    with pytest.raises(ConfigError, match=r"fedavg\.fraction_fit"):
        FedAvgConfig(upload="update", compressor="subspace", compression_params=sub, fraction_fit=0.5).validate()
    with pytest.raises(ConfigError, match=r"fedavg\.downlink_compressor"):
        FedAvgConfig(upload="update", downlink_compressor="subspace", downlink_params=sub).validate()
    with pytest.raises(ConfigError, match=r"fedavg\.compression_params\.local_steps"):
        FedAvgConfig(upload="update", compressor="subspace", compression_params=sub, local_steps=3).validate()
    FedAvgConfig(upload="update", compressor="subspace", compression_params={**sub, "local_steps": 3},
                 local_steps=3).validate()


def test_the_mask_counter_survives_the_optimizer_state_dict() -> None:
    def make() -> tuple[nn.Module, SubspaceDPOptimizer]:
        torch.manual_seed(0)
        m = nn.Linear(8, 3)
        dm, opt, _ = PrivacyEngine(seed=0).make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(10, 8), torch.zeros(10, dtype=torch.long))),
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, engine="opacus", mechanism="subspace",
            mechanism_params={"fraction": 0.2, "seed": 3, "period": 2})
        assert isinstance(opt, SubspaceDPOptimizer)
        return dm, opt

    _, before = make()
    before.steps_taken = 7
    state = before.state_dict()
    assert state[STEPS_KEY] == 7
    _, after = make()
    after.load_state_dict(state)
    assert after.steps_taken == 7 and after.mask_index == 3
    assert np.array_equal(after.flat_indices(), before.flat_indices())


class _Gossiping:
    """Stands for a node's sync_gossip strategy: the transport asks it for a round's frame shapes
    (``NodeStrategy.frame_shapes``), which sync gossip answers from its subspace gossip."""

    def __init__(self, innovation: Any) -> None:
        self.innovation = innovation

    def frame_shapes(self, round: int, shapes: Any) -> Any:
        return tuple(self.innovation.frame_shapes(round, shapes))


@pytest.mark.timeout(60)
def test_a_subspace_frame_travels_between_real_nodes_and_is_rebuilt_on_the_rounds_mask(tmp_path: Any) -> None:
    from privfl.strategies.base import ModelMessage
    from privfl.strategies.compression.subspace import SubspaceGossip
    from tests.test_compressed_transport import SHAPES as NET_SHAPES
    from tests.test_compressed_transport import _Pair

    d = sum(int(np.prod(s)) for s in NET_SHAPES)
    comp = SubspaceK(fraction=0.05, public_seed=SEED, bits=4)
    comp.rounds = 2
    x = np.random.default_rng(3).normal(size=d)
    arrays = [x[:NET_SHAPES[0][0] * NET_SHAPES[0][1]].reshape(NET_SHAPES[0]), x[-NET_SHAPES[1][0]:]]
    payload = comp.compress(released(arrays, "test: stands for a DP-noised model"))
    pair = _Pair(tmp_path / "pki")
    try:
        a, b = pair.nets["a"], pair.nets["b"]
        assert b.strategy is None  # no subspace strategy: a values-only frame does not fit the model's shapes
        assert a.send("b", ModelMessage("a", 2, "innovation", payload=payload))
        assert b.receive(2, ["a"], timeout=1.0) == {}
        b.strategy = _Gossiping(SubspaceGossip("b", {"a": 0.5}, SubspaceK(fraction=0.05, public_seed=SEED, bits=4),
                                               gamma=1.0))
        assert a.send("b", ModelMessage("a", 2, "innovation", payload=payload))
        got = b.receive(2, ["a"], timeout=5.0)["a"].payload
        assert got.to_bytes() == payload.to_bytes()
        full = comp.expand(got, 2, tuple(NET_SHAPES))
        assert np.array_equal(full.indices, subspace_indices(SEED, 2, d, 0.05))
        (_, _, rnd, _, nbytes), = [r for r in pair.released["a"] if r[2] == 2][-1:]
        assert nbytes == FRAME_HEADER_BYTES + (4 * subspace_k(d, 0.05) + 7) // 8 + 8 * len(NET_SHAPES)
    finally:
        pair.close()
