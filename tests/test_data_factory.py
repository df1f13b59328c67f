"""Bring your own data: ``[data].factory`` returns each site's torch Datasets, in every command.

The factory is called with ``site_index``, ``num_sites``, ``root`` (only when set, absolute,
relative to the file naming it) and ``[data].args``; what it returns is checked with one-line
errors. ``privfl launch`` gives each hospital its own ``[nodes.<id>.data]``. ``[model].loss``
and ``[dp].optimizer`` are registries of built-ins and import paths.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from privfl.clients import DPClient, DPConfig
from privfl.clients.losses import build_loss
from privfl.clients.optimizers import build_optimizer
from privfl.config import DataSection, DPSection, ModelSection, from_table
from privfl.errors import ConfigError, PrivflError
from privfl.experiment import load_experiment, spec_for
from privfl.launch import prepare_run
from privfl.sim import run_simulation

PROJECT = '''
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

CALLS = []

class Folder(Dataset):
    """Records 'read from' a hospital folder: the folder name fixes the values."""
    def __init__(self, root, n, offset):
        self.root, self.n, self.offset = root, n, offset
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        x = torch.full((1, 4, 4), float((i + self.offset) % 7) / 7)
        return x, (i + self.offset) % 3

def load_site(site_index, num_sites, root=None, n=24):
    CALLS.append((site_index, num_sites, root, n))
    return Folder(root, n, site_index), Folder(root, 6, site_index + 100)

def not_a_pair(site_index, num_sites):
    return [1, 2, 3]

def loaders(site_index, num_sites):
    from torch.utils.data import DataLoader
    tr, te = load_site(site_index, num_sites)
    return DataLoader(tr, batch_size=4, shuffle=True), DataLoader(te)

def arrays(site_index, num_sites):
    return (torch.zeros(3), torch.zeros(3))

def Net(width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))

class HalfLoss(nn.Module):
    reduction = "mean"
    def forward(self, out, y):
        return 0.5 * nn.functional.cross_entropy(out, y)

def sum_loss():
    return nn.CrossEntropyLoss(reduction="sum")

def my_sgd(params, lr, nesterov=False):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=nesterov)
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "hosp_byo.py").write_text(textwrap.dedent(PROJECT))
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("hosp_byo", None)
    for name in ("a", "b", "c"):
        (tmp_path / "data" / name).mkdir(parents=True)
    return tmp_path


def test_factory_is_called_per_site_with_root_and_args(project: Path) -> None:
    d = from_table(DataSection, {"factory": "hosp_byo:load_site", "root": "data/a", "args": {"n": 10},
                                 "num_sites": 3}, "[data]")
    site = d.factory_site(2, project)
    import hosp_byo  # type: ignore[import-not-found]

    assert hosp_byo.CALLS[-1] == (2, 3, str((project / "data" / "a").resolve()), 10)
    assert len(site.train) == 10 and site.in_shape == (1, 4, 4)
    assert d.resolved_scaling == "none" and d.builtin_name() is None


@pytest.mark.parametrize(("table", "needle"), [
    ({"factory": "hosp_byo:not_a_pair"}, "must return (train, test)"),
    ({"factory": "hosp_byo:arrays"}, "not a torch.utils.data.Dataset"),
    ({"factory": "hosp_byo:load_site", "args": {"bogus": 1}}, "does not take these arguments"),
    ({"factory": "hosp_byo:missing"}, "has no 'missing'"),
    ({"factory": "nowhere_pkg:load"}, "cannot import 'nowhere_pkg'"),
    ({"factory": "hosp_byo:load_site", "root": "data/none"}, "[data].root: folder not found"),
])
def test_bad_factories_fail_in_one_line(project: Path, table: dict, needle: str) -> None:
    with pytest.raises(PrivflError) as exc:
        d = from_table(DataSection, table, "[data]")
        d.factory_site(0, project)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("table", "field"), [
    ({"factory": "hosp_byo:load_site", "scaling": "public"}, "[data].scaling"),
    ({"factory": "hosp_byo:load_site", "transform": "log1p"}, "[data].scaling"),
    ({"args": {"n": 3}}, "[data].args"),
    ({"root": "x"}, "[data].root"),
    ({"factory": "not-a-path"}, "[data].factory"),
])
def test_data_section_refusals_name_the_field(project: Path, table: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        from_table(DataSection, table, "[data]")


def test_losses_and_optimizers_are_registries(project: Path) -> None:
    model = torch.nn.Linear(3, 2)
    assert isinstance(build_optimizer("adam", model.parameters(), 0.1, args={"betas": [0.8, 0.9]}), torch.optim.Adam)
    assert isinstance(build_optimizer("adamw", model.parameters(), 0.1), torch.optim.AdamW)
    sgd = build_optimizer("sgd", model.parameters(), 0.1, momentum=0.5)
    assert sgd.param_groups[0]["momentum"] == 0.5
    mine = build_optimizer("hosp_byo:my_sgd", model.parameters(), 0.1, args={"nesterov": True})
    assert mine.param_groups[0]["nesterov"] is True
    with pytest.raises(ConfigError, match=r"dp\.momentum: applies to 'sgd' only"):
        from_table(DPSection, {"sample_rate": 0.1, "optimizer": "adam", "momentum": 0.9}, "dp")
    with pytest.raises(ConfigError, match=r"dp\.optimizer: unknown optimizer 'rmsprop'"):
        from_table(DPSection, {"sample_rate": 0.1, "optimizer": "rmsprop"}, "dp")
    with pytest.raises(ConfigError, match=r"optimizer_args\.lr"):
        build_optimizer("adam", model.parameters(), 0.1, args={"lr": 1.0})
    with pytest.raises(ConfigError, match="reduction='sum'"):
        build_loss("hosp_byo:sum_loss")
    with pytest.raises(ConfigError, match=r"\[model\]\.loss: unknown loss"):
        from_table(ModelSection, {"loss": "hinge"}, "[model]")


def test_dp_client_trains_a_factory_dataset_with_the_chosen_loss_and_optimizer(project: Path) -> None:
    """The user's loss shapes the update: HalfLoss (½·CE) under the same seed gives a different model
    than CE; with Adam the optimizer's state holds moments."""
    import hosp_byo  # type: ignore[import-not-found]

    train, test = hosp_byo.load_site(0, 3)

    def run(loss: str, optimizer: str) -> tuple[list, DPClient]:
        torch.manual_seed(0)
        cfg = DPConfig(noise_multiplier=2.0, sample_rate=0.5, batch_size=8, lr=0.05, optimizer=optimizer,
                       target_epsilon=50.0, clipping="flat", max_grad_norm=100.0, delta=1e-3)
        client = DPClient(hosp_byo.Net(), train, test, cfg, seed=3, device="cpu", criterion=build_loss(loss))
        params, weight, metrics = client.fit(client.get_parameters({}), {"local_steps": 3})
        return params, client

    ce, _ = run("cross_entropy", "sgd")
    half, _ = run("hosp_byo:HalfLoss", "sgd")
    ce_again, _ = run("cross_entropy", "sgd")
    assert all((a == b).all() for a, b in zip(ce, ce_again))
    assert any((a != b).any() for a, b in zip(ce, half))
    _, adam = run("cross_entropy", "adam")
    assert adam.optimizer.original_optimizer.state, "Adam holds per-parameter moments after a step"


