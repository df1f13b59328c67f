"""``privfl compare`` over several seeds: intervals, the answer view, validation before anything runs.

One tiny comparison (3 sites, 12 DP steps, 2 runs × 3 seeds, a few seconds) is run once for
the module and read by several tests; the others run nothing or one seed.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from privfl.plots import ANSWER_PLOT, PLOTS
from tests.helpers import TINY_EXPERIMENT, invoke_main

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("restore_root_logging")]

T_975_2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)
LONG = "fedavg-with-a-label-longer-than-any-console-column-would-show"

BASE = TINY_EXPERIMENT.format(seed=0)

COMPARE = """
[compare]
strategies = ["async_gossip"]
repeats = {repeats}
targets = [0.5, 0.7, 1.0]

[[compare.runs]]
label = "{long}"
strategy = "{strategy}"
"""





def write(tmp: Path, repeats: int = 3, strategy: str = "fedavg", extra: str = "") -> Path:
    p = tmp / "compare.toml"
    p.write_text(BASE + extra + COMPARE.format(repeats=repeats, long=LONG, strategy=strategy))
    return p


def compare(*args: str) -> tuple[Path | None, str, int]:
    out = Path(args[args.index("--out") + 1])
    res = invoke_main(["compare", *args, "--no-progress"])
    made = sorted(out.glob("*")) if out.exists() else []
    assert len(made) <= 1, made
    return (made[0] if made else None), res.output, res.exit_code


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("repeats")
    run, output, code = compare("--config", str(write(tmp)), "--out", str(tmp / "runs"))
    assert code == 0 and run is not None, output
    return run, output


def curve_of(metrics: Path) -> list[tuple[float, float]]:
    """(time, mean accuracy over nodes) per evaluation, straight from metrics.csv."""
    groups: dict[tuple[float, int], dict[str, float]] = defaultdict(dict)
    with metrics.open(newline="") as f:
        for r in csv.DictReader(f):
            groups[(float(r["time"]), int(r["round"]))][r["node"]] = float(r["accuracy"])
    return [(k[0], sum(v.values()) / len(v)) for k, v in sorted(groups.items())]


def test_every_seed_keeps_its_folder_and_intervals_are_t_intervals(three_seeds: tuple[Path, str]) -> None:
    run, _ = three_seeds
    cmp = json.loads((run / "comparison.json").read_text())
    assert list(cmp) == ["async_gossip", LONG]
    for label, entry in cmp.items():
        assert entry["seeds"] == [0, 1, 2] and entry["repeats"] == 3
        for seed in (0, 1, 2):
            assert (run / label / f"seed-{seed}" / "metrics.csv").is_file()
            summary = json.loads((run / label / f"seed-{seed}" / "summary.json").read_text())
            assert summary["seed"] == seed
        acc = entry["figures"]["accuracy_mean"]
        per_seed = [curve_of(run / label / f"seed-{s}" / "metrics.csv")[-1][1] for s in (0, 1, 2)]
        assert acc["per_seed"] == pytest.approx(per_seed)
        m = sum(per_seed) / 3
        sd = math.sqrt(sum((v - m) ** 2 for v in per_seed) / 2)
        assert acc["mean"] == pytest.approx(m) and entry["accuracy_mean"] == pytest.approx(m)
        assert acc["ci95"] == pytest.approx([m - T_975_2 * sd / math.sqrt(3), m + T_975_2 * sd / math.sqrt(3)])
        for name, fig in entry["figures"].items():
            if fig is not None and fig["ci95"] is not None:
                lo, hi = fig["ci95"]
                assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in fig["per_seed"]), name
    # the seeds really differ (split and noise): not three copies of one run
    assert len({tuple(curve_of(run / "async_gossip" / f"seed-{s}" / "metrics.csv")) for s in (0, 1, 2)}) == 3
    for name in (*PLOTS, ANSWER_PLOT):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_time_to_target_is_the_first_evaluation_reaching_it(three_seeds: tuple[Path, str]) -> None:
    run, output = three_seeds
    cmp = json.loads((run / "comparison.json").read_text())
    with (run / "answer.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for label, entry in cmp.items():
        kind = "decentralized (gossip)" if label == "async_gossip" else "federated (server)"
        assert entry["kind"] == kind and entry["delta"] == 1e-5 and entry["neighbouring"] == "add/remove one record"
        by_target = {r["target"]: r for r in entry["answer"]["to_target"]}
        assert sorted(by_target) == [0.5, 0.7, 1.0]
        for target in (0.5, 0.7):
            expect = []
            for s in (0, 1, 2):
                hits = [t for t, acc in curve_of(run / label / f"seed-{s}" / "metrics.csv") if acc >= target]
                expect.append(hits[0] if hits else None)
            got = by_target[target]["time"]
            assert got["per_seed"] == pytest.approx(expect), (label, target)
            csv_row = [r for r in rows if r["strategy"] == label and r["question"] == "to reach accuracy"
                       and float(r["target"]) == target and r["quantity"] == "virtual_time_s"]
            assert len(csv_row) == 1 and csv_row[0]["kind"] == kind
            reached = [v for v in expect if v is not None]
            if reached:
                assert float(csv_row[0]["mean"]) == pytest.approx(sum(reached) / len(reached))
        # accuracy 1.0 on the pooled test sets is never reached: said so, never a 0
        never = by_target[1.0]
        for q in ("time", "bytes", "epsilon"):
            assert never[q]["mean"] is None and never[q]["reached"] == 0 and never[q]["per_seed"] == [None] * 3
        for r in rows:
            if r["strategy"] == label and r["question"] == "to reach accuracy" and float(r["target"]) == 1.0:
                assert r["mean"] == "not reached" and r["reached"] == "0/3", r
                assert r["per_seed"] == "not reached;not reached;not reached"
        # the accuracy at the common ε (smallest final ε of every run and seed)
        at = entry["answer"]["at_common_epsilon"]
        assert at["of"] == 3 and entry["answer"]["common_epsilon"] > 0
    assert "not reached" in output and "decentralized (gossip)" in output and "federated (server)" in output
    assert LONG in output  # a piped console does not cut table cells
    assert "δ = 1e-05" in output and "add/remove one record" in output


def test_a_bad_strategy_in_the_last_run_is_refused_before_anything_runs(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import privfl.experiment as experiment

    def never(*a: object, **k: object) -> None:
        raise AssertionError("a run started before validation finished")

    monkeypatch.setattr(experiment, "run_simulation", never)
    extra = "\n[compare.overrides.async_gossip]\nparams = { nope = 1 }\n"
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + COMPARE.format(repeats=2, long="last", strategy="bogus")
                   + extra)
    run, output, code = compare("--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert code == 2, output
    assert run is None and not (tmp_path / "runs").exists()  # no run folder, not even an empty one
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert all(ln.startswith("error: ") for ln in lines), output
    assert any("[[compare.runs]] #1 (label 'last').strategy: unknown strategy name 'bogus'" in ln
               for ln in lines), output
    assert any("[compare.overrides.async_gossip].params" in ln and "nope" in ln for ln in lines), output
    assert len(lines) == 2, output


def test_repeats_flag_overrides_the_file_and_a_failed_run_leaves_a_note(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import privfl.experiment as experiment

    real, calls = experiment.run_simulation, []

    def second_fails(spec):  # type: ignore[no-untyped-def]
        calls.append(spec.seed)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(spec)

    cfg = write(tmp_path, repeats=5)
    _, output, code = compare("--config", str(cfg), "--out", str(tmp_path / "bad"), "--repeats", "0")
    assert code == 2 and "--repeats" in output and not (tmp_path / "bad").exists()

    monkeypatch.setattr(experiment, "run_simulation", second_fails)
    run, output, code = compare("--config", str(cfg), "--out", str(tmp_path / "runs"), "--repeats", "2")
    assert code != 0 and run is not None
    assert calls == [0, 1]  # --repeats 2, not the file's 5
    assert (run / "async_gossip" / "seed-0" / "metrics.csv").is_file()  # what finished is kept
    note = (run / "error.txt").read_text()
    assert "async_gossip seed 1" in note and "disk full" in note and "async_gossip/seed-0" in note
    assert not (run / "comparison.json").exists()
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["repeats"] == 2 and resolved["seeds"] == [0, 1] and resolved["repeats_from"] == "--repeats"


def test_one_seed_has_no_interval(tmp_path: Path) -> None:
    from privfl.answer import fmt_stat, stat, t_interval

    assert t_interval([0.8]) is None
    s = stat([0.8])
    assert s["ci95"] is None and s["mean"] == 0.8 and fmt_stat(s) == "0.800"
    assert fmt_stat(stat([None, None])) == "not reached"
    assert fmt_stat(stat([1.0, None, 3.0]), 1) == "2.0 [-10.7, 14.7] (2/3 reached)"


def test_help_keeps_section_names() -> None:
    res = invoke_main(["compare", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "[compare].repeats" in res.output and "[compare])" in res.output, res.output
