"""`privfl node` and `privfl launch`: run one real node, or a whole consortium on loopback.

Registered by ``privfl/cli/__init__.py`` as ``app.command("node")(node.node)`` and
``app.command("launch")(node.launch)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def node(config: Path = typer.Option(..., "--config", "-c", help="The node's TOML config (node.toml).")) -> None:
    """Run one node: DP training, mTLS gossip with its neighbours, signed privacy ledger."""
    from privfl.node import run_node

    summary = run_node(config)
    typer.echo(json.dumps({k: summary[k] for k in ("node", "stop_reason", "steps", "epsilon", "accuracy")}))


def launch(
    config: Path = typer.Option(
        ..., "--config", "-c", help="The consortium TOML (e.g. examples/hospitals-gossip/consortium.toml)."),
    runs_dir: Path = typer.Option(
        None, "--runs-dir", help="Where the run folder goes (default: [consortium].runs_dir)."),
    quiet: bool = typer.Option(False, "--quiet", help="No live progress table (the result table is still printed)."),
) -> None:
    """Start one real `privfl node` process per hospital on 127.0.0.1 and collect the results."""
    from privfl.launch import launch_consortium

    result = launch_consortium(config, runs_dir=runs_dir, progress=not quiet)
    typer.echo(f"run folder: {result['run_dir']}")
    if not result["ok"]:
        raise typer.Exit(1)
