"""Receipts for goodbye heads: a neighbour that signs it received a node's close head and then
keeps no record of it is blamed in the consortium audit (``dropped_head``), and the honest node's
end is confirmed by the receipt. Real keys, real ledgers, real mTLS networks on loopback."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from privfl.accounting.audit_consortium import audit_consortium
from privfl.accounting.heads import receipt_signed_by, sign_head, sign_receipt
from privfl.accounting.ledger import Ledger, LedgerPolicy
from privfl.accounting.receipts import Receipt, append_receipt, read_receipts, receipts_path
from privfl.anchor_throttle import AnchorThrottle
from privfl.launch import free_ports
from privfl.peer_network import GrpcPeerNetwork
from privfl.pki import NodeIdentity, init_consortium, load_pki, load_private_key
from tests.helpers import audit_cli
from tests.test_audit_consortium import _lose_goodbyes_of, kinds, node_key, simulate_run

pytestmark = pytest.mark.timeout(120)

HEAD = (41, bytes(range(32)))
POLICY = LedgerPolicy(target_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5, allowed_clipping_rules=("psac",))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    init_consortium("rc", ["a", "b"], root)
    return {n: load_private_key((root / n / "node.key").read_bytes()) for n in ("a", "b")}


def test_a_receipt_verifies_only_for_its_holder_node_and_head(keys: dict[str, Any]) -> None:
    sig = sign_receipt(keys["b"], "b", "a", HEAD)
    pub = keys["b"].public_key()
    assert len(sig) == 64 and receipt_signed_by(pub, "b", "a", HEAD, sig)
    assert not receipt_signed_by(keys["a"].public_key(), "b", "a", HEAD, sig)  # another key
    assert not receipt_signed_by(pub, "c", "a", HEAD, sig)  # another holder
    assert not receipt_signed_by(pub, "b", "c", HEAD, sig)  # another node
    assert not receipt_signed_by(pub, "b", "a", (42, HEAD[1]), sig)  # another index
    assert not receipt_signed_by(pub, "b", "a", (41, bytes(32)), sig)  # another hash
    assert not receipt_signed_by(pub, "b", "a", HEAD, sig[:63])  # malformed
    # a receipt is not a head signature: the two domains differ
    assert sig != sign_head(keys["b"], "a", HEAD) and not receipt_signed_by(
        pub, "b", "a", HEAD, sign_head(keys["b"], "a", HEAD))


def test_receipts_file_round_trip_cuts_a_torn_tail_and_counts_bad_lines(tmp_path: Path, keys: dict[str, Any]) -> None:
    path = receipts_path(tmp_path / "ledger.jsonl")
    assert path.name == "receipts.jsonl" and receipts_path(tmp_path / "x.jsonl").name == "x.receipts.jsonl"
    r = Receipt("b", "a", HEAD[0], HEAD[1].hex(), sign_receipt(keys["b"], "b", "a", HEAD).hex())
    append_receipt(path, r)
    with path.open("ab") as f:
        f.write(b'{"holder": "b", "node"')  # a crash mid-append
    append_receipt(path, r)  # the torn tail is cut first
    r2 = Receipt("b", "a", 42, HEAD[1].hex(), sign_receipt(keys["b"], "b", "a", (42, HEAD[1])).hex())
    append_receipt(path, r2)
    with path.open("ab") as f:
        f.write(b'{"holder": "b"}\n')  # not a receipt
        f.write(b"[" * 200_000 + b"\n")  # too long (and too deep for json)
        f.write(b"[" * 3000 + b"\n")  # short enough to parse, too deep for json (RecursionError)
    found, bad = read_receipts(path)
    assert [(n, x) for n, x in found] == [(0, r), (2, r2)] and bad == 3  # a repeat is read once
    assert all(x.signed_by(keys["b"].public_key()) for _, x in found)
    for broken in ({**json.loads(r.to_line()), "index": -1}, {**json.loads(r.to_line()), "signature": "zz"},
                   {**json.loads(r.to_line()), "holder": "a"}):
        with pytest.raises(ValueError):
            Receipt.from_dict(broken)


# --------------------------------------------------------------------------- the audit


def _receipt(run: Path, holder: str, node: str, head: tuple[int, bytes], signer: str | None = None) -> Receipt:
    return Receipt(holder, node, head[0], head[1].hex(),
                   sign_receipt(node_key(run, signer or holder), holder, node, head).hex(),
                   sign_head(node_key(run, node), node, head).hex())


def _close_head(run: Path, node: str) -> tuple[int, bytes]:
    with Ledger.open(run / node / "ledger.jsonl", node_key(run, node)) as led:
        return led.head


def test_a_neighbour_that_drops_a_receipted_close_head_is_blamed_not_the_node(tmp_path: Path) -> None:
    """h3 (the last to close) said goodbye and both neighbours signed receipts for its close head,
    then kept no record of it. Without the receipts h3 is unconfirmed_end; with them its end is
    confirmed and each neighbour is named for the head it dropped."""
    run = simulate_run(tmp_path / "run")
    _lose_goodbyes_of(run, "h3")
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert kinds(rep, "h3") == {"unconfirmed_end": [rep.nodes["h3"].entries - 1]}
    head = _close_head(run, "h3")
    for holder in ("h1", "h2"):
        append_receipt(receipts_path(run / "h3" / "ledger.jsonl"), _receipt(run, holder, "h3", head))
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert "h3" not in {p.node for p in rep.problems}, [vars(p) for p in rep.problems]
    s = rep.nodes["h3"]
    assert s.ok and s.anchored_upto == s.entries - 1 and s.unanchored_tail == 0
    assert s.receipts == {"verified": 2, "unverified": 0} and s.anchored_by["h1"] == head[0]
    dropped = [p for p in rep.problems if p.kind == "dropped_head"]
    assert sorted((p.node, p.holder) for p in dropped) == [("h1", "h3"), ("h2", "h3")]
    assert f"head at entry {head[0]}" in dropped[0].message and "withheld" in dropped[0].message
    assert not rep.nodes["h1"].ok and not rep.nodes["h2"].ok and not rep.ok
    res = CliRunner().invoke(audit_cli(), ["audit", "--consortium", str(run), "--ca", str(run / "pki" / "ca.pem"),
                                           "--no-pld"], terminal_width=200)
    assert res.exit_code != 0 and "FAIL" in res.output
    assert "problem: node h1 entry — dropped_head (held by h3)" in res.output and "receipts" in res.output
    assert "unconfirmed_end (" not in res.output and "problem: node h3" not in res.output


def test_a_receipt_the_node_made_up_is_no_evidence(tmp_path: Path) -> None:
    """h3 cannot confirm its own end: a receipt signed with its own key (or for another node) does
    not verify under the named holder's certificate, and blames no one."""
    run = simulate_run(tmp_path / "run")
    _lose_goodbyes_of(run, "h3")
    head = _close_head(run, "h3")
    path = receipts_path(run / "h3" / "ledger.jsonl")
    append_receipt(path, _receipt(run, "h1", "h3", head, signer="h3"))  # forged: h3's key
    append_receipt(path, _receipt(run, "h2", "h1", head))  # h2's genuine signature, for another node
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert kinds(rep, "h3") == {"unconfirmed_end": [rep.nodes["h3"].entries - 1]}
    assert rep.nodes["h3"].receipts == {"verified": 0, "unverified": 2}
    assert not [p for p in rep.problems if p.kind == "dropped_head"]