def _experiment(project: Path, extra: str = "") -> Path:
    p = project / "exp.toml"
    p.write_text(textwrap.dedent(f'''
        python_path = ["proj"]
        name = "byo"
        [data]
        factory = "hosp_byo:load_site"
        root = "data"
        num_sites = 3
        [model]
        factory = "hosp_byo:Net"
        args = {{ width = 5 }}
        loss = "hosp_byo:HalfLoss"
        [dp]
        sample_rate = 0.25
        noise_multiplier = 1.0
        delta = 1e-3
        optimizer = "adam"
        lr = 0.01
        [strategy]
        name = "async_gossip"
        local_steps = 2
        [stop]
        max_steps = 4
        [simulation]
        device = "cpu"
        {extra}
    '''))
    return p


def test_simulate_runs_the_factory_sites(project: Path) -> None:
    exp = load_experiment(_experiment(project))
    spec = spec_for(exp, exp.runs[0])
    assert spec.data_root == str((project / "data").resolve()) and spec.loss == "hosp_byo:HalfLoss"
    res = run_simulation(spec)
    import hosp_byo  # type: ignore[import-not-found]

    assert {c[0] for c in hosp_byo.CALLS} == {0, 1, 2}
    assert res.summary["dp"] is True and all(0 < e < 10 for e in res.summary["epsilon"].values())
    assert set(res.summary["final_accuracy"]) == {"node0", "node1", "node2"}
    assert {p.describe()["kind"] for p in res.preprocessing.values()} == {"none"}


