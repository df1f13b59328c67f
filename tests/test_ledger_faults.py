"""A ledger append that fails leaves the file and the ledger's state exactly as before.

Issue 11, finding 6: with the ledger made immutable for a moment, refused entries used to
stay in the Python file buffer and were flushed later beside the next one (three entries
with one index: "reordered", and a node that never starts again). Every fault here is a
real one where this machine allows it: a read-only descriptor swapped in with ``dup2``
(EBADF), ``RLIMIT_FSIZE`` in a child process (a short write, then EFBIG), ``chattr +i``
(EPERM) and a full tmpfs (ENOSPC); the last two need root and skip otherwise. Only the
"even the truncation fails" and the fsync paths patch ``os`` functions, as the kernel
offers no way to make them fail on demand.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from privfl.accounting.ledger import (
    WRITE_FAILED,
    Ledger,
    LedgerError,
    read_ledger,
)
from tests.helpers import fill_disk
from tests.test_ledger import POLICY, make_pki

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return make_pki(("h1",))


def _new(path: Path, pki: dict[str, Any]) -> Ledger:
    key, cert = pki["nodes"]["h1"]
    return Ledger.create(path, key, cert, POLICY, "privfl-test 0.0", randomness="secure")


def _state(led: Ledger) -> tuple[Any, ...]:
    """Everything an append moves."""
    return (led.num_entries, led._last_hash, led.steps, led.accountant_events(), led.messages,
            led.bytes_sent, led.last_epsilon, led.stopped)


def _indices(path: Path) -> list[int]:
    return [json.loads(x)["index"] for x in path.read_bytes().splitlines()]


def _chattr(flag: str, path: Path) -> bool:
    exe = shutil.which("chattr")
    if exe is None or os.geteuid() != 0:
        return False
    return subprocess.run([exe, flag, str(path)], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- EBADF (fd swap)


def test_failed_append_leaves_file_and_state_unchanged(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    led = _new(path, pki)
    led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
    before, state = path.read_bytes(), _state(led)
    fd = led._file.fileno()
    saved = os.dup(fd)
    ro = os.open(path, os.O_RDONLY)
    os.dup2(ro, fd)  # the ledger's descriptor now refuses writes (EBADF): a real write failure
    try:
        for _ in range(3):  # the finding: several refused appends, then one that works
            with pytest.raises(LedgerError) as err:
                led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
            assert err.value.kind == WRITE_FAILED
            assert str(path) in str(err.value) and "\n" not in str(err.value)
            with pytest.raises(LedgerError):
                led.append_message("h2", 0, 1, b"model")
            assert path.read_bytes() == before
            assert _state(led) == state
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(ro)
    entry = led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
    assert entry["index"] == 2 and led.steps == 10
    led.close()
    assert _indices(path) == [0, 1, 2]
    assert read_ledger(path).ok
    key, _ = pki["nodes"]["h1"]
    again = Ledger.open(path, key)  # a restart on it works
    assert again.append_stop("done")["index"] == 3
    again.close()


# --------------------------------------------------------------------------- EFBIG (RLIMIT_FSIZE)

_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from privfl.accounting.ledger import Ledger, LedgerError, TornTailError, read_ledger
    from tests.test_ledger import POLICY

    d = Path(sys.argv[1]); mode = sys.argv[2]
    key = serialization.load_pem_private_key((d / "key.pem").read_bytes(), None)
    cert = (d / "cert.pem").read_text()
    path = d / "ledger.jsonl"
    led = Ledger.create(path, key, cert, POLICY, "privfl-test 0.0", randomness="secure")
    led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
    before = path.read_bytes(); n0 = led.num_entries; h0 = led._last_hash; s0 = led.steps
    out = {}
    if mode == "no_truncate":
        def refuse(fd, size):
            raise OSError(5, "Input/output error")
        os.ftruncate = refuse
    # half an entry fits: the first os.write is short, the next one fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 200, resource.RLIM_INFINITY))
    try:
        led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
        out["raised"] = None
    except LedgerError as exc:
        out["raised"] = exc.kind; out["message"] = str(exc)
    try:
        led.append_message("h2", 0, 1, b"model")  # still over the limit (or refused as broken)
    except LedgerError as exc:
        out["second"] = exc.kind; out["second_message"] = str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["unchanged"] = path.read_bytes() == before
    out["size_delta"] = path.stat().st_size - len(before)
    out["state_unchanged"] = (led.num_entries, led._last_hash, led.steps) == (n0, h0, s0)
    if mode == "truncate":
        out["next_index"] = led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)["index"]
        led.close()
        out["ok"] = read_ledger(path).ok
    else:
        try:
            led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
            out["refused_after"] = False
        except LedgerError:
            out["refused_after"] = True
        led._file.close()
        try:
            Ledger.open(path, key)
        except TornTailError as exc:
            out["torn"] = exc.torn_bytes
        repaired = Ledger.repair_torn_tail(path, key)
        out["next_index"] = repaired.append_dp_event(1.1, 0.01, 5, "psac", 1.0)["index"]
        repaired.close()
        out["ok"] = read_ledger(path).ok
    print(json.dumps(out))
""")


