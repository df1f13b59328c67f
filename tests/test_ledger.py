"""The signed privacy ledger: appends, durability, reopening, torn tails, accountant rebuild."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from privfl.accounting import PrivacyAccountant
from privfl.accounting.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    LedgerPolicy,
    TornTailError,
    canonical_bytes,
    entry_hash,
    read_ledger,
    signing_bytes,
    verify_signature,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- PKI fixture


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(node_ids: tuple[str, ...] = ("h1", "h2"), node_key: str = "p256") -> dict[str, Any]:
    """A CA and one CA-signed node certificate per id (ECDSA P-256 unless node_key='ed25519')."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    nodes: dict[str, tuple[Any, str]] = {}
    for nid in node_ids:
        key: Any = (
            ed25519.Ed25519PrivateKey.generate()
            if node_key == "ed25519"
            else ec.generate_private_key(ec.SECP256R1())
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(nid))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"privfl://test/{nid}")]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        nodes[nid] = (key, cert.public_bytes(serialization.Encoding.PEM).decode())
    return {
        "ca_pem": ca.public_bytes(serialization.Encoding.PEM).decode(),
        "ca_key": ca_key,
        "nodes": nodes,
    }


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return make_pki()


POLICY = LedgerPolicy(
    target_epsilon=3.0,
    delta=1e-5,
    min_noise_multiplier=0.5,
    allowed_clipping_rules=("psac", "flat"),
)


def new_ledger(path: Path, pki: dict[str, Any], node: str = "h1", **kw: Any) -> Ledger:
    key, cert = pki["nodes"][node]
    kw.setdefault("randomness", "secure")
    return Ledger.create(path, key, cert, POLICY, "privfl-test 0.0", **kw)


# --------------------------------------------------------------------------- tests


def test_entries_are_canonical_chained_and_signed(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    with new_ledger(path, pki) as led:
        led.append_dp_event(1.1, 0.01, 10, "psac", 1.0)
        led.append_message("h2", 0, 1, b"model bytes")
        led.append_stop("budget_exhausted")
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == 4
    entries = [json.loads(x) for x in lines]
    assert [e["kind"] for e in entries] == ["header", "dp_event", "message", "stop"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    cert = x509.load_pem_x509_certificate(pki["nodes"]["h1"][1].encode())
    for i, (line, e) in enumerate(zip(lines, entries)):
        assert canonical_bytes(e) == line
        assert verify_signature(cert.public_key(), e["signature"], signing_bytes(e))  # type: ignore[arg-type]
        if i:
            assert e["prev_hash"] == entry_hash(lines[i - 1])
    head = entries[0]["body"]
    assert head["node_id"] == "h1"
    assert head["policy"]["neighbouring_relation"] == "add_or_remove_one"
    assert head["policy"]["accountant"] == "rdp"
    assert head["software_version"] == "privfl-test 0.0"
    assert "BEGIN CERTIFICATE" in head["certificate"]
    # the message records a digest and size, never the values
    msg = entries[2]["body"]
    assert msg["bytes"] == len(b"model bytes") and len(msg["sha256"]) == 64
    assert b"model bytes" not in raw
    ev = entries[1]["body"]
    assert ev["mechanism"] == "poisson_gaussian" and ev["clipping_rule"] == "psac"
    acc = PrivacyAccountant()
    acc.step(1.1, 0.01, 10)
    assert ev["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-12)


def test_reopen_continues_chain_and_rebuilds_accountant(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    direct = PrivacyAccountant()
    steps = [(1.1, 0.01, 50), (0.9, 0.02, 20), (1.1, 0.01, 30)]
    with new_ledger(path, pki) as led:
        for s, q, n in steps[:2]:
            direct.step(s, q, n)
            led.append_dp_event(s, q, n, "psac", 1.0, epsilon=direct.get_epsilon(1e-5))
    # a restart: the accountant comes back from the ledger, not from zero
    with Ledger.open(path, key) as led:
        acc = led.rebuild_accountant()
        assert acc.steps == 70
        assert acc.get_epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), abs=1e-12)
        s, q, n = steps[2]
        direct.step(s, q, n)
        led.append_dp_event(s, q, n, "psac", 1.0, epsilon=direct.get_epsilon(1e-5))
        assert led.num_entries == 4
    with Ledger.open(path, key) as led:
        acc = led.rebuild_accountant()
        assert led.steps == 100
        assert acc.events == direct.events
        for method in ("rdp", "pld"):
            assert acc.get_epsilon(1e-5, method) == pytest.approx(
                direct.get_epsilon(1e-5, method), abs=1e-9
            )
        assert led.last_epsilon == pytest.approx(direct.get_epsilon(1e-5), abs=1e-12)
    assert read_ledger(path).ok


def test_pld_policy_rebuilds_pld_accountant(tmp_path: Path, pki: dict[str, Any]) -> None:
    key, cert = pki["nodes"]["h1"]
    pol = LedgerPolicy(3.0, 1e-5, 0.5, ("psac",), accountant="pld")
    with Ledger.create(tmp_path / "l.jsonl", key, cert, pol, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 100, "psac", 1.0)
        acc = led.rebuild_accountant()
    assert acc.method == "pld"
    direct = PrivacyAccountant("pld")
    direct.step(1.0, 0.01, 100)
    assert acc.get_epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), abs=1e-12)


