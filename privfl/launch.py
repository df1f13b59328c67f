"""``privfl launch``: a whole consortium of real node processes on 127.0.0.1, end to end.

Why: the simulator measures strategies on a virtual clock; this runs the very node a
hospital runs (``python -m privfl.node``), one process per site, over real mutual-TLS
gRPC with a freshly generated PKI, and collects what they wrote into one run folder::

    runs/<name>-<timestamp>/
        consortium.toml          copy of the launch config
        pki/                     CA, CRL, roster (with the consortium [policy]), node keys
        <node>/node.toml         the config that node ran with
        <node>/node.log          its stdout + stderr
        <node>/ledger.jsonl, metrics.jsonl, metrics.csv, final_model.npz, summary.json, ...
        summary.json             per-node accuracy, ε, audit result; consensus distance

Every process it starts runs in its own process group and is terminated (SIGTERM, then
SIGKILL after a grace period) when the launcher ends — normally, on Ctrl-C/SIGTERM, or
at interpreter exit.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privfl.config import (
    PYTHON_PATH_KEY,
    SHARED_SECTIONS,
    apply_python_path,
    check_sections,
    common_from,
    from_table,
    read_toml,
    resolve_path,
)
from privfl.errors import ConfigError, PrivflError
from privfl.node_config import NodeSection
from privfl.pki import CA_FILE, CRL_FILE, ROSTER_FILE, Policy, init_consortium, load_roster, validate_label
from privfl.preprocessing import check_deployable

log = logging.getLogger("privfl.launch")

NODE_DEFAULTS_KEYS = {f for f in NodeSection.__dataclass_fields__} - {"id", "listen", "output", "seed"}


@dataclass
class ConsortiumSection:
    """``[consortium]``: who takes part and where the run goes."""

    name: str = "consortium"
    nodes: list[str] = field(default_factory=list)
    runs_dir: str = "runs"
    pki: str = ""  # an existing PKI folder (roster addresses are used as they are); empty: generate one
    distinct_init: bool = False  # each node starts from its own random model (to show consensus)
    timeout: float = 600.0  # the launcher stops every node after this many seconds
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL at clean-up

    def validate(self, where: str) -> None:
        try:
            validate_label(self.name, "consortium name")
            for n in self.nodes:
                validate_label(n, "node id")
        except ConfigError:
            raise
        except Exception as exc:  # PKIError names the bad label
            raise ConfigError(f"{where}: {exc}") from None
        if len(self.nodes) < 1:
            raise ConfigError(f"{where}.nodes: give at least one node id")
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"{where}.nodes: node ids must be distinct")
        if not self.timeout > 0:
            raise ConfigError(f"{where}.timeout: must be > 0, got {self.timeout}")


@dataclass
class PolicySection:
    """``[policy]``: the consortium minimum every node must meet (written into the roster)."""

    min_noise_multiplier: float = 0.0
    max_epsilon: float = 0.0
    delta: float = 0.0

    def to_policy(self) -> Policy:
        """The roster's Policy (0 means: no constraint)."""
        return Policy(self.min_noise_multiplier or None, self.max_epsilon or None, self.delta or None)


@dataclass
class LaunchPlan:
    """A prepared run: folders, PKI and one node.toml per node."""

    name: str
    run_dir: Path
    node_ids: list[str]
    node_dirs: dict[str, Path]
    node_configs: dict[str, Path]
    pki_dir: Path
    timeout: float
    grace: float
    target_epsilon: float


# --------------------------------------------------------------------------- TOML writing


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"{where}: cannot write non-finite number {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table, e.g. [strategy].params = { compressor = "topk", ... }
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x, f'{where}.{k}')}" for k, x in v.items()) + " }"
    raise ConfigError(f"{where}: cannot write {type(v).__name__} value to TOML")


