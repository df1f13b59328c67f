"""AnchorThrottle over a real Ledger: at most one anchor per peer per DP event of the node's own,
the newest head kept back and written by flush, and the late anchors after the close."""

from __future__ import annotations

from pathlib import Path

import pytest

from privfl.accounting.ledger import Ledger, LedgerPolicy, read_late_anchors, read_ledger
from privfl.anchor_throttle import GOODBYE_WRITES, AnchorThrottle
from privfl.pki import init_consortium, load_private_key

pytestmark = pytest.mark.timeout(60)

POLICY = LedgerPolicy(target_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5, allowed_clipping_rules=("psac",))
H = [bytes([i % 256]) * 32 for i in range(2000)]


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    init_consortium("t", ["h1", "h2", "h3"], tmp_path / "pki")
    key = load_private_key((tmp_path / "pki" / "h1" / "node.key").read_bytes())
    led = Ledger.create(tmp_path / "ledger.jsonl", key, (tmp_path / "pki" / "h1" / "node.pem").read_bytes(),
                        POLICY, "v", randomness="secure")
    yield led
    led.close()


def throttle_of(led: Ledger) -> AnchorThrottle:
    def write(peer: str, index: int, digest: bytes, signature: bytes) -> bool:
        e = led.append_anchor(peer, index, digest, signature or None)
        return e is not None and e["kind"] == "anchor"
    return AnchorThrottle(lambda: (led.steps, led.ends_with_close), write)


def anchors(led: Ledger, peer: str) -> list[int]:
    return [e["body"]["index"] for e in read_ledger(led.path).entries
            if e["kind"] == "anchor" and e["body"]["peer"] == peer]


def test_a_flood_gets_one_anchor_per_own_entry_and_its_newest_head_kept(ledger: Ledger) -> None:
    t = throttle_of(ledger)
    assert t.offer("h2", 1, H[1])  # the first head of a peer is written at once
    for i in range(2, 500):  # a flood with rising heads: nothing more until our ledger moves
        assert not t.offer("h2", i, H[i])
    assert anchors(ledger, "h2") == [1]
    assert t.pending() == {"h2": (499, H[499], b"")}
    assert not t.offer("h2", 10, H[10])  # an older head does not replace the kept one
    assert t.offer("h3", 5, H[5])  # another peer is not held back by h2's flood
    ledger.append_message("h2", 1, 0, b"m")  # a release the peer asked for: no more anchors for it
    assert not t.offer("h2", 499, H[499])
    ledger.append_dp_event(1.0, 0.02, 5, "psac", 1.0)  # our own DP step: one more anchor allowed
    assert t.offer("h2", 500, H[500])
    assert not t.offer("h2", 501, H[501])
    assert anchors(ledger, "h2") == [1, 500]
    assert t.flush() == 1  # the kept head goes in before the close
    assert anchors(ledger, "h2") == [1, 500, 501]
    assert t.pending() == {}
    own = [e for e in read_ledger(ledger.path).entries if e["kind"] != "anchor"]
    assert len(anchors(ledger, "h2")) <= len(own) + 1


def test_after_the_close_one_late_anchor_then_the_newest_at_the_flush(ledger: Ledger) -> None:
    t = throttle_of(ledger)
    t.offer("h2", 3, H[3])
    ledger.append_close("finished")
    for i in range(4, 300):  # our ledger no longer moves: one late anchor, the rest kept
        t.offer("h2", i, H[i])
    late = [e["body"]["index"] for e in read_late_anchors(ledger.late_anchors_path, ledger.certificate).entries]
    assert late == [4]
    t.flush()
    late = [e["body"]["index"] for e in read_late_anchors(ledger.late_anchors_path, ledger.certificate).entries]
    assert late == [4, 299]
    assert ledger.last_anchor("h2") == (299, H[299])
    assert anchors(ledger, "h2") == [3]  # the chain ends with the close entry


def test_a_goodbye_head_is_written_at_once_for_its_receipt_but_only_twice_per_peer(ledger: Ledger) -> None:
    """The head of a goodbye is written before its receipt is signed (a crash then loses nothing
    receipted); a peer that sends goodbye after goodbye is throttled like any other sender."""
    assert GOODBYE_WRITES == 2
    t = throttle_of(ledger)
    ledger.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
    assert t.offer("h2", 3, H[3])  # one anchor for this DP event ...
    assert not t.offer("h2", 4, H[4])  # ... the next head is kept back
    assert t.commit("h2", 5, H[5])  # the goodbye: written now, although we made no progress
    assert anchors(ledger, "h2") == [3, 5] and t.pending() == {}
    assert t.commit("h2", 6, H[6])  # a second goodbye (e.g. after a restart) too
    for i in range(7, 200):  # goodbyes with rising heads: no more immediate writes
        assert not t.commit("h2", i, H[i])
    assert anchors(ledger, "h2") == [3, 5, 6] and t.pending()["h2"][0] == 199
    assert t.flush() == 1 and anchors(ledger, "h2") == [3, 5, 6, 199]
    # a newer head kept back for a peer wins over an older goodbye head
    assert t.offer("h3", 1, H[1]) and not t.offer("h3", 9, H[9])
    assert t.commit("h3", 7, H[7]) and anchors(ledger, "h3") == [1, 9]