def test_builtin_model_with_a_factory_needs_declared_classes(project: Path) -> None:
    p = _experiment(project)
    p.write_text(p.read_text().replace('factory = "hosp_byo:Net"\nargs = { width = 5 }', 'name = "mlp"'))
    exp = load_experiment(p)
    with pytest.raises(ConfigError, match=r"\[data\]\.num_classes"):
        run_simulation(spec_for(exp, exp.runs[0]))


def test_launch_gives_each_hospital_its_own_data(project: Path) -> None:
    sub = project / "conf"
    sub.mkdir()
    cfg = sub / "launch.toml"
    cfg.write_text(textwrap.dedent('''
        python_path = ["../proj"]
        [consortium]
        name = "byo"
        nodes = ["a", "b", "c"]
        [data]
        factory = "hosp_byo:load_site"
        root = "../data/c"
        [nodes.a.data]
        root = "../data/a"
        [nodes.b.data]
        root = "../data/b"
        args = { n = 12 }
        [model]
        factory = "hosp_byo:Net"
        [dp]
        sample_rate = 0.25
        noise_multiplier = 1.0
        delta = 1e-3
    '''))
    plan = prepare_run(cfg, runs_dir=project / "runs")
    data = {nid: tomllib.loads(p.read_text())["data"] for nid, p in plan.node_configs.items()}
    assert data["a"]["root"] == str((project / "data" / "a").resolve())
    assert data["b"]["root"] == str((project / "data" / "b").resolve()) and data["b"]["args"] == {"n": 12}
    assert data["c"]["root"] == str((project / "data" / "c").resolve()) and "args" not in data["c"]
    assert [data[n]["site_index"] for n in ("a", "b", "c")] == [0, 1, 2]


@pytest.mark.parametrize(("body", "needle"), [
    ('[nodes.z.data]\nroot = "x"', "'z' is not in [consortium].nodes"),
    ('[nodes.a.data]\nseed = 3', "[nodes.a.data].seed: shared by every node"),
    ('[nodes.a]\nlisten = "x"', "only a [nodes.a.data] table"),
    ('[nodes.a.data]\nscaling = "site"', "[nodes.a.data]"),
])
def test_launch_refuses_bad_per_node_data(project: Path, body: str, needle: str) -> None:
    cfg = project / "launch.toml"
    cfg.write_text('[consortium]\nname = "byo"\nnodes = ["a", "b"]\n[data]\nsource = "breast_cancer"\n'
                   '[dp]\nsample_rate = 0.25\nnoise_multiplier = 1.0\n' + body + "\n")
    with pytest.raises(ConfigError) as exc:
        prepare_run(cfg, runs_dir=project / "runs")
    assert needle in str(exc.value)


def test_dp_client_takes_the_users_data_loaders(project: Path) -> None:
    """A Flower-quickstart load_data returns DataLoaders: DPClient takes them (their Datasets) and
    trains exactly as on the Datasets, with its own Poisson batches."""
    import hosp_byo  # type: ignore[import-not-found]
    from torch.utils.data import DataLoader

    train, test = hosp_byo.load_site(1, 3)
    cfg = DPConfig(noise_multiplier=2.0, sample_rate=0.5, batch_size=8, target_epsilon=50.0, delta=1e-3)
    out = []
    for tr, te in ((train, test), (DataLoader(train, batch_size=4, shuffle=True), DataLoader(test))):
        torch.manual_seed(0)
        client = DPClient(hosp_byo.Net(), tr, te, cfg, seed=5, device="cpu")
        out.append(client.fit(client.get_parameters({}), {"local_steps": 2})[0])
        assert client.evaluate_local()[1] >= 0
    assert all((a == b).all() for a, b in zip(*out))


