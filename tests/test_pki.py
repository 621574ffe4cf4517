"""The transport keys ``fedrwe pki`` makes: formats flwr loads, permissions, no overwrite."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from shared.errors import SettingsError
from shared.pki import init_network, init_site_key, issue_server_cert

FEDRWE = [sys.executable, "-m", "flows.cli"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(cert_path: Path, ca_path: Path, host: str) -> None:
    """Verify a server certificate for ``host`` against the CA, as a TLS client would."""
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        name: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        name = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(cert, [])


def test_network_keys_have_owner_only_private_files_and_a_manifest(tmp_path: Path) -> None:
    pki = init_network(tmp_path / "pki", host="127.0.0.1", sites=["site_01", "site_02"])
    for private in (pki.ca_key, pki.server_key, *(s.private_key for s in pki.sites.values())):
        assert _mode(private) == 0o600, private
    for public in (pki.ca_cert, pki.server_cert, *(s.public_key for s in pki.sites.values())):
        assert _mode(public) == 0o644, public
    assert pki.manifest is not None
    manifest = json.loads(pki.manifest.read_text())
    assert manifest["hosts"] == ["127.0.0.1"]
    assert set(manifest["sites"]) == {"site_01", "site_02"}
    assert manifest["keep_private"] == ["ca.key", "superlink.key"]
    assert "BEGIN" not in pki.manifest.read_text()  # fingerprints, never key material


def test_the_server_certificate_is_valid_for_its_host_only(tmp_path: Path) -> None:
    pki = init_network(tmp_path / "pki", host="superlink.example.org", extra_hosts=["10.1.2.3"])
    _verify(pki.server_cert, pki.ca_cert, "superlink.example.org")
    _verify(pki.server_cert, pki.ca_cert, "10.1.2.3")
    with pytest.raises(VerificationError):
        _verify(pki.server_cert, pki.ca_cert, "127.0.0.1")
    other = init_network(tmp_path / "other", host="superlink.example.org")
    with pytest.raises(VerificationError):  # another federation's CA does not vouch for it
        _verify(pki.server_cert, other.ca_cert, "superlink.example.org")


def test_site_keys_load_with_the_loaders_flwr_uses(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    files = init_site_key(tmp_path / "keys", "site_07")
    assert try_load_public_key(files.public_key)  # `flwr supernode register` accepts it
    private = serialization.load_ssh_private_key(files.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)  # flower-supernode's loader
    assert isinstance(private.curve, ec.SECP384R1)
    public = serialization.load_ssh_public_key(files.public_key.read_bytes())
    assert public == private.public_key()
    assert _mode(files.private_key) == 0o600
    manifest = json.loads((tmp_path / "keys" / "site_07.manifest.json").read_text())
    assert manifest["send_to_operator"] == ["site_07.pub"]


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    pki = init_network(tmp_path, host="127.0.0.1")
    before = pki.ca_key.read_bytes()
    with pytest.raises(SettingsError, match=r"ca\.key.*--force"):
        init_network(tmp_path, host="127.0.0.1")
    assert pki.ca_key.read_bytes() == before
    init_site_key(tmp_path / "s", "site_01")
    with pytest.raises(SettingsError, match=r"site_01\.key"):
        init_site_key(tmp_path / "s", "site_01")
    init_network(tmp_path, host="127.0.0.1", force=True)
    assert pki.ca_key.read_bytes() != before


def test_a_reissued_server_certificate_chains_to_the_same_ca(tmp_path: Path) -> None:
    pki = init_network(tmp_path, host="127.0.0.1")
    issue_server_cert(pki.ca_cert, pki.ca_key, ["superlink.moved.example"],
                      tmp_path / "new.pem", tmp_path / "new.key")
    _verify(tmp_path / "new.pem", pki.ca_cert, "superlink.moved.example")
    assert _mode(tmp_path / "new.key") == 0o600


def test_a_site_id_that_is_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"'\.\./x'"):
        init_site_key(tmp_path, "../x")
    assert not (tmp_path.parent / "x.key").exists()


def test_the_pki_commands(tmp_path: Path) -> None:
    done = subprocess.run([*FEDRWE, "pki", "init", "--out", str(tmp_path / "op"), "--host", "127.0.0.1",
                           "--sites", "site_01,site_02"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "op" / "sites" / "site_02.pub").exists()
    again = subprocess.run([*FEDRWE, "pki", "init", "--out", str(tmp_path / "op")],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "--force" in " ".join(again.stderr.split())
    site = subprocess.run([*FEDRWE, "pki", "site-key", "--out", str(tmp_path / "s"), "--site", "site_03"],
                          capture_output=True, text=True, check=False)
    assert site.returncode == 0, site.stderr
    assert _mode(tmp_path / "s" / "site_03.key") == 0o600
    reissue = subprocess.run([*FEDRWE, "pki", "server-cert", "--pki", str(tmp_path / "op"), "--host",
                              "superlink.moved.example", "--force"], capture_output=True, text=True, check=False)
    assert reissue.returncode == 0, reissue.stderr
    _verify(tmp_path / "op" / "superlink.pem", tmp_path / "op" / "ca.pem", "superlink.moved.example")
