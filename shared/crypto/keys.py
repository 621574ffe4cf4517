"""Ed25519 keys and keyrings: who may sign, and until when.

A private key is an unencrypted PKCS#8 PEM file readable only by its owner (mode 0600).
A keyring is a JSON file of public keys, each with its owner (``"coordinator"`` or a
site id) and an optional retirement time::

    {"keyring_version": 1, "keys": [{"owner": "coordinator", "key_id": "9f2c...",
      "public_key": "-----BEGIN PUBLIC KEY-----...", "retires_at": null}]}

Rotation: add the new key, give the old one a ``retires_at`` (ISO 8601 with a zone);
messages signed by the old key are accepted until then and refused after.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import SettingsError

KEYRING_VERSION = 1


def generate_key() -> Ed25519PrivateKey:
    """A new random Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: the first 16 hex digits of the SHA-256 of its raw public bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write ``key`` as PKCS#8 PEM, readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a private key written by ``save_private_key``; errors name the file and the fix."""
    fix = "Fix: point the setting at the PEM file made by `fedrwe keys new`."
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as error:
        raise SettingsError(f"cannot read signing key {path}: {error.strerror}. {fix}") from None
    except (ValueError, TypeError):
        raise SettingsError(f"signing key {path} is not an unencrypted PEM private key. {fix}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError(f"signing key {path} is a {type(key).__name__}, not Ed25519. {fix}")
    return key


@dataclass(frozen=True)
class KeyringEntry:
    """One trusted public key: whose it is and until when it may sign (epoch seconds)."""

    owner: str
    public_key: Ed25519PublicKey
    retires_at: float | None = None

    @property
    def key_id(self) -> str:
        """The key's id (see ``key_id``)."""
        return key_id(self.public_key)

    def valid_at(self, now: float) -> bool:
        """Whether a message checked at ``now`` may be signed by this key."""
        return self.retires_at is None or now < self.retires_at


class Keyring:
    """Trusted public keys by key id."""

    def __init__(self, entries: list[KeyringEntry] | None = None) -> None:
        self._entries: dict[str, KeyringEntry] = {}
        for entry in entries or []:
            self._entries[entry.key_id] = entry

    def add(self, owner: str, public_key: Ed25519PublicKey, retires_at: float | None = None) -> KeyringEntry:
        """Trust ``public_key`` for ``owner`` (until ``retires_at``, if given); replaces its old entry."""
        entry = KeyringEntry(owner, public_key, retires_at)
        self._entries[entry.key_id] = entry
        return entry

    def retire(self, key: str, at: float) -> None:
        """Accept messages signed by key ``key`` only until ``at`` (epoch seconds)."""
        entry = self._entries[key]
        self._entries[key] = KeyringEntry(entry.owner, entry.public_key, at)

    def valid_key(self, key: str, now: float) -> KeyringEntry | None:
        """The entry of key ``key`` if it is known and not retired at ``now``, else None."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry.valid_at(now) else None

    def entries(self) -> list[KeyringEntry]:
        """Every entry, retired ones too, in insertion order."""
        return list(self._entries.values())

    def save(self, path: Path) -> None:
        """Write the keyring as JSON (public keys only)."""
        keys = [
            {
                "owner": e.owner,
                "key_id": e.key_id,
                "public_key": e.public_key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode(),
                "retires_at": None if e.retires_at is None
                else datetime.fromtimestamp(e.retires_at, UTC).isoformat(),
            }
            for e in self._entries.values()
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"keyring_version": KEYRING_VERSION, "keys": keys}, indent=2)
        path.write_text(text + "\n", encoding="utf-8")


def load_keyring(path: Path) -> Keyring:
    """Read a keyring file; errors name the file, the entry and the fix."""
    fix = "Fix: rebuild it with `fedrwe keys trust` or correct the entry."
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError(f"cannot read keyring {path}: {error.strerror}. {fix}") from None
    except json.JSONDecodeError as error:
        raise SettingsError(f"keyring {path} is not JSON: {error}. {fix}") from None
    if not isinstance(data, dict) or data.get("keyring_version") != KEYRING_VERSION:
        raise SettingsError(f"keyring {path} lacks `keyring_version`: {KEYRING_VERSION}. {fix}")
    return Keyring([_entry(item, path, i, fix) for i, item in enumerate(data.get("keys") or [])])


def _entry(item: object, path: Path, index: int, fix: str) -> KeyringEntry:
    where = f"keyring {path}, key #{index + 1}"
    if not isinstance(item, dict) or not isinstance(item.get("owner"), str):
        raise SettingsError(f"{where} has no `owner`. {fix}")
    try:
        public = serialization.load_pem_public_key(str(item.get("public_key", "")).encode())
    except ValueError:
        raise SettingsError(f"{where} ({item['owner']}): `public_key` is not a PEM public key. {fix}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SettingsError(f"{where} ({item['owner']}): `public_key` is not Ed25519. {fix}")
    if item.get("key_id") not in (None, key_id(public)):
        raise SettingsError(
            f"{where} ({item['owner']}): `key_id` {item['key_id']!r} does not match its public key "
            f"({key_id(public)}). {fix}"
        )
    retires = item.get("retires_at")
    try:
        when = None if retires is None else datetime.fromisoformat(str(retires))
    except ValueError:
        raise SettingsError(f"{where} ({item['owner']}): `retires_at` {retires!r} is not ISO 8601. {fix}") from None
    if when is not None and when.tzinfo is None:
        raise SettingsError(f"{where} ({item['owner']}): `retires_at` {retires!r} needs a zone, e.g. +00:00. {fix}")
    return KeyringEntry(item["owner"], public, None if when is None else when.timestamp())
