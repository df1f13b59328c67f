"""The client registry: privfl's DPClient, or the hospital's own Flower client (``[client].app``),
built the same way by simulate/compare and node (``privfl.site.build_client``).

A user's quickstart-style ``NumPyClient`` that makes its optimizer private with
``privfl.PrivacyEngine()`` trains under the site's σ, q and budget; its ε is the accountant's
(recomputed here with dp-accounting); one that trains without the engine is refused; with
``[dp] enabled = false`` it runs and every summary says "no DP".
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest

from privfl.errors import PrivflError
from privfl.experiment import load_experiment, spec_for
from privfl.sim import run_simulation
from privfl.site import client_kind, reads_site_data

APP = '''
import numpy as np
import torch
from flwr.client import NumPyClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfl import PrivacyEngine


def Net():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def load_data(pid, n):
    g = torch.Generator().manual_seed(pid)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x[:100], y[:100]), batch_size=10), DataLoader(TensorDataset(x[100:], y[100:]))


class Quick(NumPyClient):
    def __init__(self, pid, n, private=True):
        self.net, self.private = Net(), private
        self.train_loader, self.test_loader = load_data(pid, n)

    def get_parameters(self, config):
        return [v.detach().numpy().copy() for v in self.net.state_dict().values()]

    def set(self, params):
        self.net.load_state_dict({k: torch.tensor(v) for k, v in zip(self.net.state_dict(), params)})

    def fit(self, parameters, config):
        self.set(parameters)
        opt = torch.optim.SGD(self.net.parameters(), lr=0.2)
        model, loader = self.net, self.train_loader
        if self.private:
            model, opt, loader = PrivacyEngine().make_private(module=self.net, optimizer=opt, data_loader=loader)
        steps = 0
        while steps < config["local_steps"]:
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                steps += 1
                if steps == config["local_steps"]:
                    break
        return self.get_parameters({}), 100, {"loss": 0.123, "steps": steps}

    @torch.no_grad()
    def evaluate(self, parameters, config):
        self.set(parameters)
        x, y = self.test_loader.dataset.tensors
        out = self.net(x)
        accuracy = float((out.argmax(1) == y).float().mean())
        return float(nn.functional.cross_entropy(out, y)), len(y), {"accuracy": accuracy}


def client_fn(context):
    return Quick(context.node_config["partition-id"], context.node_config["num-partitions"]).to_client()


def careless_fn(context):
    return Quick(context.node_config["partition-id"], context.node_config["num-partitions"], private=False)
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "quick_app.py").write_text(textwrap.dedent(APP))
    sys.modules.pop("quick_app", None)
    return tmp_path


def _config(project: Path, app: str, dp: str = "noise_multiplier = 1.5", model: str = "") -> Path:
    p = project / "exp.toml"
    p.write_text(textwrap.dedent(f'''
        python_path = ["proj"]
        name = "quick"
        [data]
        num_sites = 3
        [model]
        {model}
        [dp]
        sample_rate = 0.1
        delta = 1e-3
        {dp}
        [client]
        app = "{app}"
        run_config = {{ note = "hello" }}
        [strategy]
        name = "async_gossip"
        local_steps = 3
        [stop]
        max_steps = 6
        [simulation]
        device = "cpu"
        step_cost = 0.01
    '''))
    return p


def test_registry_kinds() -> None:
    assert client_kind("") == "dp" and client_kind("pkg.mod:client_fn") == "app"
    assert reads_site_data("", "") and not reads_site_data("a:b", "") and reads_site_data("a:b", "c:d")


@pytest.mark.parametrize("model", ["", 'factory = "quick_app:Net"'])
def test_simulate_runs_a_users_flower_client_under_the_sites_dp(project: Path, model: str) -> None:
    exp = load_experiment(_config(project, "quick_app:client_fn", model=model))
    spec = spec_for(exp, exp.runs[0])
    res = run_simulation(spec)
    s = res.summary
    assert s["dp"] is True and s["privacy"] == "DP"
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 6)
    for nid in ("node0", "node1", "node2"):
        assert s["steps"][nid] == 6
        assert s["epsilon"][nid] == pytest.approx(acct.get_epsilon(1e-3), rel=1e-6)
    assert res.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert 0.4 < s["mean_accuracy"] <= 1.0  # the sites' own evaluations, the researcher's view


def test_a_client_training_without_the_engine_is_refused(project: Path) -> None:
    exp = load_experiment(_config(project, "quick_app:careless_fn"))
    with pytest.raises(PrivflError, match=r"trained without privfl\.PrivacyEngine"):
        run_simulation(spec_for(exp, exp.runs[0]))


def test_without_dp_the_users_client_runs_and_says_no_dp(project: Path) -> None:
    exp = load_experiment(_config(project, "quick_app:careless_fn", dp="enabled = false"))
    res = run_simulation(spec_for(exp, exp.runs[0]))
    assert res.summary["dp"] is False and res.summary["privacy"] == "no DP"


def test_a_bug_in_the_users_client_is_one_line_naming_it(project: Path) -> None:
    (project / "proj" / "buggy_app.py").write_text(textwrap.dedent(APP) + textwrap.dedent('''
        class Buggy(Quick):
            def fit(self, parameters, config):
                raise ValueError("shape mismatch in my loader\\nsecond line")

        def buggy_fn(context):
            return Buggy(0, 1)
    '''))
    sys.modules.pop("buggy_app", None)
    exp = load_experiment(_config(project, "buggy_app:buggy_fn"))
    with pytest.raises(PrivflError) as exc:
        run_simulation(spec_for(exp, exp.runs[0]))
    msg = str(exc.value)
    assert "[client].app" in msg and "raised ValueError: shape mismatch in my loader" in msg and "\n" not in msg
