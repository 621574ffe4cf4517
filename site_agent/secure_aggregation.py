"""The site's half of secure aggregation: its run keys, the checks on a masked round, the masking.

A study with ``secure_aggregation: true`` releases the site's public key for the run in
the summary round (``KEY_TASK``); every later round that evaluates a model names all
sites' keys (``secure_aggregation_peers``), and the site sends the model tasks as masked
vectors (shared/privacy/masked_tasks.py), after the disclosure guard checked the plain
values. The private key lives in this process's memory only, for one run.

Refused (the whole reply), because each would let a curious coordinator unmask one site:
a model task without masking in a study (or at a site) that requires it; a masked round
with fewer than two sites; a key list that does not hold this site's own key, or that
changes within a run (a subset of sites); a second, different request under a round name
already answered (the same masks over other values reveal their difference); and a
site's own fit (``local_fit``), which is a per-site value.

A coordinator could still put keys of its own in place of the other sites' keys and unmask
one site. Against that, a site's steward lists the network's sites and their Ed25519 identity
keys (``roster``): each site signs its run key with its identity key (``identity``), and a
site with a roster refuses a key list holding a site it does not know or a signature that
does not verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.errors import DisclosureRefused, SettingsError
from shared.privacy.masked_tasks import MASKED_FIELDS, mask_task
from shared.privacy.secure_sum import (
    MIN_SITES,
    MaskContext,
    announcement_bytes,
    new_private_key,
    public_key_text,
)
from shared.protocol.messages import RoundRequest
from shared.protocol.model import StudyProtocol
from site_agent.analyses.release import Release
from site_agent.settings import DisclosurePolicy, SecureAggregationSettings

MODEL_TASKS = frozenset(MASKED_FIELDS)
_MAX_RUNS = 64  # runs whose keys a site keeps at once; the oldest is forgotten first


def _run_key(request: RoundRequest) -> str:
    return f"{request.run_id}/{request.comparison or ''}"


class SecureAggregation:
    """One site's secure-aggregation state: a key pair, the pinned key list and the used rounds per run."""

    def __init__(
        self, site_id: str, identity: Ed25519PrivateKey | None = None,
        roster: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self.site_id = site_id
        self.identity = identity
        self.roster = dict(roster) if roster is not None else None
        self._keys: dict[str, X25519PrivateKey] = {}
        self._peers: dict[str, dict[str, dict[str, str]]] = {}
        self._rounds: dict[str, dict[str, str]] = {}

    def key_release(self, request: RoundRequest) -> Release:
        """The site's public key for this run (created on first use)."""
        run = _run_key(request)
        if run not in self._keys:
            if len(self._keys) >= _MAX_RUNS:
                oldest = next(iter(self._keys))
                self._keys.pop(oldest)
                self._peers.pop(oldest, None)
                self._rounds.pop(oldest, None)
            self._keys[run] = new_private_key()
        public_key = public_key_text(self._keys[run])
        values = {"public_key": public_key}
        if self.identity is not None:
            signed = announcement_bytes(request.run_id, request.comparison, self.site_id, public_key)
            values["signature"] = base64.b64encode(self.identity.sign(signed)).decode()
        return Release(values)

    def _refuse(self, request: RoundRequest, why: str, fix: str) -> DisclosureRefused:
        return DisclosureRefused(
            f"site {self.site_id!r} refused round {request.round_name!r}: {why}. Fix: {fix}."
        )

    def check(self, request: RoundRequest, protocol: StudyProtocol, policy: DisclosurePolicy) -> None:
        """Refuse a round that would release a model task unmasked or unmaskable; nothing is computed before."""
        model_tasks = sorted(set(request.tasks) & MODEL_TASKS)
        peers = request.secure_aggregation_peers
        if peers is None:
            if model_tasks and (protocol.secure_aggregation or policy.require_secure_aggregation):
                by = "the study's protocol" if protocol.secure_aggregation else "this site's policy"
                raise self._refuse(
                    request, f"{by} requires secure aggregation, yet {model_tasks} were asked unmasked",
                    "run the study with secure_aggregation: true, from a coordinator that masks model rounds",
                )
            return
        if model_tasks:
            self._check_masked(request, peers, model_tasks)

    def _check_masked(self, request: RoundRequest, peers: dict[str, dict[str, str]], model_tasks: list[str]) -> None:
        run = _run_key(request)
        key = self._keys.get(run)
        if key is None:
            raise self._refuse(
                request, f"it holds no secure-aggregation key for run {request.run_id} (keys live in "
                f"memory for one run and are announced in its summary round)", "rerun the study",
            )
        if len(peers) < MIN_SITES:
            raise self._refuse(
                request, f"a masked sum over {len(peers)} site(s) would reveal this site's values",
                f"run the study with at least {MIN_SITES} sites",
            )
        if peers.get(self.site_id, {}).get("public_key") != public_key_text(key):
            raise self._refuse(request, "the key list does not hold this site's own key for the run", "rerun the study")
        self._check_signatures(request, peers)
        pinned = self._peers.setdefault(run, dict(peers))
        if pinned != peers:
            raise self._refuse(
                request, f"the key list changed within the run (sites {sorted(pinned)} became {sorted(peers)})",
                "a site lost mid-fit means a new run with new keys: rerun the study without it",
            )
        with_local_fit = [task for task in model_tasks if request.tasks[task].get("local_fit")]
        if with_local_fit:
            raise self._refuse(
                request, f"{with_local_fit} ask for this site's own fit, a per-site value that secure "
                f"aggregation does not release", "ask for derivatives only",
            )
        digest = hashlib.sha256(request.to_bytes()).hexdigest()
        used = self._rounds.setdefault(run, {})
        if used.setdefault(request.round_name, digest) != digest:
            raise self._refuse(
                request, "this round name was already answered with other inputs (its masks are one-time)",
                "give every round of a run its own name",
            )

    def _check_signatures(self, request: RoundRequest, peers: dict[str, dict[str, str]]) -> None:
        """With a roster: every other site is known and signed its run key with its identity key."""
        if self.roster is None:
            return
        for peer_id, announced in sorted(peers.items()):
            if peer_id == self.site_id:
                continue
            identity = self.roster.get(peer_id)
            if identity is None:
                raise self._refuse(
                    request, f"site {peer_id!r} in the key list is not in this site's roster of peers",
                    "add the site's identity key to secure_aggregation.peers in site.toml, if it belongs to the network",
                )
            signed = announcement_bytes(request.run_id, request.comparison, peer_id, announced.get("public_key", ""))
            try:
                identity.verify(base64.b64decode(announced.get("signature", ""), validate=True), signed)
            except (InvalidSignature, binascii.Error, ValueError):
                raise self._refuse(
                    request, f"the run key of site {peer_id!r} is not signed by that site's identity key",
                    "rerun the study; if it repeats, the coordinator is altering keys",
                ) from None

    def protect(self, request: RoundRequest, values: dict[str, Any]) -> dict[str, Any]:
        """The released values with every model task masked (unchanged in an unmasked round)."""
        peers = request.secure_aggregation_peers
        if peers is None or not set(values) & MODEL_TASKS:
            return values
        key = self._keys[_run_key(request)]  # present: check() refused the round otherwise
        protected = dict(values)
        for task in sorted(set(values) & MODEL_TASKS):
            if "withheld" in values[task]:
                continue  # the site refused to evaluate the model: nothing to mask
            context = MaskContext(request.run_id, request.round_name, task)
            public_keys = {peer_id: announced["public_key"] for peer_id, announced in peers.items()}
            protected[task] = mask_task(task, values[task], self.site_id, key, public_keys, context)
        return protected


def from_settings(site_id: str, settings: SecureAggregationSettings) -> SecureAggregation:
    """The site's secure-aggregation state with its identity key and roster from site.toml."""
    identity = None
    if settings.identity_key is not None:
        try:
            loaded = serialization.load_pem_private_key(settings.identity_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise SettingsError(
                f"site {site_id!r}: secure_aggregation.identity_key {settings.identity_key} cannot be read as "
                f"an unencrypted PEM private key ({error}). Fix: point it at the site's Ed25519 key file."
            ) from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise SettingsError(
                f"site {site_id!r}: secure_aggregation.identity_key {settings.identity_key} holds a "
                f"{type(loaded).__name__}, not an Ed25519 key. Fix: generate an Ed25519 key."
            )
        identity = loaded
    roster = None
    if settings.peers is not None:
        roster = {peer_id: _identity_key(site_id, peer_id, text) for peer_id, text in settings.peers.items()}
    return SecureAggregation(site_id, identity, roster)


def _identity_key(site_id: str, peer_id: str, text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise SettingsError(
            f"site {site_id!r}: secure_aggregation.peers[{peer_id!r}] = {text!r} is not a base64 raw "
            f"Ed25519 public key (32 bytes). Fix: copy the key that site's steward published."
        ) from None
