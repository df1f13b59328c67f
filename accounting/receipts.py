"""Receipts a node keeps for its close head: each neighbour's signature that it received it.

Why: a node's end is confirmed in the consortium audit when a peer holds the head of its
close entry. The goodbye carries that head, and an honest neighbour records it; but a
neighbour that drops it would leave an honest node ``unconfirmed_end`` (its ledger could
have been cut back, as far as the audit can tell). So the neighbour answers the goodbye
with a *receipt*, its own signature of the head it received
(:func:`accounting.heads.sign_receipt`), and the node appends it to ``receipts.jsonl``
next to its ledger. A receipt proves itself (the holder's certificate key signed it), so
the file needs no signature of its own: a line that does not verify is no evidence, and
deleting the file only loses the node its own evidence.

Each line is one JSON object: ``holder``, ``node``, ``index``, ``entry_hash`` (hex),
``signature`` (the holder's receipt, hex r||s) and ``head_signature`` (the node's own
signature of that head, as every head a node sends carries one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privfl.accounting.heads import HEAD_SIGNATURE_BYTES, receipt_signed_by
from privfl.accounting.ledger import _append_side_line, _split_lines

__all__ = ["MAX_LINE_BYTES", "MAX_RECEIPTS", "RECEIPTS_FILE", "Receipt", "append_receipt", "read_receipts",
           "receipts_path"]

RECEIPTS_FILE = "receipts.jsonl"
MAX_LINE_BYTES = 4096  # a receipt line is about 420 bytes; a longer line is not read
MAX_RECEIPTS = 10_000  # lines read from one file (a run writes one per neighbour per goodbye)
_HASH_HEX = 64
_SIG_HEX = 2 * HEAD_SIGNATURE_BYTES


@dataclass(frozen=True)
class Receipt:
    """``holder``'s signed statement that it received ``node``'s head (``index``, ``entry_hash``)."""

    holder: str
    node: str
    index: int
    entry_hash: str
    signature: str
    head_signature: str = ""

    def __post_init__(self) -> None:
        if not self.holder or not self.node or self.holder == self.node:
            raise ValueError("a receipt names a holder and another node")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < 2**63:
            raise ValueError(f"receipt index {self.index!r} is not an entry index")
        for name, value, size in (("entry_hash", self.entry_hash, _HASH_HEX), ("signature", self.signature, _SIG_HEX)):
            if not _is_hex(value, size):
                raise ValueError(f"receipt {name} is not {size} hex characters")
        if self.head_signature and not _is_hex(self.head_signature, _SIG_HEX):
            raise ValueError(f"receipt head_signature is not {_SIG_HEX} hex characters")

    @property
    def head(self) -> tuple[int, bytes]:
        """The received head: (index, 32-byte entry hash)."""
        return self.index, bytes.fromhex(self.entry_hash)

    def signed_by(self, holder_key: object) -> bool:
        """Whether the holder's certificate key signed this receipt."""
        return receipt_signed_by(holder_key, self.holder, self.node, self.head, bytes.fromhex(self.signature))

    def to_line(self) -> bytes:
        """The receipt as one canonical JSON line (no newline)."""
        return json.dumps(vars(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, raw: Any) -> Receipt:
        """A receipt from a parsed line; ValueError when it is not one."""
        if not isinstance(raw, dict):
            raise ValueError("a receipt line is a JSON object")
        try:
            return cls(str(raw["holder"]), str(raw["node"]), raw["index"], str(raw["entry_hash"]),
                       str(raw["signature"]), str(raw.get("head_signature", "")))
        except KeyError as exc:
            raise ValueError(f"a receipt line lacks {exc}") from None


def _is_hex(value: str, size: int) -> bool:
    return len(value) == size and all(c in "0123456789abcdef" for c in value)


def receipts_path(ledger_path: str | os.PathLike[str]) -> Path:
    """``receipts.jsonl`` next to ``ledger.jsonl`` (``<stem>.receipts.jsonl`` for another name)."""
    p = Path(ledger_path)
    return p.with_name(RECEIPTS_FILE if p.name == "ledger.jsonl" else f"{p.stem}.{RECEIPTS_FILE}")


def append_receipt(path: str | os.PathLike[str], receipt: Receipt) -> None:
    """Append ``receipt`` to the receipts file and fsync (a torn last line is cut first);
    :class:`~accounting.ledger.LedgerError` ``write_failed`` when it cannot be written."""
    p = Path(path)
    good = 0
    if p.exists():
        lines, _ = _split_lines(p.read_bytes())
        good = sum(len(line) + 1 for line in lines)
    _append_side_line(p, receipt.to_line() + b"\n", good)


def read_receipts(path: str | os.PathLike[str]) -> tuple[list[tuple[int, Receipt]], int]:
    """The distinct receipts of a file, each with its first line number, and how many lines are
    not receipts (too long, not JSON, or past the first ``MAX_RECEIPTS``; a torn last line and
    repeats of a receipt are not counted). Nothing is verified here: see :meth:`Receipt.signed_by`."""
    lines, _ = _split_lines(Path(path).read_bytes())
    out: list[tuple[int, Receipt]] = []
    seen: set[Receipt] = set()
    bad = max(0, len(lines) - MAX_RECEIPTS)
    for number, line in enumerate(lines[:MAX_RECEIPTS]):
        if len(line) > MAX_LINE_BYTES:
            bad += 1
            continue
        try:
            receipt = Receipt.from_dict(json.loads(line))
        except (ValueError, RecursionError):
            bad += 1
            continue
        if receipt not in seen:
            seen.add(receipt)
            out.append((number, receipt))
    return out, bad
