"""A ledger head signed on its own: the proof a peer keeps that a node sent that head.

Every message a node sends carries its ledger head (index, entry hash), and the node's key
also signs the head alone (:func:`sign_head`: a domain, the node id, the index and the
hash). The receiver keeps that signature with the anchor. Two things then hold:

* a node that restarts can check that a head a neighbour says it holds is one it signed,
  so a member cannot stop its restart with a head it made up;
* the consortium audit can tell a head that proves a ledger was cut or rewritten from one
  the holder wrote into its own ledger: a member cannot frame another.

The signature is ECDSA P-256 / SHA-256, 64 bytes (r || s), with the node's certificate key.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

__all__ = ["HEAD_DOMAIN", "HEAD_SIGNATURE_BYTES", "head_bytes", "head_signed_by", "sign_head"]

HEAD_DOMAIN = b"privfl-ledger-head-v1\n"
HEAD_SIGNATURE_BYTES = 64  # r || s, 32 bytes each (P-256)
_HASH_BYTES = 32
_ECDSA = ec.ECDSA(hashes.SHA256())

Head = tuple[int, bytes]  # (index, 32-byte entry hash)


def head_bytes(node_id: str, head: Head) -> bytes:
    """What a head signature covers: the domain, the node id, the index and the entry hash."""
    index, entry_hash = head
    if len(entry_hash) != _HASH_BYTES:
        raise ValueError(f"ledger head hash has {len(entry_hash)} bytes, not {_HASH_BYTES}")
    if not 0 <= int(index) < 2**64:
        raise ValueError(f"ledger head index {index} is out of range")
    node = node_id.encode("utf-8")
    return HEAD_DOMAIN + struct.pack(">I", len(node)) + node + struct.pack(">Q", int(index)) + bytes(entry_hash)


def sign_head(key: ec.EllipticCurvePrivateKey, node_id: str, head: Head) -> bytes:
    """The 64-byte (r || s) ECDSA P-256 signature of ``node_id``'s ledger head."""
    r, s = decode_dss_signature(key.sign(head_bytes(node_id, head), _ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def head_signed_by(public_key: object, node_id: str, head: Head, signature: bytes) -> bool:
    """Whether ``signature`` is ``node_id``'s signature of ``head`` under ``public_key``
    (False for a key that is not ECDSA, a malformed signature or head)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != HEAD_SIGNATURE_BYTES:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, head_bytes(node_id, head), _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True
