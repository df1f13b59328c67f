"""Audit of privfl-ledger/2: seeded noise fails unless allowed, every event's randomness must
match the header's, and ε is recomputed over every purpose (training, preprocessing,
evaluation) — checked against dp-accounting called directly here."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from privfl.accounting.audit import audit_ledger
from privfl.accounting.ledger import (
    Ledger,
    LedgerPolicy,
    canonical_bytes,
    entry_hash,
    sign_bytes,
    signing_bytes,
)
from tests.helpers import audit_cli
from tests.test_ledger import POLICY, make_pki
from tests.test_ledger_mechanism import PREP, write_v1_ledger

pytestmark = pytest.mark.timeout(120)

REL = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
TOPAGG = {"k": 10, "threshold": 0.4, "scale": 1.0}


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return make_pki(("h1", "h2"))


def mixed_ledger(path: Path, pki: dict[str, Any], randomness: str = "secure",
                 policy: LedgerPolicy = POLICY) -> Path:
    """A one-shot preprocessing estimate, training steps (Gaussian and TopAgg), a DP accuracy."""
    key, cert = pki["nodes"]["h1"]
    with Ledger.create(path, key, cert, policy, "privfl-test", randomness=randomness,
                       preprocessing=PREP) as led:
        led.append_dp_event(2.0, 1.0, 1, "feature_clip", 4.0, purpose="preprocessing", sensitivity=8.0,
                            local_mechanism="feature_moments", mechanism_params={"features": 30})
        led.append_dp_event(1.1, 0.01, 60, "psac", 1.0)
        led.append_message("h2", 0, 0, b"model")
        led.append_dp_event(1.0, 0.02, 20, "psac", 1.0, local_mechanism="topagg",
                            sensitivity=math.sqrt(TOPAGG["k"]), mechanism_params=TOPAGG)
        led.append_dp_event(4.0, 1.0, 1, "count", 1.0, purpose="evaluation", local_mechanism="gaussian_count")
    return path


def resign(path: Path, key: Any, index: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit entry ``index``'s body and re-sign and re-chain it and everything after it with the
    node key: what a node itself could write, so only the audit's content checks can catch it."""
    lines = path.read_bytes().split(b"\n")[:-1]
    for i in range(index, len(lines)):
        e = json.loads(lines[i])
        if i == index:
            edit(e["body"])
        e["prev_hash"] = entry_hash(lines[i - 1])
        e.pop("signature")
        e["signature"] = sign_bytes(key, signing_bytes(e))
        lines[i] = canonical_bytes(e)
    path.write_bytes(b"".join(x + b"\n" for x in lines))


# --------------------------------------------------------------------------- randomness


def test_secure_ledger_passes_and_reports_randomness(tmp_path: Path, pki: dict[str, Any]) -> None:
    rep = audit_ledger(mixed_ledger(tmp_path / "l.jsonl", pki), pki["ca_pem"])
    assert rep.ok, rep.issues
    assert rep.checks["randomness"] == "pass"
    assert rep.randomness == "secure" and not rep.randomness_allowed and rep.randomness_label == "secure"
    assert rep.preprocessing == PREP and rep.format == "privfl-ledger/2"
    assert rep.by_purpose == {"training": {"events": 2, "steps": 80},
                              "preprocessing": {"events": 1, "steps": 1},
                              "evaluation": {"events": 1, "steps": 1}}
    assert [p.purpose for p in rep.timeline] == ["preprocessing", "training", "training", "evaluation"]
    doc = json.loads(rep.to_json())
    assert doc["randomness"] == "secure" and doc["preprocessing"] == PREP
    assert doc["by_purpose"]["preprocessing"] == {"events": 1, "steps": 1}
    assert {"purpose": "evaluation", "noise_multiplier": 4.0, "sample_rate": 1.0, "steps": 1} in doc["events"]


def test_seeded_ledger_fails_unless_allowed(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki, "seeded")
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert not rep.ok and rep.checks["randomness"] == "fail"
    assert rep.randomness == "seeded"
    kinds = [i.kind for i in rep.issues]
    assert kinds == ["seeded_noise"]  # nothing else is wrong with it
    assert "seed" in rep.issues[0].message and "recompute" in rep.issues[0].message
    assert all(v == "pass" for k, v in rep.checks.items() if k != "randomness")
    allowed = audit_ledger(path, pki["ca_pem"], compute_pld=False, allow_seeded=True)
    assert allowed.ok and allowed.checks["randomness"] == "pass"
    assert allowed.randomness_allowed and allowed.randomness_label == "seeded (allowed)"
    assert json.loads(allowed.to_json())["randomness_allowed"] is True
    # allowing seeded never changes ε
    assert allowed.epsilon_rdp == rep.epsilon_rdp


