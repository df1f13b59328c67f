"""End to end: a hospital's own Flower project, written the way Flower's PyTorch quickstart is,
trained with DP by privfl after changing one import.

The test writes an independent project in a temporary folder — ``task.py`` (``Net`` with
GroupNorm, ``load_data(partition_id, num_partitions)`` over scikit-learn's digits,
``train(net, trainloader, steps, lr, device)`` that calls ``privfl.PrivacyEngine().make_private``
with no privacy arguments, ``test(net, loader)``) and ``client_app.py`` (a plain
``NumPyClient`` and ``client_fn(context)``) — plus a launch and a compare config that use
only the documented keys (``python_path``, ``[model].factory``, ``[client].app`` and
``run_config``, ``[dp]``, ``[policy]``). It runs the real CLI in subprocesses on 127.0.0.1:

* ``privfl launch``: three hospitals as node processes; every node finishes its DP steps,
  ``privfl audit`` verifies each ledger, recomputes ε ≤ the target and finds the DP training
  events of the site's σ; the final model loads into the project's own ``Net``;
* ``privfl compare``: async gossip against Flower's FedAvg on the same project; both are in
  comparison.json with ε ≤ the target, and a final model loads into ``Net`` too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TARGET_EPSILON = 3.0
STEPS = 200
NODES = ["st-mary", "general", "childrens"]
PACKAGE = "digitsquick"

TASK = '''
"""digitsquick: a Flower / PyTorch app in the style of Flower's quickstart, on scikit-learn's digits."""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from privfl import PrivacyEngine  # the one changed import (was: from opacus import PrivacyEngine)


class Net(nn.Module):
    """A small CNN for 1x8x8 digits (GroupNorm: DP-SGD cannot train BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 16)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.pool(F.relu(self.norm2(self.conv2(x))))
        return self.fc1(x.flatten(1))


def load_data(partition_id, num_partitions, batch_size=48):
    """This partition's train and test DataLoaders (an IID split of the 1797 digits, 20 % test)."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.RandomState(42).permutation(len(y))
    part = order[partition_id::num_partitions]
    n_test = len(part) // 5
    test_idx, train_idx = part[:n_test], part[n_test:]
    trainloader = DataLoader(TensorDataset(x[train_idx], y[train_idx]), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(TensorDataset(x[test_idx], y[test_idx]), batch_size=batch_size)
    return trainloader, testloader


def train(net, trainloader, steps, lr, device):
    """Train for ``steps`` optimizer steps, privately: the site's privfl decides sigma, C, q and the budget."""
    net.to(device)
    net.train()
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    model, optimizer, trainloader = PrivacyEngine().make_private(
        module=net, optimizer=optimizer, data_loader=trainloader)
    done = 0
    while done < steps:
        for images, labels in trainloader:
            optimizer.zero_grad()
            criterion(model(images.to(device)), labels.to(device)).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return done


def test(net, testloader, device="cpu"):
    """(mean loss, accuracy) on ``testloader``."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item() * len(labels)
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
    n = len(testloader.dataset)
    net.train()
    return loss / n, correct / n


def get_weights(net):
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters):
    params_dict = zip(net.state_dict().keys(), parameters)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)
'''

CLIENT_APP = '''
"""digitsquick: the Flower ClientApp (a plain NumPyClient)."""

import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from digitsquick.task import Net, get_weights, load_data, set_weights, test, train


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader, local_steps, lr):
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader
        self.local_steps = local_steps
        self.lr = lr
        self.device = torch.device("cpu")

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        steps = int(config.get("local_steps", self.local_steps))
        train(self.net, self.trainloader, steps, self.lr, self.device)
        # the weight is public (1), never len(dataset); no training loss leaves the site
        return get_weights(self.net), 1, {}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader, self.device)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context):
    net = Net()
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, valloader = load_data(partition_id, num_partitions, context.run_config["batch-size"])
    return FlowerClient(net, trainloader, valloader, context.run_config["local-steps"],
                        context.run_config["learning-rate"])


app = ClientApp(client_fn=client_fn)
'''

SHARED = f'''
[model]
factory = "{PACKAGE}.task:Net"
seed = 0

[client]
app = "{PACKAGE}.client_app:client_fn"
run_config = {{ "batch-size" = 48, "learning-rate" = 0.01 }}

[dp]
clipping = "psac"
max_grad_norm = 1.0
noise_multiplier = 0.0
planned_steps = {STEPS}
target_epsilon = {TARGET_EPSILON}
delta = 1e-5
batch_size = 48
sample_rate = 0.1
engine = "fast"

[topology]
kind = "complete"

[strategy]
name = "async_gossip"
local_steps = 5
'''

CONSORTIUM = f'''python_path = ["."]

[consortium]
name = "quickstart"
nodes = {json.dumps(NODES)}
timeout = 150.0

[policy]
min_noise_multiplier = 0.8
max_epsilon = {TARGET_EPSILON}
delta = 1e-5

[node]
consensus_exchanges = 10
{SHARED}
[stop]
max_steps = {STEPS}
max_seconds = 120.0
'''

COMPARE = f'''python_path = ["."]
name = "quickstart-compare"

[data]
num_sites = 3
{SHARED}
[stop]
max_steps = {STEPS}
max_seconds = 0

[simulation]
latency = 0.02
bandwidth = 12.5e6
eval_every = 1.0

[compare]
strategies = ["async_gossip", "fedavg"]
'''

CLI = Path(sys.executable).with_name("privfl")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hospital's project: its package, a launch config and a compare config."""
    root = tmp_path_factory.mktemp("quickstart")
    pkg = root / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""digitsquick: a Flower app."""\n')
    (pkg / "task.py").write_text(textwrap.dedent(TASK).lstrip())
    (pkg / "client_app.py").write_text(textwrap.dedent(CLIENT_APP).lstrip())
    (root / "consortium.toml").write_text(CONSORTIUM)
    (root / "compare.toml").write_text(COMPARE)
    return root


@pytest.fixture(scope="module")
def task(project: Path):  # noqa: ANN201 - the project's own task module
    """The project's ``task`` module, imported from its file (not from privfl)."""
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}_task_under_test", project / PACKAGE / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp / "flwr"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _privfl(args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``privfl ARGS`` to the end (or kill it, and every node process it said it started)."""
    cmd = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "privfl"]
    proc = subprocess.Popen([*cmd, *args], cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGTERM)  # the launcher stops its nodes on SIGTERM
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        for pid in re.findall(r"started \(pid (\d+)\)", out or ""):  # nodes run in their own groups
            _killpg(int(pid), signal.SIGKILL)
        pytest.fail(f"privfl {' '.join(args)} did not finish in {timeout:.0f} s:\n{(out or '')[-4000:]}")
    finally:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode, out


