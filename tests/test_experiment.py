"""``privfl simulate`` / ``privfl compare`` end to end: config → run folder, determinism,
clean config errors, run variants that change only what they declare, equal ε across strategies."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privfl.errors import ConfigError
from privfl.experiment import load_experiment
from privfl.plots import PLOTS
from tests.helpers import TINY_EXPERIMENT, invoke_main

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("restore_root_logging")]

ROOT = Path(__file__).resolve().parents[1]
METRIC_COLUMNS = ["time", "round", "node", "steps", "loss", "accuracy", "epsilon", "bytes_sent",
                  "bytes_received", "consensus_max", "consensus_rms", "stopped"]





BASE = TINY_EXPERIMENT

COMPARE = """
[compare]
strategies = ["async_gossip", "sync_gossip", "allreduce", "fedavg"]

[[compare.runs]]
label = "fedavg-sigma2"
strategy = "fedavg"
dp = {{ noise_multiplier = 2.0 }}

[[compare.runs]]
label = "fedavg-k6"
strategy = "fedavg"
local_steps = {variant_steps}
"""


def write_config(tmp: Path, name: str = "experiment.toml", seed: int = 0, compare: bool = False,
                 extra: str = "", variant_steps: int = 6) -> Path:
    text = BASE.format(seed=seed) + extra
    if compare:
        text += COMPARE.format(variant_steps=variant_steps)
    p = tmp / name
    p.write_text(text)
    return p


def invoke(*args: str) -> Path:
    """Run the CLI in-process; return the one run folder it made under ``--out``."""
    out = Path(args[args.index("--out") + 1])
    before = set(out.glob("*")) if out.exists() else set()
    res = invoke_main([*args, "--no-progress"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    made = sorted(set(out.glob("*")) - before)
    assert len(made) == 1, made
    return made[0]


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_pngs(d: Path) -> None:
    for name in PLOTS:
        p = d / name
        assert p.is_file(), p
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


def test_simulate_writes_a_complete_run_folder(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    run = invoke("simulate", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert (run / "config.toml").read_text() == cfg.read_text()
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["runs"] == ["async_gossip"]
    spec = resolved["async_gossip"]
    assert spec["num_nodes"] == 3 and spec["model"] == "logreg" and spec["local_steps"] == 4
    assert spec["dp"]["noise_multiplier"] == 1.0 and spec["topology"] == "complete"

    with (run / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header == METRIC_COLUMNS
    rows = read_metrics(run / "metrics.csv")
    assert {r["node"] for r in rows} == {"node0", "node1", "node2"}
    final = rows[-3:]
    assert all(int(r["steps"]) == 12 for r in final)
    assert all(0 < float(r["epsilon"]) < 50 for r in final)
    assert all(int(r["bytes_sent"]) > 0 and int(r["bytes_received"]) > 0 for r in final)
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times) and times[-1] > 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "async_gossip" and summary["steps"] == {f"node{i}": 12 for i in range(3)}
    comparison = json.loads((run / "comparison.json").read_text())
    assert set(comparison) == {"async_gossip"}
    assert comparison["async_gossip"]["epsilon_max"] == pytest.approx(max(summary["epsilon"].values()))
    assert comparison["async_gossip"]["accuracy_mean"] == pytest.approx(
        sum(float(r["accuracy"]) for r in final) / 3)
    assert_pngs(run)
    assert (run / "run.log").read_text().count("simulate async_gossip") >= 1


def test_identical_seeds_give_identical_metrics_csv(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra="", seed=0)
    a = invoke("simulate", "--config", str(cfg), "--out", str(tmp_path / "a"))
    b = invoke("simulate", "--config", str(cfg), "--out", str(tmp_path / "b"))
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    other = write_config(tmp_path, "seed1.toml", seed=1)
    c = invoke("simulate", "--config", str(other), "--out", str(tmp_path / "c"))
    assert (c / "metrics.csv").read_bytes() != (a / "metrics.csv").read_bytes()
    # each run logs into its own run.log only (the file handler goes when the run ends)
    for d in (a, b, c):
        assert (d / "run.log").read_text().count("simulate async_gossip:") == 1, d


def test_compare_runs_every_variant_on_identical_data_and_equal_epsilon(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "compare.toml", compare=True)
    run = invoke("compare", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    labels = ["async_gossip", "sync_gossip", "allreduce", "fedavg", "fedavg-sigma2", "fedavg-k6"]
    comparison = json.loads((run / "comparison.json").read_text())
    assert list(comparison) == labels
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["runs"] == labels
    assert_pngs(run)

    # a variant changes only what it declares
    base = resolved["fedavg"]
    for label in labels:
        spec = resolved[label]
        for key in ("dataset", "num_nodes", "partitioning", "alpha", "preprocessing", "test_fraction", "model",
                    "hidden", "seed", "compute_profile", "compute_params", "links", "stop"):
            assert spec[key] == base[key], (label, key)
    assert resolved["fedavg-sigma2"]["dp"]["noise_multiplier"] == 2.0
    assert resolved["fedavg-sigma2"]["local_steps"] == 4
    assert resolved["fedavg-k6"]["local_steps"] == 6
    assert resolved["fedavg-k6"]["dp"] == base["dp"]
    for label in labels:
        if label != "fedavg-sigma2":
            assert resolved[label]["dp"]["noise_multiplier"] == 1.0, label
        assert resolved[label]["strategy"] == ("fedavg" if label.startswith("fedavg") else label)

    # ε per node is the same across strategies for the same number of local steps
    summaries = {lb: json.loads((run / lb / "summary.json").read_text()) for lb in labels}
    ref = summaries["async_gossip"]
    assert ref["steps"] == {f"node{i}": 12 for i in range(3)}
    for lb in ("sync_gossip", "allreduce", "fedavg", "fedavg-k6"):
        assert summaries[lb]["steps"] == ref["steps"], lb
        for nid, eps in ref["epsilon"].items():
            assert summaries[lb]["epsilon"][nid] == pytest.approx(eps, rel=1e-9), (lb, nid)
    # more noise, same steps: strictly less ε spent
    for nid, eps in ref["epsilon"].items():
        assert summaries["fedavg-sigma2"]["epsilon"][nid] < 0.5 * eps
    # each run has its own metrics.csv with the documented columns
    for lb in labels:
        with (run / lb / "metrics.csv").open(newline="") as f:
            assert next(csv.reader(f)) == METRIC_COLUMNS
    # only communication differs: all-reduce sends a model every step, FedAvg every 4 steps
    assert comparison["allreduce"]["bytes_sent"] > 2 * comparison["fedavg"]["bytes_sent"]


@pytest.mark.parametrize("extra, field", [
    ("\n[compare]\nstrategies = [\"fedavg\"]\n[[compare.runs]]\nlabel = \"x\"\nstrategy = \"fedavg\"\n"
     "lr = 0.1\n", "lr"),
    ("\n[compare]\nstrategies = [\"fedavg\"]\n[[compare.runs]]\nlabel = \"x\"\nstrategy = \"fedavg\"\n"
     "dp = { clipping = \"nope\" }\n", "clipping"),
    ("\n[compare]\nstrategies = [\"fedavg\", \"fedavg\"]\n", "fedavg"),
])
def test_compare_config_errors_name_the_field(tmp_path: Path, extra: str, field: str) -> None:
    cfg = write_config(tmp_path, extra=extra)
    with pytest.raises(ConfigError, match=field):
        load_experiment(cfg)


def test_config_errors_exit_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.format(seed=0).replace('scaling = "public"', 'scaling = "zscore"'))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(BASE.format(seed=0) + "\n[simulation.extra]\nx = 1\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cases = [
        (["simulate", "--config", str(bad)], "data].scaling"),
        (["compare", "--config", str(unknown)], "extra"),
        (["simulate", "--config", str(tmp_path / "missing.toml")], "missing.toml"),
    ]
    script = ("import sys; from privfl.cli import main\n"
              "for args in %r:\n"
              "    sys.argv = ['privfl', *args]\n"
              "    try:\n        main()\n    except SystemExit as e:\n"
              "        print('EXIT', e.code, flush=True)\n") % [c[0] for c in cases]
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.split() == ["EXIT", "2"] * len(cases), proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == len(cases), proc.stderr
    for line, (_, field) in zip(lines, cases):
        assert line.startswith("error: ") and field in line, line
    assert not (tmp_path / "runs").exists()  # nothing was run


@pytest.mark.parametrize("example", ["hospitals-breast-cancer", "digits-heterogeneous"])
def test_shipped_example_configs_load(example: str) -> None:
    one = load_experiment(ROOT / "examples" / example / "experiment.toml")
    many = load_experiment(ROOT / "examples" / example / "compare.toml")
    assert len(one.runs) == 1 and len(many.runs) >= 5
    # the compare config is the experiment config plus the list of runs
    assert one.common.data == many.common.data and one.common.dp == many.common.dp
    assert one.common.model == many.common.model and one.simulation == many.simulation
    assert one.common.dp.planned_steps == one.common.stop.max_steps  # every site ends at exactly ε


@pytest.mark.parametrize("old, hint", [("scale", "scaling = 'public'"), ("log", "transform = 'log1p'")])
def test_retired_scaling_names_are_refused_with_guidance(tmp_path: Path, old: str, hint: str) -> None:
    cfg = tmp_path / "old.toml"
    cfg.write_text(BASE.format(seed=0).replace('scaling = "public"', f'scaling = "{old}"'))
    with pytest.raises(ConfigError, match=r"\[data\]\.scaling: ") as e:
        load_experiment(cfg)
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_preprocessing_fields_reach_the_sim_spec(tmp_path: Path) -> None:
    """[data] preprocessing keys become SimSpec.preprocessing; a statistics path is relative to the config."""
    from privfl.experiment import spec_for

    (tmp_path / "ranges.toml").write_text("low = [0.0]\nhigh = [1.0]\n")
    base = BASE.format(seed=0)  # BASE declares sample_rate already
    cfg = tmp_path / "pre.toml"
    cfg.write_text(base.replace('scaling = "public"',
                                'scaling = "public"\ntransform = "log1p"\nstatistics = "ranges.toml"'))
    spec = spec_for(load_experiment(cfg), "async_gossip")
    assert spec.preprocessing.scaling == "public" and spec.preprocessing.transform == "log1p"
    assert spec.preprocessing.statistics == str(tmp_path / "ranges.toml")
    cfg.write_text(base.replace(
        'scaling = "public"', 'scaling = "dp"\ndp_noise_multiplier = 2.0\ndp_bound = 8.0\ntransform = "log1p"'))
    pre = spec_for(load_experiment(cfg), "async_gossip").preprocessing
    assert (pre.scaling, pre.dp_noise_multiplier, pre.dp_bound) == ("dp", 2.0, 8.0)