def test_v1_ledger_randomness_is_unrecorded(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = write_v1_ledger(tmp_path / "old.jsonl", key, cert, [(1.1, 0.01, 40), (0.9, 0.02, 10)])
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert not rep.ok and rep.randomness == "unrecorded" and rep.checks["randomness"] == "fail"
    assert [i.kind for i in rep.issues] == ["unrecorded_randomness"]
    assert rep.format == "privfl-ledger/1" and rep.preprocessing is None
    assert rep.checks["integrity"] == rep.checks["policy"] == rep.checks["claimed_epsilon"] == "pass"
    assert rep.by_purpose["training"] == {"events": 2, "steps": 50}
    allowed = audit_ledger(path, pki["ca_pem"], compute_pld=False, allow_seeded=True)
    assert allowed.ok and allowed.randomness_label == "unrecorded (allowed)"


@pytest.mark.parametrize("value", ["seeded", None])
def test_event_randomness_differing_from_the_header_fails(
    tmp_path: Path, pki: dict[str, Any], value: str | None
) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    key, _ = pki["nodes"]["h1"]

    def edit(body: dict[str, Any]) -> None:
        if value is None:
            del body["randomness"]
        else:
            body["randomness"] = value

    resign(path, key, 4, edit)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert rep.checks["integrity"] == "pass"
    assert not rep.ok and rep.checks["randomness"] == "fail"
    bad = [i for i in rep.issues if i.kind == "randomness_mismatch"]
    assert len(bad) == 1 and bad[0].index == 4
    # allow_seeded does not excuse an inconsistent record
    assert not audit_ledger(path, pki["ca_pem"], compute_pld=False, allow_seeded=True).ok


# --------------------------------------------------------------------------- ε over every purpose


def _direct(method: str, events: list[tuple[float, float, int]]) -> float:
    """ε at δ=1e-5 from dp-accounting; q = 1 events composed as a plain Gaussian."""
    acc: Any = (RdpAccountant(neighboring_relation=REL) if method == "rdp"
                else PLDAccountant(neighboring_relation=REL, value_discretization_interval=1e-4))
    for s, q, n in events:
        inner: Any = dp_accounting.GaussianDpEvent(s)
        if q < 1.0:
            inner = dp_accounting.PoissonSampledDpEvent(q, inner)
        acc.compose(dp_accounting.SelfComposedDpEvent(inner, n))
    return float(acc.get_epsilon(1e-5))


def test_epsilon_includes_preprocessing_and_evaluation(tmp_path: Path, pki: dict[str, Any]) -> None:
    rep = audit_ledger(mixed_ledger(tmp_path / "l.jsonl", pki), pki["ca_pem"])
    every = [(2.0, 1.0, 1), (1.1, 0.01, 60), (1.0, 0.02, 20), (4.0, 1.0, 1)]
    training = every[1:3]
    assert rep.epsilon_rdp == pytest.approx(_direct("rdp", every), abs=1e-9)
    assert rep.epsilon_pld is not None
    assert rep.epsilon_pld == pytest.approx(_direct("pld", every), abs=1e-6)
    assert rep.epsilon_rdp > _direct("rdp", training) + 0.1
    assert rep.epsilon_pld > _direct("pld", training) + 0.1
    # ε over time: after the q = 1 preprocessing estimate alone, a plain Gaussian's ε
    assert rep.timeline[0].epsilon_rdp == pytest.approx(_direct("rdp", every[:1]), abs=1e-9)
    assert rep.timeline[-1].epsilon_rdp == pytest.approx(rep.epsilon_rdp, abs=1e-12)
    # the node's recorded ε (its own accountant) also counted every event
    assert rep.checks["claimed_epsilon"] == "pass"
    assert rep.totals["steps"] == 82 and rep.totals["dp_events"] == 4


def test_pld_policy_audits_every_purpose(tmp_path: Path, pki: dict[str, Any]) -> None:
    pol = LedgerPolicy(50.0, 1e-5, 0.5, ("psac",), accountant="pld")
    rep = audit_ledger(mixed_ledger(tmp_path / "l.jsonl", pki, policy=pol), pki["ca_pem"], compute_pld=False)
    assert rep.ok, rep.issues
    every = [(2.0, 1.0, 1), (1.1, 0.01, 60), (1.0, 0.02, 20), (4.0, 1.0, 1)]
    assert rep.epsilon == rep.epsilon_pld == pytest.approx(_direct("pld", every), abs=1e-6)


def test_a_preprocessing_event_can_exhaust_the_budget(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    tight = LedgerPolicy(1.5, 1e-5, 0.5, ("psac",))
    with Ledger.create(path, key, cert, tight, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 100, "psac", 1.0)  # ε ≈ 1.21
        led.append_dp_event(3.0, 1.0, 1, "feature_clip", 1.0, purpose="preprocessing")
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert rep.timeline[0].epsilon_rdp < 1.5 < rep.timeline[1].epsilon_rdp
    assert rep.over_budget == [2] and rep.checks["budget"] == "fail"


def test_policy_floor_and_rules_bind_training_only(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    loose = LedgerPolicy(100.0, 1e-5, 0.5, ("psac", "flat"))
    with Ledger.create(path, key, cert, loose, "v", randomness="secure") as led:
        # σ = 0.3 is below the policy's 0.5 floor, and the rule is not a training rule: fine for these
        led.append_dp_event(0.3, 1.0, 1, "feature_clip", 4.0, purpose="preprocessing", sensitivity=8.0)
        led.append_dp_event(0.3, 1.0, 1, "count", 1.0, purpose="evaluation")
        led.append_dp_event(0.3, 0.01, 10, "psac", 1.0)  # a training event: a policy violation
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert [(i.index, i.kind) for i in rep.issues] == [(3, "policy")]
    assert "below the policy's minimum" in rep.issues[0].message
    # every event still counts in ε
    assert rep.epsilon_rdp == pytest.approx(_direct("rdp", [(0.3, 1.0, 2), (0.3, 0.01, 10)]), abs=1e-9)


def test_bad_sensitivity_is_a_bad_entry_that_still_counts(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    key, _ = pki["nodes"]["h1"]
    eps = audit_ledger(path, pki["ca_pem"], compute_pld=False).epsilon_rdp

    def zero(body: dict[str, Any]) -> None:
        body["sensitivity"] = 0.0

    resign(path, key, 1, zero)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert not rep.ok and rep.checks["policy"] == "fail"
    assert [(i.index, i.kind) for i in rep.issues] == [(1, "bad_entry")]
    assert "sensitivity" in rep.issues[0].message
    assert rep.epsilon_rdp == pytest.approx(eps, abs=1e-12)  # never dropped from ε


def test_unknown_purpose_and_missing_fields_are_bad_entries(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    key, _ = pki["nodes"]["h1"]

    def warmup(body: dict[str, Any]) -> None:
        body["purpose"] = "warmup"

    resign(path, key, 2, warmup)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert [(i.index, i.kind) for i in rep.issues] == [(2, "bad_entry")] and "purpose" in rep.issues[0].message

    def strip(body: dict[str, Any]) -> None:
        del body["local_mechanism"], body["mechanism_params"]

    path = mixed_ledger(tmp_path / "m.jsonl", pki)
    resign(path, key, 2, strip)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert [(i.index, i.kind) for i in rep.issues] == [(2, "bad_entry")]
    assert "local_mechanism" in rep.issues[0].message


def test_topagg_event_is_recorded_and_audited(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert rep.ok
    body = json.loads(path.read_bytes().split(b"\n")[4])["body"]
    assert body["local_mechanism"] == "topagg" and body["mechanism_params"] == TOPAGG
    assert body["sensitivity"] == pytest.approx(math.sqrt(10))
    assert {"purpose": "training", "noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 20} in rep.events
    # a TopAgg event that claims a sensitivity other than √k is flagged
    key, _ = pki["nodes"]["h1"]

    def one(b: dict[str, Any]) -> None:
        b["sensitivity"] = 1.0

    resign(path, key, 4, one)
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert [(i.index, i.kind) for i in rep.issues] == [(4, "bad_entry")]
    assert "√k" in rep.issues[0].message


def test_log_line_prints_only_computed_values(
    tmp_path: Path, pki: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    with caplog.at_level(logging.DEBUG, logger="privfl.audit"):
        rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    line = [r.getMessage() for r in caplog.records if r.name == "privfl.audit"][-1]
    assert rep.epsilon_pld is None and "eps_pld" not in line and "nan" not in line
    assert "eps_rdp=" in line and "randomness=secure" in line
    assert json.loads(rep.to_json())["epsilon_pld"] is None
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="privfl.audit"):
        rep = audit_ledger(path, pki["ca_pem"])
    line = [r.getMessage() for r in caplog.records if r.name == "privfl.audit"][-1]
    assert rep.epsilon_pld is not None and f"eps_pld={rep.epsilon_pld:.4f}" in line


# --------------------------------------------------------------------------- CLI


def test_cli_allow_seeded(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = mixed_ledger(tmp_path / "l.jsonl", pki, "seeded")
    ca = tmp_path / "ca.pem"
    ca.write_text(pki["ca_pem"])
    runner = CliRunner()
    app = audit_cli()
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld"])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "seeded_noise" in res.output and "randomness" in res.output
    res = runner.invoke(app, ["audit", str(path), "--ca", str(ca), "--no-pld", "--allow-seeded"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "PASS" in out and "seeded (allowed)" in out
    assert '"kind": "dp_standardize"' in out  # the preprocessing description
    assert "preprocessing events / steps" in out and "evaluation events / steps" in out
    assert "not computed (--no-pld)" in out and "nan" not in out.lower()
    res = runner.invoke(app, ["audit", "ledger", str(path), "--ca", str(ca), "--json", "--allow-seeded"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["randomness"] == "seeded" and doc["randomness_allowed"] is True
    assert doc["by_purpose"]["training"] == {"events": 2, "steps": 80}
    assert isinstance(doc["epsilon_pld"], float)
    res = runner.invoke(app, ["audit", "ledger", "--help"])
    assert "--allow-seeded" in res.output and "simulations and tests" in res.output
    # a secure ledger needs no flag; bad input is still one line and exit 2
    secure = mixed_ledger(tmp_path / "s.jsonl", pki)
    assert runner.invoke(app, ["audit", str(secure), "--ca", str(ca), "--no-pld"]).exit_code == 0
    res = runner.invoke(app, ["audit", str(tmp_path / "none.jsonl"), "--ca", str(ca), "--allow-seeded"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_message_digest_is_named_by_its_hash_and_exactly_one_is_required(tmp_path: Path,
                                                                          pki: dict[str, Any]) -> None:
    """A node records a sent model's BLAKE3 digest under ``blake3``; a message entry with no digest,
    or with two, is a bad entry (what each sent model was must stay checkable)."""
    key, cert = pki["nodes"]["h1"]
    path = tmp_path / "b.jsonl"
    with Ledger.create(path, key, cert, POLICY, "privfl-test", randomness="secure", preprocessing=PREP) as led:
        entry = led.append_message("h2", 0, 0, digest="ab" * 32, size=8, digest_algorithm="blake3")
        with pytest.raises(ValueError, match="digest_algorithm"):
            led.append_message("h2", 1, 0, digest="ab" * 32, size=8, digest_algorithm="md5")
        with pytest.raises(ValueError, match="SHA-256"):
            led.append_message("h2", 1, 0, b"model", digest_algorithm="blake3")
    assert entry["body"]["blake3"] == "ab" * 32 and "sha256" not in entry["body"]
    assert audit_ledger(path, pki["ca_pem"], compute_pld=False).ok

    def both(body: dict[str, Any]) -> None:
        body["sha256"] = "cd" * 32

    def neither(body: dict[str, Any]) -> None:
        del body["blake3"]

    for edit in (both, neither):
        bad = tmp_path / f"{edit.__name__}.jsonl"
        bad.write_bytes(path.read_bytes())
        resign(bad, key, 1, edit)
        rep = audit_ledger(bad, pki["ca_pem"], compute_pld=False)
        assert [(i.index, i.kind) for i in rep.issues] == [(1, "bad_entry")], (edit.__name__, rep.issues)


def test_an_event_that_records_no_delta_fails(tmp_path: Path, pki: dict[str, Any]) -> None:
    """A node drops δ from one event and re-signs: the event's guarantee is then unstated, and the
    audit must not read the policy's δ into it."""
    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    assert audit_ledger(path, pki["ca_pem"], compute_pld=False).ok
    resign(path, pki["nodes"]["h1"][0], 2, lambda body: body.pop("delta"))
    rep = audit_ledger(path, pki["ca_pem"], compute_pld=False)
    assert not rep.ok and rep.checks["integrity"] == "pass" and rep.checks["policy"] == "fail"
    assert [(i.index, i.kind) for i in rep.issues] == [(2, "policy")]
    assert "records no δ" in rep.issues[0].message


def test_roster_policy_is_a_protocol_the_pki_policy_meets(tmp_path: Path, pki: dict[str, Any]) -> None:
    """audit_ledger takes the roster's ``[policy]`` as privfl.pki.Policy or the audit's own RosterPolicy."""
    from privfl.accounting.audit_consortium import RosterPolicy
    from privfl.pki import Policy

    path = mixed_ledger(tmp_path / "l.jsonl", pki)
    for floor in (Policy(max_epsilon=POLICY.target_epsilon), RosterPolicy(max_epsilon=POLICY.target_epsilon)):
        rep = audit_ledger(path, pki["ca_pem"], compute_pld=False, roster_policy=floor)
        assert rep.ok and rep.checks["roster_policy"] == "pass", rep.issues
    spent = audit_ledger(path, pki["ca_pem"], compute_pld=False).epsilon
    for floor in (Policy(max_epsilon=spent * 0.99), RosterPolicy(max_epsilon=spent * 0.99)):
        rep = audit_ledger(path, pki["ca_pem"], compute_pld=False, roster_policy=floor)
        assert not rep.ok and rep.checks["roster_policy"] == "fail"
        assert {i.message.split(":")[0] for i in rep.issues if i.kind == "roster_policy"} >= {
            f"the header's target ε {POLICY.target_epsilon:g} exceeds the roster's [policy].max_epsilon "
            f"{spent * 0.99:g}"}
