"""Small validation gaps: each bad value is one line naming its ``[section].field`` (the config's
name, not an internal one), exit code 2 from the CLI, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from privfl.config import DataSection, StopSection, from_table
from privfl.errors import ConfigError
from privfl.sim import LinkSpec, SimSpec, StopCriteria, compute_speeds
from tests.helpers import TINY_EXPERIMENT

pytestmark = pytest.mark.timeout(120)

BASE = TINY_EXPERIMENT.format(seed=0)


def with_value(section: str, line: str) -> str:
    """BASE with ``line`` (``key = value``) set in ``[section]``."""
    key = line.split("=")[0].strip()
    out, current, done = [], None, False
    for text in BASE.splitlines():
        m = re.match(r"^\[(.+)\]$", text.strip())
        if m:
            if current == section and not done:
                out.append(line)
                done = True
            current = m.group(1)
        if current == section and re.match(rf"^{key}\s*=", text):
            out.append(line)
            done = True
            continue
        out.append(text)
    if not done:
        out += [line] if current == section else [f"[{section}]", line]
    return "\n".join(out) + "\n"


CLI_CASES = [
    ("data", "seed = -1", "[data].seed"),
    ("stop", "max_steps = -1", "[stop].max_steps"),
    ("stop", "max_seconds = -5.0", "[stop].max_seconds"),
    ("stop", "target_accuracy = 1.5", "[stop].target_accuracy"),
    ("stop", "target_accuracy = -0.1", "[stop].target_accuracy"),
    ("simulation", "latency = -1.0", "[simulation].latency"),
    ("simulation", "bandwidth = 0.0", "[simulation].bandwidth"),
    ("simulation", "eval_every = -1.0", "[simulation].eval_every"),
    ("simulation", "eval_every_rounds = -2", "[simulation].eval_every_rounds"),
    ("simulation", "max_rounds = -1", "[simulation].max_rounds"),
    ("simulation", "step_cost = -1.0", "[simulation].step_cost"),
    ("simulation", "seed = -1", "[simulation].seed"),
    ("simulation", 'compute_profile = "straggler"\nstraggler_factor = 0.0', "[simulation].straggler_factor"),
    ("simulation", 'compute_profile = "explicit"\nspeeds = [1.0]', "[simulation].speeds"),
]


def test_cli_refuses_each_bad_value_with_one_line_and_exit_2(tmp_path: Path) -> None:
    args = []
    for i, (section, line, _) in enumerate(CLI_CASES):
        (tmp_path / f"c{i}.toml").write_text(with_value(section, line))
        args.append(["simulate", "--config", str(tmp_path / f"c{i}.toml"), "--no-progress", "--out",
                     str(tmp_path / "runs")])
    script = ("import sys; from privfl.cli import main\n"
              f"for args in {args!r}:\n"
              "    sys.argv = ['privfl', *args]\n"
              "    try:\n        main()\n    except SystemExit as e:\n"
              "        print('EXIT', e.code, flush=True)\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.stdout.split() == ["EXIT", "2"] * len(CLI_CASES), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == len(CLI_CASES), proc.stderr
    for line, (_, _, field) in zip(lines, CLI_CASES):
        assert line.startswith("error: "), line
        assert field + ":" in line, (field, line)


# ---- the sections themselves -------------------------------------------------------------------
@pytest.mark.parametrize("table,field", [
    ({"seed": -1}, "[data].seed"),
])
def test_data_section_refuses(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field + ":")):
        from_table(DataSection, table, "[data]")


@pytest.mark.parametrize("table,field", [
    ({"max_steps": -1}, "[stop].max_steps"),
    ({"max_seconds": -0.5}, "[stop].max_seconds"),
    ({"max_seconds": float("nan")}, "[stop].max_seconds"),
    ({"target_accuracy": 1.01}, "[stop].target_accuracy"),
    ({"target_accuracy": -0.2}, "[stop].target_accuracy"),
    ({"target_accuracy": float("nan")}, "[stop].target_accuracy"),
])
def test_stop_section_refuses(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field + ":")):
        from_table(StopSection, table, "[stop]")


def test_sections_keep_their_zero_and_edge_values() -> None:
    assert from_table(DataSection, {"seed": 0}, "[data]").seed == 0
    for table in ({"max_steps": 0, "max_seconds": 0.0, "target_accuracy": 0.0}, {"target_accuracy": 1.0},
                  {"max_seconds": float("inf")}):
        from_table(StopSection, table, "[stop]")


# ---- the simulator names the config's fields -----------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    ({"num_nodes": 0}, "[data].num_sites"),
    ({"local_steps": 0}, "[strategy].local_steps"),
    ({"seed": -3}, "[simulation].seed"),
    ({"eval_every": -1.0}, "[simulation].eval_every"),
    ({"eval_every_rounds": 0}, "[simulation].eval_every_rounds"),
    ({"step_cost": 0.0}, "[simulation].step_cost"),
    ({"step_cost": "fast"}, "[simulation].step_cost"),
    ({"links": LinkSpec(latency=-1.0)}, "[simulation].latency"),
    ({"links": LinkSpec(latency=float("nan"))}, "[simulation].latency"),
    ({"links": LinkSpec(bandwidth=-1.0)}, "[simulation].bandwidth"),
    ({"compute_profile": "warp"}, "[simulation].compute_profile"),
    ({"compute_profile": "straggler", "compute_params": {"factor": 0}}, "[simulation].straggler_factor"),
    ({"compute_profile": "straggler", "compute_params": {"index": 7}}, "[simulation].straggler_index"),
    ({"compute_profile": "lognormal", "compute_params": {"sigma": -1}}, "[simulation].lognormal_sigma"),
    ({"compute_profile": "explicit", "compute_params": {"speeds": [1.0]}}, "[simulation].speeds"),
    ({"compute_profile": "explicit", "compute_params": {"speeds": [1.0, 0.0, 1.0, 1.0]}}, "[simulation].speeds[1]"),
    ({"stop": StopCriteria()}, "[stop]"),
    ({"stop": StopCriteria(max_time=-1.0)}, "[stop].max_seconds"),
    ({"stop": StopCriteria(max_steps=-1)}, "[stop].max_steps"),
    ({"stop": StopCriteria(max_rounds=-1)}, "[simulation].max_rounds"),
    ({"stop": StopCriteria(max_steps=5, target_accuracy=2.0)}, "[stop].target_accuracy"),
    ({"node_ids": ["a"]}, "SimSpec.node_ids"),
    ({"links": LinkSpec(header_bytes=-1)}, "LinkSpec.header_bytes"),
    ({"links": LinkSpec(latencies=[0.1])}, "LinkSpec.latencies"),
])
def test_sim_spec_names_the_config_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field + ":")) as err:
        SimSpec(**kw).validate()
    msg = str(err.value)
    assert "\n" not in msg
    assert not re.search(r"(?<![\[\w.])(links|sim|compute|strategy)\.\w", msg), msg  # no internal names


def test_profiles_name_the_config_fields() -> None:
    with pytest.raises(ConfigError, match=re.escape("[simulation].compute_profile:")):
        compute_speeds("warp", 3)
    with pytest.raises(ConfigError, match=re.escape("[simulation].straggler_factor:")):
        compute_speeds("straggler", 3, params={"factor": "slow"})
    with pytest.raises(ConfigError, match=re.escape("[simulation].latency:")):
        LinkSpec(latency="far").bind(2)  # type: ignore[arg-type]


def test_a_valid_spec_passes() -> None:
    SimSpec().validate()
    SimSpec(compute_profile="straggler", compute_params={"factor": 4.0, "index": 3}, eval_every=0.5,
            stop=StopCriteria(max_time=0.0)).validate()


def test_a_top_level_typo_is_named_with_the_closest_name(tmp_path: Path) -> None:
    from privfl.config import check_sections

    with pytest.raises(ConfigError) as exc:
        check_sections({"pythonpath": ["."], "stp": {}}, ("stop", "dp"), "x.toml")
    msg = str(exc.value)
    assert "unknown key pythonpath (did you mean python_path?)" in msg
    assert "unknown section stp (did you mean stop?)" in msg
    assert "allowed at the top level: dp, python_path, stop" in msg
