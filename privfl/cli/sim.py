"""``privfl simulate`` and ``privfl compare``: runs on a virtual clock, plots, a summary table."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from privfl.experiment import load_experiment, run_dir_for, run_experiment, summarize


def _table(title: str, results: dict) -> Table:
    t = Table(title=title)
    for c in ("strategy", "virtual time (s)", "accuracy (mean)", "accuracy (min)", "ε (max)", "bytes sent",
              "consensus dist."):
        t.add_column(c, justify="right")
    for name, res in results.items():
        s = summarize(res)
        t.add_row(name, f"{s['virtual_time']:.1f}", f"{s['accuracy_mean']:.3f}", f"{s['accuracy_min']:.3f}",
                  "no DP" if s["epsilon_max"] is None else f"{s['epsilon_max']:.3f}", f"{s['bytes_sent']:,}",
                  f"{s['consensus_max']:.2e}")
    return t


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


def _run(config: Path, out: str | None, progress: bool, compare: bool, verbose: bool = False) -> None:
    console = Console()
    exp = load_experiment(config)
    if compare and len(exp.runs) < 2:
        console.print("[yellow]note[/]: this config has no [compare] list of several strategies; running one")
    if not compare:
        exp.runs = exp.runs[:1]
    run_dir = run_dir_for(exp, out)
    fh = _log_to(run_dir, verbose)
    c = exp.common
    data = f"data {c.data.factory}" if c.data.factory else f"{c.data.source} ({c.data.partitioning})"
    client = f", client {c.client.app}" if c.client.app else ""
    console.print(f"[bold]{exp.name}[/]: {c.data.num_sites} nodes, {data}, model {c.model.spec}{client}, "
                  f"{'DP ' + c.dp.clipping if c.dp.enabled else 'no DP'}, "
                  f"strategies {', '.join(exp.strategies)} → {run_dir}")
    try:
        results = run_experiment(exp, run_dir, progress=progress)
    finally:
        logging.getLogger().removeHandler(fh)
        fh.close()
    console.print(_table(exp.name, results))
    console.print(f"run folder: {run_dir} (metrics.csv, summary.json, comparison.json, run.log, plots *.png, "
                  "final_model_<node>.pt + preprocessing_<node>.json)")


def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="experiment TOML"),
    out: str = typer.Option(None, "--out", help="parent folder of the run folder (default: [simulation].output)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print every event (always in run.log)"),
) -> None:
    """Run one strategy, all nodes in one process on a virtual clock."""
    _run(config, out, progress, compare=False, verbose=verbose)


def compare(
    config: Path = typer.Option(..., "--config", "-c", help="compare TOML (an experiment with [compare])"),
    out: str = typer.Option(None, "--out", help="parent folder of the run folder (default: [simulation].output)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print every event (always in run.log)"),
) -> None:
    """Run several strategies on identical data, model, DP settings and machines; plot them together."""
    _run(config, out, progress, compare=True, verbose=verbose)
