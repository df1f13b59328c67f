"""Node configuration and start-up refusals: every error names the field or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from privfl.errors import ConfigError, PrivflError
from privfl.launch import dump_toml
from privfl.node_config import load_node_config
from privfl.pki import Policy, init_consortium

NODES = ["h-a", "h-b"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_consortium("unit", NODES, d, base_port=47100, policy=Policy(min_noise_multiplier=0.8, max_epsilon=5.0))
    return d


def _tables(pki: Path, out: Path, **over: dict) -> dict[str, dict]:
    t: dict[str, dict] = {
        "node": {"id": "h-a", "output": str(out)},
        "identity": {"cert": str(pki / "h-a" / "node.pem"), "key": str(pki / "h-a" / "node.key"),
                     "ca": str(pki / "ca.pem"), "roster": str(pki / "roster.toml"), "crl": str(pki / "crl.pem")},
        "data": {"source": "breast_cancer", "num_sites": 2, "site_index": 0},
        "model": {"name": "logreg"},
        "dp": {"noise_multiplier": 2.0, "target_epsilon": 3.0, "batch_size": 32, "sample_rate": 0.14},
        "stop": {"max_steps": 10},
    }
    for k, v in over.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = {**t.get(k, {}), **v}
    return t


def _write(tmp_path: Path, tables: dict) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(dump_toml(tables))
    return p


def test_valid_config_resolves_paths_relative_to_file(pki: Path, tmp_path: Path) -> None:
    t = _tables(pki, tmp_path / "out")
    t["node"]["output"] = "out"
    cfg = load_node_config(_write(tmp_path, t))
    assert cfg.node.id == "h-a" and cfg.site_index == 0
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.cert_path == pki / "h-a" / "node.pem"
    assert cfg.common.dp.noise_multiplier == 2.0


def test_bad_cert_path_names_the_field(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path, identity={"cert": "missing/node.pem"}))
    with pytest.raises(ConfigError, match=r"\[identity\]\.cert: file not found"):
        load_node_config(p)


def test_unknown_key_is_named(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path, node={"colour": "blue"}))
    with pytest.raises(ConfigError, match=r"\[node\]: unknown key\(s\) colour"):
        load_node_config(p)


def test_missing_identity_section(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path, identity=None))
    with pytest.raises(ConfigError, match=r"missing section \[identity\]"):
        load_node_config(p)


def test_site_index_out_of_range(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path, data={"site_index": 2}))
    with pytest.raises(ConfigError, match=r"\[data\]\.site_index: must be in 0\.\.1"):
        load_node_config(p)


def test_bad_dp_value_names_the_field(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path, dp={"clipping": "nope"}))
    with pytest.raises(ConfigError, match=r"\[dp\]\.clipping"):
        load_node_config(p)


# ---- start-up refusals (the Node is built but never started) --------------------------------


def test_node_refuses_key_of_another_node(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node, NodeError

    t = _tables(pki, tmp_path, identity={"key": str(pki / "h-b" / "node.key")})
    with pytest.raises(NodeError, match=r"\[identity\]\.key: .* is not the key of the certificate"):
        Node(load_node_config(_write(tmp_path, t)))


def test_node_refuses_cert_of_another_node(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node, NodeError

    t = _tables(pki, tmp_path, node={"id": "h-b"})  # h-a's files, but claims to be h-b
    with pytest.raises(NodeError, match=r"\[node\]\.id: 'h-b' but the certificate .* names node 'h-a'"):
        Node(load_node_config(_write(tmp_path, t)))


def test_node_refuses_cert_not_pinned_by_roster(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node, NodeError

    other = tmp_path / "other-pki"
    init_consortium("unit", NODES, other, base_port=47200)  # same names, other CA and keys
    t = _tables(pki, tmp_path, identity={"cert": str(other / "h-a" / "node.pem"),
                                         "key": str(other / "h-a" / "node.key")})
    with pytest.raises(NodeError, match=r"\[identity\]\.cert: .* refused by the roster/CA/CRL"):
        Node(load_node_config(_write(tmp_path, t)))


def test_node_refuses_dp_weaker_than_roster_policy(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node, NodeError

    p = _write(tmp_path, _tables(pki, tmp_path / "o1", dp={"noise_multiplier": 0.5}))
    with pytest.raises(NodeError, match=r"\[dp\]\.noise_multiplier: 0\.5 is below the consortium minimum 0\.8"):
        Node(load_node_config(p))
    p = _write(tmp_path, _tables(pki, tmp_path / "o2", dp={"target_epsilon": 8.0}))
    with pytest.raises(NodeError, match=r"\[dp\]\.target_epsilon: 8 exceeds the consortium maximum 5"):
        Node(load_node_config(p))
    assert not (tmp_path / "o1" / "ledger.jsonl").exists()  # refused before any ledger is written


def test_node_rebuilds_budget_from_ledger_and_refuses_a_tampered_one(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node, NodeError

    out = tmp_path / "out"
    cfg = load_node_config(_write(tmp_path, _tables(pki, out)))
    node = Node(cfg)
    node.client.fit(node.client.get_parameters({}), {"local_steps": 3})  # write-ahead dp_event
    eps = node.client.epsilon
    assert eps > 0 and node.ledger is not None and node.ledger.steps == 3
    node.ledger.close()
    node.network.client.close()  # type: ignore[union-attr]

    again = Node(cfg)  # a restart without a checkpoint: ε comes back from the ledger, not zero
    assert again.client.accountant.steps == 3
    assert again.client.epsilon == pytest.approx(eps, rel=1e-9)
    again.ledger.close()  # type: ignore[union-attr]
    again.network.client.close()  # type: ignore[union-attr]

    path = out / "ledger.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"steps":3', b'"steps":1')  # under-report the spent budget
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(NodeError, match=r"ledger .* failed verification, refusing to start"):
        Node(cfg)


def test_errors_are_privfl_errors() -> None:
    from privfl.node import NodeError

    assert issubclass(NodeError, PrivflError)


def _close(node: object) -> None:
    node.ledger.close()  # type: ignore[attr-defined]
    node.network.client.close()  # type: ignore[attr-defined]


def test_node_uses_secure_randomness_and_says_so_in_its_ledger(pki: Path, tmp_path: Path) -> None:
    from privfl.accounting.audit import audit_ledger
    from privfl.node import Node

    node = Node(load_node_config(_write(tmp_path, _tables(pki, tmp_path / "out"))))
    assert node.client.random_kind == "secure" and node.ledger.randomness == "secure"  # type: ignore[union-attr]
    node.client.fit(node.client.get_parameters({}), {"local_steps": 2})
    _close(node)
    report = audit_ledger(tmp_path / "out" / "ledger.jsonl", (pki / "ca.pem").read_bytes())
    assert report.ok and report.checks["randomness"] == "pass"


def test_seeded_test_node_is_recorded_and_fails_the_audit(pki: Path, tmp_path: Path) -> None:
    from privfl.accounting.audit import audit_ledger
    from privfl.node import Node

    node = Node(load_node_config(_write(tmp_path, _tables(pki, tmp_path / "out", node={"seed": 5}))))
    assert node.client.random_kind == "seeded" and node.ledger.randomness == "seeded"  # type: ignore[union-attr]
    node.client.fit(node.client.get_parameters({}), {"local_steps": 2})
    _close(node)
    ledger = tmp_path / "out" / "ledger.jsonl"
    assert not audit_ledger(ledger, (pki / "ca.pem").read_bytes()).ok
    assert audit_ledger(ledger, (pki / "ca.pem").read_bytes(), allow_seeded=True).ok


def test_node_refuses_per_site_statistics(pki: Path, tmp_path: Path) -> None:
    p = _write(tmp_path, _tables(pki, tmp_path / "out", data={"scaling": "site"}))
    from privfl.node import Node

    with pytest.raises(ConfigError, match=r"\[data\]\.scaling"):
        Node(load_node_config(p))
    assert not (tmp_path / "out" / "ledger.jsonl").exists()


def test_node_refuses_missing_sample_rate(pki: Path, tmp_path: Path) -> None:
    t = _tables(pki, tmp_path)
    del t["dp"]["sample_rate"]
    with pytest.raises(ConfigError, match=r"\[dp\]\.sample_rate: required"):
        load_node_config(_write(tmp_path, t))


def test_sigma_is_the_same_at_sites_of_different_sizes(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node

    sigmas, qs = [], []
    for i, alpha in enumerate((0.3, 5.0)):  # two different splits: the sites hold different numbers of records
        t = _tables(pki, tmp_path / f"o{i}", dp={"noise_multiplier": 0.0, "planned_steps": 100},
                    data={"partitioning": "dirichlet", "alpha": alpha})
        node = Node(load_node_config(_write(tmp_path, t)))
        sigmas.append(node.sigma)
        qs.append(node.client.sample_rate)
        sizes = len(node.site.train)
        _close(node)
        assert sizes > 0
    assert sigmas[0] == sigmas[1] and qs[0] == qs[1] == 0.14


def test_dp_preprocessing_is_in_the_ledger_and_not_paid_twice(pki: Path, tmp_path: Path) -> None:
    from privfl.node import Node

    out = tmp_path / "out"
    t = _tables(pki, out, data={"scaling": "dp", "transform": "log1p", "dp_noise_multiplier": 20.0, "dp_bound": 10.0},
                dp={"noise_multiplier": 0.0, "planned_steps": 50})
    cfg = load_node_config(_write(tmp_path, t))
    node = Node(cfg)
    events = [e for e in node.ledger.entries() if e["kind"] == "dp_event"]  # type: ignore[union-attr]
    assert len(events) == 1 and events[0]["body"]["purpose"] == "preprocessing"
    assert events[0]["body"]["sample_rate"] == 1.0 and events[0]["body"]["noise_multiplier"] == 20.0
    eps0 = node.client.epsilon
    assert eps0 > 0 and node.ledger.steps == 0  # type: ignore[union-attr]
    sigma = node.sigma
    _close(node)
    again = Node(cfg)  # restart: the saved estimate is reused, no second event, the same σ
    events = [e for e in again.ledger.entries() if e["kind"] == "dp_event"]  # type: ignore[union-attr]
    assert len(events) == 1 and again.sigma == sigma and again.client.epsilon == pytest.approx(eps0)
    _close(again)