def test_a_node_cannot_frame_a_neighbour_with_a_receipt_for_an_older_head(tmp_path: Path) -> None:
    """A holder keeps a node's newest head only. h3 collects receipts for an earlier head too (one
    its neighbours received, then a later one replaced): they hold a later head, so nobody dropped it."""
    run = simulate_run(tmp_path / "run")
    path = receipts_path(run / "h3" / "ledger.jsonl")
    close = _close_head(run, "h3")
    older = (close[0] - 1, bytes.fromhex(json.loads(
        (run / "h3" / "ledger.jsonl").read_bytes().splitlines()[close[0]])["prev_hash"]))
    for holder in ("h1", "h2"):
        append_receipt(path, _receipt(run, holder, "h3", older))
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert rep.ok, [vars(p) for p in rep.problems]
    assert rep.nodes["h3"].receipts == {"verified": 2, "unverified": 0}


def test_receipts_the_holders_did_record_change_nothing_and_a_cut_is_still_caught(tmp_path: Path) -> None:
    run = simulate_run(tmp_path / "run")
    head = _close_head(run, "h3")
    for holder in ("h1", "h2"):
        append_receipt(receipts_path(run / "h3" / "ledger.jsonl"), _receipt(run, holder, "h3", head))
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert rep.ok, [vars(p) for p in rep.problems]
    # the receipts are evidence against h3's own ledger too: a cut of its close entry is caught
    path = run / "h3" / "ledger.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in path.read_bytes().splitlines()[:-1]))
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert "truncated" in kinds(rep, "h3")


