"""Cox model stratified by matched set, from counts of risk-set configurations.

OHDSI's CohortMethod fits matched cohorts with a Cox model conditioned on the matched
set (``fitOutcomeModel(stratified = TRUE)``), the variance that respects the pairs. Each
set is a stratum; at each of its event days the set contributes one Breslow term that
depends only on how many exposed and comparator members are still at risk (``n1``,
``n0``) and how many of each have the event that day (``d1``, ``d0``). A site therefore
reduces its matched sets to counts of ``(n1, n0, d1, d0)`` configurations, and the
coordinator fits the pooled stratified model from the summed counts - no event day and
no row leaves. Configurations are also kept per follow-up window for the PH check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.errors import ConvergenceError
from shared.stats.newton import maximize_1d

Configuration = tuple[int, int, int, int, int]  # (window, n1, n0, d1, d0)


def risk_set_configurations(
    set_id: NDArray[np.int64],
    treatment: NDArray[np.int64],
    time: NDArray[np.int64],
    event: NDArray[np.int64],
    cuts: Sequence[float] | None = None,
) -> Counter[Configuration]:
    """One site's counts of ``(window, n1, n0, d1, d0)`` over its sets' event days.

    ``window`` is the index of the follow-up window (between ``cuts``) of the event day;
    0 for every day when there are no cuts. Terms where one arm has nobody at risk carry
    no information and are left out.
    """
    order = np.lexsort((time, set_id))
    sets, arm, days, status = set_id[order], treatment[order], time[order], event[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, sets[1:] != sets[:-1]])
    size = np.diff(np.r_[starts, len(sets)])
    first_of_row = np.repeat(starts, size)
    # One term per (set, event day): rows are sorted by set then day, so repeats are adjacent.
    event_rows = np.flatnonzero(status)
    if event_rows.size == 0:
        return Counter()
    first = np.r_[True, (sets[event_rows][1:] != sets[event_rows][:-1]) | (days[event_rows][1:] != days[event_rows][:-1])]
    counts: Counter[Configuration] = Counter()
    edges = np.asarray([0.0, *(cuts or [])])
    for row in event_rows[first]:
        day, start = days[row], int(first_of_row[row])
        members = slice(start, start + int(size[np.searchsorted(starts, start)]))
        member_days, member_arm, member_status = days[members], arm[members], status[members]
        at_risk = member_days >= day
        n1, n0 = int(np.sum(at_risk & (member_arm == 1))), int(np.sum(at_risk & (member_arm == 0)))
        if n1 == 0 or n0 == 0:
            continue
        dies = member_status & (member_days == day)
        d1, d0 = int(np.sum(dies & (member_arm == 1))), int(np.sum(dies & (member_arm == 0)))
        window = int(np.searchsorted(edges, day, side="right")) - 1
        counts[(window, n1, n0, d1, d0)] += 1
    return counts


def configurations_to_json(counts: Counter[Configuration]) -> list[list[int]]:
    """Sorted ``[window, n1, n0, d1, d0, count]`` rows (a stable, JSON-friendly form)."""
    return [[*key, count] for key, count in sorted(counts.items())]


def configurations_from_json(rows: list[list[int]]) -> Counter[Configuration]:
    """Inverse of :func:`configurations_to_json`; sums repeated keys (e.g. from several sites)."""
    counts: Counter[Configuration] = Counter()
    for *key, count in rows:
        window, n1, n0, d1, d0 = (int(k) for k in key)
        counts[(window, n1, n0, d1, d0)] += int(count)
    return counts


@dataclass(frozen=True)
class MatchedCoxFit:
    """Log HR conditional on the matched set, its SE (inverse information) and the loglik."""

    log_hr: float
    se: float
    loglik: float
    iterations: int


def fit_matched_cox(
    counts: Counter[Configuration], window: int | None = None, tolerance: float = 1e-12, max_iter: int = 100
) -> MatchedCoxFit:
    """Newton-Raphson on the set-stratified Breslow likelihood (``window``: one window only)."""
    rows = np.array([(c, *key) for key, c in counts.items() if window is None or key[0] == window], dtype=np.float64)
    if len(rows) == 0 and not counts:
        raise ConvergenceError(
            "the matched Cox model has no finite estimate: no matched set has an event while both "
            "arms are at risk (e.g. the caliper matches nobody). Fix: widen the caliper or check the cohort."
        )
    if len(rows) == 0 or rows[:, 4].dot(rows[:, 0]) == 0 or rows[:, 5].dot(rows[:, 0]) == 0:
        raise ConvergenceError(
            "the matched Cox model has no finite estimate: within the matched sets one arm has no "
            "event while both arms are at risk. Fix: lengthen the time at risk or widen the caliper."
        )
    count, n1, n0, d1, d0 = rows[:, 0], rows[:, 2], rows[:, 3], rows[:, 4], rows[:, 5]
    deaths = d1 + d0

    def derivatives(beta: float) -> tuple[float, float, float]:
        s0 = n0 + n1 * np.exp(beta)
        share = n1 * np.exp(beta) / s0
        loglik = float(np.sum(count * (d1 * beta - deaths * np.log(s0))))
        return loglik, float(np.sum(count * (d1 - deaths * share))), float(np.sum(count * deaths * share * (1 - share)))

    beta, iterations = maximize_1d(derivatives, "the matched Cox model", tolerance, max_iter)
    loglik, _, information = derivatives(beta)
    return MatchedCoxFit(beta, float(np.sqrt(1.0 / information)), loglik, iterations)
