"""A ledger head signed on its own: the proof a peer keeps that a node sent that head.

Every message a node sends carries its ledger head (index, entry hash), and the node's key
also signs the head alone (:func:`sign_head`: a domain, the node id, the index and the
hash). The receiver keeps that signature with the anchor. Two things then hold:

* a node that restarts can check that a head a neighbour says it holds is one it signed,
  so a member cannot stop its restart with a head it made up;
* the consortium audit can tell a head that proves a ledger was cut or rewritten from one
  the holder wrote into its own ledger: a member cannot frame another.

The signature is ECDSA P-256 / SHA-256, 64 bytes (r || s), with the node's certificate key.

A *receipt* is the other direction: the holder's signature that it received a node's head
(:func:`sign_receipt`: another domain, the holder id, then what a head signature covers).
A node's goodbye carries the head of its close entry, and the neighbour answers with a
receipt for it, which the node keeps (:mod:`accounting.receipts`). A neighbour that signs
a receipt and then keeps no record of that head can no longer leave an honest node's end
unconfirmed in the consortium audit: the receipt confirms the end, and the missing record
is the holder's problem.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

__all__ = ["HEAD_DOMAIN", "HEAD_SIGNATURE_BYTES", "RECEIPT_DOMAIN", "head_bytes", "head_signed_by",
           "receipt_bytes", "receipt_signed_by", "sign_head", "sign_receipt"]

HEAD_DOMAIN = b"privfl-ledger-head-v1\n"
RECEIPT_DOMAIN = b"privfl-head-receipt-v1\n"
HEAD_SIGNATURE_BYTES = 64  # r || s, 32 bytes each (P-256)
_HASH_BYTES = 32
_ECDSA = ec.ECDSA(hashes.SHA256())

Head = tuple[int, bytes]  # (index, 32-byte entry hash)


def head_bytes(node_id: str, head: Head) -> bytes:
    """What a head signature covers: the domain, the node id, the index and the entry hash."""
    return HEAD_DOMAIN + _head_fields(node_id, head)


def receipt_bytes(holder_id: str, node_id: str, head: Head) -> bytes:
    """What a receipt covers: its domain, the holder id, then the node id, index and entry hash."""
    holder = holder_id.encode("utf-8")
    return RECEIPT_DOMAIN + struct.pack(">I", len(holder)) + holder + _head_fields(node_id, head)


def _head_fields(node_id: str, head: Head) -> bytes:
    index, entry_hash = head
    if len(entry_hash) != _HASH_BYTES:
        raise ValueError(f"ledger head hash has {len(entry_hash)} bytes, not {_HASH_BYTES}")
    if not 0 <= int(index) < 2**64:
        raise ValueError(f"ledger head index {index} is out of range")
    node = node_id.encode("utf-8")
    return struct.pack(">I", len(node)) + node + struct.pack(">Q", int(index)) + bytes(entry_hash)


def sign_head(key: ec.EllipticCurvePrivateKey, node_id: str, head: Head) -> bytes:
    """The 64-byte (r || s) ECDSA P-256 signature of ``node_id``'s ledger head."""
    return _sign(key, head_bytes(node_id, head))


def head_signed_by(public_key: object, node_id: str, head: Head, signature: bytes) -> bool:
    """Whether ``signature`` is ``node_id``'s signature of ``head`` under ``public_key``
    (False for a key that is not ECDSA, a malformed signature or head)."""
    try:
        data = head_bytes(node_id, head)
    except ValueError:
        return False
    return _verify(public_key, data, signature)


def sign_receipt(key: ec.EllipticCurvePrivateKey, holder_id: str, node_id: str, head: Head) -> bytes:
    """The holder's 64-byte signature that it received ``node_id``'s ledger ``head``."""
    return _sign(key, receipt_bytes(holder_id, node_id, head))


def receipt_signed_by(public_key: object, holder_id: str, node_id: str, head: Head, signature: bytes) -> bool:
    """Whether ``signature`` is ``holder_id``'s receipt for ``node_id``'s ``head`` under ``public_key``
    (the holder's certificate key; False for anything malformed)."""
    try:
        data = receipt_bytes(holder_id, node_id, head)
    except ValueError:
        return False
    return _verify(public_key, data, signature)


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, _ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _verify(public_key: object, data: bytes, signature: bytes) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != HEAD_SIGNATURE_BYTES:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, data, _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True
