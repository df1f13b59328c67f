"""One log line per event: importing Opacus adds a root handler (its import-time
``logging.basicConfig``) and Flower's logger propagates to the root, so without care every
Flower line is printed twice. privfl's entry points (the CLI's ``main``, ``privfl.node``'s
``main``) and ``privfl.logs.drop_opacus_root_handler`` (a Flower App) print it once.
Each check runs in a fresh interpreter: Opacus configures logging only on its first import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
OPACUS_DATE = r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:"  # the start of a line in Opacus's root format


def run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("FLWR_LOG_LEVEL", None)
    env.pop("PRIVFL_LOG", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    return proc


def lines_with(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line]


def test_opacus_import_adds_the_root_handler_that_is_dropped() -> None:
    # the cause, on the installed Opacus: if this fails, Opacus changed its import-time logging
    proc = run("""
        import logging
        import opacus
        from privfl.logs import _is_opacus_handler, drop_opacus_root_handler
        print([_is_opacus_handler(h) for h in logging.getLogger().handlers])
        print(len(drop_opacus_root_handler()), len(logging.getLogger().handlers))
    """)
    assert proc.stdout.split("\n")[:2] == ["[True]", "1 0"]


def test_cli_main_prints_a_flower_line_once() -> None:
    proc = run("""
        import logging, sys
        import privfl.cli as cli

        @cli.app.command("probe")
        def probe() -> None:
            import privfl.cli.sim, privfl.clients, opacus  # torch, Opacus, Flower: what simulate loads
            from flwr.common.logger import log
            log(logging.WARNING, "flower-probe-line")
            log(logging.DEBUG, "flower-debug-line")
            logging.getLogger("privfl.probe").warning("privfl-probe-line")
            print("ROOT_HANDLERS", len(logging.getLogger().handlers), file=sys.stderr)

        sys.argv = ["privfl", "probe"]
        cli.main()
    """)
    err = proc.stderr
    assert len(lines_with(err, "flower-probe-line")) == 1, err
    assert len(lines_with(err, "privfl-probe-line")) == 1, err
    assert lines_with(err, "flower-probe-line")[0].split(" ", 2)[2] == "WARNING flwr: flower-probe-line"
    assert not lines_with(err, "flower-debug-line"), err  # Flower's own console level still applies
    assert "ROOT_HANDLERS 1" in err


def test_node_main_prints_a_flower_line_once() -> None:
    proc = run("""
        import logging
        import privfl.node as node

        def fake_run_node(path):
            import opacus  # already loaded with the node's clients
            from flwr.common.logger import log
            log(logging.WARNING, "flower-node-line")
            return {"node": "h0", "stop_reason": "", "steps": 0, "epsilon": 0.0, "accuracy": 0.0}

        node.run_node = fake_run_node
        raise SystemExit(node.main(["--config", "unused.toml"]))
    """)
    assert len(lines_with(proc.stderr, "flower-node-line")) == 1, proc.stderr


def test_flower_app_path_drops_only_opacus_handler() -> None:
    # a Flower App: Flower's runtime logs through its own handler; privfl.clients loads Opacus
    proc = run("""
        import logging
        from privfl.clients import DPClient  # what examples/flower-app's client_app imports
        from privfl.logs import drop_opacus_root_handler
        from flwr.common.logger import log
        log(logging.WARNING, "before-drop-line")
        drop_opacus_root_handler()
        log(logging.WARNING, "flower-app-line")
        print("ROOT_HANDLERS", len(logging.getLogger().handlers))
    """)
    assert len(lines_with(proc.stderr, "before-drop-line")) == 2, proc.stderr  # the bug, as Opacus leaves it
    assert len(lines_with(proc.stderr, "flower-app-line")) == 1, proc.stderr
    assert "ROOT_HANDLERS 0" in proc.stdout


def test_user_logging_configured_first_is_left_alone() -> None:
    proc = run("""
        import logging, sys
        logging.basicConfig(format="USER %(name)s %(message)s", stream=sys.stdout)
        user = logging.getLogger().handlers[0]
        import privfl.clients, opacus
        from privfl.logs import drop_opacus_root_handler
        assert drop_opacus_root_handler() == []
        assert logging.getLogger().handlers == [user]
        logging.getLogger("privfl.probe").warning("user-line")
    """)
    assert proc.stdout.splitlines() == ["USER privfl.probe user-line"]
    import re

    assert not re.search(OPACUS_DATE, proc.stderr), proc.stderr
