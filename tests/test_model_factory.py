"""A hospital's own model by import path: `[model] factory = "pkg.module:name"`, `[model].args`,
and a top-level `python_path` relative to the config file — the same in `simulate`, `node`
and `launch`. Refusals name the field; a model Opacus cannot make private names its layer."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from privfl.errors import ConfigError, PrivflError
from privfl.experiment import load_experiment, spec_for
from privfl.launch import dump_toml, prepare_run
from privfl.node_config import load_node_config
from privfl.pki import init_consortium
from privfl.sim import run_simulation

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """The hospital's own network (breast cancer: 30 features, 2 classes)."""

    def __init__(self, hidden: int = 8, norm: str = "group") -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, hidden)
        self.norm = nn.BatchNorm1d(hidden) if norm == "batch" else nn.GroupNorm(2, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))
'''


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A user project: ``src/hospital_models/net.py``, configs beside ``src``."""
    pkg = tmp_path / "src" / f"hospital_models_{tmp_path.name[-8:].replace('-', '_')}"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text(textwrap.dedent(NET))
    yield tmp_path
    sys.modules.pop(f"{pkg.name}.net", None)
    sys.modules.pop(pkg.name, None)


def _pkg(project: Path) -> str:
    return next(p.name for p in (project / "src").iterdir() if p.is_dir())


EXPERIMENT = '''python_path = ["src"]
name = "byo"

[data]
source = "breast_cancer"
num_sites = 2

[model]
factory = "{pkg}.net:Net"
args = {{ hidden = {hidden}, norm = "{norm}" }}

[dp]
noise_multiplier = 1.0
target_epsilon = 50.0
batch_size = 16
sample_rate = 0.1
lr = 0.5

[strategy]
name = "async_gossip"
local_steps = 2

[stop]
max_steps = 6
'''


def test_simulate_trains_the_users_own_module(project: Path) -> None:
    cfg = project / "experiment.toml"
    cfg.write_text(EXPERIMENT.format(pkg=_pkg(project), hidden=6, norm="group"))
    spec = spec_for(load_experiment(cfg), "async_gossip")
    assert spec.model == f"{_pkg(project)}.net:Net" and spec.model_args == {"hidden": 6, "norm": "group"}
    res = run_simulation(spec)
    assert res.summary["steps"]["node0"] == 6
    # the user's parameter names travel as they are, and the final model is the user's module
    assert res.param_names == ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]
    assert res.models["node0"][0].shape == (6, 30)


def test_bad_factory_and_bad_args_name_the_field(project: Path) -> None:
    cfg = project / "experiment.toml"
    cfg.write_text(EXPERIMENT.format(pkg="no_such_pkg", hidden=6, norm="group"))
    with pytest.raises(ConfigError, match=r"\[model\]\.factory: cannot import 'no_such_pkg.net'"):
        load_experiment(cfg)
    cfg.write_text(EXPERIMENT.format(pkg=_pkg(project), hidden=6, norm="group").replace(":Net", ":Nope"))
    with pytest.raises(ConfigError, match=r"\[model\]\.factory: module .* has no 'Nope'"):
        load_experiment(cfg)
    cfg.write_text(EXPERIMENT.format(pkg=_pkg(project), hidden=6, norm="group").replace("hidden = 6", "width = 6"))
    with pytest.raises(ConfigError, match=r"\[model\]\.args"):
        run_simulation(spec_for(load_experiment(cfg), "async_gossip"))
    cfg.write_text(EXPERIMENT.format(pkg=_pkg(project), hidden=6, norm="group").replace('["src"]', '["nowhere"]'))
    with pytest.raises(ConfigError, match=r"python_path: folder not found"):
        load_experiment(cfg)


def test_a_batchnorm_model_is_refused_naming_the_layer(project: Path) -> None:
    cfg = project / "experiment.toml"
    cfg.write_text(EXPERIMENT.format(pkg=_pkg(project), hidden=6, norm="batch"))
    with pytest.raises(PrivflError, match=r"BatchNorm1d at norm.*GroupNorm"):
        run_simulation(spec_for(load_experiment(cfg), "async_gossip"))


def test_a_node_and_a_launch_build_the_same_user_module(project: Path) -> None:
    from privfl.node import Node

    pki = project / "pki"
    init_consortium("byo", ["h-a", "h-b"], pki, base_port=47500)
    tables = {
        "node": {"id": "h-a", "output": "out"},
        "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0},
        "model": {"factory": f"{_pkg(project)}.net:Net", "args": {"hidden": 6}},
        "dp": {"noise_multiplier": 2.0, "target_epsilon": 3.0, "batch_size": 32, "sample_rate": 0.14},
    }
    path = project / "node.toml"
    path.write_text('python_path = ["src"]\n\n' + dump_toml(tables))
    node = Node(load_node_config(path))
    try:
        assert node.names[:2] == ["fc1.weight", "fc1.bias"] and node.client.module.fc1.out_features == 6
    finally:
        node.ledger.close()  # type: ignore[union-attr]
        node.network.client.close()  # type: ignore[union-attr]
    # launch writes the absolute python_path into every node's config
    cons = project / "consortium.toml"
    cons.write_text('python_path = ["src"]\n\n[consortium]\nname = "byo"\nnodes = ["x", "y"]\n\n'
                    + dump_toml({k: v for k, v in tables.items() if k in ("model", "dp")}))
    plan = prepare_run(cons, runs_dir=project / "runs", run_name="byo")
    text = plan.node_configs["x"].read_text()
    assert f'python_path = ["{(project / "src").resolve()}"]' in text
    cfg = load_node_config(plan.node_configs["x"])
    assert cfg.common.model.spec == f"{_pkg(project)}.net:Net" and cfg.common.model.args == {"hidden": 6}
