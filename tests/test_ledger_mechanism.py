"""privfl-ledger/2: the header's randomness kind and preprocessing, dp_events that carry the
whole mechanism (purpose, sensitivity, local mechanism and its parameters), training-only
step counts, and privfl-ledger/1 ledgers that still verify."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from privfl.accounting import PrivacyAccountant
from privfl.accounting.ledger import (
    GENESIS_HASH,
    LEDGER_FORMAT,
    DpEventKey,
    Ledger,
    LedgerError,
    LedgerPolicy,
    canonical_bytes,
    entry_hash,
    read_ledger,
    sign_bytes,
)
from tests.test_ledger import POLICY, make_pki

pytestmark = pytest.mark.timeout(60)

PREP = {"kind": "dp_standardize", "features": 30, "clip": [-4.0, 4.0], "epsilon": 0.1}


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return make_pki(("h1", "h2"))


def create(path: Path, pki: dict[str, Any], randomness: str = "secure", policy: LedgerPolicy = POLICY,
           **kw: Any) -> Ledger:
    key, cert = pki["nodes"]["h1"]
    return Ledger.create(path, key, cert, policy, "privfl-test", randomness=randomness, **kw)


def write_v1_ledger(path: Path, key: Any, cert_pem: str, events: list[tuple[float, float, int]],
                    policy: LedgerPolicy = POLICY, node_id: str = "h1") -> Path:
    """A privfl-ledger/1 ledger as the previous software wrote it (no randomness, no purpose)."""
    acc = PrivacyAccountant(policy.accountant)  # type: ignore[arg-type]
    bodies: list[tuple[str, dict[str, Any]]] = [("header", {
        "format": "privfl-ledger/1", "node_id": node_id, "certificate": cert_pem,
        "policy": policy.to_dict(), "software_version": "privfl 0.old"})]
    for s, q, n in events:
        acc.step(s, q, n)
        bodies.append(("dp_event", {
            "mechanism": "poisson_gaussian", "noise_multiplier": s, "sample_rate": q, "steps": n,
            "clipping_rule": "psac", "clipping_norm": 1.0, "neighbouring_relation": "add_or_remove_one",
            "accountant": policy.accountant, "delta": policy.delta,
            "epsilon": acc.get_epsilon(policy.delta)}))
    prev, out = GENESIS_HASH, b""
    for i, (kind, body) in enumerate(bodies):
        entry: dict[str, Any] = {"body": body, "index": i, "kind": kind, "prev_hash": prev,
                                 "timestamp": round(time.time(), 6)}
        entry["signature"] = sign_bytes(key, canonical_bytes(entry))
        line = canonical_bytes(entry)
        prev = entry_hash(line)
        out += line + b"\n"
    path.write_bytes(out)
    return path


# --------------------------------------------------------------------------- header


def test_header_records_randomness_and_preprocessing(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "l.jsonl"
    key, _ = pki["nodes"]["h1"]
    with create(path, pki, "seeded", preprocessing=PREP) as led:
        assert led.randomness == "seeded" and led.preprocessing == PREP
        assert led.format == LEDGER_FORMAT == "privfl-ledger/2"
    head = json.loads(path.read_bytes().split(b"\n")[0])["body"]
    assert head["format"] == "privfl-ledger/2"
    assert head["randomness"] == "seeded" and head["preprocessing"] == PREP
    assert read_ledger(path).ok
    with Ledger.open(path, key) as led:  # round trip through the verifier
        assert led.randomness == "seeded" and led.preprocessing == PREP
    # no description: stored as {"kind": "none"}
    with create(tmp_path / "n.jsonl", pki) as led:
        assert led.randomness == "secure" and led.preprocessing == {"kind": "none"}
    head = json.loads((tmp_path / "n.jsonl").read_bytes().split(b"\n")[0])["body"]
    assert head["preprocessing"] == {"kind": "none"}


@pytest.mark.parametrize("bad", ["Secure", "os", "", None, 1])
def test_unknown_randomness_kind_is_refused(tmp_path: Path, pki: dict[str, Any], bad: Any) -> None:
    path = tmp_path / "l.jsonl"
    with pytest.raises(ValueError, match="randomness"):
        create(path, pki, bad)
    key, cert = pki["nodes"]["h1"]
    with pytest.raises(ValueError, match="randomness"):
        Ledger.open_or_create(path, key, cert, POLICY, "v", randomness=bad)
    assert not path.exists()


def test_randomness_is_a_required_keyword(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    with pytest.raises(TypeError, match="randomness"):
        Ledger.create(tmp_path / "l.jsonl", key, cert, POLICY, "v")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="randomness"):
        Ledger.open_or_create(tmp_path / "l.jsonl", key, cert, POLICY, "v")  # type: ignore[call-arg]
    assert not (tmp_path / "l.jsonl").exists()


@pytest.mark.parametrize("bad", [{"kind": "x", "mean": math.nan}, {1: "x"}, {"kind": object()}, ["kind"]])
def test_preprocessing_must_be_json_safe(tmp_path: Path, pki: dict[str, Any], bad: Any) -> None:
    with pytest.raises(ValueError, match="preprocessing"):
        create(tmp_path / "l.jsonl", pki, preprocessing=bad)
    assert not (tmp_path / "l.jsonl").exists()


def test_tampered_header_randomness_breaks_the_signature(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "l.jsonl"
    create(path, pki, "seeded").close()
    lines = path.read_bytes().split(b"\n")
    assert b'"randomness":"seeded"' in lines[0]
    lines[0] = lines[0].replace(b'"randomness":"seeded"', b'"randomness":"secure"')
    path.write_bytes(b"\n".join(lines))
    res = read_ledger(path)
    assert res.error is not None and res.error.index == 0 and res.error.kind == "modified"


def test_header_with_unknown_randomness_is_a_bad_header(tmp_path: Path, pki: dict[str, Any]) -> None:
    """Even correctly signed (by the node key), a v2 header must name a known kind."""
    key, cert = pki["nodes"]["h1"]
    entry: dict[str, Any] = {"body": {"format": "privfl-ledger/2", "node_id": "h1", "certificate": cert,
                                      "policy": POLICY.to_dict(), "software_version": "v",
                                      "randomness": "mostly_secure", "preprocessing": {"kind": "none"}},
                             "index": 0, "kind": "header", "prev_hash": GENESIS_HASH, "timestamp": 1.0}
    entry["signature"] = sign_bytes(key, canonical_bytes(entry))
    path = tmp_path / "l.jsonl"
    path.write_bytes(canonical_bytes(entry) + b"\n")
    res = read_ledger(path)
    assert res.error is not None and res.error.kind == "bad_header" and "randomness" in res.error.reason


def test_open_or_create_refuses_changed_randomness(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "l.jsonl"
    key, cert = pki["nodes"]["h1"]
    with Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure", preprocessing=PREP) as led:
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
    with Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure", preprocessing=PREP) as led:
        assert led.steps == 5 and led.randomness == "secure"
    before = path.read_bytes()
    with pytest.raises(LedgerError) as info:
        Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="seeded", preprocessing=PREP)
    assert info.value.kind == "bad_header"
    assert "randomness" in str(info.value) and "start a new ledger" in str(info.value)
    with pytest.raises(LedgerError, match="preprocessing.*start a new ledger"):
        Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure")
    assert path.read_bytes() == before
    # refusals released the writer lock: the ledger opens again
    Ledger.open(path, key).close()


# --------------------------------------------------------------------------- dp_event


def test_dp_event_records_the_whole_mechanism(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "l.jsonl"
    with create(path, pki, "seeded") as led:
        led.append_dp_event(1.1, 0.01, 10, "psac", 2.0)
        led.append_dp_event(1.0, 0.02, 3, "psac", 1.0, local_mechanism="topagg",
                            sensitivity=math.sqrt(10),
                            mechanism_params={"k": 10, "threshold": 0.4, "scale": 1.0})
        led.append_dp_event(5.0, 1.0, 1, "feature_clip", 4.0, purpose="preprocessing",
                            sensitivity=8.0, local_mechanism="feature_moments",
                            mechanism_params={"features": 30, "moments": [1, 2]})
        led.append_dp_event(20.0, 1.0, 1, "count", 1.0, purpose="evaluation",
                            local_mechanism="gaussian_count")
    res = read_ledger(path)
    assert res.ok
    ev = [e["body"] for e in res.entries if e["kind"] == "dp_event"]
    assert ev[0]["purpose"] == "training" and ev[0]["sensitivity"] == 2.0  # default = clipping norm
    assert ev[0]["local_mechanism"] == "gaussian" and ev[0]["mechanism_params"] == {}
    assert ev[1]["local_mechanism"] == "topagg" and ev[1]["sensitivity"] == pytest.approx(math.sqrt(10))
    assert ev[1]["mechanism_params"] == {"k": 10, "threshold": 0.4, "scale": 1.0}
    assert ev[2]["purpose"] == "preprocessing" and ev[2]["sensitivity"] == 8.0
    assert ev[2]["sample_rate"] == 1.0 and ev[2]["mechanism_params"] == {"features": 30, "moments": [1, 2]}
    assert ev[3]["purpose"] == "evaluation" and ev[3]["local_mechanism"] == "gaussian_count"
    assert all(b["randomness"] == "seeded" for b in ev)  # copied from the header
    assert all(b["mechanism"] == "poisson_gaussian" for b in ev)


def test_bad_mechanism_fields_are_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    with create(tmp_path / "l.jsonl", pki) as led:
        with pytest.raises(ValueError, match="purpose"):
            led.append_dp_event(1.0, 0.01, 1, "psac", 1.0, purpose="warmup")
        for bad in (0.0, -1.0, math.inf, math.nan, True):
            with pytest.raises(ValueError, match="sensitivity"):
                led.append_dp_event(1.0, 1.0, 1, "clip", 1.0, purpose="preprocessing", sensitivity=bad)
        with pytest.raises(ValueError, match="local_mechanism"):
            led.append_dp_event(1.0, 0.01, 1, "psac", 1.0, local_mechanism="")
        with pytest.raises(ValueError, match="mechanism_params"):
            led.append_dp_event(1.0, 0.01, 1, "psac", 1.0, mechanism_params={"k": math.inf})
        with pytest.raises(ValueError, match="mechanism_params"):
            led.append_dp_event(1.0, 0.01, 1, "psac", 1.0, mechanism_params=[("k", 1)])  # type: ignore[arg-type]
        assert led.num_entries == 1  # nothing was written by refused appends
        assert led.steps == 0 and led.accountant_events() == {}


def test_steps_count_training_only_and_the_accountant_counts_everything(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    path = tmp_path / "l.jsonl"
    key, _ = pki["nodes"]["h1"]
    with create(path, pki) as led:
        led.append_dp_event(2.0, 1.0, 1, "feature_clip", 4.0, purpose="preprocessing", sensitivity=8.0)
        led.append_dp_event(1.0, 0.01, 50, "psac", 1.0)
        led.append_dp_event(1.0, 0.01, 30, "psac", 1.0)
        led.append_dp_event(3.0, 1.0, 2, "count", 1.0, purpose="evaluation")
        assert led.steps == 80
        with_all = led.rebuild_accountant()
    with Ledger.open(path, key) as led:  # the same after a restart
        assert led.steps == 80
        by = led.events_by_purpose()
        assert by == {
            "training": {DpEventKey(1.0, 0.01): 80},
            "preprocessing": {DpEventKey(2.0, 1.0): 1},
            "evaluation": {DpEventKey(3.0, 1.0): 2},
        }
        assert led.accountant_events() == {
            DpEventKey(1.0, 0.01): 80, DpEventKey(2.0, 1.0): 1, DpEventKey(3.0, 1.0): 2}
        acc = led.rebuild_accountant()
        assert acc.steps == 83
        assert acc.get_epsilon(1e-5) == pytest.approx(with_all.get_epsilon(1e-5), abs=1e-12)
        # the ledger's recorded ε after the last event is the ε of every event
        assert led.last_epsilon == pytest.approx(acc.get_epsilon(1e-5), abs=1e-12)
    training_only = PrivacyAccountant()
    training_only.step(1.0, 0.01, 80)
    every = PrivacyAccountant()
    every.step(1.0, 0.01, 80)
    every.step(2.0, 1.0, 1)
    every.step(3.0, 1.0, 2)
    assert acc.get_epsilon(1e-5) == pytest.approx(every.get_epsilon(1e-5), abs=1e-12)
    assert acc.get_epsilon(1e-5) > training_only.get_epsilon(1e-5) + 0.1


# --------------------------------------------------------------------------- privfl-ledger/1


def test_v1_ledger_still_verifies_and_opens(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = write_v1_ledger(tmp_path / "old.jsonl", key, cert, [(1.1, 0.01, 40), (0.9, 0.02, 10)])
    res = read_ledger(path)
    assert res.ok, res.error
    assert res.header is not None and res.header["body"]["format"] == "privfl-ledger/1"
    with Ledger.open(path, key) as led:
        assert led.format == "privfl-ledger/1"
        assert led.randomness == "unrecorded" and led.preprocessing is None
        assert led.steps == 50  # events without a purpose are training
        direct = PrivacyAccountant()
        direct.step(1.1, 0.01, 40)
        direct.step(0.9, 0.02, 10)
        assert led.rebuild_accountant().get_epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), abs=1e-12)
        # a v1 ledger cannot carry the whole mechanism: no new dp_events (messages are fine)
        with pytest.raises(LedgerError, match="start a new ledger"):
            led.append_dp_event(1.0, 0.01, 1, "psac", 1.0)
        led.append_message("h2", 0, 0, b"m")
        assert led.num_entries == 4
    assert read_ledger(path).ok
    with pytest.raises(LedgerError, match="randomness.*start a new ledger"):
        Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure")
