"""``privfl audit``: verify a node's privacy ledger, or bound ε empirically from canaries.

    privfl audit LEDGER --ca CA.pem [--node-id ID] [--roster roster.toml] [--crl crl.pem] [--json]
                 [--plot eps.png] [--allow-seeded]                              (= `audit ledger ...`)
    privfl audit --consortium RUN_DIR --ca CA.pem [--roster roster.toml] [--crl crl.pem] [--json]
                                                                            (= `audit consortium ...`)
    privfl audit empirical --scores canaries.csv --k-pos 50 --k-neg 50 --delta 1e-5
    privfl audit empirical --m 1000 --r 100 --v 75 --delta 1e-5
    privfl audit empirical --config examples/audit/audit.toml [--json] [--seed 3]

A single ledger cannot prove it is complete (whoever holds the node key can cut or re-sign
it); ``--consortium`` audits every ledger of a ``privfl launch`` run folder
(``<run>/<node>/ledger.jsonl``) and checks them against the heads the nodes hold for each
other, naming the node and entry of every truncation, rollback or rewrite.

Register with ``app.add_typer(audit.app, name="audit")``. Exit codes: 0 when every check
passes, 1 when verification fails, 2 for bad input (one clean line, no traceback).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from privfl.accounting.audit import AuditReport, ConsortiumPolicy, audit_ledger
from privfl.accounting.audit_consortium import ConsortiumReport, audit_consortium
from privfl.accounting.audit_empirical import (
    DEFAULT_BETA,
    OneRunAudit,
    audit_one_run,
    epsilon_lower_bound_from_counts,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
MAX_EVENT_ROWS = 40


class _LedgerByDefault(TyperGroup):
    """A group whose default sub-command is ``ledger``: ``audit FILE`` = ``audit ledger FILE``,
    and ``audit --consortium RUN ...`` = ``audit consortium --consortium RUN ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            consortium = any(a == "--consortium" or a.startswith("--consortium=") for a in args)
            args = ["consortium" if consortium else "ledger", *args]
        return super().parse_args(ctx, args)


HELP = (
    "Verify privacy ledgers and recompute ε, or bound ε empirically.\n\n"
    "privfl audit LEDGER --ca CA.pem [--roster roster.toml] [--crl crl.pem] is short for "
    "`privfl audit ledger ...`; privfl audit --consortium RUN_DIR --ca CA.pem for "
    "`privfl audit consortium ...`. Exit 0: every check passed, 1: a check failed, 2: bad input."
)

app = typer.Typer(cls=_LedgerByDefault, no_args_is_help=True, help=HELP)


