"""Key material of a simulated network: one coordinator key, one key per site, two keyrings.

    <folder>/coordinator.pem           the coordinator's private key (signs requests)
    <folder>/coordinator.keyring.json  the coordinator's public key: what every site trusts
    <folder>/<site_id>.pem             a site's private key (signs its replies)
    <folder>/sites.keyring.json        every site's public key: what the coordinator trusts

A real network makes the same files with ``fedrwe keys new`` / ``fedrwe keys trust`` and
exchanges only the public keyrings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.crypto import Keyring, generate_key, save_private_key


@dataclass(frozen=True)
class NetworkKeys:
    """Where a simulated network's keys are."""

    folder: Path

    @property
    def coordinator_key(self) -> Path:
        """The coordinator's private key."""
        return self.folder / "coordinator.pem"

    @property
    def coordinator_keyring(self) -> Path:
        """The keyring every site trusts (the coordinator's public key)."""
        return self.folder / "coordinator.keyring.json"

    @property
    def site_keyring(self) -> Path:
        """The keyring the coordinator trusts (every site's public key)."""
        return self.folder / "sites.keyring.json"

    def site_key(self, site_id: str) -> Path:
        """A site's private key."""
        return self.folder / f"{site_id}.pem"

    def site_settings(self, site_id: str) -> dict[str, str]:
        """A site's ``[envelopes]`` settings."""
        return {"coordinator_keyring": str(self.coordinator_keyring), "site_key": str(self.site_key(site_id))}

    def run_config(self) -> dict[str, str]:
        """The study run config entries that make the coordinator sign and verify."""
        return {"signing-key": str(self.coordinator_key), "site-keyring": str(self.site_keyring)}


def make_network_keys(folder: Path, site_ids: Iterable[str]) -> NetworkKeys:
    """Fresh keys for the coordinator and each site, and both keyrings, in ``folder``."""
    keys = NetworkKeys(folder.resolve())
    coordinator = generate_key()
    save_private_key(coordinator, keys.coordinator_key)
    trusted_by_sites = Keyring()
    trusted_by_sites.add("coordinator", coordinator.public_key())
    trusted_by_sites.save(keys.coordinator_keyring)
    sites = Keyring()
    for site_id in site_ids:
        key = generate_key()
        save_private_key(key, keys.site_key(site_id))
        sites.add(site_id, key.public_key())
    sites.save(keys.site_keyring)
    return keys
