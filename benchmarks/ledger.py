"""Ledger throughput and audit cost; prints JSON.

Appends per second with fsync on every entry, batched (fsync every N), and without
fsync (close only); then the time to verify / reopen / audit a ledger of
``--entries`` entries (default 100 000: one dp_event per four entries, the rest messages).

    .venv/bin/python benchmarks/ledger.py [--entries 100000] [--fsync-appends 2000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privfl.accounting.audit import audit_ledger  # noqa: E402
from privfl.accounting.ledger import Ledger, LedgerPolicy, read_ledger  # noqa: E402


def make_pki() -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """A throwaway CA and one P-256 node certificate (CN=bench-node)."""
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("bench-node")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return key, cert.public_bytes(pem).decode(), ca.public_bytes(pem).decode()


POLICY = LedgerPolicy(target_epsilon=1e9, delta=1e-5, min_noise_multiplier=0.5,
                      allowed_clipping_rules=("psac",))
DIGEST = "ab" * 32


def append_rate(path: Path, key: ec.EllipticCurvePrivateKey, cert: str, n: int, fsync_every: int) -> float:
    """Message appends per second."""
    with Ledger.create(path, key, cert, POLICY, "bench", fsync_every=fsync_every, randomness="secure") as led:
        t = time.perf_counter()
        for i in range(n):
            led.append_message("peer", i, i, digest=DIGEST, size=1000)
        led.sync()
        dt_s = time.perf_counter() - t
    return n / dt_s


def build_big(path: Path, key: ec.EllipticCurvePrivateKey, cert: str, entries: int) -> float:
    """A ledger of ``entries`` entries (1 in 4 a dp_event); returns the build seconds."""
    eps = 0.0
    t = time.perf_counter()
    with Ledger.create(path, key, cert, POLICY, "bench", fsync_every=0, randomness="secure") as led:
        for i in range(1, entries):
            if i % 4 == 1:
                eps += 1e-4  # the node's value; the audit's claimed-ε check will flag it
                led.append_dp_event(1.0, 0.01, 1, "psac", 1.0, epsilon=eps)
            else:
                led.append_message("peer", i, i, digest=DIGEST, size=100_000)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--fsync-appends", type=int, default=2000)
    ap.add_argument("--batched-appends", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    key, cert, ca = make_pki()
    out: dict[str, object] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        base = Path(d)
        out["appends_per_s_fsync_every_entry"] = round(
            append_rate(base / "a.jsonl", key, cert, args.fsync_appends, 1), 1)
        out[f"appends_per_s_fsync_every_{args.batch}"] = round(
            append_rate(base / "b.jsonl", key, cert, args.batched_appends, args.batch), 1)
        out["appends_per_s_fsync_on_close"] = round(
            append_rate(base / "c.jsonl", key, cert, args.batched_appends, 0), 1)

        big = base / "big.jsonl"
        out["entries"] = args.entries
        out["build_s"] = round(build_big(big, key, cert, args.entries), 2)
        out["file_mb"] = round(big.stat().st_size / 1e6, 1)
        t = time.perf_counter()
        res = read_ledger(big)
        out["verify_s_serial"] = round(time.perf_counter() - t, 2)
        assert res.ok and len(res.entries) == args.entries
        workers = max(2, min(4, os.cpu_count() or 1))
        t = time.perf_counter()
        res = read_ledger(big, workers=workers)
        out[f"verify_s_{workers}_processes"] = round(time.perf_counter() - t, 2)
        assert res.ok and len(res.entries) == args.entries
        t = time.perf_counter()
        Ledger.open(big, key).close()
        out["reopen_s"] = round(time.perf_counter() - t, 2)
        for pld in (False, True):
            t = time.perf_counter()
            rep = audit_ledger(big, ca, compute_pld=pld)  # default workers
            out["audit_s_with_pld" if pld else "audit_s_rdp_only"] = round(time.perf_counter() - t, 2)
        out["audit_dp_events"] = rep.totals["dp_events"]
        out["audit_epsilon_rdp"] = round(rep.epsilon_rdp, 4)
        out["audit_epsilon_pld"] = round(rep.epsilon_pld, 4)
        out["audit_integrity"] = rep.checks["integrity"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
