"""The consortium audit: three nodes' ledgers, anchored at each other, and what an insider
holding one node's key can do to its ledger (cut, roll back, re-sign a rewrite): each is
caught naming the node and the entry. Real keys (privfl.pki), real ledgers, real files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from privfl.accounting.accountant import DpEventKey, epsilon_of
from privfl.accounting.audit import SINGLE_LEDGER_NOTE, audit_ledger
from privfl.accounting.audit_consortium import ConsortiumReport, audit_consortium
from privfl.accounting.heads import sign_head
from privfl.accounting.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerPolicy,
    canonical_bytes,
    check_against_peers,
    entry_hash,
    late_anchors_path,
    sign_bytes,
)
from privfl.pki import init_consortium, load_private_key

pytestmark = pytest.mark.timeout(120)

NODES = ("h1", "h2", "h3")
POLICY = LedgerPolicy(target_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5,
                      allowed_clipping_rules=("psac",))
ROUNDS = 12


# --------------------------------------------------------------------------- a simulated run


def node_key(run: Path, node: str) -> Any:
    """The node's private key, as the PKI wrote it."""
    return load_private_key((run / "pki" / node / "node.key").read_bytes())


def simulate_run(run: Path, rounds: int = ROUNDS) -> Path:
    """A run folder as `privfl launch` writes it (<run>/pki, <run>/<node>/ledger.jsonl), where
    the nodes did what a real run does: a DP step, a message to the next node carrying the
    sender's head (recorded by the receiver), and at the end close + goodbye (heads received
    after a node's own close go to its anchors-final file)."""
    init_consortium("test", list(NODES), run / "pki")
    ledgers = {
        n: Ledger.create(run / n / "ledger.jsonl", node_key(run, n),
                         (run / "pki" / n / "node.pem").read_bytes(), POLICY, "privfl-test",
                         randomness="secure")
        for n in NODES
    }
    keys = {n: node_key(run, n) for n in NODES}

    def signed(n: str) -> tuple[int, bytes, bytes]:  # the head as a message carries it: with its signature
        head = ledgers[n].head
        return (*head, sign_head(keys[n], n, head))

    seq = dict.fromkeys(NODES, 0)
    for r in range(rounds):
        for i, n in enumerate(NODES):
            led = ledgers[n]
            led.append_dp_event(1.0 + 0.01 * (r % 3), 0.02, 5, "psac", 1.0)
            peer = NODES[(i + 1 + r) % len(NODES)]
            if peer == n:
                peer = NODES[(i + 1) % len(NODES)]
            led.append_message(peer, seq[n], r, f"{n}-{r}".encode())
            seq[n] += 1
            ledgers[peer].append_anchor(n, *signed(n))  # the receiver records the sender's head
    for n in NODES:  # close + goodbye to every neighbour, in turn
        ledgers[n].append_close("finished")
        for peer in NODES:
            if peer != n:
                ledgers[peer].append_anchor(n, *signed(n))
    for led in ledgers.values():
        led.close()
    return run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_run(tmp_path_factory.mktemp("consortium") / "run")


@pytest.fixture()
def run(base_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the simulated run, to tamper with."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def ca_of(run: Path) -> bytes:
    return (run / "pki" / "ca.pem").read_bytes()


def audit(run: Path, **kw: Any) -> ConsortiumReport:
    return audit_consortium(run, ca_of(run), compute_pld=False, **kw)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def heads_held_for(run: Path, node: str) -> list[int]:
    """Every entry index of ``node`` that another node holds a head for (ledger or anchors-final)."""
    out = []
    for other in NODES:
        if other == node:
            continue
        led = run / other / "ledger.jsonl"
        for path in (led, late_anchors_path(led)):
            if not path.exists():
                continue
            for line in lines_of(path):
                e = json.loads(line)
                if e["kind"] in ("anchor", "late_anchor") and e["body"]["peer"] == node:
                    out.append(e["body"]["index"])
    return sorted(out)


def kinds(report: ConsortiumReport, node: str) -> dict[str, list[int | None]]:
    out: dict[str, list[int | None]] = {}
    for p in report.problems_of(node):
        out.setdefault(p.kind, []).append(p.index)
    return out


# --------------------------------------------------------------------------- the insider


def insider_rewrite(path: Path, key: Any, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """What a node's insider can do with its key: edit the entries, then re-index, recompute
    every recorded ε so the claims match, re-chain and re-sign the whole ledger. The result
    passes the single-ledger audit."""
    entries = [json.loads(line) for line in lines_of(path)]
    entries = edit(entries)
    policy = LedgerPolicy.from_dict(entries[0]["body"]["policy"])
    events: dict[DpEventKey, int] = {}
    prev = GENESIS_HASH
    out = []
    for i, e in enumerate(entries):
        e = {k: v for k, v in e.items() if k != "signature"}
        e["index"], e["prev_hash"] = i, prev
        if e["kind"] == "dp_event":
            b = e["body"]
            k = DpEventKey(float(b["noise_multiplier"]), float(b["sample_rate"]))
            events[k] = events.get(k, 0) + int(b["steps"])
            b["epsilon"] = epsilon_of(events, policy.delta, policy.accountant)  # type: ignore[arg-type]
        e["signature"] = sign_bytes(key, canonical_bytes(e))
        line = canonical_bytes(e)
        out.append(line)
        prev = entry_hash(line)
    write_lines(path, out)


def first_changed(before: list[bytes], after: list[bytes]) -> int:
    return next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))