def _run_child(tmp_path: Path, pki: dict[str, Any], mode: str) -> dict[str, Any]:
    key, cert = pki["nodes"]["h1"]
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_text(cert)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), mode], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_short_write_then_efbig_is_truncated_back(tmp_path: Path, pki: dict[str, Any]) -> None:
    out = _run_child(tmp_path, pki, "truncate")
    assert out["raised"] == WRITE_FAILED and "File too large" in out["message"]
    assert out["second"] == WRITE_FAILED
    assert out["unchanged"] and out["size_delta"] == 0 and out["state_unchanged"]
    assert out["next_index"] == 2 and out["ok"]


def test_torn_line_left_when_truncation_fails_is_repaired_on_reopen(tmp_path: Path,
                                                                    pki: dict[str, Any]) -> None:
    out = _run_child(tmp_path, pki, "no_truncate")
    assert out["raised"] == WRITE_FAILED and "could not be truncated back" in out["message"]
    assert out["size_delta"] > 0 and out["state_unchanged"]  # half a line is on disk
    assert out["second"] == WRITE_FAILED and out["refused_after"]  # no append beside a torn line
    assert out["torn"] == out["size_delta"]
    assert out["next_index"] == 3 and out["ok"]  # 2: the torn_tail_repaired note


# --------------------------------------------------------------------------- EPERM (chattr +i)


def test_immutable_ledger_for_a_moment(tmp_path: Path, pki: dict[str, Any]) -> None:
    """The finding's own reproduction: ``chattr +i``, some appends, ``chattr -i``, more appends."""
    path = tmp_path / "ledger.jsonl"
    led = _new(path, pki)
    led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
    before, state = path.read_bytes(), _state(led)
    if not _chattr("+i", path):
        led.close()
        pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag)")
    try:
        for _ in range(3):
            with pytest.raises(LedgerError, match="Operation not permitted") as err:
                led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
            assert err.value.kind == WRITE_FAILED
        key, _ = pki["nodes"]["h1"]
        with pytest.raises(LedgerError) as err:  # opening it for appending: one line, not an OSError
            Ledger(path, key, read_ledger(path), 1)
        assert err.value.kind in (WRITE_FAILED, "locked")
    finally:
        assert _chattr("-i", path)
    assert path.read_bytes() == before and _state(led) == state
    assert led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)["index"] == 2
    led.close()
    assert _indices(path) == [0, 1, 2] and read_ledger(path).ok


def test_opening_an_immutable_ledger_is_a_ledger_error(tmp_path: Path, pki: dict[str, Any]) -> None:
    path = tmp_path / "ledger.jsonl"
    _new(path, pki).close()
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not available here")
    try:
        key, _ = pki["nodes"]["h1"]
        with pytest.raises(LedgerError, match=r"cannot open .*ledger.jsonl for appending") as err:
            Ledger.open(path, key)
        assert err.value.kind == WRITE_FAILED
    finally:
        assert _chattr("-i", path)


# --------------------------------------------------------------------------- ENOSPC (tmpfs)


@pytest.fixture()
def tiny_tmpfs(make_tmpfs: Any) -> Path:
    """A 256 KiB tmpfs (see conftest.make_tmpfs)."""
    return make_tmpfs("256k")


def test_full_disk_append_is_refused_whole(tiny_tmpfs: Path, pki: dict[str, Any]) -> None:
    path = tiny_tmpfs / "ledger.jsonl"
    led = _new(path, pki)
    filler = tiny_tmpfs / "filler"
    fill_disk(filler)
    failed = None
    for _ in range(200):  # appends fit in the last page's slack, then one needs a page
        before, state = path.read_bytes(), _state(led)
        try:
            led.append_dp_event(1.1, 0.01, 1, "psac", 1.0)
        except LedgerError as exc:
            failed = exc
            break
    assert failed is not None and failed.kind == WRITE_FAILED
    assert "No space left on device" in str(failed)
    assert path.read_bytes() == before and _state(led) == state
    filler.unlink()
    n = led.num_entries
    assert led.append_dp_event(1.1, 0.01, 1, "psac", 1.0)["index"] == n
    led.close()
    assert _indices(path) == list(range(n + 1)) and read_ledger(path).ok