# --------------------------------------------------------------------------- real networks


class _Pair:
    """Two networks (a, b) over real mTLS on loopback, each with a ledger head hook."""

    def __init__(self, root: Path, b_class: type[GrpcPeerNetwork] = GrpcPeerNetwork,
                 goodbye: Any = None) -> None:
        ids = ["a", "b"]
        ports = free_ports(2)
        init_consortium("rp", ids, root, addresses={n: f"127.0.0.1:{p}" for n, p in zip(ids, ports)})
        ca, roster, crl = load_pki(root)
        self.heads = {"a": (7, b"\x0a" * 32), "b": (3, b"\x0b" * 32)}
        self.receipts: dict[str, list[tuple[Any, ...]]] = {"a": [], "b": []}
        self.goodbyes: list[tuple[Any, ...]] = []  # what b was asked to record before it signed

        def recorded(*head: Any) -> bool:
            self.goodbyes.append(head)
            return True if goodbye is None else goodbye(*head)
        self.nets: dict[str, GrpcPeerNetwork] = {}
        params = [np.zeros((2, 3), np.float32)]
        for n in ids:
            cls = b_class if n == "b" else GrpcPeerNetwork
            net = cls(NodeIdentity.load(root / n), roster, crl, [m for m in ids if m != n], ["w"], params,
                      timeout=5.0, ledger_head=lambda n=n: self.heads[n],
                      on_receipt=lambda *r, n=n: self.receipts[n].append(r),
                      on_goodbye=recorded if n == "b" else None)
            net.start()
            self.nets[n] = net
        self.keys = {n: load_private_key((root / n / "node.key").read_bytes()) for n in ids}

    def close(self) -> None:
        for net in self.nets.values():
            net.close()


def test_a_goodbye_is_answered_with_a_receipt_for_the_head_it_carried(tmp_path: Path) -> None:
    pair = _Pair(tmp_path / "pki")
    try:
        assert pair.nets["a"].notify("bye") == {"b"}
        assert pair.nets["b"].heard("bye") == {"a"}
        (peer, index, entry_hash, sig), = pair.receipts["a"]
        assert peer == "b" and (index, entry_hash) == pair.heads["a"]
        assert receipt_signed_by(pair.keys["b"].public_key(), "b", "a", pair.heads["a"], sig)
        assert pair.nets["a"].notify("done") == {"b"} and len(pair.receipts["a"]) == 1  # only goodbyes
        (who, gi, gh, gsig), = pair.goodbyes  # b recorded a's head before it signed the receipt
        assert who == "a" and (gi, gh) == pair.heads["a"] and len(gsig) == 64
    finally:
        pair.close()


@pytest.mark.parametrize("outcome", ["raises", "kept back"])
def test_no_receipt_is_signed_for_a_goodbye_head_that_was_not_recorded(tmp_path: Path, outcome: str) -> None:
    def not_recorded(*_: Any) -> bool:
        if outcome == "raises":
            raise OSError("No space left on device")
        return False  # e.g. throttled, or refused as not advancing

    pair = _Pair(tmp_path / "pki", goodbye=not_recorded)
    try:
        assert pair.nets["a"].notify("bye") == {"b"}  # the goodbye is delivered, acknowledged only
        assert pair.receipts["a"] == [] and len(pair.goodbyes) == 1
    finally:
        pair.close()