def expect_differs_at(run: Path, node: str, before: list[bytes]) -> int:
    """The lowest held head of ``node`` at or after the first rewritten entry (still in the file)."""
    after = lines_of(run / node / "ledger.jsonl")
    start = first_changed(before, after)
    return min(i for i in heads_held_for(run, node) if start <= i < len(after))


# --------------------------------------------------------------------------- untouched


def test_untouched_run_passes_with_every_last_entry_anchored(run: Path) -> None:
    rep = audit(run)
    assert rep.ok, [vars(p) for p in rep.problems]
    assert set(rep.nodes) == set(NODES)
    for n, s in rep.nodes.items():
        assert s.ok and s.audit is not None and s.audit.ok
        assert s.anchored_upto == s.entries - 1 and s.unanchored_tail == 0, n
        assert set(s.anchored_by) == set(NODES) - {n}
    # the last node to close holds the others' goodbyes in its anchors-final file
    assert rep.nodes["h3"].heads_held["anchors_final"] == 0
    assert rep.nodes["h1"].heads_held["anchors_final"] == 2
    assert late_anchors_path(run / "h1" / "ledger.jsonl").exists()
    doc = json.loads(rep.to_json())
    assert doc["ok"] is True and doc["nodes"]["h2"]["anchored_upto"] == rep.nodes["h2"].entries - 1
    # a list of ledger paths works the same; a roster pins every certificate
    rep2 = audit_consortium([run / n / "ledger.jsonl" for n in NODES], ca_of(run),
                            roster=run / "pki" / "roster.toml", compute_pld=False)
    assert rep2.ok and all(s.audit and s.audit.checks["roster"] == "pass" for s in rep2.nodes.values())


def test_single_ledger_audit_says_what_it_cannot_see(run: Path) -> None:
    rep = audit_ledger(run / "h2" / "ledger.jsonl", ca_of(run), compute_pld=False)
    assert rep.ok and rep.certificate_node_id == "h2"
    assert SINGLE_LEDGER_NOTE in rep.notes and "--consortium" in SINGLE_LEDGER_NOTE
    assert rep.totals["anchors"] > 0 and rep.totals["closes"] == 1


# --------------------------------------------------------------------------- cut short


@pytest.mark.parametrize("cut", [1, 10])
def test_tail_truncation_is_caught(run: Path, cut: int) -> None:
    path = run / "h2" / "ledger.jsonl"
    lines = lines_of(path)
    write_lines(path, lines[:-cut])
    assert audit_ledger(path, ca_of(run), compute_pld=False).ok  # alone it still verifies
    rep = audit(run)
    assert not rep.ok
    found = kinds(rep, "h2")
    assert found["truncated"] == [len(lines) - cut, len(lines) - cut]  # held by h1 and h3
    held_by = {p.holder for p in rep.problems_of("h2") if p.kind == "truncated"}
    assert held_by == {"h1", "h3"}
    msg = next(p.message for p in rep.problems_of("h2") if p.kind == "truncated")
    assert f"ends at entry {len(lines) - cut - 1}" in msg and f"entry {len(lines) - 1}" in msg
    # h2's own anchors-final follows a close entry its ledger no longer holds
    assert "anchors_final" in found
    assert not rep.nodes["h2"].ok and rep.nodes["h1"].ok and rep.nodes["h3"].ok


def _lose_goodbyes_of(run: Path, node: str) -> None:
    """The goodbyes ``node`` sent after its close never arrived: its peers' anchors-final files
    are written again, by the real Ledger API with their own keys, without ``node``'s heads."""
    for peer in NODES:
        side = late_anchors_path(run / peer / "ledger.jsonl")
        if peer == node or not side.exists():
            continue
        keep = [json.loads(x)["body"] for x in lines_of(side)]
        side.unlink()
        with Ledger.open(run / peer / "ledger.jsonl", node_key(run, peer)) as led:
            for b in keep:
                if b["peer"] != node:
                    led.append_late_anchor(b["peer"], b["index"], b["entry_hash"], b.get("signature"))


