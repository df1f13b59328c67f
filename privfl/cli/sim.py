"""``privfl simulate`` and ``privfl compare``: runs on a virtual clock, plots, summary and answer tables.

Everything in the config is checked before the first run starts (a bad value: one
``error:`` line naming its ``[section].field`` each, exit code 2, no run folder made).
Tables print in full when the output is not a terminal (no value cut to the console's width).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privfl.answer import NOT_REACHED, fmt_stat, human_bytes
from privfl.errors import ConfigError
from privfl.experiment import (
    Comparison,
    check_repeats,
    load_experiment,
    run_comparison,
    run_dir_for,
    subtitle,
    validate_experiment,
)

#: the width of a console that is not a terminal (a pipe, a file, CI): wide enough that no cell is cut
PIPE_WIDTH = 4096


def console_for(stderr: bool = False) -> Console:
    """A Rich console; when it does not write to a terminal, so wide that tables never truncate."""
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


def _table(title: str, columns: list[str]) -> Table:
    t = Table(title=escape(title))
    for i, c in enumerate(columns):
        t.add_column(escape(c), justify="left" if i < 2 else "right", overflow="fold")
    return t


def figures_table(cmp: Comparison) -> Table:
    """Per run: final accuracy, ε, virtual time, bytes, consensus; mean [95 % t-interval] with repeats."""
    reps = cmp.exp.repeats
    note = f" — mean [95% t-interval] over {reps} seeds" if reps > 1 else ""
    t = _table(f"{cmp.exp.name}: final figures{note}",
               ["strategy", "kind", "virtual time (s)", "accuracy (mean)", "accuracy (min)", "ε (max)",
                "δ", "bytes (all traffic)", "consensus dist."])
    for label, e in cmp.summary.items():
        f = e["figures"]
        eps = "no DP" if e["privacy"] == "no DP" else fmt_stat(f["epsilon_max"], 3)
        t.add_row(escape(label), escape(e["kind"]), fmt_stat(f["virtual_time"], 1), fmt_stat(f["accuracy_mean"], 3),
                  fmt_stat(f["accuracy_min"], 3), eps, "–" if e["delta"] is None else f"{e['delta']:g}",
                  fmt_stat(f["bytes_total"], fmt=human_bytes), fmt_stat(f["consensus_max"], 3))
    return t


def answer_tables(cmp: Comparison) -> list[Table]:
    """What it takes to reach each target accuracy, and the accuracy at the common ε, per run."""
    view = cmp.answer
    reps = cmp.exp.repeats
    note = f" — mean [95% t-interval] over {reps} seeds" if reps > 1 else ""
    reach = _table(f"to reach a target accuracy (first evaluation at or above it){note}",
                   ["strategy", "kind", "target", "virtual time (s)", "bytes (all traffic)", "ε (max)"])
    for label, r in view["runs"].items():
        kind = escape(cmp.summary[label]["kind"])
        for row in r["to_target"]:
            eps = "no DP" if row["epsilon"] is None else fmt_stat(row["epsilon"], 3)
            reach.add_row(escape(label), kind, f"{row['target']:.2f}", fmt_stat(row["time"], 1),
                          fmt_stat(row["bytes"], fmt=human_bytes), eps)
    tables = [reach]
    common = view.get("common_epsilon")
    if common is not None:
        at = _table(f"accuracy at the common ε = {common:.3f} (the smallest final ε of all runs){note}",
                    ["strategy", "kind", "accuracy (mean over nodes)"])
        for label, r in view["runs"].items():
            s = r["at_common_epsilon"]
            at.add_row(escape(label), escape(cmp.summary[label]["kind"]),
                       "no DP" if s is None else (fmt_stat(s, 3) if s["mean"] is not None else NOT_REACHED))
        tables.append(at)
    return tables


def _log_to(run_dir: Path, verbose: bool) -> logging.Handler:
    """Every event goes to ``run.log`` in the run folder; the console shows warnings only
    (the progress bar and the summary table are the console's story) unless ``verbose``.
    Returns the file handler, which the caller removes when the run ends (so a second
    run in the same process does not write into the first run's log)."""
    root = logging.getLogger()
    for h in root.handlers:
        if not verbose:
            h.setLevel(logging.WARNING)
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.setLevel(logging.INFO)
    root.addHandler(fh)
    root.setLevel(logging.INFO)
    return fh


def _refuse(e: ConfigError) -> typer.Exit:
    """Print each refusal on its own ``error:`` line; the exit (code 2) to raise."""
    err = console_for(stderr=True)
    for line in str(e).splitlines():
        if line.strip():
            err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _run(config: Path, out: str | None, progress: bool, compare: bool, verbose: bool = False,
         repeats: int | None = None) -> None:
    console = console_for()
    try:
        exp = load_experiment(config)
        if compare and repeats is not None:
            exp.repeats = check_repeats(repeats, "--repeats")
            exp.repeats_from = "--repeats"
        if not compare:
            exp.runs, exp.repeats = exp.runs[:1], 1
        validate_experiment(exp)  # every run, before any run folder exists
    except ConfigError as e:
        raise _refuse(e) from None
    if compare and len(exp.runs) < 2:
        console.print("[yellow]note[/]: this config has no \\[compare] list of several strategies; running one")
    run_dir = run_dir_for(exp, out)
    fh = _log_to(run_dir, verbose)
    c = exp.common
    data = f"data {c.data.factory}" if c.data.factory else f"{c.data.source} ({c.data.partitioning})"
    client = f", client {c.client.app}" if c.client.app else ""
    seeds = f", {exp.repeats} seeds ({exp.seeds[0]}–{exp.seeds[-1]})" if exp.repeats > 1 else ""
    console.print(escape(f"{exp.name}: {c.data.num_sites} nodes, {data}, model {c.model.spec}{client}, "
                         f"{'DP ' + c.dp.clipping if c.dp.enabled else 'no DP'}, "
                         f"strategies {', '.join(exp.strategies)}{seeds} → {run_dir}"))
    try:
        cmp = run_comparison(exp, run_dir, progress=progress)
    except BaseException:
        kept = "finished runs are kept in " if compare and len(exp.runs) > 1 else "the run folder is "
        console.print(escape(f"stopped: {kept}{run_dir}; see error.txt there"))
        raise
    finally:
        logging.getLogger().removeHandler(fh)
        fh.close()
    console.print(escape(subtitle(exp, cmp.summary)))
    console.print(figures_table(cmp))
    for t in answer_tables(cmp):
        console.print(t)
    layout = "<label>/seed-<seed>/" if exp.repeats > 1 and len(exp.runs) > 1 else (
        "seed-<seed>/" if exp.repeats > 1 else ("<label>/" if len(exp.runs) > 1 else ""))
    console.print(escape(f"run folder: {run_dir} (comparison.json, answer.csv, answer.png, per_seed.csv, plots "
                         f"*.png, run.log; per run {layout or 'here'}: metrics.csv, summary.json, "
                         "final_model_<node>.pt + preprocessing_<node>.json)"))


def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="experiment TOML"),
    out: str = typer.Option(None, "--out", help="parent folder of the run folder (default: \\[simulation].output)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print every event (always in run.log)"),
) -> None:
    """Run one strategy (one seed), all nodes in one process on a virtual clock."""
    _run(config, out, progress, compare=False, verbose=verbose)


def compare(
    config: Path = typer.Option(..., "--config", "-c", help="compare TOML (an experiment with \\[compare])"),
    out: str = typer.Option(None, "--out", help="parent folder of the run folder (default: \\[simulation].output)"),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="show a progress bar per run (strategy, seed, ε, accuracy)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print every event (always in run.log)"),
    repeats: int = typer.Option(None, "--repeats", "-r",
                                help="seeds per run, overriding \\[compare].repeats: repeat r uses seed base + r "
                                     "(base: \\[simulation].seed, or \\[data].seed when that is 0) for the split, "
                                     "initial model, DP noise and sampling"),
) -> None:
    """Run several strategies on identical data, model, DP settings and machines, over one or more seeds;
    tables and plots with 95% intervals, and the time, bytes and ε each needs to reach an accuracy."""
    _run(config, out, progress, compare=True, verbose=verbose, repeats=repeats)
