"""``privfl privacy``: what an auditor types first — ε of a DP-SGD run, or σ for a target ε."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from privfl.accounting import PrivacyAccountant, calibrate_noise

app = typer.Typer(no_args_is_help=True)


def _check(sample_rate: float, steps: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise typer.BadParameter(f"--sample-rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise typer.BadParameter(f"--steps must be >= 1, got {steps}")
    if not 0 < delta < 1:
        raise typer.BadParameter(f"--delta must be in (0, 1), got {delta}")


@app.command()
def epsilon(
    noise_multiplier: float = typer.Option(..., help="σ: noise std / clipping norm"),
    sample_rate: float = typer.Option(..., help="Poisson sampling rate q"),
    steps: int = typer.Option(..., help="number of DP-SGD steps"),
    delta: float = typer.Option(1e-5, help="δ"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """ε of `steps` Poisson-sampled Gaussian steps (add/remove-one), by RDP and PLD."""
    _check(sample_rate, steps, delta)
    if not noise_multiplier > 0:
        raise typer.BadParameter(f"--noise-multiplier must be > 0, got {noise_multiplier}")
    acc = PrivacyAccountant()
    acc.step(noise_multiplier, sample_rate, steps)
    res = {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
           "delta": delta, "neighboring_relation": "add_or_remove_one",
           "epsilon_rdp": acc.get_epsilon(delta, "rdp"), "epsilon_pld": acc.get_epsilon(delta, "pld")}
    if as_json:
        typer.echo(json.dumps(res))
        return
    t = Table(title=f"ε at δ={delta:g} (add/remove one record)")
    for c in ("σ", "q", "steps", "ε (RDP)", "ε (PLD)"):
        t.add_column(c, justify="right")
    t.add_row(f"{noise_multiplier:g}", f"{sample_rate:g}", str(steps),
              f"{res['epsilon_rdp']:.4f}", f"{res['epsilon_pld']:.4f}")
    Console().print(t)


@app.command()
def calibrate(
    target_epsilon: float = typer.Option(..., help="target ε"),
    sample_rate: float = typer.Option(..., help="Poisson sampling rate q"),
    steps: int = typer.Option(..., help="planned number of DP-SGD steps"),
    delta: float = typer.Option(1e-5, help="δ"),
    method: str = typer.Option("rdp", help="accountant: rdp or pld"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Smallest σ whose `steps` steps stay within the target ε."""
    _check(sample_rate, steps, delta)
    if method not in ("rdp", "pld"):
        raise typer.BadParameter(f"--method must be rdp or pld, got {method!r}")
    if not target_epsilon > 0:
        raise typer.BadParameter(f"--target-epsilon must be > 0, got {target_epsilon}")
    sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps, method)  # type: ignore[arg-type]
    acc = PrivacyAccountant(method)  # type: ignore[arg-type]
    acc.step(sigma, sample_rate, steps)
    if as_json:
        typer.echo(json.dumps({"noise_multiplier": sigma, "epsilon": acc.get_epsilon(delta),
                               "method": method, "delta": delta}))
        return
    typer.echo(f"σ = {sigma:.4f}  (ε = {acc.get_epsilon(delta):.4f} ≤ {target_epsilon:g} at δ = {delta:g}, "
               f"{method.upper()}, q = {sample_rate:g}, {steps} steps)")
