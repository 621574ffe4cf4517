"""Which sites take part in a comparison, which dropped out and why, and the quorum.

A site drops out of a round when it cannot be reached (no reply after the round's
retries, or the transport's ``unavailable`` reply) or when it answers with an error or a
refusal. What happens next depends on how far the comparison got:

- in its first round nothing central has been computed yet, so the comparison simply goes
  on with the sites that answered;
- later, an iterative fit holds sums over the sites it started with (a Newton step with a
  site missing half-way would be wrong), so the comparison restarts from its first round
  on the remaining sites, under a new attempt run id (sites' caches and secure-aggregation
  keys are per run id).

Either way the protocol's ``quorum`` must still hold, or the comparison fails with the
dropped sites and their reasons. A site that could not be reached stays out for the rest
of the run (waiting for it again would cost each later round its timeout: flows/rounds.py
leaves its node out); a site that answered with an error or refusal is asked again in the next
comparison, whose question differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import InsufficientSites
from shared.protocol.model import Quorum

UNAVAILABLE = "unavailable"  # the status of a site that could not be reached


@dataclass(frozen=True)
class Dropout:
    """One site leaving one comparison: where, and the reason it gave (or its transport's)."""

    site_id: str
    comparison: str | None
    round_name: str
    status: str  # "unavailable", "error" or "refused"
    reason: str

    def as_json(self) -> dict[str, Any]:
        """The dropout as results.json lists it."""
        return asdict(self)


@dataclass
class Participation:
    """Dropouts over a whole study run, and the protocol's quorum check."""

    study_id: str
    quorum: Quorum
    dropouts: list[Dropout] = field(default_factory=list)

    def drop(self, comparison: str | None, round_name: str, failed: dict[str, tuple[str, str]]) -> None:
        """Record ``failed`` (site id -> (status, reason)) as dropouts of ``comparison``."""
        for site_id, (status, reason) in sorted(failed.items()):
            self.dropouts.append(Dropout(site_id, comparison, round_name, status, reason))

    def of(self, comparison: str | None) -> list[dict[str, Any]]:
        """The dropouts of one comparison, as results.json lists them."""
        return [d.as_json() for d in self.dropouts if d.comparison == comparison]

    def check(self, comparison: str | None, remaining: list[str]) -> None:
        """Fail the comparison unless ``remaining`` satisfies the quorum.

        Raises:
            InsufficientSites: names the quorum, the remaining sites, every dropout of the
                comparison with its reason, and the fix.
        """
        missing = sorted(set(self.quorum.required_sites) - set(remaining))
        need = max(self.quorum.min_sites, len(self.quorum.required_sites))
        if not missing and len(remaining) >= need and remaining:
            return
        what = f"comparison {comparison!r} of study {self.study_id!r}" if comparison else f"study {self.study_id!r}"
        short = (f"required site(s) {missing} are not among them" if missing
                 else f"{len(remaining)} site(s) remain ({remaining}) and the quorum needs {need}")
        dropped = "; ".join(f"{d.site_id} at {d.round_name} ({d.status}: {d.reason})"
                            for d in self.dropouts if d.comparison == comparison) or "none"
        raise InsufficientSites(
            f"{what}: the quorum (min_sites {self.quorum.min_sites}, required_sites "
            f"{self.quorum.required_sites}) no longer holds: {short}. Dropped: {dropped}. Fix: bring the "
            f"dropped sites back (their reasons above) and resume or rerun the study, or relax `quorum` "
            f"in the protocol (a new protocol hash, which the sites approve again)."
        )


def attempt_run_id(run_id: str, comparison: str | None, attempt: int) -> str:
    """The run id of a comparison's ``attempt`` (the study's own for the first attempt).

    Derived, not random, so a resumed run rebuilds the very requests it journaled.
    """
    if attempt == 1:
        return run_id
    return hashlib.sha256(f"{run_id}/{comparison or ''}/attempt-{attempt}".encode()).hexdigest()[:32]