def dump_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of ``{section: {key: scalar, list or inline table}}`` (all privfl configs need)."""
    out = []
    for section, body in tables.items():
        out.append(f"[{section}]")
        for k, v in body.items():
            out.append(f"{k} = {_toml_value(v, f'[{section}].{k}')}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- preparing


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def load_consortium(path: str | Path) -> tuple[dict[str, Any], ConsortiumSection, PolicySection]:
    """Parse and validate a consortium config: (raw table, [consortium], [policy])."""
    p = Path(path)
    table = read_toml(p)
    src = str(p)
    python_path = apply_python_path(table, p.parent, src)
    check_sections(table, ("consortium", "policy", "node", "nodes", *SHARED_SECTIONS), src)
    if "consortium" not in table:
        raise ConfigError(f"{src}: missing section [consortium] (name, nodes)")
    cons = from_table(ConsortiumSection, table["consortium"], f"{src}: [consortium]")
    pol = from_table(PolicySection, table.get("policy", {}), f"{src}: [policy]")
    node_defaults = table.get("node", {})
    if not isinstance(node_defaults, dict):
        raise ConfigError(f"{src}: [node]: expected a table")
    bad = sorted(set(node_defaults) - NODE_DEFAULTS_KEYS)
    if bad:
        raise ConfigError(f"{src}: [node]: key(s) {', '.join(bad)} cannot be shared by every node; "
                          f"allowed: {', '.join(sorted(NODE_DEFAULTS_KEYS))}")
    data = dict(table.get("data", {}))
    if data.get("num_sites", len(cons.nodes)) != len(cons.nodes):
        raise ConfigError(f"{src}: [data].num_sites: {data['num_sites']} but [consortium].nodes lists "
                          f"{len(cons.nodes)} nodes")
    data["num_sites"] = len(cons.nodes)
    table["data"] = data
    shared = {k: v for k, v in table.items() if k in SHARED_SECTIONS}
    common = common_from(shared, src)
    check_deployable(common.data.preprocessing_spec(p.parent), f"{src}: [data]")  # nodes refuse it too, later
    per_node = _per_node_data(table.get("nodes", {}), cons.nodes, src)
    for nid, own in per_node.items():  # each hospital's own [data], checked as its node will read it
        where = f"{src}: [nodes.{nid}.data]"
        merged = common_from({**shared, "data": {**data, **own}}, where)
        check_deployable(merged.data.preprocessing_spec(p.parent), where)
    table[PYTHON_PATH_KEY] = python_path  # absolute: every generated node.toml gets it
    return table, cons, pol


#: [data] keys naming files or folders: relative to the launch file that names them
_DATA_PATH_KEYS = ("source", "statistics", "root")


def _per_node_data(nodes: Any, node_ids: Sequence[str], src: str) -> dict[str, dict[str, Any]]:
    """``[nodes.<id>.data]``: each hospital's own [data] keys (merged over the shared [data])."""
    if not isinstance(nodes, dict):
        raise ConfigError(f"{src}: [nodes]: expected tables [nodes.<node id>.data]")
    out = {}
    for nid, body in nodes.items():
        if nid not in node_ids:
            raise ConfigError(f"{src}: [nodes.{nid}]: {nid!r} is not in [consortium].nodes")
        if not isinstance(body, dict) or set(body) - {"data"}:
            raise ConfigError(f"{src}: [nodes.{nid}]: only a [nodes.{nid}.data] table may be given per node")
        own = body.get("data", {})
        if not isinstance(own, dict):
            raise ConfigError(f"{src}: [nodes.{nid}.data]: expected a table")
        for key in ("num_sites", "site_index", "seed", "partitioning"):
            if key in own:
                raise ConfigError(f"{src}: [nodes.{nid}.data].{key}: shared by every node (it fixes the split); "
                                  "set it in [data]")
        out[nid] = dict(own)
    return out


