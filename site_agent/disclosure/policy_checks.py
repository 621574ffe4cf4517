"""Checks of the site policy that sit before any computation or release.

Each raises :class:`DisclosureRefused` with a named reason and never a patient-level value:
tasks outside ``allowed_analyses``, a cohort below ``min_cohort_size``, a model with too many
parameters for the site's persons (``max_parameters_per_patients``), and a binary covariate
level held by fewer than ``min_cell_count`` persons at the site. Thresholds come from the
site's policy, never from a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from shared.errors import DisclosureRefused
from site_agent.analyses.release import Release
from site_agent.settings import DisclosurePolicy

TASK_ANALYSES: dict[str, tuple[str, ...]] = {
    "crude_cox": ("crude",),
    "propensity": ("propensity",),
    "adjusted": ("matched", "iptw_ate", "iptw_att", "overlap"),
    "weighted_cox": ("matched", "iptw_ate", "iptw_att", "overlap"),
    "large_scale_concepts": ("large_scale",),
}
"""The analyses each model task serves; the summary tasks (counts, provenance) serve all."""


def refused_task(task: str, policy: DisclosurePolicy, site_id: str) -> str | None:
    """Why ``task`` is not run under the site's ``allowed_analyses`` (None when it may run).

    A task serving several analyses runs when any of them is allowed; its parts for the
    others are withheld by :func:`restrict_parts`.
    """
    served = TASK_ANALYSES.get(task)
    if served is None or any(name in policy.allowed_analyses for name in served):
        return None
    return (
        f"site {site_id!r} does not run task {task!r}: its analyses {list(served)} are not in the "
        f"site's allowed_analyses {list(policy.allowed_analyses)}. Fix: drop the analysis from the "
        f"protocol, or ask the site's data steward to allow it."
    )


def restrict_parts(release: Release, policy: DisclosurePolicy, site_id: str) -> Release:
    """``release`` with each part for an analysis outside ``allowed_analyses`` withheld.

    The ``crude`` part of the adjusted task belongs to the crude analysis.
    """
    parts: dict[str, Release] = {}
    for name, part in release.parts.items():
        if name in set(policy.allowed_analyses):
            parts[name] = part
        else:
            parts[name] = Release({}, withheld=(
                f"site {site_id!r} does not run analysis {name!r}: not in the site's allowed_analyses "
                f"{list(policy.allowed_analyses)}. Fix: ask the site's data steward to allow it."
            ))
    return replace(release, parts=parts)


def check_cohort_size(n_persons: int, policy: DisclosurePolicy, site_id: str, study_id: str) -> None:
    """Refuse the whole study at this site when its cohort is below the site's minimum."""
    minimum = policy.cohort_minimum()
    if n_persons < minimum:
        raise DisclosureRefused(
            f"site {site_id!r} refused study {study_id!r}: its cohort at this site is below the site's "
            f"min_cohort_size {minimum}, so nothing about it is computed. Fix: run the study without "
            f"this site, or widen the cohort."
        )


def _binary(column: NDArray[np.float64]) -> bool:
    return bool(np.all((column == 0.0) | (column == 1.0)))


def check_design(
    task: str, design: NDArray[np.float64], names: Sequence[str], policy: DisclosurePolicy, site_id: str,
) -> None:
    """Refuse to evaluate a model on ``design`` (intercept first) that says too much per person.

    It needs at least ``p * max_parameters_per_patients`` persons for ``p`` parameters, and
    each level of each 0/1 column present in 0 or at least ``min_cell_count`` persons: the
    gradient and Hessian at any point carry those per-level counts. Names the covariate, never
    its count.
    """
    n_persons, width = design.shape
    needed = width * policy.max_parameters_per_patients
    if n_persons < needed:
        raise DisclosureRefused(
            f"site {site_id!r} refused {task!r}: a model with {width} parameters needs at least "
            f"{needed:g} persons at the site (max_parameters_per_patients "
            f"{policy.max_parameters_per_patients:g}), and this cohort has fewer. Fix: use fewer "
            f"covariates (or fewer large-scale concepts), or run without this site."
        )
    rare = []
    for j in range(1, width):
        column = design[:, j]
        if not _binary(column):
            continue
        ones = int(column.sum())
        if 0 < ones < policy.min_cell_count or 0 < n_persons - ones < policy.min_cell_count:
            rare.append(names[j] if j < len(names) else f"column {j}")
    if rare:
        raise DisclosureRefused(
            f"site {site_id!r} refused {task!r}: covariate(s) {rare} have a level held by fewer persons "
            f"than the site's minimum cell count {policy.min_cell_count}. Fix: drop or merge the "
            f"covariate(s) in the protocol, or run without this site."
        )