def _fail_input(message: str) -> typer.Exit:
    """Print one clean line for bad input and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------- ledger


@app.command("ledger")
def ledger_cmd(
    ledger: Path = typer.Argument(..., help="the node's ledger.jsonl"),
    ca: Path = typer.Option(..., "--ca", help="consortium CA certificate (PEM)"),
    other_cert: list[Path] = typer.Option(
        [], "--other-cert", help="another node's certificate, to name entries it signed (repeatable)"
    ),
    node_id: str | None = typer.Option(None, "--node-id", help="fail unless the ledger is this node's"),
    roster: Path | None = typer.Option(
        None, "--roster", help="roster.toml: fail unless the certificate is its node's pinned one "
        "and the ledger keeps within the roster's [policy] (max ε, δ, min σ)"),
    crl: Path | None = typer.Option(
        None, "--crl", help="the consortium CRL (PEM): fail if it revoked the certificate before an entry"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Path | None = typer.Option(None, "--plot", help="write ε over time to this PNG"),
    all_events: bool = typer.Option(False, "--all-events", help="list every DP event"),
    no_pld: bool = typer.Option(False, "--no-pld", help="skip the PLD cross-check (faster)"),
    workers: int = typer.Option(1, "--workers", min=1, help="processes checking signatures of large ledgers"),
    allow_seeded: bool = typer.Option(
        False, "--allow-seeded",
        help="pass a ledger whose noise was seeded (or whose randomness is unrecorded): "
        "for simulations and tests only"),
) -> None:
    """Verify LEDGER (certificate, signatures, hash chain, randomness, policy, budget) and recompute ε."""
    given = [(ledger, "ledger"), (ca, "CA certificate"), *[(c, "certificate") for c in other_cert]]
    for p, what in given + ([(crl, "CRL")] if crl is not None else []):
        if not p.is_file():
            raise _fail_input(f"{what} file {p} is a directory, not a file" if p.is_dir()
                              else f"{what} file {p} does not exist")
    pins, floor = _roster(roster) if roster is not None else (None, None)
    try:
        report = audit_ledger(
            ledger,
            ca.read_bytes(),
            other_certs=[c.read_bytes() for c in other_cert],
            expected_node_id=node_id,
            compute_pld=not no_pld,
            workers=workers,
            allow_seeded=allow_seeded,
            roster=pins,
            roster_policy=floor,
            crl_pem=crl.read_bytes() if crl is not None else None,
        )
    except (ValueError, OSError) as exc:
        raise _fail_input(str(exc)) from None
    if plot is not None:
        if report.policy is None:
            raise _fail_input(f"cannot plot {ledger}: no verified header, so no ε to plot "
                              f"({report.reason})")
        try:
            plot_epsilon(report, plot)
        except OSError as exc:
            raise _fail_input(f"cannot write plot {plot}: {exc}") from None
    if as_json:
        typer.echo(report.to_json())
    else:
        print_report(report, Console(), all_events=all_events)
        _note_no_policy(floor)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)


def _note_no_policy(floor: ConsortiumPolicy | None) -> None:
    """Say so when the roster given sets no consortium minimum (then only each header binds)."""
    if floor is not None and all(v is None for v in (floor.max_epsilon, floor.min_noise_multiplier, floor.delta)):
        typer.echo("note: the roster has no [policy]: each ledger is held only to its own header's target "
                   "(`privfl pki init --max-epsilon ... --min-noise-multiplier ... --delta ...` sets one)")


def _roster(roster: Path) -> tuple[dict[str, str], ConsortiumPolicy]:
    """(node id → pinned fingerprint, the ``[policy]``) of a roster.toml (bad input exits 2)."""
    from privfl.errors import PrivflError
    from privfl.pki import load_roster

    try:
        r = load_roster(roster)
    except PrivflError as exc:
        raise _fail_input(str(exc)) from None
    return r.pins, r.policy


# --------------------------------------------------------------------------- consortium


@app.command("consortium")
def consortium_cmd(
    run_dir: Path | None = typer.Argument(None, help="a `privfl launch` run folder (<run>/<node>/ledger.jsonl)"),
    consortium: Path | None = typer.Option(None, "--consortium", help="the run folder (same as RUN_DIR)"),
    ledgers: list[Path] = typer.Option(
        [], "--ledger", help="audit these ledgers (repeatable) instead of a run folder"),
    ca: Path = typer.Option(..., "--ca", help="consortium CA certificate (PEM)"),
    roster: Path | None = typer.Option(
        None, "--roster", help="roster.toml whose pins every certificate must be "
        "(default: <run>/pki/roster.toml when there is one)"),
    crl: Path | None = typer.Option(
        None, "--crl", help="the consortium CRL (PEM): fail a ledger written on after its certificate's "
        "revocation (default: <run>/pki/crl.pem when there is one)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    no_pld: bool = typer.Option(False, "--no-pld", help="skip the PLD cross-check (faster)"),
    allow_seeded: bool = typer.Option(
        False, "--allow-seeded", help="pass seeded ledgers: for simulations and tests only"),
) -> None:
    """Audit every ledger of a run and cross-check them against the heads their peers hold."""
    folders = [p for p in (run_dir, consortium) if p is not None]
    if len(folders) == 2 and folders[0] != folders[1]:
        raise _fail_input(f"two run folders given ({folders[0]} and {folders[1]}): give one")
    if bool(folders) == bool(ledgers):
        raise _fail_input("give a run folder (--consortium RUN_DIR) or --ledger files, not both or neither")
    if not ca.is_file():
        raise _fail_input(f"CA certificate file {ca} is a directory, not a file" if ca.is_dir()
                          else f"CA certificate file {ca} does not exist")
    if roster is None and folders and (folders[0] / "pki" / "roster.toml").is_file():
        roster = folders[0] / "pki" / "roster.toml"
    if roster is not None and not roster.is_file():
        raise _fail_input(f"roster file {roster} does not exist")
    if crl is None and folders and (folders[0] / "pki" / "crl.pem").is_file():
        crl = folders[0] / "pki" / "crl.pem"
    if crl is not None and not crl.is_file():
        raise _fail_input(f"CRL file {crl} does not exist")
    pins, floor = _roster(roster) if roster is not None else (None, None)
    try:
        report = audit_consortium(
            folders[0] if folders else list(ledgers), ca.read_bytes(),
            allow_seeded=allow_seeded, roster=pins, roster_policy=floor, compute_pld=not no_pld,
            crl_pem=crl.read_bytes() if crl is not None else None,
        )
    except (ValueError, OSError) as exc:
        raise _fail_input(str(exc)) from None
    if as_json:
        typer.echo(report.to_json())
    else:
        print_consortium(report, Console(), roster, crl)
        _note_no_policy(floor)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)


def print_consortium(report: ConsortiumReport, console: Console, roster: Path | None = None,
                     crl: Path | None = None) -> None:
    """A table per node (audit, entries, anchored prefix, ε) and one line per problem."""
    verdict = "[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    console.print(f"consortium {report.source}: {verdict}  ({len(report.nodes)} ledgers, "
                  f"{len(report.problems)} problems)", highlight=False, soft_wrap=True)
    if roster is not None:
        console.print(f"roster: {roster}", markup=False, highlight=False, soft_wrap=True)
    if crl is not None:
        console.print(f"CRL: {crl}", markup=False, highlight=False, soft_wrap=True)
    table = Table(title="ledgers, cross-checked against the heads their peers hold",
                  caption="ε: over the entries that verify; tail: entries after the last head a peer holds; "
                          "receipts: neighbours' signed receipts for its goodbye heads (+ ones that do not verify)")
    for col in ("node", "ok", "entries", "verified", "anchored\nup to", "tail", "receipts", "ε", "target\nε"):
        table.add_column(col, justify="left" if col == "node" else "right", no_wrap=True)
    for name, s in report.nodes.items():
        ok = "[green]yes[/]" if s.ok else "[red]no[/]"
        upto = "—" if s.anchored_upto is None else str(s.anchored_upto)
        tail = str(s.unanchored_tail) if s.unanchored_tail == 0 else f"[yellow]{s.unanchored_tail}[/]"
        target = "—" if s.target_epsilon is None else f"{s.target_epsilon:g}"
        verified = s.audit.entries_verified if s.audit is not None else 0
        shown = str(verified) if verified == s.entries else f"[red]{verified}[/]"
        bad = s.receipts.get("unverified", 0)
        receipts = str(s.receipts.get("verified", 0)) + (f" [yellow]+{bad}[/]" if bad else "")
        table.add_row(name, ok, str(s.entries), shown, upto, tail, receipts, _fmt_eps(s.epsilon), target)
    console.print(table)
    for p in report.problems:
        held = f" (held by {p.holder})" if p.holder else ""
        where = "—" if p.index is None else str(p.index)
        typer.echo(f"problem: node {p.node} entry {where} {p.kind}{held}: {p.message}")
    for name, s in report.nodes.items():
        if s.audit is not None and s.audit.first_bad_index is not None:
            typer.echo(f"note: node {name}: its ledger breaks at entry {s.audit.first_bad_index}; "
                       f"its ε covers entries 0..{s.audit.entries_verified - 1} only, and heads "
                       "matching later entries vouch for bytes that do not verify")
        if s.unanchored_tail and s.entries:
            typer.echo(f"note: node {name}: its last {s.unanchored_tail} entries "
                       f"({s.entries - s.unanchored_tail}..{s.entries - 1}) are held by no peer")
    for note in report.notes:
        typer.echo(f"note: {note}")


def _fmt_eps(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "inf" if math.isinf(x) else f"{x:.4f}"


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_report(report: AuditReport, console: Console, all_events: bool = False) -> None:
    """A readable report: summary, checks, issues, DP events with ε over time, totals."""
    verdict = "[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    console.print(f"ledger {report.path}: {verdict}", highlight=False, soft_wrap=True)
    if report.reason:
        console.print(f"FAIL: {report.reason}", markup=False, highlight=False, soft_wrap=True)
    if report.first_bad_index is not None:
        console.print(f"[yellow]ε and totals below cover {report.scope}[/]", highlight=False,
                      soft_wrap=True)
    if report.certificate_node_id or report.node_id:
        console.print(f"node id (from its certificate): [bold]{report.certificate_node_id or '?'}[/]",
                      highlight=False)
    if report.node_id:
        console.print(
            f"node [bold]{report.node_id}[/]  software {report.software_version}  "
            f"certificate {report.certificate.get('subject', '?')} "
            f"(sha256 {report.certificate.get('sha256_fingerprint', '?')[:16]}…)"
        )
    if report.policy:
        pol = report.policy
        console.print(
            f"policy: ε ≤ {pol['target_epsilon']:g} at δ = {pol['delta']:g} "
            f"({pol['accountant'].upper()}, {pol['neighbouring_relation']}), "
            f"σ ≥ {pol['min_noise_multiplier']:g}, clipping {', '.join(pol['allowed_clipping_rules'])}"
        )
    if report.randomness is not None:
        color = "green" if report.randomness == "secure" else ("yellow" if report.randomness_allowed else "red")
        console.print(f"randomness: [{color}]{report.randomness_label}[/]  (ledger format {report.format})")
        prep = "unrecorded" if report.preprocessing is None else json.dumps(report.preprocessing, sort_keys=True)
        console.print(f"preprocessing: {prep}", markup=False, highlight=False, soft_wrap=True)

    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    for name, res in report.checks.items():
        color = "green" if res == "pass" else ("yellow" if res == "skipped" else "red")
        checks.add_row(name, f"[{color}]{res}[/]")
    console.print(checks)

    if report.issues:
        issues = Table(title="issues (first bad entry first)")
        issues.add_column("entry", justify="right")
        issues.add_column("kind")
        issues.add_column("what")
        first = report.first_issue
        ordered = [first] + [i for i in report.issues if i is not first] if first else []
        for i in ordered:
            issues.add_row("—" if i.index is None else str(i.index), i.kind, i.message)
        console.print(issues)

    if report.timeline:
        over = set(report.over_budget)
        pld = report.accountant == "pld"
        title = "DP events and ε over time (recomputed with dp-accounting, RDP)"
        if pld:
            title += ("; this ledger is accounted by PLD: RDP is an upper bound, 'ε recorded' is "
                      "the node's PLD, and the budget is judged by PLD, recomputed at the end")
        events = Table(title=title)
        cols = ["entry", "time (UTC)", "purpose", "steps", "ε (RDP)", "ε recorded"]
        if pld:
            cols.append("ε (PLD)")
        for col in cols:
            events.add_column(col, justify="right")
        pts = report.timeline
        shown = pts if all_events or len(pts) <= MAX_EVENT_ROWS else None
        if shown is None:
            half = MAX_EVENT_ROWS // 2
            rows: list[Any] = [*pts[:half], None, *pts[-half:]]
        else:
            rows = list(shown)
        for p in rows:
            if p is None:
                events.add_row("…", f"{len(pts) - MAX_EVENT_ROWS} more", *[""] * (len(cols) - 2))
                continue
            style = "red" if p.index in over else None
            cells = [str(p.index), _fmt_time(p.timestamp), p.purpose, str(p.steps),
                     _fmt_eps(p.epsilon_rdp), _fmt_eps(p.epsilon_claimed)]
            if pld:
                cells.append(_fmt_eps(p.epsilon_pld) if p.epsilon_pld is not None else "")
            events.add_row(*cells, style=style)
        console.print(events)

    t = report.totals
    if t:
        tot = Table(title="totals" if report.first_bad_index is None else f"totals over {report.scope}")
        tot.add_column("")
        tot.add_column("", justify="right")
        tot.add_row("entries verified", str(report.entries_verified))
        tot.add_row("DP events / steps (all purposes)", f"{t.get('dp_events', 0)} / {t.get('steps', 0)}")
        for purpose, n in report.by_purpose.items():
            tot.add_row(f"  {purpose} events / steps", f"{n.get('events', 0)} / {n.get('steps', 0)}")
        tot.add_row("messages / model bytes sent (payloads, without gRPC framing or replies)",
                    f"{t.get('messages', 0)} / {t.get('bytes_sent', 0)}")
        tot.add_row("peers", ", ".join(f"{k}: {v}" for k, v in sorted(t.get("peers", {}).items())) or "—")
        tot.add_row(f"ε (RDP) at δ={report.delta:g}", _fmt_eps(report.epsilon_rdp))
        tot.add_row(f"ε (PLD) at δ={report.delta:g}",
                    "not computed (--no-pld)" if report.epsilon_pld is None else _fmt_eps(report.epsilon_pld))
        tot.add_row(f"target ε (budget judged by {(report.accountant or 'rdp').upper()})",
                    f"{report.target_epsilon:g}")
        tot.add_row("events over budget", str(len(report.over_budget)))
        console.print(tot)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def plot_epsilon(report: AuditReport, out: Path) -> None:
    """Write ε against time since the header, with the target and the verdict, as PNG.

    The recomputed RDP curve always; for a PLD ledger also the node's recorded (PLD) ε and
    the recomputed PLD ε at the end, by which its budget is judged. Needs a verified header.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.delta is None:
        raise ValueError("the report has no verified header: nothing to plot")
    t0 = report.totals.get("first_timestamp", 0.0)
    xs = [p.timestamp - t0 for p in report.timeline]
    ys = [p.epsilon_rdp for p in report.timeline]
    pld = report.accountant == "pld"
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.step([0.0, *xs], [0.0, *ys], where="post",
                label="ε (RDP, recomputed)" + ("; an upper bound" if pld else ""))
        if pld:
            rec = [(x, p.epsilon_claimed) for x, p in zip(xs, report.timeline) if p.epsilon_claimed is not None]
            if rec:
                ax.plot(*zip(*rec), ".", color="tab:green", label="ε recorded by the node (PLD)")
            if report.epsilon_pld is not None and xs:
                ax.plot([xs[-1]], [report.epsilon_pld], "*", color="black", markersize=11,
                        label="ε (PLD, recomputed)")
        if report.target_epsilon is not None:
            ax.axhline(report.target_epsilon, color="red", linestyle="--", label="target ε")
        ax.set_xlabel("seconds since ledger start")
        ax.set_ylabel(f"ε at δ = {report.delta:g}")
        verdict = "PASS" if report.ok else "FAIL"
        title = f"privacy spent by {report.node_id}: {verdict}"
        if report.first_bad_index is not None:
            title += f" (verified entries 0..{report.entries_verified - 1} only)"
        ax.set_title(title, color="black" if report.ok else "red", fontsize=10)
        ax.legend()
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- empirical


