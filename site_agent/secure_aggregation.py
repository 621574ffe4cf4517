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
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.errors import DisclosureRefused
from shared.privacy.masked_tasks import MASKED_FIELDS, mask_task
from shared.privacy.secure_sum import MIN_SITES, MaskContext, new_private_key, public_key_text
from shared.protocol.messages import RoundRequest
from shared.protocol.model import StudyProtocol
from site_agent.analyses.release import Release
from site_agent.settings import DisclosurePolicy

MODEL_TASKS = frozenset(MASKED_FIELDS)
_MAX_RUNS = 64  # runs whose keys a site keeps at once; the oldest is forgotten first


def _run_key(request: RoundRequest) -> str:
    return f"{request.run_id}/{request.comparison or ''}"


class SecureAggregation:
    """One site's secure-aggregation state: a key pair, the pinned key list and the used rounds per run."""

    def __init__(self, site_id: str) -> None:
        self.site_id = site_id
        self._keys: dict[str, X25519PrivateKey] = {}
        self._peers: dict[str, dict[str, str]] = {}
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
        return Release({"public_key": public_key_text(self._keys[run])})

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

    def _check_masked(self, request: RoundRequest, peers: dict[str, str], model_tasks: list[str]) -> None:
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
        if peers.get(self.site_id) != public_key_text(key):
            raise self._refuse(request, "the key list does not hold this site's own key for the run", "rerun the study")
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
            protected[task] = mask_task(task, values[task], self.site_id, key, peers, context)
        return protected
