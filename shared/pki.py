"""Transport keys of a federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

Who makes what (see docs/privacy.md, "Transport"):

- the network operator (who runs the SuperLink) runs ``fedrwe pki init``: a private CA
  (``ca.key`` stays with the operator, ``ca.pem`` goes to every site and every study
  lead), and the SuperLink's server certificate ``superlink.pem`` / ``superlink.key``
  for its host name or IP address, signed by that CA;
- each site runs ``fedrwe pki site-key``: an EC P-384 key pair for SuperNode
  authentication, in the OpenSSH format flwr 1.42 reads (``flower-supernode
  --auth-supernode-private-key`` loads the private key, ``flwr supernode register`` the
  public key). Only ``<site>.pub`` leaves the site; the operator registers it.

Private keys are written with mode 0600 and never overwritten unless ``force`` is set,
so re-running a command cannot silently replace a key another machine already trusts.
Every command also writes a JSON manifest of the files it made, their roles and the
certificates' fingerprints and validity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import SettingsError

CA_DAYS = 5 * 365
SERVER_DAYS = 365
CURVE = ec.SECP384R1  # a NIST curve, as `flwr supernode register` requires
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "manifest.json"
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class SiteKeyFiles:
    """One site's SuperNode authentication key pair (OpenSSH format)."""

    site_id: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class NetworkPki:
    """The files of ``fedrwe pki init``: where each one is, for the processes' flags."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    host: str
    sites: dict[str, SiteKeyFiles] = field(default_factory=dict)
    manifest: Path | None = None


# ---------------------------------------------------------------- writing files


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600, even under a lax umask)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    """Raise if any key file already exists and ``force`` is not set."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise SettingsError(
            f"key files already exist: {', '.join(existing)}. Replacing them would break every "
            "machine that trusts them. Fix: choose another --out folder, or pass --force to "
            "replace them (then redistribute ca.pem / re-register the site keys)."
        )


def _check_site_id(site_id: str) -> str:
    if not SITE_ID.match(site_id):
        raise SettingsError(
            f"site id {site_id!r} cannot name a key file. Fix: use letters, digits, '_', '.' "
            "or '-' (at most 64 characters), e.g. site_01."
        )
    return site_id


# ---------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrwe federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for a name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(clock: Clock = _utcnow) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE())
    now = clock()
    name = _name("fedrwe federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    hosts: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    clock: Clock = _utcnow,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (IP or DNS SANs), signed by the CA."""
    if not hosts:
        raise SettingsError("the SuperLink certificate needs a host. Fix: pass --host 127.0.0.1 (or its DNS name).")
    key = ec.generate_private_key(CURVE())
    now = clock()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_server_cert(
    ca_cert: Path,
    ca_key: Path,
    hosts: Sequence[str],
    cert_out: Path,
    key_out: Path,
    *,
    force: bool = False,
    clock: Clock = _utcnow,
) -> x509.Certificate:
    """Sign a new SuperLink certificate with an existing CA (host moved, or expiry near).

    The sites keep trusting the same ``ca.pem``; only the SuperLink's files change.
    """
    _refuse_overwrite([cert_out, key_out], force)
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise SettingsError(f"{ca_key} is not an EC private key. Fix: use the ca.key made by `fedrwe pki init`.")
    key, cert = make_server_cert(hosts, signer, ca, clock)
    _write_private(key_out, _pem_key(key))
    _write_public(cert_out, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def _cert_entry(path: Path, cert: x509.Certificate) -> dict[str, object]:
    return {
        "path": path.name,
        "subject": cert.subject.rfc4514_string(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


# ---------------------------------------------------------------- site keys


def write_site_key(out: Path, site_id: str, *, force: bool = False) -> SiteKeyFiles:
    """Make one site's SuperNode key pair in ``out``: ``<site>.key`` (0600) and ``<site>.pub``.

    Both are OpenSSH-format EC P-384 keys: the formats ``flower-supernode
    --auth-supernode-private-key`` and ``flwr supernode register`` load.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = SiteKeyFiles(_check_site_id(site_id), out / f"{site_id}.key", out / f"{site_id}.pub")
    _refuse_overwrite([files.private_key, files.public_key], force)
    key = ec.generate_private_key(CURVE())
    _write_private(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_public(files.public_key, public + f" fedrwe-{site_id}\n".encode())
    return files


def site_key_entry(files: SiteKeyFiles, out: Path) -> dict[str, str]:
    """The manifest entry of a site key: file names and the public key's fingerprint."""
    public = serialization.load_ssh_public_key(files.public_key.read_bytes())
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return {
        "private_key": str(files.private_key.relative_to(out)),
        "public_key": str(files.public_key.relative_to(out)),
        "public_key_sha256": digest.finalize().hex(),
    }


def init_site_key(out: Path, site_id: str, *, force: bool = False) -> SiteKeyFiles:
    """``fedrwe pki site-key``: a site makes its own key pair and a manifest beside it."""
    out = out.resolve()
    files = write_site_key(out, site_id, force=force)
    manifest = {
        "kind": "fedrwe site key",
        "created": _utcnow().isoformat(),
        "site": {site_id: site_key_entry(files, out)},
        "send_to_operator": [files.public_key.name],
        "keep_private": [files.private_key.name],
    }
    (out / f"{site_id}.manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return files


# ---------------------------------------------------------------- the whole network


def init_network(
    out: Path,
    *,
    host: str = "127.0.0.1",
    extra_hosts: Sequence[str] = (),
    sites: Sequence[str] = (),
    force: bool = False,
    clock: Clock = _utcnow,
) -> NetworkPki:
    """``fedrwe pki init``: CA, SuperLink certificate for ``host`` and optional site keys.

    The site keys (``sites/<site>.key|.pub``) are for a simulated or test network where
    one operator plays every site; a real site makes its own with ``init_site_key``.
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pki = NetworkPki(
        out=out, ca_cert=out / "ca.pem", ca_key=out / "ca.key",
        server_cert=out / "superlink.pem", server_key=out / "superlink.key", host=host,
    )
    site_ids = [_check_site_id(s) for s in sites]
    planned = [pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key]
    planned += [out / "sites" / f"{s}.{ext}" for s in site_ids for ext in ("key", "pub")]
    _refuse_overwrite(planned, force)
    ca_key, ca_cert = make_ca(clock)
    server_key, server_cert = make_server_cert([host, *extra_hosts], ca_key, ca_cert, clock)
    _write_private(pki.ca_key, _pem_key(ca_key))
    _write_public(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.server_key, _pem_key(server_key))
    _write_public(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for site_id in site_ids:
        pki.sites[site_id] = write_site_key(out / "sites", site_id, force=force)
    manifest = {
        "kind": "fedrwe network pki",
        "created": clock().isoformat(),
        "host": host,
        "hosts": [host, *extra_hosts],
        "ca": {**_cert_entry(pki.ca_cert, ca_cert), "key": pki.ca_key.name},
        "superlink": {**_cert_entry(pki.server_cert, server_cert), "key": pki.server_key.name},
        "sites": {s: site_key_entry(f, out) for s, f in pki.sites.items()},
        "keep_private": [pki.ca_key.name, pki.server_key.name],
        "distribute": {"ca.pem": "every site (SuperNode --root-certificates) and study lead (flwr CLI)"},
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return NetworkPki(**{**pki.__dict__, "manifest": path})
