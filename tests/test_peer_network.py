"""GrpcPeerNetwork: ModelMessage <-> named tensors, real mTLS exchanges, refusals, ledger hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privfl.launch import free_ports
from privfl.peer_network import (
    AdvertisedPolicy,
    GrpcPeerNetwork,
    from_transport,
    policy_problem,
    to_transport,
)
from privfl.pki import NodeIdentity, Policy, init_consortium, load_pki
from privfl.strategies.base import ModelMessage
from privfl.strategies.gossip import AsyncGossip
from privfl.transport import DecodedMessage

NAMES = ["fc.weight", "fc.bias"]
GOOD = AdvertisedPolicy(noise_multiplier=1.0, target_epsilon=3.0, delta=1e-5)


def _params(v: float, shape: tuple[int, int] = (2, 3)) -> list[np.ndarray]:
    return [np.full(shape, v, dtype=np.float32), np.full(shape[0], v, dtype=np.float32)]


def test_conversion_round_trip_keeps_order_and_meta() -> None:
    msg = ModelMessage(sender="a", round=4, kind="exchange_request",
                       params=[np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], dtype=np.float32)],
                       meta={"lr": 0.5})
    t = to_transport(msg, NAMES, GOOD, sequence=11)
    assert list(t.tensors) == NAMES and t.sequence == 11 and t.round == 4
    assert t.scalars["policy_sigma"] == 1.0 and t.scalars["lr"] == 0.5
    dec = DecodedMessage(sender="a", recipient="b", sequence=11, round=4, kind=t.kind,
                         tensors=dict(reversed(list(t.tensors.items()))), scalars=dict(t.scalars),
                         digest=b"", in_reply_to=0, wire_bytes=0)
    back = from_transport(dec, NAMES)
    assert back.params is not None
    np.testing.assert_array_equal(back.params[0], msg.params[0])  # type: ignore[index]
    np.testing.assert_array_equal(back.params[1], msg.params[1])  # type: ignore[index]
    assert back.meta == {"lr": 0.5}  # the policy advertisement is not model metadata


def test_conversion_refuses_wrong_number_of_arrays() -> None:
    with pytest.raises(ValueError, match="3 arrays, the model has 2"):
        to_transport(ModelMessage("a", 0, "x", params=_params(1.0) + [np.zeros(1)]), NAMES)


def test_policy_problem() -> None:
    minimum = Policy(min_noise_multiplier=0.8, max_epsilon=3.0, delta=1e-5)
    assert policy_problem(GOOD.scalars(), minimum) is None
    assert "noise multiplier 0.5 < roster minimum 0.8" in str(
        policy_problem(AdvertisedPolicy(0.5, 3.0, 1e-5).scalars(), minimum))
    assert "target ε 8 > roster maximum 3" in str(policy_problem(AdvertisedPolicy(1.0, 8.0, 1e-5).scalars(), minimum))
    assert "missing" in str(policy_problem({}, minimum))
    assert policy_problem({}, Policy()) is None  # no consortium minimum: nothing to check


class _Cluster:
    """Three networks (a, b, c) over real mTLS on loopback; each serves an AsyncGossip."""

    def __init__(self, root: Path, shapes: dict[str, tuple[int, int]], policies: dict[str, AdvertisedPolicy]) -> None:
        ids = ["a", "b", "c"]
        ports = free_ports(3)
        init_consortium("pn", ids, root, addresses={n: f"127.0.0.1:{p}" for n, p in zip(ids, ports)},
                        policy=Policy(min_noise_multiplier=0.8, max_epsilon=3.0))
        ca, roster, crl = load_pki(root)
        self.released: dict[str, list[tuple[Any, ...]]] = {n: [] for n in ids}
        self.nets: dict[str, GrpcPeerNetwork] = {}
        self.strats: dict[str, AsyncGossip] = {}
        for n, v in zip(ids, (1.0, 3.0, 5.0)):
            ident = NodeIdentity.load(root / n)
            params = _params(v, shapes.get(n, (2, 3)))
            net = GrpcPeerNetwork(ident, roster, crl, [m for m in ids if m != n], NAMES, params,
                                  policy=policies.get(n, GOOD), timeout=5.0,
                                  on_release=lambda *a, n=n: self.released[n].append(a))
            strat = AsyncGossip(None, net, params, {"local_steps": 1})  # type: ignore[arg-type]
            net.attach(strat)
            net.start()
            self.nets[n], self.strats[n] = net, strat

    def close(self) -> None:
        for net in self.nets.values():
            net.close()


@pytest.fixture()
def cluster(tmp_path: Path, request: pytest.FixtureRequest):
    shapes, policies = getattr(request, "param", ({}, {}))
    c = _Cluster(tmp_path / "pki", shapes, policies)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_exchange_averages_over_mtls_and_records_releases(cluster: _Cluster) -> None:
    a, b = cluster.strats["a"], cluster.strats["b"]
    sent, received, ok = a._exchange_with("b")
    assert ok and sent == received == 4 * 8
    for s in (a, b):  # both now hold (1 + 3) / 2
        np.testing.assert_allclose(s.params[0], 2.0)
        np.testing.assert_allclose(s.params[1], 2.0)
    (peer, seq, rnd, digest, nbytes), = cluster.released["a"]
    assert peer == "b" and nbytes == 32 and len(digest) == 64 and seq > 0
    (peer_b, seq_b, _r, digest_b, _n), = cluster.released["b"]
    assert peer_b == "a" and seq_b == seq and digest_b != digest  # b's reply: its pre-average model
    assert cluster.nets["a"].counters.total().bytes_sent > 32
    with b._lock:  # b busy (try-lock): a's request is refused, which is no policy violation
        assert not a._exchange_with("b")[2]
    assert not any(net.refused_policy for net in cluster.nets.values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cluster", [({"c": (3, 2)}, {})], indirect=True)
def test_wrong_shapes_are_refused(cluster: _Cluster) -> None:
    c, b = cluster.strats["c"], cluster.strats["b"]
    before = [p.copy() for p in b.params]
    assert cluster.nets["c"].exchange("b", ModelMessage("c", 0, "exchange_request", params=c.params)) is None
    for p, q in zip(b.params, before):  # b refused the request before touching its model
        np.testing.assert_array_equal(p, q)
    # and b refuses c's reply shape when b is the one asking
    assert cluster.nets["b"].exchange("c", ModelMessage("b", 0, "exchange_request", params=b.params)) is None
    for p, q in zip(b.params, before):
        np.testing.assert_array_equal(p, q)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cluster", [({}, {"c": AdvertisedPolicy(0.5, 3.0, 1e-5)})], indirect=True)
def test_peer_with_weaker_advertised_policy_is_refused(cluster: _Cluster) -> None:
    b, c = cluster.strats["b"], cluster.strats["c"]
    before = [p.copy() for p in b.params]
    assert cluster.nets["c"].exchange("b", ModelMessage("c", 0, "exchange_request", params=c.params)) is None
    assert "c" in cluster.nets["b"].refused_policy
    for p, q in zip(b.params, before):
        np.testing.assert_array_equal(p, q)
    # b asking c: c answers, but b refuses the weaker peer's model
    assert cluster.nets["b"].exchange("c", ModelMessage("b", 0, "exchange_request", params=b.params)) is None
    # a and b (both compliant) still gossip
    assert cluster.strats["a"]._exchange_with("b")[2]


@pytest.mark.timeout(60)
def test_send_receive_and_control(cluster: _Cluster) -> None:
    a, b = cluster.nets["a"], cluster.nets["b"]
    assert a.send("b", ModelMessage("a", 7, "model", params=_params(9.0)))
    got = b.receive(7, ["a", "c"], timeout=0.5)  # c never sends: bounded wait
    assert list(got) == ["a"]
    np.testing.assert_allclose(got["a"].params[0], 9.0)  # type: ignore[index]
    assert a.notify("done") == {"b", "c"}
    assert b.heard("done") == {"a"}
    cluster.nets["c"].close()
    assert a.notify("bye") == {"b"}  # an unreachable peer is skipped, not waited on


@pytest.mark.timeout(60)
def test_value_bounds_refuse_nan_and_what_exceeds_them(cluster: _Cluster) -> None:
    """NaN compares False with every bound, so it is named, not let through (the transport's own
    finiteness check refuses it before this; the bounds hold on their own too)."""
    net = cluster.nets["a"]
    assert net.values_problem(_params(1.0)) is None
    nan = _params(1.0)
    nan[1][0] = np.nan
    assert net.values_problem(nan) == "a value is not a number"
    assert "exceeds max_abs_value" in str(net.values_problem(_params(2e6)))
    assert "L2 norm" in str(net.values_problem(_params(5e4)))
