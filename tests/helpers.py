"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import typer

from clients import DPClient, DPConfig
from privfl.models import build_model


def dp_clients(sites, target_eps=(50.0, 50.0, 50.0)) -> dict[str, DPClient]:
    """One logreg DPClient per site (σ = 1, batch 32), named h0, h1, …"""
    out = {}
    for i, (s, eps) in enumerate(zip(sites, target_eps)):
        cfg = DPConfig(noise_multiplier=1.0, batch_size=32, sample_rate=32 / len(s.train), lr=0.5, target_epsilon=eps)
        model = build_model("logreg", s.train.x.shape[1:], 2, seed=0)
        out[f"h{i}"] = DPClient(model, (s.train.x, s.train.y), (s.test.x, s.test.y), cfg, seed=i)
    return out


def patched_copy(src: Path, dest: Path, replacements: Iterable[tuple[str, str]]) -> Path:
    """Write ``src`` to ``dest`` with each (old, new) replaced; every ``old`` must occur (so edits can't go stale)."""
    text = src.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


def audit_cli() -> typer.Typer:
    """A typer app with ``privfl audit`` as its only group (what the console entry registers)."""
    from privfl.cli import audit

    main = typer.Typer()
    main.add_typer(audit.app, name="audit")

    @main.command()
    def version() -> None:  # a second command so that `main` stays a group
        typer.echo("0")

    return main