class _WrongKeyReceipts(GrpcPeerNetwork):
    """A rogue neighbour whose receipts are signed for another head than the one it received."""

    def _receipt(self, sender: str, msg: Any) -> Any:
        out = super()._receipt(sender, msg)
        out.tensors["ledger.receipt_signature"] = np.frombuffer(
            sign_receipt(self._signing_key, self.node_id, sender, (99, b"\x00" * 32)), np.uint8)
        return out


def test_a_receipt_that_does_not_verify_is_dropped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pair = _Pair(tmp_path / "pki", _WrongKeyReceipts)
    try:
        with caplog.at_level(logging.WARNING, logger="privfl.node"):
            assert pair.nets["a"].notify("bye") == {"b"}  # delivered: the goodbye itself went through
        assert pair.receipts["a"] == []
        assert "is not its signature of our head at index 7: dropped" in caplog.text
    finally:
        pair.close()


# --------------------------------------------------------------------------- attacks by a member


class _Site:
    """A ledger, its AnchorThrottle and a GrpcPeerNetwork, wired as privfl.node.Node wires them."""

    def __init__(self, run: Path, nid: str, roster: Any, crl: bytes) -> None:
        self.nid = nid
        self.key = node_key(run, nid)
        self.ledger = Ledger.create(run / nid / "ledger.jsonl", self.key, (run / "pki" / nid / "node.pem").read_bytes(),
                                    POLICY, "privfl-test", randomness="secure")
        led = self.ledger
        self.throttle = AnchorThrottle(lambda: (led.steps, led.ends_with_close),
                                       lambda p, i, h, s: led.append_anchor(p, i, h, s or None),
                                       newest=led.last_anchor, sync=led.sync)
        self.lie: tuple[int, bytes] | None = None  # a rogue's made-up head (signed with its own key)
        self.net = GrpcPeerNetwork(
            NodeIdentity.load(run / "pki" / nid), roster, crl, [n for n in ("a", "b") if n != nid], ["w"],
            [np.zeros((2, 3), np.float32)], timeout=5.0, trust_poll=None,
            ledger_head=lambda: self.lie or led.head, on_peer_head=self.throttle.offer,
            on_goodbye=self.throttle.commit, on_receipt=self._keep)
        self.net.start()

    def _keep(self, peer: str, index: int, entry_hash: bytes, sig: bytes) -> None:
        own = sign_head(self.key, self.nid, (index, entry_hash)).hex()
        receipt = Receipt(peer, self.nid, index, entry_hash.hex(), sig.hex(), own)
        append_receipt(receipts_path(self.ledger.path), receipt)


def _sites(run: Path) -> tuple[_Site, _Site]:
    ports = free_ports(2)
    init_consortium("rs", ["a", "b"], run / "pki", addresses={n: f"127.0.0.1:{p}" for n, p in zip("ab", ports)})
    _, roster, crl = load_pki(run / "pki")
    a, b = _Site(run, "a", roster, crl), _Site(run, "b", roster, crl)
    for _ in range(3):  # a little honest traffic: DP events, hellos carrying heads
        for s in (a, b):
            s.ledger.append_dp_event(1.0, 0.02, 5, "psac", 1.0)
        a.net.notify("hello")
        b.net.notify("hello")
    return a, b


