"""Consortium PKI: files, permissions, roster validation, verification reasons, signatures, CLI."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from privfl.cli.pki import app
from privfl.errors import PrivflError
from privfl.pki import (
    NodeIdentity,
    PKIError,
    Roster,
    RosterNode,
    fingerprint,
    init_consortium,
    issue_node,
    load_certificate,
    load_pki,
    load_private_key,
    load_roster,
    make_ca,
    make_crl,
    make_node_cert,
    node_id_from_cert,
    revoke_node,
    sign_bytes,
    verify_node_certificate,
    verify_signature,
)

pytestmark = pytest.mark.timeout(60)


def _pem(cert) -> bytes:  # noqa: ANN001
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    init_consortium("demo", ["h1", "h2", "h3"], tmp_path / "pki", base_port=50100, days=30)
    return tmp_path / "pki"


def test_init_round_trip(pki: Path) -> None:
    ca_pem, roster, crl = load_pki(pki)
    assert roster.consortium == "demo"
    assert list(roster.nodes) == ["h1", "h2", "h3"]
    assert roster.nodes["h2"].address == "127.0.0.1:50101"
    for node in ("h1", "h2", "h3"):
        cert_pem = (pki / node / "node.pem").read_bytes()
        assert node_id_from_cert(cert_pem) == node
        assert fingerprint(cert_pem) == roster.nodes[node].fingerprint
        assert verify_node_certificate(cert_pem, ca_pem, roster, crl) == node
        assert (pki / node / "ca.pem").read_bytes() == ca_pem
        ident = NodeIdentity.load(pki / node)
        assert ident.node_id == node
    cert = load_certificate((pki / "h1" / "node.pem").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert load_private_key((pki / "h1" / "node.key").read_bytes()).curve.name == "secp256r1"
    with pytest.raises(PKIError, match="already exists"):
        init_consortium("demo", ["h1"], pki)


def test_private_keys_are_0600(pki: Path) -> None:
    for key in [pki / "ca.key", *(pki / n / "node.key" for n in ("h1", "h2", "h3"))]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((pki / "h1").stat().st_mode) == 0o700


def test_pkierror_is_privfl_error() -> None:
    assert issubclass(PKIError, PrivflError)


@pytest.mark.parametrize("text, field", [
    ('[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\nfingerprint="sha256:' + "0" * 64 + '"\n',
     "'consortium'"),
    ('consortium="demo"\n', "'nodes'"),
    ('consortium="demo"\n[[nodes]]\nid="h1"\nfingerprint="sha256:' + "0" * 64 + '"\n',
     "nodes[0]: missing field 'address'"),
    ('consortium="demo"\n[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\nfingerprint="sha256:' + "0" * 64
     + '"\n[[nodes]]\nid="h2"\naddress="nohost"\nfingerprint="sha256:' + "0" * 64 + '"\n',
     "nodes[1].address"),
    ('consortium="demo"\n[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\nfingerprint="md5:12"\n',
     "nodes[0].fingerprint"),
    ('consortium="demo"\n[[nodes]]\nid="H 1"\naddress="127.0.0.1:1"\nfingerprint="sha256:' + "0" * 64
     + '"\n', "nodes[0].id"),
    ('consortium="demo"\n[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\nfingerprint="sha256:' + "0" * 64
     + '"\n[[nodes]]\nid="h1"\naddress="127.0.0.1:2"\nfingerprint="sha256:' + "1" * 64 + '"\n',
     "duplicate node id"),
    ('consortium="demo"\n[policy]\ndelta=2.0\n[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\n'
     'fingerprint="sha256:' + "0" * 64 + '"\n', "policy.delta"),
    ('consortium="demo"\n[policy]\nmax_epsilon=-1\n[[nodes]]\nid="h1"\naddress="127.0.0.1:1"\n'
     'fingerprint="sha256:' + "0" * 64 + '"\n', "policy.max_epsilon"),
    ('consortium = [\n', "cannot parse"),
])
def test_roster_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "roster.toml"
    path.write_text(text)
    with pytest.raises(PKIError) as info:
        load_roster(path)
    assert field in str(info.value)
    assert str(path) in str(info.value)


def test_roster_policy_is_read(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    path.write_text('consortium="demo"\n[policy]\nmin_noise_multiplier=0.8\nmax_epsilon=8\n'
                    'delta=1e-5\n[[nodes]]\nid="h1"\naddress="10.0.0.5:7000"\n'
                    'fingerprint="sha256:' + "a" * 64 + '"\n')
    roster = load_roster(path)
    assert roster.policy.min_noise_multiplier == 0.8
    assert roster.policy.max_epsilon == 8.0
    assert roster.policy.delta == 1e-5
    assert roster.address_of("h1") == "10.0.0.5:7000"
    with pytest.raises(PKIError, match="not in the roster"):
        roster.address_of("h9")


def test_missing_roster_file(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not found"):
        load_roster(tmp_path / "nope.toml")


def test_verify_reasons(pki: Path) -> None:
    ca_pem, roster, crl = load_pki(pki)
    ca_cert = load_certificate(ca_pem)
    ca_key = load_private_key((pki / "ca.key").read_bytes())
    # another CA, same consortium and node id
    other_ca, other_key = make_ca("demo")
    rogue, _ = make_node_cert(other_ca, other_key, "demo", "h1")
    with pytest.raises(PKIError, match="unknown CA"):
        verify_node_certificate(_pem(rogue), ca_pem, roster, crl)
    # expired, though pinned in the roster
    now = dt.datetime.now(dt.UTC)
    old, _ = make_node_cert(ca_cert, ca_key, "demo", "h1", not_before=now - dt.timedelta(days=10),
                            not_after=now - dt.timedelta(days=1))
    pinned = Roster("demo", {**roster.nodes, "h1": RosterNode("h1", "127.0.0.1:1", fingerprint(old))})
    with pytest.raises(PKIError, match="expired"):
        verify_node_certificate(_pem(old), ca_pem, pinned, crl)
    # valid CA cert whose node id is not in the roster
    stranger, _ = make_node_cert(ca_cert, ca_key, "demo", "h9")
    with pytest.raises(PKIError, match="h9 is not in the roster"):
        verify_node_certificate(_pem(stranger), ca_pem, roster, crl)
    # same node id, not the pinned certificate
    twin, _ = make_node_cert(ca_cert, ca_key, "demo", "h1")
    with pytest.raises(PKIError, match="fingerprint"):
        verify_node_certificate(_pem(twin), ca_pem, roster, crl)
    # other consortium under the same CA
    alien, _ = make_node_cert(ca_cert, ca_key, "other", "h1")
    with pytest.raises(PKIError, match="consortium"):
        verify_node_certificate(_pem(alien), ca_pem, roster, crl)
    # a CRL signed by another CA is refused, fail closed
    with pytest.raises(PKIError, match="CRL is not signed"):
        verify_node_certificate((pki / "h1" / "node.pem").read_bytes(), ca_pem, roster,
                                make_crl(other_ca, other_key))
    with pytest.raises(PKIError, match="malformed certificate"):
        verify_node_certificate(b"not a cert", ca_pem, roster, crl)


def test_revoke_and_reissue(pki: Path) -> None:
    h2_old = (pki / "h2" / "node.pem").read_bytes()
    revoke_node(pki, "h2")
    ca_pem, roster, crl = load_pki(pki)
    with pytest.raises(PKIError, match="revoked"):
        verify_node_certificate(h2_old, ca_pem, roster, crl)
    assert verify_node_certificate((pki / "h1" / "node.pem").read_bytes(), ca_pem, roster, crl) == "h1"
    # re-issue h1: the roster pin moves, and the previous certificate is revoked
    h1_old = (pki / "h1" / "node.pem").read_bytes()
    entry = issue_node(pki, "h1", "127.0.0.1:6000")
    ca_pem, roster, crl = load_pki(pki)
    assert roster.nodes["h1"] == entry and entry.address == "127.0.0.1:6000"
    assert verify_node_certificate((pki / "h1" / "node.pem").read_bytes(), ca_pem, roster, crl) == "h1"
    with pytest.raises(PKIError, match="revoked"):
        verify_node_certificate(h1_old, ca_pem, roster, crl)
    # a new member
    issue_node(pki, "h4", "127.0.0.1:6001")
    ca_pem, roster, crl = load_pki(pki)
    assert verify_node_certificate((pki / "h4" / "node.pem").read_bytes(), ca_pem, roster, crl) == "h4"
    with pytest.raises(PKIError, match="not in the roster"):
        revoke_node(pki, "h7")


def test_sign_and_verify(pki: Path) -> None:
    ident = NodeIdentity.load(pki / "h1")
    sig = sign_bytes(ident.key_pem, b"ledger entry")
    verify_signature(ident.cert_pem, b"ledger entry", sig)
    with pytest.raises(PKIError, match="does not verify"):
        verify_signature(ident.cert_pem, b"ledger entrY", sig)
    with pytest.raises(PKIError, match="does not verify"):
        verify_signature((pki / "h2" / "node.pem").read_bytes(), b"ledger entry", sig)


def test_invalid_names(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="node id"):
        init_consortium("demo", ["ok", "Bad_Name"], tmp_path / "x")
    with pytest.raises(PKIError, match="duplicate"):
        init_consortium("demo", ["a", "a"], tmp_path / "x")
    with pytest.raises(PKIError, match="consortium"):
        init_consortium("no dots.", ["a"], tmp_path / "x")


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "pki"
    res = runner.invoke(app, ["init", "--consortium", "demo", "--nodes", "h1,h2", "--out", str(out),
                              "--base-port", "51000", "--days", "10"])
    assert res.exit_code == 0, res.output
    assert load_roster(out / "roster.toml").nodes["h2"].address == "127.0.0.1:51001"
    res = runner.invoke(app, ["issue", "--pki", str(out), "--node", "h3", "--address", "127.0.0.1:51002"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["revoke", "--pki", str(out), "--node", "h2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["show", "--pki", str(out)])
    assert res.exit_code == 0, res.output
    assert "h3" in res.output and "revoked" in res.output
    res = runner.invoke(app, ["revoke", "--pki", str(out), "--node", "zz"])
    assert res.exit_code == 2
    assert "not in the roster" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["issue", "--pki", str(out), "--node", "h4", "--address", "nowhere"])
    assert res.exit_code == 2 and "address" in res.output


def test_cli_init_writes_the_consortium_policy(tmp_path: Path) -> None:
    """`pki init --max-epsilon/--min-noise-multiplier/--delta` is the roster's [policy], which nodes and
    audits enforce; without them the command says the roster has none."""
    runner = CliRunner()
    res = runner.invoke(app, ["init", "--consortium", "demo", "--nodes", "h1,h2", "--out", str(tmp_path / "a"),
                              "--max-epsilon", "3", "--min-noise-multiplier", "0.8", "--delta", "1e-5"])
    assert res.exit_code == 0, res.output
    pol = load_roster(tmp_path / "a" / "roster.toml").policy
    assert (pol.max_epsilon, pol.min_noise_multiplier, pol.delta) == (3.0, 0.8, 1e-5)
    assert "no [policy]" not in res.output
    res = runner.invoke(app, ["init", "--consortium", "demo", "--nodes", "h1", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "the roster has no [policy]" in res.output
    res = runner.invoke(app, ["init", "--consortium", "demo", "--nodes", "h1", "--out", str(tmp_path / "c"),
                              "--delta", "2"])
    assert res.exit_code == 2 and "--delta: expected a positive number below 1" in res.output
    assert not (tmp_path / "c").exists()