def test_a_ledger_cut_back_to_its_last_anchored_head_is_caught(run: Path) -> None:
    """The stealthiest cut: h3 (the last to close) holds its ledger back to the last head its
    peers hold in their ledgers, after its goodbyes were lost. No head lies beyond the cut and
    every held head matches, so only the missing confirmed close entry can show it."""
    _lose_goodbyes_of(run, "h3")
    honest = audit(run)
    unconfirmed = [p for p in honest.problems if p.kind == "unconfirmed_end"]
    assert [(p.node, p.index) for p in honest.problems] == [
        ("h3", honest.nodes["h3"].entries - 1)]  # an honest ledger whose close no peer confirms
    assert "no peer holds the head of its close entry" in unconfirmed[0].message
    path = run / "h3" / "ledger.jsonl"
    lines = lines_of(path)
    top = max(heads_held_for(run, "h3"))
    assert top < len(lines) - 1
    write_lines(path, lines[: top + 1])
    (run / "h3" / "anchors-final.jsonl").unlink(missing_ok=True)
    assert audit_ledger(path, ca_of(run), compute_pld=False).ok  # alone it verifies
    rep = audit(run)
    assert not rep.ok and not rep.nodes["h3"].ok and rep.nodes["h1"].ok and rep.nodes["h2"].ok
    assert kinds(rep, "h3") == {"unconfirmed_end": [top]}  # nothing else could see it
    assert rep.nodes["h3"].unanchored_tail == 0
    msg = rep.problems_of("h3")[0].message
    assert f"ends at entry {top}, not at a close entry" in msg and "cut back" in msg


def test_truncation_to_half_is_caught(run: Path) -> None:
    path = run / "h1" / "ledger.jsonl"
    lines = lines_of(path)
    half = len(lines) // 2
    write_lines(path, lines[:half])
    single = audit_ledger(path, ca_of(run), compute_pld=False)
    assert single.ok and single.epsilon < audit_ledger(run / "h2" / "ledger.jsonl", ca_of(run),
                                                       compute_pld=False).epsilon
    rep = audit(run)
    assert kinds(rep, "h1")["truncated"] == [half, half]
    assert rep.nodes["h1"].anchored_upto is not None and rep.nodes["h1"].anchored_upto < half


def test_missing_ledger_is_caught(run: Path) -> None:
    shutil.rmtree(run / "h3")
    rep = audit(run)
    assert not rep.ok and set(rep.nodes) == {"h1", "h2"}
    missing = [p for p in rep.problems if p.kind == "missing"]
    assert {p.node for p in missing} == {"h3"} and {p.holder for p in missing} == {"h1", "h2"}


# --------------------------------------------------------------------------- insider rewrites


