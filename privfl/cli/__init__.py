"""The ``privfl`` command line: one typer app with a sub-app per area."""

from __future__ import annotations

import os
import sys

import typer

from privfl.errors import PrivflError

app = typer.Typer(
    name="privfl",
    help="Privacy-preserving learning across hospitals: DP gossip, Flower baseline, privacy ledgers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from privfl.cli import audit, demo, node, pki, privacy, sim

    app.add_typer(privacy.app, name="privacy", help="Compute ε or calibrate σ for DP-SGD.")
    app.add_typer(pki.app, name="pki", help="Consortium CA, node certificates, roster, revocation.")
    app.add_typer(audit.app, name="audit", help=audit.HELP)
    app.command("demo", help="Run the demo: DP training on the breast-cancer data.")(demo.demo)
    app.command("node", help="Run one hospital's node: local DP training and gossip over mTLS.")(node.node)
    app.command("launch", help="Start N real nodes on this machine (loopback, mTLS) and collect results.")(node.launch)
    app.command("simulate", help="Simulate one strategy on a virtual clock.")(sim.simulate)
    app.command("compare", help="Compare strategies on identical data, model and DP settings, over --repeats seeds "
                "(mean and 95% interval), with the answer view: time, bytes and ε to reach each accuracy."
                )(sim.compare)


def main() -> None:
    """Console entry point: bad input gives one clean line and exit code 2, not a traceback.
    Every log record is printed once: privfl's root handler, no Opacus root handler, Flower's
    records through the root (:func:`privfl.logs.configure_logging`)."""
    from privfl.logs import configure_logging

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    configure_logging(os.environ.get("PRIVFL_LOG", "INFO"))
    _register()
    try:
        app(standalone_mode=True)
    except PrivflError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
