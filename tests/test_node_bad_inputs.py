"""Bad inputs to a real ``privfl node`` process end in one stderr line ``error: ...`` and exit 2.

Issue 11, findings 8 and 10: a non-UTF-8 TOML, ``[node].output`` naming a file, an output
file that is a directory, a read-only or full output folder, an immutable ledger, and a
second node on the same output folder (or with the same identity) used to end in a
traceback or run twice. Each case runs the real CLI in a subprocess (``python -m
privfl.node`` as the launcher spawns it, and ``python -m privfl node`` for the console
entry point) with logging at ERROR, so stderr must be exactly the one line.

Faults: a read-only folder is a tmpfs remounted read-only, a full disk a filled 256 KiB
tmpfs, an immutable ledger ``chattr +i`` (all need root; skipped otherwise: as root a
chmod would not stop the writes).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from privfl.launch import dump_toml
from privfl.pki import fingerprint, init_consortium
from tests.helpers import fill_disk

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
NODES = ["h-a", "h-b"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("badin", NODES, d, base_port=47310)
    return d


def _tables(pki: Path, out: Path | str, node_id: str = "h-a", **over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t: dict[str, dict[str, Any]] = {
        "node": {"id": node_id, "output": str(out), "wait_for_peers": 0.0, "consensus_exchanges": 0,
                 "consensus_wait": 0.0, "linger": 0.0, "peer_timeout": 1.0, "checkpoint_every": 0.5},
        "identity": {"cert": str(pki / node_id / "node.pem"), "key": str(pki / node_id / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": NODES.index(node_id)},
        "model": {"name": "logreg"},
        "dp": {"noise_multiplier": 2.0, "target_epsilon": 3.0, "batch_size": 32, "sample_rate": 0.14},
        "strategy": {"name": "async_gossip", "local_steps": 1},
        "stop": {"max_steps": 5},
    }
    for k, v in over.items():
        t[k] = {**t.get(k, {}), **v}
    return t


def _write(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    path.write_text(dump_toml(tables))
    return path


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(FLWR_TELEMETRY_ENABLED="0", PRIVFL_LOG="ERROR", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
             PYTHONWARNINGS="ignore")
    return e


def _cli(config: Path, entry: str = "module", timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m privfl.node --config`` (entry "module", what the launcher spawns) or
    ``python -m privfl <entry> --config`` (the console entry point)."""
    args = ["-m", "privfl.node"] if entry == "module" else ["-m", "privfl", entry]
    return subprocess.run([sys.executable, *args, "--config", str(config)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The process exited 2 with exactly one stderr line ``error: ...`` containing ``needles``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize("entry", ["module", "node", "launch", "simulate", "compare"])
def test_non_utf8_toml(tmp_path: Path, entry: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[node]\nid = "h\xe9pital"\n')  # Latin-1, not UTF-8
    line = _one_line_error(_cli(bad, entry), str(bad), "not UTF-8", "offset 14 (line 2, column 8")
    assert "0xe9" in line


@pytest.mark.parametrize("entry", ["module", "node", "launch", "simulate"])
def test_config_path_is_a_directory(tmp_path: Path, entry: str) -> None:
    d = tmp_path / "node.toml"
    d.mkdir()
    _one_line_error(_cli(d, entry), str(d), "is a directory")


# --------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("entry", ["module", "node"])
def test_output_names_a_file(pki: Path, tmp_path: Path, entry: str) -> None:
    f = tmp_path / "out"
    f.write_text("not a folder")
    cfg = _write(tmp_path / "node.toml", _tables(pki, f))
    _one_line_error(_cli(cfg, entry), "[node].output", str(f), "is a file")
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("name", ["ledger.jsonl", "checkpoint.pt", "metrics.jsonl", "summary.json"])
def test_an_output_file_is_a_directory(pki: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    cfg = _write(tmp_path / "node.toml", _tables(pki, out))
    _one_line_error(_cli(cfg), "[node].output", str(out / name), "is a directory")
    assert not (out / "ledger.jsonl").is_file()


def test_output_parent_is_a_file(pki: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    _one_line_error(_cli(_write(tmp_path / "node.toml", _tables(pki, out))), "[node].output",
                    "cannot create the folder", str(out))


@pytest.fixture()
def tmpfs(make_tmpfs: Any) -> Path:
    """A 256 KiB tmpfs (see conftest.make_tmpfs)."""
    return make_tmpfs("256k")


def _remount_ro(d: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.decode().strip()}")


def test_read_only_output_folder(pki: Path, tmp_path: Path, tmpfs: Path) -> None:
    out = tmpfs / "out"
    out.mkdir()
    _remount_ro(tmpfs)
    cfg = _write(tmp_path / "node.toml", _tables(pki, out))
    _one_line_error(_cli(cfg), "[node].output", "cannot write in the folder", str(out), "Read-only file system")
    new = tmpfs / "new" / "out"  # and one it would have to create
    cfg = _write(tmp_path / "node2.toml", _tables(pki, new))
    _one_line_error(_cli(cfg), "[node].output", "cannot create the folder", "Read-only file system")


def test_full_disk_at_start(pki: Path, tmp_path: Path, tmpfs: Path) -> None:
    out = tmpfs / "out"
    out.mkdir()
    fill_disk(tmpfs / "filler")
    cfg = _write(tmp_path / "node.toml", _tables(pki, out))
    _one_line_error(_cli(cfg), "[node].output", str(out), "No space left on device")


# --------------------------------------------------------------------------- a real ledger


def _chattr(flag: str, path: Path) -> bool:
    exe = shutil.which("chattr")
    if exe is None or os.geteuid() != 0:
        return False
    return subprocess.run([exe, flag, str(path)], capture_output=True).returncode == 0


def test_node_runs_then_an_immutable_ledger_is_refused_at_start(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _write(tmp_path / "node.toml", _tables(pki, out))
    first = _cli(cfg)  # alone (its peer never comes): 5 DP steps, then it finishes
    assert first.returncode == 0, first.stderr[-3000:]
    ledger = out / "ledger.jsonl"
    size = ledger.stat().st_size
    if not _chattr("+i", ledger):
        pytest.skip("chattr +i is not available here")
    try:
        _one_line_error(_cli(cfg), str(ledger), "Operation not permitted", "refusing to start")
    finally:
        assert _chattr("-i", ledger)
    assert ledger.stat().st_size == size


# --------------------------------------------------------------------------- one node per folder / identity


def _wait_for_pid(path: Path, pid: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if path.read_text().strip() == str(pid):
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{path} never named pid {pid}")


def test_second_node_on_the_same_output_folder_or_identity_is_refused(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # it waits for h-b, holding its locks, longer than the three refused starts below can take on a
    # loaded machine (each imports torch: 60 s ran out under a 2-core CI beside a simulation); killed below
    tables = _tables(pki, out, node={"wait_for_peers": 600.0})
    cfg = _write(tmp_path / "node.toml", tables)
    first = subprocess.Popen([sys.executable, "-m", "privfl.node", "--config", str(cfg)], cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        cert_fp = fingerprint((pki / "h-a" / "node.pem").read_bytes()).split(":")[-1][:32]
        ident = Path(tempfile.gettempdir()) / f"privfl-node-{cert_fp}.lock"
        _wait_for_pid(out / ".lock", first.pid, first)
        _wait_for_pid(ident, first.pid, first)
        line = _one_line_error(_cli(cfg), f"another privfl node (pid {first.pid}) is running with output folder {out}")
        assert "[node].output" in line
        _one_line_error(_cli(cfg, "node"), f"pid {first.pid}")  # and through the console entry point
        other = _write(tmp_path / "node2.toml", _tables(pki, tmp_path / "out2"))  # same identity, another folder
        _one_line_error(_cli(other), f"another privfl node (pid {first.pid}) is running as node 'h-a'")
        assert first.poll() is None  # the first one is untouched
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
        try:
            first.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        first.stderr.close()  # type: ignore[union-attr]
    # its locks went with it: the folder takes a node again
    again = _write(tmp_path / "node3.toml", _tables(pki, out))
    done = _cli(again)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_fresh_node_that_reaches_no_neighbour_refuses_to_train(pki: Path, tmp_path: Path) -> None:
    """h-b is not running (a wrong roster address or a firewall looks the same): h-a must not spend
    its budget training a model no peer will ever average. One line naming the field, exit 2, no
    DP step in its ledger; wait_for_peers = 0 is how to train alone on purpose."""
    out = tmp_path / "out"
    cfg = _write(tmp_path / "node.toml", _tables(pki, out, node={"wait_for_peers": 1.0}))
    proc = _cli(cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]  # beside the node's INFO log
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    for needle in (str(cfg), "[node].wait_for_peers: no neighbour answered within 1 s", "h-b at 127.0.0.1:",
                   "no DP step was taken", "wait_for_peers = 0"):
        assert needle in errors[0], (needle, errors[0])
    ledger = (out / "ledger.jsonl").read_text() if (out / "ledger.jsonl").exists() else ""
    assert '"kind":"dp_event"' not in ledger and not (out / "summary.json").exists()


def test_a_node_refuses_to_stop_on_its_own_test_accuracy(pki: Path, tmp_path: Path) -> None:
    """When a node's non-DP test accuracy crosses a target is visible to its peers (its rounds stop,
    its 'done' arrives) and to the auditor (the ledger's stop entry): a statistic of its records."""
    cfg = _write(tmp_path / "node.toml", _tables(pki, tmp_path / "out", stop={"target_accuracy": 0.9}))
    _one_line_error(_cli(cfg), "[stop].target_accuracy", "releases a statistic of its records")
    assert not (tmp_path / "out" / "ledger.jsonl").exists()