def _double_sigma(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for e in entries:
        if e["kind"] == "dp_event":
            e["body"]["noise_multiplier"] *= 2
    return entries


def _steps_to_one(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for e in entries:
        if e["kind"] == "dp_event":
            e["body"]["steps"] = 1
    return entries


def _drop_half_the_events(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dp = [i for i, e in enumerate(entries) if e["kind"] == "dp_event"]
    drop = set(dp[1::2])
    return [e for i, e in enumerate(entries) if i not in drop]


def _raise_target(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    entries[0]["body"]["policy"]["target_epsilon"] = 80.0
    return entries


def _rewrite_peers(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for e in entries:
        if e["kind"] == "message":
            e["body"]["peer"] = "h1"
    return entries


@pytest.mark.parametrize(
    "edit", [_double_sigma, _steps_to_one, _drop_half_the_events, _raise_target, _rewrite_peers],
    ids=["sigma_doubled", "steps_set_to_1", "half_the_events_dropped", "target_raised", "peers_rewritten"],
)
def test_insider_resign_passes_alone_and_is_caught_by_the_consortium(
    run: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    path = run / "h2" / "ledger.jsonl"
    before = lines_of(path)
    original = audit_ledger(path, ca_of(run), compute_pld=False)
    insider_rewrite(path, node_key(run, "h2"), edit)
    single = audit_ledger(path, ca_of(run), compute_pld=False)
    assert single.ok, [vars(i) for i in single.issues]  # the single audit is fooled
    if edit in (_double_sigma, _steps_to_one, _drop_half_the_events):
        assert single.epsilon < original.epsilon
    rep = audit(run)
    assert not rep.ok
    want = expect_differs_at(run, "h2", before)
    differs = [p for p in rep.problems_of("h2") if p.kind == "differs"]
    assert differs and min(p.index for p in differs) == want  # type: ignore[type-var]
    assert all(f"entry {p.index}" in p.message and p.holder in ("h1", "h3") for p in differs)
    assert rep.nodes["h1"].ok and rep.nodes["h3"].ok and not rep.nodes["h2"].ok


def test_rollback_and_restart_is_caught(run: Path) -> None:
    """h2's ledger is cut back and the node runs again from there: new, different entries,
    written by the real Ledger API with h2's key. Its peers' heads expose it, both at start
    (check_against_peers) and in the audit."""
    path = run / "h2" / "ledger.jsonl"
    before = lines_of(path)
    cut = len(before) // 2
    write_lines(path, before[:cut])
    (run / "h2" / "anchors-final.jsonl").unlink(missing_ok=True)
    key = node_key(run, "h2")
    # the heads h2's peers hold for it, as they answer head_query
    held = {}
    for peer in ("h1", "h3"):
        with Ledger.open(run / peer / "ledger.jsonl", node_key(run, peer)) as led:
            held[peer] = led.last_anchor("h2")
    with Ledger.open(path, key) as led:
        reason = check_against_peers(led, held)
        assert reason is not None and "behind peer h1" in reason and "refusing to train" in reason
        for r in range(cut):  # the insider ignores it and trains again
            led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
            led.append_message("h1", 100 + r, 100 + r, f"again-{r}".encode())
        led.append_close("finished")
    assert audit_ledger(path, ca_of(run), compute_pld=False).ok
    rep = audit(run)
    found = kinds(rep, "h2")
    assert min(found["differs"]) == expect_differs_at(run, "h2", before)  # type: ignore[type-var]
    assert min(found["differs"]) >= cut  # type: ignore[operator]


def test_tampered_anchors_final_is_caught(run: Path) -> None:
    side = late_anchors_path(run / "h1" / "ledger.jsonl")
    lines = lines_of(side)
    e = json.loads(lines[0])
    e["body"]["index"] -= 1
    lines[0] = canonical_bytes(e)
    write_lines(side, lines)
    rep = audit(run)
    assert kinds(rep, "h1")["anchors_final"] == [0]


def test_roster_pin_is_checked(run: Path, tmp_path: Path) -> None:
    """A roster whose pin for h2 is another certificate: h2's ledger fails, naming the roster."""
    other = tmp_path / "other"
    init_consortium("test", list(NODES), other)
    roster = (run / "pki" / "roster.toml").read_text()
    theirs = (other / "roster.toml").read_text()
    pin = next(line for line in theirs.splitlines() if line.startswith("fingerprint"))
    lines = roster.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("fingerprint")][1]  # h2's
    lines[at] = pin
    bad = tmp_path / "roster.toml"
    bad.write_text("\n".join(lines) + "\n")
    rep = audit(run, roster=bad)
    probs = [p for p in rep.problems if p.detail == "roster"]
    assert [p.node for p in probs] == ["h2"] and "pin" in probs[0].message


@pytest.mark.parametrize("how", ["unsigned", "signed by the holder", "the node's signature of another head"])
def test_a_member_cannot_frame_another_with_a_made_up_head(run: Path, how: str) -> None:
    """h2 writes into its own ledger (with its own key, as the real Ledger API would) a head of
    h1 far beyond h1's end, to make the audit call h1's ledger truncated. Every head carries
    h1's own signature of it; this one does not verify under h1's key, so the audit reports
    h2's ledger (unproven_head) and finds nothing wrong with h1."""
    assert audit(run).ok
    h1_lines = lines_of(run / "h1" / "ledger.jsonl")
    real = (len(h1_lines) - 1, bytes.fromhex(entry_hash(h1_lines[-1])))  # h1's real last head
    fake = (10_000, bytes([7]) * 32)
    sig = {"unsigned": None,
           "signed by the holder": sign_head(node_key(run, "h2"), "h1", fake),
           "the node's signature of another head": sign_head(node_key(run, "h1"), "h1", real)}[how]
    with Ledger.open(run / "h2" / "ledger.jsonl", node_key(run, "h2")) as led:
        led.append_anchor("h1", *fake, sig)
    report = audit(run)
    kinds = {(p.node, p.kind) for p in report.problems}
    assert ("h2", "unproven_head") in kinds, report.problems
    assert not [p for p in report.problems if p.node == "h1"], report.problems  # h1 is not framed
    msg = next(p.message for p in report.problems if p.kind == "unproven_head")
    assert "10000" in msg and "never signed" in msg and "not evidence against h1" in msg


def test_a_cut_ledger_is_still_caught_by_the_heads_its_node_signed(run: Path) -> None:
    """The other side: heads that h1's key did sign still prove h1's ledger was cut."""
    path = run / "h1" / "ledger.jsonl"
    lines = lines_of(path)
    write_lines(path, lines[: len(lines) // 2])
    kinds = {(p.node, p.kind) for p in audit(run).problems}
    assert ("h1", "truncated") in kinds and not any(k == "unproven_head" for _, k in kinds)