def load_canary_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, inclusion signs) from .json ({"scores", "inclusion"}), .npz or .csv (score,included).

    ``inclusion`` may be ±1, 0/1 or booleans (1/true = trained on).
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            d = json.loads(path.read_text())
            scores, incl = d["scores"], d["inclusion"]
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as d:
                scores, incl = d["scores"], d["inclusion"]
        elif suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            scores = [float(r["score"]) for r in rows]
            incl = [r["included"].strip().lower() for r in rows]
            incl = [1 if x in ("1", "+1", "true", "yes") else -1 for x in incl]
        else:
            raise ValueError(f"unsupported scores file type {suffix!r}: use .json, .npz or .csv")
    except KeyError as exc:
        raise ValueError(f"scores file {path} lacks field {exc}") from None
    s = np.asarray(scores, dtype=np.float64).ravel()
    a = np.asarray(incl).ravel()
    if a.dtype == bool:
        signs = np.where(a, 1, -1)
    else:
        a = a.astype(np.int64)
        if not np.all(np.isin(a, (-1, 0, 1))):
            raise ValueError(f"scores file {path}: inclusion must be ±1, 0/1 or booleans")
        signs = np.where(a > 0, 1, -1)
    if s.shape != signs.shape:
        raise ValueError(f"scores file {path}: {s.size} scores but {signs.size} inclusion flags")
    return s, signs.astype(np.int8)


