"""End to end: the Flower App's subspace FedAvg under Flower's Deployment Engine, over TLS.

Real processes on 127.0.0.1 only, on free ports picked at run time: one ``flower-superlink``
(TLS on its Fleet, Control and Runtime APIs, with a server certificate from privfl's own PKI,
``privfl pki init``) and two ``flower-supernode``\\ s (``--root-certificates``: the
consortium CA), then ``flwr run <app> --stream`` against that SuperLink (``config.toml``
``root-certificates``) with the subspace keys for 2 rounds. The SuperNodes' own Runtime
API (between a SuperNode and the ClientApp processes it starts) stays plain HTTP on
127.0.0.1, as Flower runs it by default. Each message runs in a fresh ClientApp process,
so round 2 only works if the node's receiver (its global model and version) and its
accountant came back from ``context.state``.

Checked from the streamed log: the ServerApp's per-round byte lines (round 1: the whole
model down, the k values up; round 2: the k values both ways, from both nodes) and the
``[privfl] round N: epsilon_max=...`` lines, equal to what privfl's accountant gives for
3 and 6 steps of the declared σ and q.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from privfl.accounting import PrivacyAccountant
from privfl.accounting.subspace import subspace_k
from privfl.strategies.compression.message import FRAME_HEADER_BYTES

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "examples" / "flower-app"
BIN = ROOT / ".venv" / "bin"
STEPS, ROUNDS, FRACTION, SEED = 3, 2, 0.1, 7
#: the default app (breast_cancer, logreg): 30 features x 2 classes + 2 biases
D = 62

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason="flower-superlink is not installed in .venv/bin")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (bound to port 0, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group, SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children (the SuperExec, app processes) may not be
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.mark.timeout(240)
def test_subspace_fedavg_runs_on_a_tls_deployment_engine(tmp_path: Path) -> None:
    deadline = time.monotonic() + 220
    home = tmp_path / "flwr"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    pki = tmp_path / "pki"
    made = subprocess.run([str(BIN / "privfl"), "pki", "init", "--consortium", "flower", "--nodes", "superlink",
                           "--out", str(pki)], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    cert, key, ca = (pki / "superlink" / n for n in ("node.pem", "node.key", "ca.pem"))
    link, node0, node1 = _free_ports(3)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n[superlink.deployment]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{ca}"\n')
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".flwr", "__pycache__", "*.pyc"))

    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        superlink, sl_log = start("superlink", "flower-superlink", "--ssl-certfile", str(cert), "--ssl-keyfile",
                                  str(key), "--ssl-ca-certfile", str(ca), "--port", str(link),
                                  "--disable-runtime-dependency-installation")
        _wait_for_port(link, superlink, sl_log, deadline)
        for pid, port in enumerate((node0, node1)):
            start(f"supernode{pid}", "flower-supernode", "--root-certificates", str(ca), "--superlink",
                  f"127.0.0.1:{link}", "--port", str(port), "--node-config", f"partition-id={pid} num-partitions=2")
        run_config = (f"num-server-rounds={ROUNDS} local-steps={STEPS} subspace-fraction={FRACTION} "
                      f"subspace-seed={SEED}")
        runner, run_log = start("flwr-run", "flwr", "run", str(app), "--stream", "--run-config", run_config)
        try:
            runner.wait(timeout=max(10.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"flwr run did not finish:\n{run_log.read_text()[-4000:]}") from None
        out = run_log.read_text()
        assert runner.returncode == 0, out[-4000:]
        assert "https://" in sl_log.read_text()  # the SuperLink served TLS
    finally:
        for proc in reversed(procs):
            _kill_group(proc)

    # the subspace frames crossed the real wire: k values up in both rounds, down in round 2
    frame = FRAME_HEADER_BYTES + 4 * subspace_k(D, FRACTION)
    assert re.search(rf"\[privfl\] round 1: subspace bytes up {2 * frame} \(2 nodes\), down {2 * 4 * D} \(2 nodes\)",
                     out), out[-3000:]
    assert re.search(rf"\[privfl\] round 2: subspace bytes up {2 * frame} \(2 nodes\), down {2 * frame} \(2 nodes\)",
                     out), out[-3000:]
    # ε per round: what privfl's accountant gives for the steps so far (σ = 1.2, q = 0.2, δ = 1e-5: the defaults)
    found = {int(r): float(e) for r, e in re.findall(r"\[privfl\] round (\d+): epsilon_max=([0-9.]+) \(delta=1e-05\)",
                                                    out)}
    assert set(found) == {1, 2}, out[-3000:]
    acc = PrivacyAccountant()
    for rnd in (1, 2):
        acc.step(1.2, 0.2, STEPS)
        assert found[rnd] == pytest.approx(round(acc.get_epsilon(1e-5), 4), abs=1e-9)
    assert found[2] > found[1]
    # the run ends with the ε lines
    tail = [line for line in out.splitlines() if line.startswith("[privfl]")]
    assert tail[-2:] == [f"[privfl] round {r}: epsilon_max={found[r]:.4f} (delta=1e-05)" for r in (1, 2)]
