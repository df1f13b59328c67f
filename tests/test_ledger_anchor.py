"""Ledger heads and anchors: head, anchor entries (deduped), close, late anchors in the signed
anchors-final file, and the node's start-up checks against its peers and its checkpoint.
Real keys from privfl.pki, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privfl.accounting.audit import audit_ledger
from privfl.accounting.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    LedgerPolicy,
    canonical_bytes,
    check_against_peers,
    check_checkpoint_steps,
    entry_hash,
    late_anchors_path,
    read_late_anchors,
    read_ledger,
)
from privfl.pki import init_consortium, load_private_key

pytestmark = pytest.mark.timeout(60)

POLICY = LedgerPolicy(target_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5,
                      allowed_clipping_rules=("psac",))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("test", ["h1", "h2", "h3"], d)
    return d


def open_ledger(path: Path, pki: Path, node: str = "h1") -> Ledger:
    key = load_private_key((pki / node / "node.key").read_bytes())
    if path.exists():
        return Ledger.open(path, key)
    return Ledger.create(path, key, (pki / node / "node.pem").read_bytes(), POLICY, "v",
                         randomness="secure")


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


H = [bytes([i]) * 32 for i in range(256)]


def test_head_is_the_newest_entry_hash(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open_ledger(path, pki) as led:
        assert led.head == (0, bytes.fromhex(entry_hash(lines_of(path)[0])))
        led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
        idx, digest = led.head
        lines = lines_of(path)
        assert idx == 1 and len(digest) == 32
        assert digest.hex() == entry_hash(lines[1])  # what the next prev_hash holds
        led.append_note("x")
        assert json.loads(lines_of(path)[2])["prev_hash"] == digest.hex()


def test_anchor_entries_are_deduped_and_survive_reopening(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open_ledger(path, pki) as led:
        assert led.last_anchor("h2") is None
        e = led.append_anchor("h2", 3, H[3])
        assert e is not None and e["kind"] == "anchor"
        assert e["body"] == {"peer": "h2", "index": 3, "entry_hash": H[3].hex()}
        assert led.append_anchor("h2", 3, H[3]) is None  # same head: nothing new
        assert led.append_anchor("h2", 2, H[2]) is None  # older head: nothing new
        assert led.append_anchor("h2", 3, H[9]) is None  # a conflicting head is logged, not recorded
        assert led.append_anchor("h2", 7, H[7].hex()) is not None  # hex works too
        assert led.append_anchor("h3", 1, H[1]) is not None
        n = led.num_entries
        with pytest.raises(ValueError, match="own head"):
            led.append_anchor("h1", 9, H[9])
        with pytest.raises(ValueError, match="32 bytes"):
            led.append_anchor("h2", 9, b"short")
        with pytest.raises(ValueError, match=">= 0"):
            led.append_anchor("h2", -1, H[1])
        assert led.num_entries == n
    assert read_ledger(path).ok
    with open_ledger(path, pki) as led:
        assert led.last_anchor("h2") == (7, H[7])
        assert led.last_anchors() == {"h2": (7, H[7]), "h3": (1, H[1])}
        assert led.append_anchor("h2", 5, H[5]) is None  # dedupe holds across restarts
    rep = audit_ledger(path, compute_pld=False)
    assert rep.ok and rep.totals["anchors"] == 3


def test_tampered_anchor_entry_is_detected(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open_ledger(path, pki) as led:
        led.append_anchor("h2", 3, H[3])
        led.append_note("after")
    lines = lines_of(path)
    e = json.loads(lines[1])
    e["body"]["index"] = 30
    lines[1] = canonical_bytes(e)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    v = read_ledger(path)
    assert v.error is not None and v.error.index == 1 and v.error.kind == "modified"


def test_close_then_late_anchors_go_to_the_signed_side_file(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    side = late_anchors_path(path)
    assert side == tmp_path / "anchors-final.jsonl"
    with open_ledger(path, pki) as led:
        led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
        led.append_anchor("h2", 4, H[4])
        with pytest.raises(LedgerError, match="close entry"):
            led.append_late_anchor("h3", 1, H[1])  # not closed yet
        close = led.append_close("finished")
        assert close["kind"] == "close" and close["body"]["steps"] == 5
        assert led.ends_with_close
        head = led.head
        n = led.num_entries
        late = led.append_anchor("h2", 9, H[9])  # after the close: never into the chain
        assert late is not None and late["kind"] == "late_anchor"
        assert late["body"]["after"] == {"index": head[0], "entry_hash": head[1].hex()}
        assert led.append_late_anchor("h3", 2, H[2]) is not None
        assert led.append_late_anchor("h3", 2, H[2]) is None  # deduped
        assert led.num_entries == n and led.head == head  # the last entry is still the close
        assert led.last_anchor("h2") == (9, H[9])  # answers head_query with late heads too
    v = read_late_anchors(side, read_ledger(path).certificate)  # type: ignore[arg-type]
    assert v.ok and [e["index"] for e in v.entries] == [0, 1]
    assert v.entries[0]["prev_hash"] == GENESIS_HASH
    # reopened after the run, the ledger still ends with its close: heads still go to the side file
    with open_ledger(path, pki) as led:
        assert led.ends_with_close and led.last_anchor("h3") == (2, H[2])
        assert led.append_anchor("h3", 5, H[5])["kind"] == "late_anchor"  # type: ignore[index]
        # a restarted node that appends again puts new heads back into its chain
        led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
        assert not led.ends_with_close
        assert led.append_anchor("h3", 6, H[6])["kind"] == "anchor"  # type: ignore[index]
        with pytest.raises(LedgerError, match="close entry"):
            led.append_late_anchor("h2", 10, H[10])
    assert len(lines_of(side)) == 3 and audit_ledger(path, compute_pld=False).ok


def test_tampered_anchors_final_is_detected_and_not_extended(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    side = late_anchors_path(path)
    with open_ledger(path, pki) as led:
        led.append_close()
        led.append_anchor("h2", 4, H[4])
        led.append_anchor("h3", 4, H[4])
    cert = read_ledger(path).certificate
    assert cert is not None
    good = side.read_bytes()
    lines = lines_of(side)
    # an edited line (re-serialised canonically) fails its signature
    e = json.loads(lines[1])
    e["body"]["index"] = 40
    side.write_bytes(lines[0] + b"\n" + canonical_bytes(e) + b"\n")
    v = read_late_anchors(side, cert)
    assert v.error is not None and v.error.index == 1 and v.error.kind == "modified"
    assert len(v.entries) == 1
    with open_ledger(path, pki) as led:
        with pytest.raises(LedgerError, match="does not verify"):
            led.append_anchor("h2", 9, H[9])
    # dropped first line: the chain breaks
    side.write_bytes(lines[1] + b"\n")
    v = read_late_anchors(side, cert)
    assert v.error is not None and v.error.index == 0
    # signed by another node's key: refused
    other = tmp_path / "other" / "ledger.jsonl"
    with open_ledger(other, pki, "h2") as led:
        led.append_close()
        led.append_anchor("h1", 4, H[4])
    side.write_bytes(late_anchors_path(other).read_bytes())
    v = read_late_anchors(side, cert)
    assert v.error is not None and v.error.kind == "modified"
    # a torn last line (a crash mid-append) is cut on the next append, not treated as tampering
    side.write_bytes(good + b'{"body":')
    with open_ledger(path, pki) as led:
        assert led.append_anchor("h2", 9, H[9]) is not None
    v = read_late_anchors(side, cert)
    assert v.ok and len(v.entries) == 3


def test_check_against_peers(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open_ledger(path, pki) as led:
        for _ in range(4):
            led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
            led.append_message("h2", 0, 0, b"m")
        mid = led.head
        led.append_close()
        assert check_against_peers(led, {}) is None
        assert check_against_peers(led, {"h2": mid, "h3": led.head, "h4": None}) is None
        assert check_against_peers(led, {"h2": (mid[0], mid[1].hex())}) is None
        behind = check_against_peers(led, {"h2": mid, "h3": (led.head[0] + 5, H[1])})
        assert behind is not None and "peer h3" in behind and f"entry {led.head[0] + 5}" in behind
        assert f"ends at entry {led.head[0]}" in behind and "refusing to train" in behind
        differs = check_against_peers(led, {"h2": (mid[0], H[1])})
        assert differs is not None and "differs" in differs and "peer h2" in differs
        assert f"entry {mid[0]}" in differs
        bad = check_against_peers(led, {"h3": (1, b"x")})
        assert bad is not None and "h3" in bad and "malformed" in bad


def test_check_checkpoint_steps(tmp_path: Path, pki: Path) -> None:
    with open_ledger(tmp_path / "ledger.jsonl", pki) as led:
        for _ in range(3):
            led.append_dp_event(1.0, 0.02, 200, "psac", 1.0)
        assert check_checkpoint_steps(led, 600) is None
        assert check_checkpoint_steps(led, 0) is None
        reason = check_checkpoint_steps(led, 1025)
        assert reason is not None and "1025" in reason and "600" in reason


def test_v2_ledger_without_anchors_still_verifies_and_reopens(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open_ledger(path, pki) as led:
        led.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
    with open_ledger(path, pki) as led:
        assert led.last_anchors() == {} and not led.ends_with_close
    assert audit_ledger(path, compute_pld=False).ok


def test_a_peers_head_signature_is_kept_with_its_anchor_and_survives_reopening(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    sig = bytes(range(64))
    with open_ledger(path, pki) as led:
        e = led.append_anchor("h2", 3, H[3], sig)
        assert e is not None and e["body"]["signature"] == sig.hex()
        assert led.last_anchor_signature("h2") == sig
        led.append_anchor("h2", 4, H[4])  # a newer head without one: the old signature is not its proof
        assert led.last_anchor_signature("h2") == b""
        led.append_anchor("h3", 2, H[2], sig.hex())
        led.append_close("finished")
        led.append_anchor("h2", 9, H[9], sig)  # a late anchor keeps it too
        with pytest.raises(ValueError, match="head signature"):
            led.append_anchor("h3", 5, H[5], b"short")
    with open_ledger(path, pki) as led:
        assert led.last_anchor_signature("h2") == sig and led.last_anchor("h2") == (9, H[9])
        assert led.last_anchor_signature("h3") == sig
        assert led.last_anchor_signature("h1x") == b""
    assert audit_ledger(path, (pki / "ca.pem").read_bytes(), compute_pld=False).ok
