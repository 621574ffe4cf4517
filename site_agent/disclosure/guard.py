"""The disclosure guard: the single exit of every reply a site sends.

Like a Flower mod, it wraps the handler. Every count a release rests on is checked
against the site's own policy (never the request's). A count between 1 and
``min_cell_count - 1``, under ``below_minimum = "refuse"``, refuses the whole reply, naming the
count but not its value; under ``"suppress"`` the value (or, when the partial did not say where
the count sits, its whole task or part) is replaced by a marker naming it. Either way nothing
about a handful of patients leaves; the value is kept in the site's own release log. With
``dp_noise`` the counts that have a place in the reply get Laplace noise, labelled in the reply.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import DataError, DisclosureRefused
from site_agent.analyses.release import Release
from site_agent.settings import DisclosurePolicy

Handler = Callable[[], dict[str, Release]]
DISCLOSURE_KEY = "disclosure"
"""Reserved key of a reply's results: what the guard suppressed or noised (names, never values)."""


def small_counts(release: Release, policy: DisclosurePolicy) -> dict[str, int]:
    """The release's counts from 1 to ``min_cell_count - 1``."""
    return {name: n for name, n in release.counts.items() if 0 < n < policy.min_cell_count}


def _refusal(task: str, small: Mapping[str, int], policy: DisclosurePolicy, site_id: str, verb: str) -> DisclosureRefused:
    names = ", ".join(sorted(small))  # the names only: the small values never leave
    return DisclosureRefused(
        f"site {site_id!r} {verb} {task!r}: {names} below the site's minimum cell count "
        f"{policy.min_cell_count}. Fix: widen the cohort or drop the analysis; the threshold "
        f"is the site's policy and cannot be lowered by a request.",
        counts=dict(small),
    )


def check_release(task: str, release: Release, policy: DisclosurePolicy, site_id: str) -> None:
    """Raise :class:`DisclosureRefused` when a count is below the site's minimum cell count."""
    small = small_counts(release, policy)
    if small:
        raise _refusal(task, small, policy, site_id, "refused")


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
    """What passed the guard, per task; the small counts withheld or suppressed (for the
    site's log only); the names of suppressed counts and of noised counts (sent)."""

    values: dict[str, Any]
    withheld: dict[str, int] = field(default_factory=dict)
    suppressed: list[str] = field(default_factory=list)
    noised: list[str] = field(default_factory=list)


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


def _set(values: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    target: Any = values
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _get(values: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    target: Any = values
    for key in path:
        target = target[key]
    return target


def _hidden(values: dict[str, Any], path: tuple[str | int, ...]) -> bool:
    """True when ``path`` or a container on the way to it was blanked."""
    target: Any = values
    for key in path:
        if target is None:
            return True
        target = target[key]
    return target is None


@dataclass
class _Exit:
    """One reply's way through the guard."""

    policy: DisclosurePolicy
    site_id: str
    rng: np.random.Generator | None
    outcome: Guarded

    def released(self, task: str, release: Release) -> dict[str, Any]:
        if release.withheld is not None:
            self.outcome.withheld[task] = 0  # refused to compute: nothing was computed, so no count to keep
            return {"withheld": release.withheld}
        small = small_counts(release, self.policy)
        if small and self.policy.below_minimum == "refuse":
            raise _refusal(task, small, self.policy, self.site_id, "refused")
        where = _non_finite(release.values, task)
        if where is not None:
            raise DataError(
                f"site {self.site_id!r}: {where} is not a finite number, so it is not sent. Fix: check "
                f"the cohort's counts for that analysis (e.g. an arm without events)."
            )
        values = copy.deepcopy(release.values) if small or self.policy.dp_noise else release.values
        if small:
            marker = self._suppress(task, release, small, values)
            if marker is not None:
                return marker
        self._noise(task, release, small, values)
        if not release.parts:
            return values
        parts: dict[str, Any] = {}
        for name, part in release.parts.items():
            try:
                parts[name] = self.released(f"{task}.{name}", part)
            except DisclosureRefused as refusal:
                self.outcome.withheld.update({f"{task}.{name}.{k}": v for k, v in refusal.counts.items()})
                parts[name] = {"withheld": str(refusal)}
        return {**values, "parts": parts}

    def _suppress(self, task: str, release: Release, small: dict[str, int], values: dict[str, Any]) -> dict[str, Any] | None:
        """Blank the small counts in place, or return the marker that replaces the whole task."""
        names = sorted(f"{task}.{name}" for name in small)
        self.outcome.withheld.update({f"{task}.{name}": n for name, n in small.items()})
        self.outcome.suppressed.extend(names)
        if all(name in release.paths for name in small):
            hidden = [release.hides.get(name, release.paths[name]) for name in small]
            for path in sorted(hidden, key=len, reverse=True):  # inner cells first
                _set(values, path, None)
            return None
        return {
            "withheld": str(_refusal(task, small, self.policy, self.site_id, "suppressed")),
            "suppressed": names,
        }

    def _noise(self, task: str, release: Release, small: dict[str, int], values: dict[str, Any]) -> None:
        """Laplace noise (scale 1/epsilon, rounded, not below 0) on every count with a place."""
        if self.policy.dp_noise is None or self.rng is None:
            return
        scale = 1.0 / self.policy.dp_noise.epsilon
        for name, path in sorted(release.paths.items()):
            if name in small or _hidden(values, path):
                continue
            current = _get(values, path)
            if not isinstance(current, int) or isinstance(current, bool):
                continue
            _set(values, path, max(0, round(current + float(self.rng.laplace(0.0, scale)))))
            self.outcome.noised.append(f"{task}.{name}")


def guarded(
    handler: Handler, policy: DisclosurePolicy, site_id: str, rng: np.random.Generator | None = None,
) -> Guarded:
    """Run ``handler`` and return only releases that pass the policy (and hold finite numbers).

    A small count in a task refuses the whole reply (``below_minimum = "refuse"``) or is
    suppressed; in a separable part of a task it withholds that part alone. With the policy's
    ``dp_noise``, ``rng`` draws the noise (a site passes a generator seeded from the OS).
    """
    outcome = Guarded({})
    exit_ = _Exit(policy, site_id, rng, outcome)
    outcome.values = {task: exit_.released(task, release) for task, release in handler().items()}
    label: dict[str, Any] = {}
    if outcome.suppressed:
        label["suppressed"] = sorted(outcome.suppressed)
    if outcome.noised and policy.dp_noise is not None:
        label["noise"] = {
            "mechanism": "laplace", "epsilon": policy.dp_noise.epsilon,
            "counts": sorted(outcome.noised), "note": "these counts are noisy; estimates using them are approximate",
        }
    if label:
        outcome.values[DISCLOSURE_KEY] = label
    return outcome