def test_a_factory_may_return_data_loaders(project: Path) -> None:
    d = from_table(DataSection, {"factory": "hosp_byo:loaders", "num_sites": 3}, "[data]")
    site = d.factory_site(1, project)
    assert len(site.train) == 24 and len(site.test) == 6 and site.in_shape == (1, 4, 4)


LAUNCH = '''
    python_path = ["../proj"]
    [consortium]
    name = "byo"
    nodes = ["a", "b", "c"]
    [data]
    factory = "hosp_byo:load_site"
    [nodes.a.data]
    root = "../data/a"
    [nodes.b.data]
    root = "../data/bb"
    [nodes.c.data]
    root = "../data/c"
    [model]
    factory = "hosp_byo:Net"
    [dp]
    sample_rate = 0.25
    noise_multiplier = 1.0
    delta = 1e-3
'''


def test_launch_checks_every_node_before_starting_any(project: Path) -> None:
    """A typo in one hospital's data folder, or in the model's import path, is refused by the
    launcher in one line naming the node and the field, with no node process started."""
    sub = project / "conf"
    sub.mkdir()
    cfg = sub / "launch.toml"
    cfg.write_text(textwrap.dedent(LAUNCH))
    with pytest.raises(ConfigError) as exc:
        prepare_run(cfg, runs_dir=project / "runs")
    msg = str(exc.value)
    assert msg.startswith(f"node b: {cfg}: [nodes.b.data].root: folder not found") and "bb" in msg, msg
    assert "(no node was started)" in msg and "\n" not in msg
    assert not (project / "runs").exists() or not any((project / "runs").iterdir())  # nothing left behind
    cfg.write_text(textwrap.dedent(LAUNCH).replace("../data/bb", "../data/b").replace("hosp_byo:Net", "hosp_byo:Nett"))
    with pytest.raises(ConfigError) as exc:
        prepare_run(cfg, runs_dir=project / "runs")
    msg = str(exc.value)
    assert "[model].factory: module 'hosp_byo' has no 'Nett'" in msg, msg
    assert msg.count(str(cfg)) == 1  # the file named once, not "x.toml: x.toml: …"


def test_a_failing_factory_is_one_line_and_its_traceback_only_at_debug(
        project: Path, caplog: pytest.LogCaptureFixture) -> None:
    (project / "proj" / "hosp_boom.py").write_text("def load(site_index, num_sites):\n    raise OSError('disk gone')\n")
    d = from_table(DataSection, {"factory": "hosp_boom:load"}, "[data]")
    with caplog.at_level(logging.INFO):
        with pytest.raises(PrivflError) as exc:
            d.factory_site(0, project)
    assert "OSError: disk gone" in str(exc.value) and "logged at level DEBUG" in str(exc.value)
    assert not [r for r in caplog.records if r.exc_info]  # an operator's console gets no traceback


def test_node_error_line_is_the_last_error_of_the_log(tmp_path: Path) -> None:
    from privfl.launch import node_error_line

    (tmp_path / "node.log").write_text("INFO start\nerror: first\nTraceback ...\nerror: node.toml: [data].root: x\n")
    assert node_error_line(tmp_path) == "error: node.toml: [data].root: x"
    assert node_error_line(tmp_path / "missing") is None


def test_launch_refuses_a_budget_that_allows_no_step(project: Path) -> None:
    """σ, q, δ and ε are declared: a target ε that one step already exceeds is refused by the
    launcher, naming the field, before a node starts and ends 'budget exhausted' with 0 steps."""
    sub = project / "conf"
    sub.mkdir()
    cfg = sub / "launch.toml"
    cfg.write_text(textwrap.dedent(LAUNCH).replace("../data/bb", "../data/b")
                   .replace("delta = 1e-3", "delta = 1e-3\n    target_epsilon = 0.05"))
    with pytest.raises(ConfigError) as exc:
        prepare_run(cfg, runs_dir=project / "runs")
    msg = str(exc.value)
    assert msg.startswith(f"node a: {cfg}: [dp].target_epsilon: ε = 0.05 allows no DP step"), msg
    assert "σ = 1" in msg and "q = 0.25" in msg and "(no node was started)" in msg