# --------------------------------------------------------------------------- fsync (patched)


def test_failed_fsync_truncates_back(tmp_path: Path, pki: dict[str, Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.jsonl"
    led = _new(path, pki)
    before, state = path.read_bytes(), _state(led)
    real = os.fsync

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(LedgerError, match="Input/output error") as err:
        led.append_dp_event(1.1, 0.01, 5, "psac", 1.0)
    assert err.value.kind == WRITE_FAILED
    with pytest.raises(LedgerError, match="cannot fsync"):
        led.sync()
    assert path.read_bytes() == before and _state(led) == state
    with pytest.raises(LedgerError, match="cannot fsync"):
        led.close()  # closes the file anyway
    assert led._file.closed
    monkeypatch.setattr(os, "fsync", real)
    key, _ = pki["nodes"]["h1"]
    again = Ledger.open(path, key)
    assert again.append_dp_event(1.1, 0.01, 5, "psac", 1.0)["index"] == 1
    again.close()


# --------------------------------------------------------------------------- the node fails closed


def test_node_fails_closed_when_its_ledger_cannot_be_written(tmp_path: Path) -> None:
    """The write-ahead hooks: a refused dp_event write stops the step, a refused message write
    keeps the model in; the node then serves no model and takes no further write."""
    from privfl.node import Node, NodeError
    from privfl.node_config import load_node_config
    from privfl.pki import init_consortium
    from tests.test_node_bad_inputs import _tables, _write

    pki = tmp_path / "pki"
    init_consortium("failclosed", ["h-a", "h-b"], pki, base_port=47370)
    node = Node(load_node_config(_write(tmp_path / "node.toml", _tables(pki, tmp_path / "out"))))
    led = node.ledger
    assert led is not None and node.network is not None
    try:
        fd = led._file.fileno()
        saved, ro = os.dup(fd), os.open(led.path, os.O_RDONLY)
        os.dup2(ro, fd)  # EBADF on every write from now on
        before, steps = led.path.read_bytes(), node.client.training_steps
        try:
            with pytest.raises(NodeError, match=r"ledger\.jsonl: \[Errno 9\] Bad file descriptor: the training "
                                                r"step\(s\) did not run; the node stopped \(fail closed\)"):
                node.client.fit([p.copy() for p in node.initial_params], {"local_steps": 1})
            assert node.client.training_steps == steps  # the step never ran
            assert node.network.serving_models is False  # nothing more leaves
            assert node._stop_reason() == "signal"  # the run loop ends
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(ro)
        with pytest.raises(NodeError, match="fail closed"):  # writable again, but the node stays stopped
            node._on_release("h-b", 0, 1, "0" * 64, 10)
        assert led.path.read_bytes() == before and led.num_entries == 1
    finally:
        led.close()
        node.network.client.close()


def test_a_model_does_not_leave_when_its_release_cannot_be_recorded(tmp_path: Path) -> None:
    """The release hook runs before the transport sends: a refused message entry stops the send."""
    from privfl.node import Node, NodeError
    from privfl.node_config import load_node_config
    from privfl.pki import init_consortium
    from privfl.strategies.base import ModelMessage
    from tests.test_node_bad_inputs import _tables, _write

    pki = tmp_path / "pki"
    init_consortium("norelease", ["h-a", "h-b"], pki, base_port=47380)
    node = Node(load_node_config(_write(tmp_path / "node.toml", _tables(pki, tmp_path / "out"))))
    led, net = node.ledger, node.network
    assert led is not None and net is not None
    sent: list[Any] = []
    net.client.exchange = lambda *a, **k: sent.append(a)  # type: ignore[method-assign]  # the wire
    net.client.available = lambda peer: True  # type: ignore[method-assign]
    msg = ModelMessage("h-a", 1, "exchange_request", [p.copy() for p in node.initial_params])
    try:
        fd = led._file.fileno()
        saved, ro = os.dup(fd), os.open(led.path, os.O_RDONLY)
        os.dup2(ro, fd)
        try:
            with pytest.raises(NodeError, match=r"the model for h-b did not leave"):
                net.exchange("h-b", msg)
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(ro)
        assert sent == [] and net.serving_models is False
        assert net.exchange("h-b", msg) is None and sent == []  # and none leaves afterwards
        assert led.num_entries == 1
    finally:
        led.close()
        net.client.close()