def _absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with its file and folder keys made absolute against ``base`` (the launch file's folder)."""
    out = dict(data)
    for key in _DATA_PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and (key != "source" or value.endswith((".csv", ".npz"))):
            out[key] = str(resolve_path(base, value).resolve())
    return out


def check_node_config(path: Path, node_id: str, source: Path | None = None,
                      own: Mapping[str, Any] | None = None) -> None:
    """What a node would refuse at start, checked by the launcher before it starts any: the
    node's config (sections, fields, the model, loss, data and client imports), its data
    folder and a budget that allows no DP step. ConfigError naming the node and the launch
    config ``source`` (the node's own ``[nodes.<id>.data]`` table for what ``own`` sets), so a
    typo in one hospital's folder costs no run."""
    from privfl.node import check_one_step_fits, resolved_noise
    from privfl.node_config import load_node_config

    src = str(source) if source is not None else str(path)
    try:
        cfg = load_node_config(path)
        root = cfg.common.data.root_path(path.parent)
        if root is not None and not Path(root).exists():
            table = f"[nodes.{node_id}.data]" if own and "root" in own else "[data]"
            raise ConfigError(f"{src}: {table}.root: folder not found: {root}")
        check_one_step_fits(cfg, resolved_noise(cfg))
    except PrivflError as exc:
        raise ConfigError(f"node {node_id}: {str(exc).replace(str(path), src)} (no node was started)") from None


def node_error_line(node_dir: Path) -> str | None:
    """The one-line error a node exited with (the last ``error:`` line of its node.log), if any."""
    try:
        lines = (node_dir / "node.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((x.strip() for x in reversed(lines) if x.startswith("error:")), None)


def prepare_run(config: str | Path, runs_dir: str | Path | None = None, run_name: str | None = None) -> LaunchPlan:
    """Make the run folder: PKI (generated unless given), one node.toml per node."""
    cfg_path = Path(config).resolve()
    table, cons, pol = load_consortium(cfg_path)
    base = cfg_path.parent
    root = Path(runs_dir) if runs_dir is not None else resolve_path(base, cons.runs_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (root / (run_name or f"{cons.name}-{stamp}")).resolve()
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = run_dir.with_name(f"{run_name or cons.name + '-' + stamp}-{n}")
    run_dir.mkdir(parents=True)
    shutil.copyfile(cfg_path, run_dir / "consortium.toml")
    if cons.pki:
        src_pki = resolve_path(base, cons.pki)
        if not (src_pki / ROSTER_FILE).is_file():
            raise ConfigError(f"{cfg_path}: [consortium].pki: no {ROSTER_FILE} in {src_pki}")
        pki_dir = src_pki.resolve()
        roster = load_roster(pki_dir / ROSTER_FILE)
        missing = [nid for nid in cons.nodes if nid not in roster.nodes]
        if missing:
            raise ConfigError(f"{cfg_path}: [consortium].nodes: {', '.join(missing)} not in the roster {pki_dir}")
    else:
        pki_dir = run_dir / "pki"
        ports = free_ports(len(cons.nodes))
        init_consortium(cons.name, cons.nodes, pki_dir,
                        addresses={nid: f"127.0.0.1:{port}" for nid, port in zip(cons.nodes, ports)},
                        policy=pol.to_policy())
    shared = {k: dict(table[k]) for k in SHARED_SECTIONS if k in table}
    # files named in the launch config are relative to it, not to a node's folder
    shared["data"] = _absolute_paths(shared.get("data", {}), base)
    per_node = {nid: _absolute_paths(own, base) for nid, own in _per_node_data(table.get("nodes", {}),
                                                                                 cons.nodes, str(cfg_path)).items()}
    node_dirs, node_configs = {}, {}
    for i, nid in enumerate(cons.nodes):
        d = run_dir / nid
        d.mkdir()
        node_sec: dict[str, Any] = {"id": nid, "output": "."}
        node_sec.update(table.get("node", {}))
        if cons.distinct_init:
            node_sec.setdefault("init_seed", 10_000 + i)
        tables: dict[str, dict[str, Any]] = {
            "node": node_sec,
            "identity": {"cert": str(pki_dir / nid / "node.pem"), "key": str(pki_dir / nid / "node.key"),
                         "ca": str(pki_dir / CA_FILE), "roster": str(pki_dir / ROSTER_FILE),
                         "crl": str(pki_dir / CRL_FILE)},
        }
        for k, v in shared.items():
            tables[k] = dict(v)
        tables["data"].update(per_node.get(nid, {}))
        tables["data"]["site_index"] = i
        path = d / "node.toml"
        top = (f"{PYTHON_PATH_KEY} = {_toml_value(table[PYTHON_PATH_KEY], PYTHON_PATH_KEY)}\n\n"
               if table.get(PYTHON_PATH_KEY) else "")
        path.write_text(f"# generated by privfl launch for node {nid}\n" + top + dump_toml(tables))
        node_dirs[nid], node_configs[nid] = d, path
    try:  # every node's config, imports, data folder and budget, before any process starts
        for nid in cons.nodes:
            check_node_config(node_configs[nid], nid, cfg_path, per_node.get(nid))
    except ConfigError:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: no run folder (nor its fresh PKI) is left
        raise
    target = float(table.get("dp", {}).get("target_epsilon", 3.0))
    log.info("launch: run %s prepared in %s (%d nodes)", cons.name, run_dir, len(cons.nodes))
    return LaunchPlan(cons.name, run_dir, list(cons.nodes), node_dirs, node_configs, pki_dir, cons.timeout,
                      cons.grace, target)


# --------------------------------------------------------------------------- processes


class NodeProcesses:
    """The node processes of one run; each in its own process group, all cleaned up at the end."""

    def __init__(self, plan: LaunchPlan, grace: float | None = None) -> None:
        self.plan = plan
        self.grace = plan.grace if grace is None else grace
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.returncodes: dict[str, int] = {}
        self._logs: list[Any] = []
        atexit.register(self.cleanup)

    def start(self, node_id: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m privfl.node --config <node.toml>`` for ``node_id`` (log appended to node.log)."""
        d = self.plan.node_dirs[node_id]
        logf = open(d / "node.log", "ab")
        self._logs.append(logf)
        e = dict(os.environ)
        e.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        e.setdefault("OMP_NUM_THREADS", "1")
        e.setdefault("PYTHONUNBUFFERED", "1")
        root = str(Path(__file__).resolve().parent.parent)
        e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e.update(env or {})
        proc = subprocess.Popen([sys.executable, "-m", "privfl.node", "--config", str(self.plan.node_configs[node_id])],
                                cwd=d, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=e, start_new_session=True)
        self.procs[node_id] = proc
        self.returncodes.pop(node_id, None)
        log.info("launch: node %s started (pid %d)", node_id, proc.pid)
        return proc

    def start_all(self) -> None:
        """Start every node of the plan."""
        for nid in self.plan.node_ids:
            self.start(nid)

    def poll(self) -> dict[str, int | None]:
        """Exit code per started node (None while running)."""
        out: dict[str, int | None] = {}
        for nid, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                self.returncodes[nid] = rc
            out[nid] = rc
        return out

    def running(self) -> list[str]:
        """Nodes still running."""
        return [nid for nid, rc in self.poll().items() if rc is None]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the node's process group (kill -9 by default) and reap it."""
        p = self.procs[node_id]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            p.wait(timeout=10)
            self.returncodes[node_id] = p.returncode

    def wait(self, timeout: float, on_tick: Any = None, interval: float = 0.5,
             give_up: Any = None) -> bool:
        """Wait until every node exits, ``timeout`` passes or ``give_up()`` is true; True if all exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if on_tick is not None:
                on_tick()
            if not self.running():
                return True
            if give_up is not None and give_up():
                return False
            time.sleep(interval)
        return not self.running()

    def refused(self) -> list[str]:
        """Nodes that exited with code 2 (bad input or a refusal: the run cannot go on as planned)."""
        return [nid for nid, rc in self.poll().items() if rc == 2]

    def cleanup(self) -> None:
        """SIGTERM every live process group, SIGKILL what is left after the grace period."""
        live = [(nid, p) for nid, p in self.procs.items() if p.poll() is None]
        for nid, p in live:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                log.info("launch: node %s terminated (SIGTERM)", nid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace
        for nid, p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                    log.warning("launch: node %s killed (SIGKILL) after %.0f s grace", nid, self.grace)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.poll()
        for f in self._logs:
            try:
                f.close()
            except OSError:
                pass
        self._logs.clear()


# --------------------------------------------------------------------------- progress and results


def last_metrics(path: Path) -> dict[str, Any] | None:
    """The last complete row of a node's metrics.jsonl (None if none yet)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    for line in reversed(data.split(b"\n")):
        if line.strip():
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _flat(params: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in params])


def max_pairwise_distance(models: Sequence[Sequence[np.ndarray]]) -> float:
    """Largest L2 distance between any two models (0 for fewer than two)."""
    v = [_flat(m) for m in models]
    best = 0.0
    for i in range(len(v)):
        for j in range(i + 1, len(v)):
            best = max(best, float(np.linalg.norm(v[i] - v[j])))
    return best


def load_model(path: Path) -> list[np.ndarray]:
    """Arrays of an npz model file in stored order (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in z.files]


def collect(plan: LaunchPlan, returncodes: Mapping[str, int | None], wall_seconds: float) -> dict[str, Any]:
    """Combine the nodes' summaries, audit their ledgers, measure consensus; write run_dir/summary.json."""
    from privfl.accounting.audit import audit_ledger

    ca_pem = (plan.pki_dir / CA_FILE).read_bytes()
    # the consortium's pins, [policy] and CRL, as `privfl audit --consortium` applies them
    roster = load_roster(plan.pki_dir / ROSTER_FILE) if (plan.pki_dir / ROSTER_FILE).is_file() else None
    pins, floor = (roster.pins, roster.policy) if roster is not None else (None, None)
    crl_pem = (plan.pki_dir / CRL_FILE).read_bytes() if (plan.pki_dir / CRL_FILE).is_file() else None
    nodes: dict[str, Any] = {}
    finals, initials = [], []
    for nid in plan.node_ids:
        d = plan.node_dirs[nid]
        entry: dict[str, Any] = {"exit_code": returncodes.get(nid)}
        try:
            entry.update(json.loads((d / "summary.json").read_text()))
        except (OSError, ValueError):
            entry["error"] = node_error_line(d) or "no summary.json (the node did not finish)"
        if (d / "ledger.jsonl").exists():
            # launched nodes draw secure noise: a seeded ledger fails here (no allow_seeded)
            rep = audit_ledger(
                d / "ledger.jsonl", ca_pem, expected_node_id=nid, compute_pld=True,
                roster=pins, roster_policy=floor, crl_pem=crl_pem)
            entry["audit_ok"] = rep.ok
            entry["audit_accountant"] = rep.accountant
            entry["audit_epsilon"] = rep.epsilon  # by the node's own accountant
            entry["audit_epsilon_rdp"] = rep.epsilon_rdp
            entry["audit_epsilon_pld"] = rep.epsilon_pld
            entry["audit_randomness"] = rep.randomness
            if not rep.ok and rep.first_issue is not None:
                entry["audit_issue"] = rep.first_issue.message
        if (d / "final_model.npz").exists():
            finals.append(load_model(d / "final_model.npz"))
        if (d / "initial_model.npz").exists():
            initials.append(load_model(d / "initial_model.npz"))
        nodes[nid] = entry
    accs = [e["accuracy"] for e in nodes.values() if isinstance(e.get("accuracy"), (int, float))]
    summary = {
        "name": plan.name, "run_dir": str(plan.run_dir), "wall_seconds": round(wall_seconds, 2),
        "nodes": nodes,
        "mean_accuracy": float(np.mean(accs)) if accs else None,
        "min_accuracy": float(np.min(accs)) if accs else None,
        "max_epsilon": max((e.get("epsilon") or 0.0 for e in nodes.values()), default=0.0),
        "target_epsilon": plan.target_epsilon,
        "consensus_distance": max_pairwise_distance(finals) if len(finals) == len(plan.node_ids) else None,
        "initial_distance": max_pairwise_distance(initials) if len(initials) == len(plan.node_ids) else None,
        "ok": all(e.get("exit_code") == 0 and e.get("audit_ok") for e in nodes.values()),
    }
    (plan.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _progress_table(plan: LaunchPlan, procs: NodeProcesses, t0: float) -> Any:
    from rich.table import Table

    t = Table(title=f"{plan.name}: {time.monotonic() - t0:.0f} s", expand=False)
    for col in ("node", "state", "steps", "ε", "accuracy", "sent", "received"):
        t.add_column(col, justify="right" if col not in ("node", "state") else "left")
    codes = procs.poll()
    for nid in plan.node_ids:
        m = last_metrics(plan.node_dirs[nid] / "metrics.jsonl") or {}
        rc = codes.get(nid)
        state = "running" if rc is None else ("done" if rc == 0 else f"exit {rc}")
        eps = m.get("epsilon")
        acc = m.get("accuracy")
        t.add_row(nid, f"{state} {m.get('phase', '')}".strip(), str(m.get("steps", "-")),
                  f"{eps:.3f}" if isinstance(eps, (int, float)) else "-",
                  f"{acc:.3f}" if isinstance(acc, (int, float)) else "-",
                  _kb(m.get("bytes_sent")), _kb(m.get("bytes_received")))
    return t


def _kb(x: Any) -> str:
    return f"{x / 1024:.0f} KiB" if isinstance(x, (int, float)) else "-"


def result_table(summary: Mapping[str, Any]) -> Any:
    """A rich table of the final results."""
    from rich.table import Table

    def num(x: Any) -> str:  # a value that was not computed shows "-", never a placeholder
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
        return f"{x:.3f}" if ok else "-"

    def _other_method(method: str | None) -> str:  # the method beside the node's own
        return "pld" if method == "rdp" else "rdp"

    nodes = summary["nodes"]
    methods = {e.get("audit_accountant") for e in nodes.values() if e.get("audit_accountant")}
    single = next(iter(methods)) if len(methods) == 1 else None
    own = f"ε (audit, {single})" if single else "ε (audit, node's accountant)"
    other = f"ε (audit, {_other_method(single)})" if single else "ε (audit, other method)"
    t = Table(title=f"{summary['name']}: finished in {summary['wall_seconds']:.1f} s")
    for col in ("node", "exit", "stop", "steps", "ε (node)", own, other, "noise", "ledger", "accuracy"):
        t.add_column(col)
    for nid, e in nodes.items():
        method = e.get("audit_accountant")
        alt = _other_method(method) if method else None
        aeps, oeps = num(e.get("audit_epsilon")), num(e.get(f"audit_epsilon_{alt}") if alt else None)
        if single is None and method:  # mixed accountants: each cell names its method
            aeps = f"{aeps} ({method})" if aeps != "-" else aeps
            oeps = f"{oeps} ({alt})" if oeps != "-" else oeps
        t.add_row(nid, str(e.get("exit_code")), str(e.get("stop_reason", "-")), str(e.get("steps", "-")),
                  num(e.get("epsilon")), aeps, oeps, str(e.get("audit_randomness") or "-"),
                  "verified" if e.get("audit_ok") else "FAILED", num(e.get("accuracy")))
    return t


def launch_consortium(config: str | Path, runs_dir: str | Path | None = None, progress: bool = True,
                      run_name: str | None = None) -> dict[str, Any]:
    """Prepare, start every node, show progress (``progress``), wait, collect, print the result
    table and every failed node's error line; always cleans up the processes."""
    from rich.console import Console
    from rich.live import Live

    plan = prepare_run(config, runs_dir, run_name)
    procs = NodeProcesses(plan)
    console = Console()
    old: dict[int, Any] = {}

    def _on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    t0 = time.monotonic()
    interrupted = False
    try:
        procs.start_all()
        # a node that refuses its input (exit 2) stops the run: its peers would wait for it in vain
        if progress:
            with Live(_progress_table(plan, procs, t0), console=console, refresh_per_second=2) as live:
                all_done = procs.wait(plan.timeout, on_tick=lambda: live.update(_progress_table(plan, procs, t0)),
                                      give_up=procs.refused)
        else:
            all_done = procs.wait(plan.timeout, give_up=procs.refused)
        if procs.refused() and procs.running():
            log.warning("launch: node(s) %s refused to run (exit 2); stopping the others", ", ".join(procs.refused()))
        elif not all_done:
            log.warning("launch: timeout after %.0f s; stopping the nodes still running", plan.timeout)
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: stopping every node …")
    finally:
        procs.cleanup()
        for signum, handler in old.items():
            signal.signal(signum, handler)
    summary = collect(plan, procs.returncodes, time.monotonic() - t0)
    summary["interrupted"] = interrupted
    # the result table and every failed node's line, also with --quiet (which hides only the live table)
    console.print(result_table(summary))
    for nid, entry in summary["nodes"].items():
        rc = entry.get("exit_code")
        if rc is not None and rc < 0:
            console.print(f"node {nid} was stopped by the launcher (signal {-rc})", markup=False,
                          highlight=False, soft_wrap=True)
        elif rc != 0:  # the node's line names its generated node.toml: say which file that came from
            error = str(entry.get("error", "")).replace(str(plan.node_configs[nid]),
                                                       f"{plan.node_configs[nid]} (from {Path(config).resolve()})")
            console.print(f"node {nid} exited {rc}: {error}", markup=False, highlight=False, soft_wrap=True)
    cd, d0 = summary.get("consensus_distance"), summary.get("initial_distance")
    ma = summary['mean_accuracy']
    console.print(f"mean accuracy {ma if ma is None else f'{ma:.3f}'}, max ε {summary['max_epsilon']:.3f} "
                  f"(target {summary['target_epsilon']:g}), consensus distance "
                  f"{cd if cd is None else f'{cd:.3g}'} (initial {d0 if d0 is None else f'{d0:.3g}'})")
    (plan.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["ConsortiumSection", "LaunchPlan", "NodeProcesses", "PolicySection", "collect", "dump_toml",
           "free_ports", "last_metrics", "launch_consortium", "load_consortium", "load_model",
           "max_pairwise_distance", "prepare_run"]
