"""`privfl pki` commands: create a consortium PKI, issue and revoke node certificates, show it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from privfl.errors import PrivflError
from privfl.pki import (
    CRL_FILE,
    DEFAULT_BASE_PORT,
    DEFAULT_DAYS,
    ROSTER_FILE,
    Policy,
    init_consortium,
    issue_node,
    load_certificate,
    load_crl,
    load_roster,
    revoke_node,
)

app = typer.Typer(help="Consortium PKI: CA, node certificates, roster and revocation list.",
                  no_args_is_help=True)
_console = Console()
_err = Console(stderr=True)


def _fail(exc: PrivflError) -> typer.Exit:
    _err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command()
def init(consortium: str = typer.Option(..., help="Consortium name (DNS label)."),
         nodes: str = typer.Option(..., help="Comma-separated node ids, e.g. h1,h2,h3."),
         out: Path = typer.Option(..., help="Output PKI directory."),
         base_port: int = typer.Option(DEFAULT_BASE_PORT, help="First port on 127.0.0.1."),
         days: int = typer.Option(DEFAULT_DAYS, help="Certificate validity in days."),
         max_epsilon: float | None = typer.Option(
             None, help="Roster [policy]: no node may promise a weaker guarantee than this ε."),
         min_noise_multiplier: float | None = typer.Option(
             None, help="Roster [policy]: no node may train with less noise than this σ."),
         delta: float | None = typer.Option(None, help="Roster [policy]: the largest δ a node may use.")) -> None:
    """Create the CA, one key + certificate per node, an empty CRL and roster.toml (with the
    consortium's minimum privacy [policy], which every node and audit enforces)."""
    given = {"--max-epsilon": max_epsilon, "--min-noise-multiplier": min_noise_multiplier, "--delta": delta}
    for flag, v in given.items():
        if v is not None and not (v > 0 and (flag != "--delta" or v < 1)):
            raise _fail(PrivflError(f"{flag}: expected a positive number{' below 1' if flag == '--delta' else ''}, "
                                    f"got {v!r}"))
    try:
        ids = [n.strip() for n in nodes.split(",") if n.strip()]
        roster = init_consortium(consortium, ids, out, base_port=base_port, days=days,
                                 policy=Policy(min_noise_multiplier, max_epsilon, delta))
    except PrivflError as exc:
        raise _fail(exc) from None
    _console.print(f"consortium {roster.consortium}: {len(roster.nodes)} nodes written to {out}")
    if all(v is None for v in given.values()):
        _console.print("note: the roster has no [policy]: nodes and audits enforce no consortium minimum "
                       "(give --max-epsilon, --min-noise-multiplier and --delta)", markup=False, highlight=False)
    _console.print(f"keep {out / 'ca.key'} with the operator; give each node only its own folder")


@app.command()
def issue(pki: Path = typer.Option(..., help="PKI directory made by `init`."),
          node: str = typer.Option(..., help="Node id to issue (re-issuing revokes the old cert)."),
          address: str = typer.Option(..., help="host:port the node listens on."),
          days: int = typer.Option(DEFAULT_DAYS, help="Certificate validity in days.")) -> None:
    """Issue (or re-issue) a node certificate and add it to the roster."""
    try:
        entry = issue_node(pki, node, address, days=days)
    except PrivflError as exc:
        raise _fail(exc) from None
    _console.print(f"node {entry.node_id} at {entry.address}: {entry.fingerprint}")


@app.command()
def revoke(pki: Path = typer.Option(..., help="PKI directory made by `init`."),
           node: str = typer.Option(..., help="Node id whose certificate to revoke.")) -> None:
    """Revoke a node's current certificate (adds its serial to the CA-signed CRL)."""
    try:
        serial = revoke_node(pki, node)
    except PrivflError as exc:
        raise _fail(exc) from None
    _console.print(f"node {node} revoked (serial {serial:x}); distribute {pki / CRL_FILE}")


@app.command()
def show(pki: Path = typer.Option(..., help="PKI directory made by `init`.")) -> None:
    """Print the roster: node id, address, fingerprint, expiry and revocation status."""
    try:
        roster = load_roster(pki / ROSTER_FILE)
        crl_path = pki / CRL_FILE
        try:
            revoked = {r.serial_number for r in load_crl(crl_path.read_bytes())}
        except OSError as exc:
            raise PrivflError(f"{crl_path}: cannot read CRL: {exc}") from None
        table = Table(title=f"consortium {roster.consortium}")
        for col in ("node", "address", "fingerprint", "expires", "status"):
            table.add_column(col)
        for n in roster.nodes.values():
            cert_path = pki / n.node_id / "node.pem"
            expires, status = "?", "no certificate here"
            if cert_path.exists():
                cert = load_certificate(cert_path.read_bytes())
                expires = cert.not_valid_after_utc.date().isoformat()
                status = "revoked" if cert.serial_number in revoked else "valid"
            table.add_row(n.node_id, n.address, n.fingerprint[:23] + "...", expires, status)
    except PrivflError as exc:
        raise _fail(exc) from None
    _console.print(table)
    pol = {k: v for k, v in vars(roster.policy).items() if v is not None}
    if pol:
        _console.print("policy: " + ", ".join(f"{k}={v}" for k, v in pol.items()))
