"""Per-message signatures: round trip, every tampered field refused, another member's key, revocation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privfl.accounting.heads import head_signed_by
from privfl.pki import NodeIdentity, init_consortium, issue_node, load_pki, revoke_node
from privfl.transport import WIRE_VERSION, Message, TrustState, encode_message, iter_chunks
from privfl.transport.codec import MessageAssembler
from privfl.transport.signing import (
    AuthenticationFailed,
    PeerVerifier,
    Signer,
    canonical_bytes,
    head_signature_of,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sigpki")
    init_consortium("sig", ["a", "b", "c"], d)
    return d


def _trust(d: Path) -> TrustState:
    ca, roster, crl = load_pki(d)
    return TrustState(ca, roster, crl, "b")


def _signed(d: Path, sender: str = "a", key_of: str | None = None, head: tuple[int, bytes] | None = (7, b"\x11" * 32),
            **msg_kw: object) -> list[bytes]:
    """A complete signed stream from ``sender`` to ``b`` (signed with ``key_of``'s certificate and key)."""
    idn = NodeIdentity.load(d / (key_of or sender))
    signer = Signer(idn.key_pem, idn.cert_pem)
    kw = {"kind": "model", "round": 3, "tensors": {"w": np.arange(6, dtype=np.float32)},
          "scalars": {"policy_sigma": 1.0}}
    kw.update(msg_kw)
    enc = encode_message(Message(**kw), sender, "b", 1234, in_reply_to=55, certificate=signer.certificate_der,  # type: ignore[arg-type]
                         seal=lambda h, dg: signer.seal(h, dg, head))
    return list(iter_chunks(enc))


def _verify(d: Path, chunks: list[bytes], verifier: PeerVerifier | None = None, verify_digest: bool = True):  # noqa: ANN202
    asm = MessageAssembler(None, 1 << 20, verify_digest)
    assert any(asm.feed(c) for c in chunks)
    v = verifier or PeerVerifier(_trust(d))
    assert asm.header is not None and asm.trailer is not None and asm.digest is not None
    peer, head = v.message(asm.header, asm.trailer, asm.digest)
    return peer, head, asm.message(head, head_signature_of(asm.trailer))


def test_round_trip_carries_the_verified_ledger_head(pki: Path) -> None:
    peer, head, msg = _verify(pki, _signed(pki))
    assert peer.node_id == "a" and head == (7, b"\x11" * 32) and msg.ledger_head == head
    # the head carries a's own signature of it alone: checkable later, away from the message
    assert head_signed_by(peer.public_key, "a", head, msg.head_signature)
    assert not head_signed_by(peer.public_key, "b", head, msg.head_signature)  # bound to the node id
    assert not head_signed_by(peer.public_key, "a", (8, head[1]), msg.head_signature)  # and the index
    assert msg.sender == "a" and msg.in_reply_to == 55
    _, head, msg = _verify(pki, _signed(pki, head=None))
    assert head is None and msg.ledger_head is None


def _mutate(chunks: list[bytes], part: str, change) -> list[bytes]:  # noqa: ANN001
    from privfl.transport.proto import gossip_pb2 as pb
    out = list(chunks)
    idx = 0 if part == "header" else len(out) - 1
    c = pb.Chunk.FromString(out[idx])
    change(getattr(c, part))
    out[idx] = c.SerializeToString()
    return out


TAMPER = {
    "sender": ("header", lambda h: setattr(h, "sender", "c")),
    "recipient": ("header", lambda h: setattr(h, "recipient", "c")),
    "sequence": ("header", lambda h: setattr(h, "sequence", h.sequence + 1)),
    "in_reply_to": ("header", lambda h: setattr(h, "in_reply_to", 56)),
    "round": ("header", lambda h: setattr(h, "round", 4)),
    "kind": ("header", lambda h: setattr(h, "kind", "innovation")),
    "scalar value": ("header", lambda h: h.scalars.__setitem__("policy_sigma", 9.0)),
    "scalar added": ("header", lambda h: h.scalars.__setitem__("lr", 0.1)),
    "tensor name": ("header", lambda h: setattr(h.tensors[0], "name", "v")),
    "certificate": ("header", lambda h: setattr(h, "sender_certificate", b"")),
    "digest": ("trailer", lambda t: setattr(t, "model_digest", b"\0" * 32)),
    "digest algorithm": ("header", lambda h: setattr(h, "digest_algorithm", "sha256")),
    "head index": ("trailer", lambda t: setattr(t.ledger_head, "index", 8)),
    "head hash": ("trailer", lambda t: setattr(t.ledger_head, "entry_hash", b"\x12" * 32)),
    "head removed": ("trailer", lambda t: t.ClearField("ledger_head")),
    "signature": ("trailer", lambda t: setattr(t, "signature", t.signature[:-1] + bytes([t.signature[-1] ^ 1]))),
    "unsigned": ("trailer", lambda t: setattr(t, "signature", b"")),
    "head signature": ("trailer", lambda t: setattr(t.ledger_head, "signature", bytes(64))),
    "head unsigned": ("trailer", lambda t: setattr(t.ledger_head, "signature", b"")),
}


@pytest.mark.parametrize("field", sorted(TAMPER))
def test_every_tampered_field_is_refused(pki: Path, field: str) -> None:
    part, change = TAMPER[field]
    chunks = _mutate(_signed(pki), part, change)
    # receivers that trust the declared digest (verify_digest=False) still refuse: it is signed
    with pytest.raises(Exception) as info:
        _verify(pki, chunks, verify_digest=False)
    assert isinstance(info.value, AuthenticationFailed), (field, info.value)


def test_signed_with_another_members_key_is_refused(pki: Path) -> None:
    # c signs a message that claims to come from a, with c's own certificate: the certificate names c
    with pytest.raises(AuthenticationFailed, match="names node 'c'"):
        _verify(pki, _signed(pki, sender="a", key_of="c"))
    # a's certificate in the header but c's signature: the signature does not verify
    idc, ida = NodeIdentity.load(pki / "c"), NodeIdentity.load(pki / "a")
    signer_c, cert_a = Signer(idc.key_pem, idc.cert_pem), Signer(ida.key_pem, ida.cert_pem).certificate_der
    enc = encode_message(Message("model", 3, {"w": np.ones(2, np.float32)}), "a", "b", 9, certificate=cert_a,
                         seal=lambda h, dg: signer_c.seal(h, dg, None))
    with pytest.raises(AuthenticationFailed, match="does not verify"):
        _verify(pki, list(iter_chunks(enc)))


def test_revoked_and_unpinned_certificates_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    init_consortium("sig", ["a", "b"], d)
    old = _signed(d)
    verifier = PeerVerifier(_trust(d))
    _verify(d, old, verifier)  # cached as verified
    issue_node(d, "a", "127.0.0.1:1")  # re-issue: the old certificate is revoked, the pin moves
    ca, roster, crl = load_pki(d)
    verifier.trust.update(roster, crl)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        _verify(d, old, verifier)  # the cache was dropped with the trust change
    _verify(d, _signed(d), verifier)  # the new certificate is the pin
    revoke_node(d, "a")
    verifier.trust.update(crl=(d / "crl.pem").read_bytes())
    with pytest.raises(AuthenticationFailed, match="revoked") as info:
        _verify(d, _signed(d), verifier)
    assert not info.value.repeat
    with pytest.raises(AuthenticationFailed) as info:
        _verify(d, _signed(d), verifier)
    assert info.value.repeat  # logged once per certificate by the callers


def test_canonical_bytes_are_injective_on_string_boundaries(pki: Path) -> None:
    from privfl.transport.proto import gossip_pb2 as pb
    h1 = pb.Header(version=WIRE_VERSION, sender="ab", recipient="c", kind="model")
    h2 = pb.Header(version=WIRE_VERSION, sender="a", recipient="bc", kind="model")
    assert canonical_bytes(h1, b"\0" * 32, None) != canonical_bytes(h2, b"\0" * 32, None)
    s1 = pb.Header(version=WIRE_VERSION, sender="a", kind="m")
    s1.scalars["x"], s1.scalars["y"] = 1.0, 2.0
    s2 = pb.Header(version=WIRE_VERSION, sender="a", kind="m")
    s2.scalars["y"], s2.scalars["x"] = 2.0, 1.0
    assert canonical_bytes(s1, b"\0" * 32, None) == canonical_bytes(s2, b"\0" * 32, None)