def test_goodbyes_beyond_the_record_get_no_receipt_so_a_crash_blames_no_one(tmp_path: Path) -> None:
    """A rogue a says goodbye early, again after its close, then with a made-up higher head and
    with a rewritten close head. b writes the first two at once and receipts them; the made-up
    head is kept back and the conflicting one refused, and neither gets a receipt. b then dies
    before its shutdown flush: the audit blames b for nothing and a's receipts confirm its end."""
    run = tmp_path / "run"
    a, b = _sites(run)
    try:
        b.ledger.append_close("finished")
        assert b.net.notify("bye") == {"a"}
        assert a.net.notify("bye") == {"b"}  # an early goodbye (1st: written at once)
        a.ledger.append_close("finished")
        close = a.ledger.head
        assert a.net.notify("bye") == {"b"}  # its real close (2nd: written at once)
        a.lie = (close[0] + 50, b"\xee" * 32)
        assert a.net.notify("bye") == {"b"}  # a made-up head: only kept back by b
        a.lie = (close[0], b"\xdd" * 32)
        assert a.net.notify("bye") == {"b"}  # the close index with another hash: refused by b's ledger
        found, _ = read_receipts(receipts_path(a.ledger.path))
        assert [r.index for _, r in found][-1] == close[0] and len(found) == 2
        assert b.throttle.pending()["a"][0] == close[0] + 50
    finally:
        a.net.close()
        b.net.close()  # b "crashes": no flush of its kept-back heads
        a.ledger.close()
        b.ledger.close()
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert not [p for p in rep.problems if p.kind in ("dropped_head", "unproven_head")], \
        [vars(p) for p in rep.problems]
    assert not rep.problems_of("b") and not rep.problems_of("a"), [vars(p) for p in rep.problems]


def test_a_receipt_for_a_head_the_ledger_lacks_blames_no_holder_without_the_nodes_signature(tmp_path: Path) -> None:
    """h3 stores genuine receipts of h1 (replayed from another run, or for a head h3 rewrote) with
    the head signature left out: they are no evidence against h1 nor against h3's ledger."""
    run = simulate_run(tmp_path / "run")
    head = _close_head(run, "h3")
    path = receipts_path(run / "h3" / "ledger.jsonl")
    for fake in ((head[0], b"\xaa" * 32), (head[0] + 6, b"\xbb" * 32)):
        r = _receipt(run, "h1", "h3", fake)
        append_receipt(path, Receipt(r.holder, r.node, r.index, r.entry_hash, r.signature, ""))
    rep = audit_consortium(run, (run / "pki" / "ca.pem").read_bytes(), compute_pld=False)
    assert rep.ok, [vars(p) for p in rep.problems]
    assert rep.nodes["h3"].receipts == {"verified": 0, "unverified": 2}


def _trio(root: Path, b_receipts: bool) -> tuple[dict[str, GrpcPeerNetwork], dict[str, list[tuple[Any, ...]]]]:
    """a's only neighbour is b; c is another member of the roster (a witness)."""
    ids = ["a", "b", "c"]
    ports = free_ports(3)
    init_consortium("rw", ids, root, addresses={n: f"127.0.0.1:{p}" for n, p in zip(ids, ports)})
    _, roster, crl = load_pki(root)
    got: dict[str, list[tuple[Any, ...]]] = {n: [] for n in ids}
    neighbours = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
    nets = {}
    for n in ids:
        net = GrpcPeerNetwork(NodeIdentity.load(root / n), roster, crl, neighbours[n], ["w"],
                              [np.zeros((2, 3), np.float32)], timeout=5.0, trust_poll=None,
                              ledger_head=lambda: (7, b"\x0a" * 32), on_receipt=lambda *r, n=n: got[n].append(r),
                              on_goodbye=(lambda *h: b_receipts) if n == "b" else (lambda *h: True))
        net.start()
        nets[n] = net
    return nets, got


@pytest.mark.parametrize("b_receipts", [True, False])
def test_when_no_neighbour_receipts_the_goodbye_another_member_is_asked(tmp_path: Path, b_receipts: bool) -> None:
    """Neighbours that withhold their receipts cannot leave a node without one: it asks another
    member of the roster, who records the head and receipts it. An honest neighbour's receipt
    is enough, and then no one else is asked."""
    nets, got = _trio(tmp_path / "pki", b_receipts)
    try:
        assert nets["a"].goodbye(timeout=3.0) == {"b"}
        assert [r[0] for r in got["a"]] == (["b"] if b_receipts else ["c"])
        assert nets["c"].heard("bye") == (set() if b_receipts else {"a"})
    finally:
        for net in nets.values():
            net.close()