@app.command("empirical")
def empirical_cmd(
    config: Path | None = typer.Option(
        None, "--config",
        help="audit TOML (\\[data], \\[model], \\[dp], \\[audit]): insert canaries, train once, bound ε"),
    seed: int | None = typer.Option(None, "--seed", help="with --config: override \\[audit].seed"),
    save_scores: Path | None = typer.Option(
        None, "--save-scores", help="with --config: write the canary scores and inclusion (.json), "
        "re-auditable with --scores"),
    scores: Path | None = typer.Option(None, "--scores", help="canary scores + inclusion (.json/.npz/.csv)"),
    k_pos: int | None = typer.Option(None, "--k-pos", help="guess 'included' for the k₊ top scores"),
    k_neg: int | None = typer.Option(None, "--k-neg", help="guess 'excluded' for the k₋ lowest scores"),
    m: int | None = typer.Option(None, "--m", help="number of canaries (counts mode)"),
    r: int | None = typer.Option(None, "--r", help="number of guesses (counts mode)"),
    v: int | None = typer.Option(None, "--v", help="number of correct guesses (counts mode)"),
    delta: float | None = typer.Option(None, "--delta", help="δ of the guarantee being audited (default 1e-5; "
                                       "with --config it is \\[dp].delta)"),
    beta: float | None = typer.Option(None, "--beta", help=f"1 − confidence (default {DEFAULT_BETA}; "
                                      "with --config it is \\[audit].beta)"),
    epsilon_upper: float | None = typer.Option(None, "--epsilon-upper", help="the accountant's ε, to compare"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """One-run empirical lower bound on ε (Steinke, Nasr & Jagielski 2023) at confidence 1 − β.

    With --config: run the canary audit of one node (its data, model and DP settings) and
    report ε_lb beside the accountant's ε; exit 1 if ε_lb exceeds it (a bug signal).
    """
    if config is not None:
        _empirical_from_config(config, seed, save_scores, as_json,
                               clash=[n for n, x in (("--scores", scores), ("--k-pos", k_pos), ("--k-neg", k_neg),
                                                     ("--m", m), ("--r", r), ("--v", v), ("--delta", delta),
                                                     ("--beta", beta), ("--epsilon-upper", epsilon_upper))
                                      if x is not None])
        return
    delta = 1e-5 if delta is None else delta
    beta = DEFAULT_BETA if beta is None else beta
    try:
        if seed is not None or save_scores is not None:
            raise ValueError("--seed and --save-scores go with --config")
        if scores is not None:
            if k_pos is None or k_neg is None:
                raise ValueError("--scores needs --k-pos and --k-neg (choose them before looking)")
            if not scores.is_file():
                raise ValueError(f"scores file {scores} does not exist")
            s, signs = load_canary_scores(scores)
            result = audit_one_run(s, signs, k_pos, k_neg, delta, beta, epsilon_upper)
        elif None not in (m, r, v):
            assert m is not None and r is not None and v is not None
            eps = epsilon_lower_bound_from_counts(m, r, v, delta, beta)
            result = OneRunAudit(eps, m, r, v, -1, -1, delta, beta, epsilon_upper)
        else:
            raise ValueError("give --config FILE, --scores FILE (with --k-pos/--k-neg) or all of --m, --r, --v")
    except ValueError as exc:
        raise _fail_input(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
    else:
        typer.echo(
            f"ε_lb = {result.epsilon_lb:.3f} at {100 * (1 - beta):g}% confidence, δ = {delta:g} "
            f"({result.v}/{result.r} guesses correct, m = {result.m} canaries)"
        )
        if epsilon_upper is not None:
            typer.echo(f"accountant ε = {epsilon_upper:.3f}: lower/upper = "
                       f"{result.epsilon_lb / epsilon_upper:.2f}" if epsilon_upper > 0 else "")
        if result.exceeds_upper_bound:
            typer.echo("the empirical lower bound EXCEEDS the accountant's ε: DP or accounting is broken")
    raise typer.Exit(EXIT_FAILED if result.exceeds_upper_bound else EXIT_OK)


def _empirical_from_config(config: Path, seed: int | None, save_scores: Path | None, as_json: bool,
                           clash: list[str]) -> None:
    """``audit empirical --config``: the canary training run, then the table or JSON; exits."""
    from privfl.audit_run import load_audit_config, run_audit  # torch/opacus only when needed
    from privfl.errors import PrivflError

    if clash:
        raise _fail_input(f"--config takes its settings from the file; drop {', '.join(clash)}")
    try:
        cfg = load_audit_config(config)
        res = run_audit(cfg, seed=seed)
    except PrivflError as exc:
        raise _fail_input(str(exc)) from None
    if save_scores is not None:
        try:
            save_scores.parent.mkdir(parents=True, exist_ok=True)
            save_scores.write_text(json.dumps({"scores": res.scores, "inclusion": res.inclusion,
                                               "k_pos": res.audit.k_pos, "k_neg": res.audit.k_neg,
                                               "delta": res.audit.delta}))
        except OSError as exc:
            raise _fail_input(f"cannot write scores file {save_scores}: {exc}") from None
    if as_json:
        typer.echo(json.dumps(res.to_dict(), sort_keys=True))
    else:
        console = Console()
        a = res.audit
        t = Table(title=f"one-run empirical audit of {res.node_id} ({config})")
        t.add_column("")
        t.add_column("", justify="right")
        t.add_row(f"ε lower bound ({100 * (1 - a.beta):g}% confidence)", f"[bold]{a.epsilon_lb:.4f}[/]")
        t.add_row(f"formal ε (accountant) at δ = {a.delta:g}",
                  "— (DP disabled)" if res.formal_epsilon is None else f"{res.formal_epsilon:.4f}")
        if res.formal_epsilon:
            t.add_row("ε_lb / formal ε", f"{a.epsilon_lb / res.formal_epsilon:.3f}")
        t.add_row("canaries (kind, m, included)", f"{res.canary}, {a.m}, {res.included}")
        t.add_row("guesses k₊ / k₋, correct v / r", f"{a.k_pos} / {a.k_neg}, {a.v} / {a.r}")
        t.add_row("mean score included / excluded", f"{res.mean_score_included:.4f} / {res.mean_score_excluded:.4f}")
        t.add_row("steps, σ, q", f"{res.steps}, {res.noise_multiplier:g}, {res.sample_rate:.4f}")
        t.add_row("clipping, C", f"{res.clipping}, {res.max_grad_norm:g}")
        t.add_row("test accuracy (with canaries)", f"{res.test_accuracy:.4f}")
        t.add_row("seconds", f"{res.seconds:.1f}")
        console.print(t)
        if res.exceeds_formal:
            console.print("[bold red]the empirical lower bound EXCEEDS the accountant's ε: "
                          "DP or accounting is broken[/]")
        elif res.formal_epsilon is None:
            console.print("DP is disabled: there is no formal ε; ε_lb shows what the canaries leak without noise")
        else:
            console.print("[green]consistent[/]: ε_lb ≤ formal ε")
    raise typer.Exit(EXIT_FAILED if res.exceeds_formal else EXIT_OK)