def _accuracy(task, state_dict: dict[str, torch.Tensor]) -> float:  # noqa: ANN001
    """The state_dict loaded into the project's own Net, scored on every partition's test split."""
    net = task.Net()
    assert list(state_dict) == list(net.state_dict())  # the model's own parameter names
    net.load_state_dict(state_dict)
    correct = total = 0
    for i in range(len(NODES)):
        _, testloader = task.load_data(i, len(NODES))
        _, acc = task.test(net, testloader)
        n = len(testloader.dataset)
        correct, total = correct + acc * n, total + n
    return correct / total


def _load_final(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def _final_model(folder: Path, stem: str) -> Path:
    found = sorted(folder.glob(f"{stem}.pt")) + sorted(folder.glob(f"{stem}.safetensors"))
    assert found, f"no {stem}.pt / .safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return found[0]


@pytest.mark.timeout(240)
def test_a_flower_quickstart_project_trains_privately_under_privfl_launch(project: Path, task) -> None:  # noqa: ANN001
    runs = project / "runs"
    t0 = time.monotonic()
    rc, out = _privfl(["launch", "--config", "consortium.toml", "--quiet", "--runs-dir", str(runs)], project, 200)
    assert rc == 0, out[-4000:]
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"], json.dumps(summary, indent=1)[-4000:]
    assert set(summary["nodes"]) == set(NODES)
    ca, roster = run_dir / "pki" / "ca.pem", run_dir / "pki" / "roster.toml"
    for nid, e in summary["nodes"].items():
        log = (run_dir / nid / "node.log").read_text()[-3000:]
        assert e["exit_code"] == 0 and e["stop_reason"] == "max_steps", (nid, e, log)
        assert e["steps"] == STEPS, (nid, e)
        # the summary says DP: a calibrated σ at or above the consortium minimum, secure noise, ε spent
        assert e.get("privacy", "DP") == "DP", (nid, e)
        assert e["noise_multiplier"] >= 0.8 and e["sample_rate"] == pytest.approx(0.1), (nid, e)
        assert 0 < e["epsilon"] <= TARGET_EPSILON, (nid, e)
        assert e["audit_ok"] and e["audit_randomness"] == "secure", (nid, e)
        assert e["exchanges"] + e["served"] > 0  # the hospitals' models really met
        # the auditor's own view, from the ledger alone
        rc, text = _privfl(["audit", "ledger", str(run_dir / nid / "ledger.jsonl"), "--ca", str(ca),
                            "--roster", str(roster), "--node-id", nid, "--json"], project, 60)
        assert rc == 0, text[-3000:]
        report = json.loads(text[text.index("{"):text.rindex("}") + 1])
        assert report["ok"] and report["randomness"] == "secure", report.get("issues")
        assert 0 < report["epsilon"] <= TARGET_EPSILON
        assert report["epsilon"] == pytest.approx(e["epsilon"], rel=1e-6)
        assert report["by_purpose"]["training"]["steps"] == STEPS  # every step of the client's train() is a DP event
        assert report["events"] and all(ev["noise_multiplier"] == pytest.approx(e["noise_multiplier"])
                                        for ev in report["events"] if ev["purpose"] == "training")
    # the hospital takes its model home: a plain state_dict for its own Net
    state = _load_final(_final_model(run_dir / NODES[0], "final_model"))
    acc = _accuracy(task, state)
    assert acc >= 0.6, acc  # chance is 0.1
    assert time.monotonic() - t0 < 200


@pytest.mark.timeout(240)
def test_the_same_project_compares_async_gossip_with_fedavg(project: Path, task) -> None:  # noqa: ANN001
    out_dir = project / "compare-runs"
    rc, out = _privfl(["compare", "--config", "compare.toml", "--no-progress", "--out", str(out_dir)], project, 200)
    assert rc == 0, out[-4000:]
    (run_dir,) = [d for d in out_dir.iterdir() if d.is_dir()]
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert {"async_gossip", "fedavg"} <= set(comparison), comparison
    for label in ("async_gossip", "fedavg"):
        s = comparison[label]
        assert s["privacy"] == "DP", (label, s)
        assert 0 < s["epsilon_max"] <= TARGET_EPSILON + 1e-9, (label, s)
        assert s["steps_mean"] > 0 and s["bytes_sent"] > 0, (label, s)
        assert np.isfinite(s["accuracy_mean"]) and s["accuracy_mean"] >= 0.5, (label, s)
        models = sorted((run_dir / label).glob("final_model_*.pt")) + sorted(
            (run_dir / label).glob("final_model_*.safetensors"))
        assert len(models) == len(NODES), (label, sorted(p.name for p in (run_dir / label).iterdir()))
        acc = _accuracy(task, _load_final(models[0]))
        assert acc >= 0.6, (label, acc)
