"""``privfl demo``: one hospital trains with DP-PSAC on the breast-cancer data."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import Progress

from privfl.accounting import BudgetExhausted
from privfl.clients import DPClient, DPConfig
from privfl.data import load_builtin, split_sites
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site


def demo(
    epochs: int = typer.Option(20, help="local epochs"),
    target_epsilon: float = typer.Option(3.0, help="privacy budget ε"),
    delta: float = typer.Option(1e-5, help="δ"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """DP training (DP-PSAC, calibrated σ) on one site; prints accuracy and ε after each epoch."""
    console = Console()
    raw = split_sites(load_builtin("breast_cancer"), 1, "iid", seed=seed)[0]
    site, _ = preprocess_site(PreprocessingSpec(), raw, dataset_name="breast_cancer")  # published feature ranges
    batch = 64
    steps_per_epoch = max(1, round(len(site.train) / batch))
    cfg = DPConfig(clipping="psac", max_grad_norm=1.0, psac_r=0.1, target_epsilon=target_epsilon,
                   delta=delta, planned_steps=epochs * steps_per_epoch, batch_size=batch, lr=1.0)
    model = build_model("mlp", site.train.x.shape[1:], site.train.num_classes, seed=seed)
    client = DPClient(model, (site.train.x, site.train.y), (site.test.x, site.test.y), cfg, seed=seed)
    console.print(f"[bold]privfl demo[/]: breast_cancer, {len(site.train)} train / {len(site.test)} test rows, "
                  f"MLP, DP-PSAC (C=1, r=0.1), σ={client.noise_multiplier:.3f} calibrated for "
                  f"ε={target_epsilon:g}, δ={delta:g} over {cfg.planned_steps} steps")
    params = client.get_parameters({})
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("training", total=epochs)
        for ep in range(1, epochs + 1):
            try:
                params, _, m = client.fit(params, {"local_steps": steps_per_epoch})
            except BudgetExhausted as e:
                console.print(f"[yellow]{e}[/]")
                break
            loss, _, ev = client.evaluate(params, {})
            console.print(f"epoch {ep:3d}  train loss {m['loss']:.4f}  test accuracy {ev['accuracy']:.3f}  "
                          f"ε {m['epsilon']:.3f}")
            bar.advance(task)
    _, _, ev = client.evaluate(params, {})
    console.print(f"[bold green]final[/]: test accuracy {ev['accuracy']:.3f}, "
                  f"ε = {client.epsilon:.3f} (RDP) / {client.accountant.get_epsilon(delta, 'pld'):.3f} (PLD) "
                  f"at δ = {delta:g}, {client.accountant.steps} steps")