def _writer(path: str, key_pem: bytes, n: int) -> None:
    key = serialization.load_pem_private_key(key_pem, None)
    led = Ledger.open(path, key)  # type: ignore[arg-type]
    for i in range(n):
        led.append_message("h2", i, i, b"x" * i)
    os._exit(0)  # no close(): every append must already be on disk


def test_appends_are_durable_without_close(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    new_ledger(path, pki).close()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    proc = mp.get_context("fork").Process(target=_writer, args=(str(path), key_pem, 25))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    with Ledger.open(path, key) as led:
        assert led.num_entries == 26
        assert led.messages == 25
        assert led.bytes_sent == sum(range(25))


def test_batched_fsync_still_writes_everything(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    with new_ledger(path, pki, fsync_every=16) as led:
        for i in range(40):
            led.append_message("h2", i, 0, digest="ab" * 32, size=10)
    with Ledger.open(path, key, fsync_every=0) as led:
        assert led.num_entries == 41


def test_torn_tail_is_refused_then_repaired(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    with new_ledger(path, pki) as led:
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
        led.append_message("h2", 0, 0, b"abc")
    good = path.read_bytes()
    # a crash in the middle of the next append: half a line, no newline
    path.write_bytes(good + b'{"body":{"peer":"h2","seq":1')
    with pytest.raises(TornTailError) as info:
        Ledger.open(path, key)
    assert info.value.kind == "torn_tail" and info.value.index == 3
    assert read_ledger(path).error is not None
    # open never continues silently: the file is untouched
    assert path.read_bytes().startswith(good) and len(path.read_bytes()) > len(good)
    with Ledger.repair_torn_tail(path, key) as led:
        assert led.num_entries == 4  # 3 good entries + the repair note
        led.append_message("h2", 1, 0, b"abcd")
    verified = read_ledger(path)
    assert verified.ok
    kinds = [e["kind"] for e in verified.entries]
    assert kinds == ["header", "dp_event", "message", "note", "message"]
    note = verified.entries[3]["body"]
    assert note["note"] == "torn_tail_repaired" and note["dropped_bytes"] == 28


def test_repair_refuses_tampering(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    with new_ledger(path, pki) as led:
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"steps":5', b'"steps":4')
    path.write_bytes(b"\n".join(lines) + b"partial")
    before = path.read_bytes()
    with pytest.raises(LedgerError) as info:
        Ledger.repair_torn_tail(path, key)
    assert not isinstance(info.value, TornTailError)
    assert info.value.index == 1 and info.value.kind == "modified"
    assert path.read_bytes() == before
    with pytest.raises(LedgerError):
        Ledger.open(path, key)


def test_open_refuses_wrong_key_and_existing_file(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    new_ledger(path, pki).close()
    other_key, _ = pki["nodes"]["h2"]
    with pytest.raises(LedgerError, match="does not match"):
        Ledger.open(path, other_key)
    with pytest.raises(FileExistsError):
        new_ledger(path, pki)
    with pytest.raises(ValueError, match="does not match"):
        Ledger.create(
            tmp_path / "x.jsonl", other_key, pki["nodes"]["h1"][1], POLICY, "v", randomness="secure"
        )


def test_second_writer_is_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, _ = pki["nodes"]["h1"]
    with new_ledger(path, pki):
        with pytest.raises(LedgerError, match="another writer"):
            Ledger.open(path, key)


def test_open_or_create_refuses_changed_policy(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    key, cert = pki["nodes"]["h1"]
    with Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure") as led:
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
    with Ledger.open_or_create(path, key, cert, POLICY, "v", randomness="secure") as led:
        assert led.steps == 5
    looser = LedgerPolicy(8.0, 1e-5, 0.5, ("psac", "flat"))
    with pytest.raises(LedgerError, match="policy"):
        Ledger.open_or_create(path, key, cert, looser, "v", randomness="secure")


def test_bad_inputs_are_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        LedgerPolicy(0.0, 1e-5, 0.5, ("psac",))
    with pytest.raises(ValueError, match="neighbouring_relation"):
        LedgerPolicy(1.0, 1e-5, 0.5, ("psac",), neighbouring_relation="replace_one")
    with new_ledger(tmp_path / "l.jsonl", pki) as led:
        with pytest.raises(ValueError, match="noise_multiplier"):
            led.append_dp_event(0.0, 0.01, 1, "psac", 1.0)
        with pytest.raises(ValueError, match="sample_rate"):
            led.append_dp_event(1.0, 1.5, 1, "psac", 1.0)
        with pytest.raises(ValueError, match="digest"):
            led.append_message("h2", 0, 0, digest="xyz", size=1)
        assert led.num_entries == 1  # nothing was written by refused appends
    with pytest.raises(FileNotFoundError):
        read_ledger(tmp_path / "missing.jsonl")


def test_ed25519_node_key_works(tmp_path: Path) -> None:
    pki = make_pki(("h1",), node_key="ed25519")
    key, _ = pki["nodes"]["h1"]
    path = tmp_path / "l.jsonl"
    with new_ledger(path, pki) as led:
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
    with Ledger.open(path, key) as led:
        assert led.steps == 5


def test_works_with_privfl_pki_certificates(tmp_path: Path) -> None:
    pki_mod = pytest.importorskip("privfl.pki")
    ca, ca_key = pki_mod.make_ca("testnet")
    cert, key = pki_mod.make_node_cert(ca, ca_key, "testnet", "hosp-a")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    path = tmp_path / "l.jsonl"
    with Ledger.create(path, key, pem, POLICY, "v", randomness="secure") as led:
        assert led.node_id == "hosp-a"
        led.append_dp_event(1.0, 0.01, 5, "psac", 1.0)
    with Ledger.open(path, key) as led:
        assert led.steps == 5


def test_reopen_fast_path_still_catches_tampering(tmp_path: Path, pki: dict[str, Any]) -> None:
    """Reopening checks the chain and only the last signature; tampering is still named."""
    from privfl.accounting.ledger import sign_bytes

    key, _ = pki["nodes"]["h1"]
    other_key, _ = pki["nodes"]["h2"]
    path = tmp_path / "l.jsonl"
    with new_ledger(path, pki) as led:
        for _ in range(6):
            led.append_dp_event(1.0, 0.01, 10, "psac", 1.0)
    good = path.read_bytes().split(b"\n")[:-1]

    # 1. a middle entry edited and the chain re-hashed after it (signatures untouched)
    lines = list(good)
    e = json.loads(lines[3])
    e["body"]["steps"] = 1
    lines[3] = canonical_bytes(e)
    for i in range(4, len(lines)):
        nxt = json.loads(lines[i])
        nxt["prev_hash"] = entry_hash(lines[i - 1])
        lines[i] = canonical_bytes(nxt)
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    with pytest.raises(LedgerError) as info:
        Ledger.open(path, key)
    assert info.value.index == 3 and info.value.kind == "modified"

    # 2. ... and additionally the last entry re-signed by another node's key
    e = json.loads(lines[-1])
    e["signature"] = sign_bytes(other_key, signing_bytes(e))
    lines[-1] = canonical_bytes(e)
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    with pytest.raises(LedgerError) as info:
        Ledger.open(path, key)
    assert info.value.index == 3

    # 3. the last entry dropped and the one before re-signed by another key: refused
    lines = list(good[:-1])
    e = json.loads(lines[-1])
    e["signature"] = sign_bytes(other_key, signing_bytes(e))
    lines[-1] = canonical_bytes(e)
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    with pytest.raises(LedgerError) as info:
        Ledger.open(path, key)
    assert info.value.index == len(lines) - 1 and info.value.kind == "modified"


def test_non_canonical_base64_signature_is_refused() -> None:
    """A flip in the unused padding bits of the signature's last base64 character decodes
    to the same bytes; it must still count as a modified entry."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    from privfl.accounting.ledger import sign_bytes, verify_signature

    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(40):
        data = b"entry %d" % i
        sig = sign_bytes(key, data)
        assert verify_signature(key.public_key(), sig, data)
        if sig.endswith("="):
            stem = sig.rstrip("=")
            last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".index(stem[-1])
            alt = stem[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[last ^ 1] \
                + sig[len(stem):]
            assert base64.b64decode(alt) == base64.b64decode(sig)
            assert not verify_signature(key.public_key(), alt, data)
            return
    pytest.skip("no padded signature drawn")
