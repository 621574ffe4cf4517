"""The disclosure guard: the single exit of every reply a site sends.

Like a Flower mod, it wraps the handler. Every count a release rests on is checked
against the site's own policy (never the request's): a count between 1 and
``min_cell_count - 1`` refuses the whole reply, naming the count but not its value, so nothing
about a handful of patients leaves; the value is kept in the site's own release log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import DataError, DisclosureRefused
from site_agent.analyses.release import Release
from site_agent.settings import DisclosurePolicy

Handler = Callable[[], dict[str, Release]]


def check_release(task: str, release: Release, policy: DisclosurePolicy, site_id: str) -> None:
    """Raise :class:`DisclosureRefused` when a count is below the site's minimum cell count."""
    small = {name: n for name, n in release.counts.items() if 0 < n < policy.min_cell_count}
    if small:
        names = ", ".join(sorted(small))  # the names only: the small values never leave
        raise DisclosureRefused(
            f"site {site_id!r} refused {task!r}: {names} below the site's minimum cell count "
            f"{policy.min_cell_count}. Fix: widen the cohort or drop the analysis; the threshold "
            f"is the site's policy and cannot be lowered by a request.",
            counts=small,
        )


def _non_finite(value: object, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items: list[tuple[str, object]] = [(f"{where}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((found for path, item in items if (found := _non_finite(item, path))), None)


@dataclass
class Guarded:
    """What passed the guard, per task, and the small counts withheld (for the site's log only)."""

    values: dict[str, Any]
    withheld: dict[str, int] = field(default_factory=dict)


WITHHOLDABLE = frozenset({"crude_cox", "propensity", "adjusted", "weighted_cox"})
"""Model tasks a site may refuse alone; the reply's other tasks (counts, other fits) still go."""


def compute_tasks(partials: Mapping[str, Callable[[dict[str, Any]], Release]], tasks: dict[str, dict[str, Any]]) -> dict[str, Release]:
    """Run each requested partial; a model task the site refuses to evaluate is withheld alone."""
    releases: dict[str, Release] = {}
    for name, params in tasks.items():
        try:
            releases[name] = partials[name](params)
        except DisclosureRefused as refusal:
            if name not in WITHHOLDABLE:
                raise
            releases[name] = Release({}, withheld=str(refusal))
    return releases


def _released(task: str, release: Release, policy: DisclosurePolicy, site_id: str, withheld: dict[str, int]) -> dict[str, Any]:
    if release.withheld is not None:
        withheld[task] = 0  # refused to compute: nothing was computed, so no count to keep
        return {"withheld": release.withheld}
    check_release(task, release, policy, site_id)
    where = _non_finite(release.values, task)
    if where is not None:
        raise DataError(
            f"site {site_id!r}: {where} is not a finite number, so it is not sent. Fix: check "
            f"the cohort's counts for that analysis (e.g. an arm without events)."
        )
    if not release.parts:
        return release.values
    parts: dict[str, Any] = {}
    for name, part in release.parts.items():
        try:
            parts[name] = _released(f"{task}.{name}", part, policy, site_id, withheld)
        except DisclosureRefused as refusal:
            withheld.update({f"{task}.{name}.{k}": v for k, v in refusal.counts.items()})
            parts[name] = {"withheld": str(refusal)}
    return {**release.values, "parts": parts}


def guarded(handler: Handler, policy: DisclosurePolicy, site_id: str) -> Guarded:
    """Run ``handler`` and return only releases that pass the policy (and hold finite numbers).

    A small count in a task refuses the whole reply; in a separable part of a task it
    withholds that part alone.
    """
    withheld: dict[str, int] = {}
    values = {task: _released(task, release, policy, site_id, withheld) for task, release in handler().items()}
    return Guarded(values, withheld)
