"""Kaplan-Meier curves and the log-rank test from event tables summed over sites.

Each site reduces its rows to an :class:`~shared.stats.cox.EventTable` (events and exits
per day and arm). Tables on different day grids merge exactly (:func:`merge_event_tables`),
and the pooled table gives the pooled Kaplan-Meier estimate and log-rank statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from shared.errors import ConvergenceError
from shared.stats.cox import EventTable

FloatArray = NDArray[np.float64]


def merge_event_tables(tables: list[EventTable]) -> EventTable:
    """The pooled table: counts summed day by day over the union of the days."""
    days = np.unique(np.concatenate([t.time for t in tables]))
    dtype = np.result_type(*(t.events for t in tables), *(t.exits for t in tables))  # float when weighted
    events = np.zeros((2, len(days)), dtype=dtype)
    exits = np.zeros((2, len(days)), dtype=dtype)
    for table in tables:
        position = np.searchsorted(days, table.time)
        events[:, position] += table.events
        exits[:, position] += table.exits
    return EventTable(days, events, exits)


@dataclass(frozen=True)
class KaplanMeier:
    """Survival per event day for one arm, with a pointwise 95% CI (log-log Greenwood)."""

    time: NDArray[np.int64]
    at_risk: NDArray[np.int64]
    events: NDArray[np.int64]
    survival: FloatArray
    ci_low: FloatArray
    ci_high: FloatArray
    greenwood: FloatArray  # cumulative sum of d / (n (n - d)); Var S = S^2 x this

    def _index(self, day: float) -> int:
        return int(np.searchsorted(self.time, day, side="right")) - 1

    def survival_at(self, day: float) -> float:
        """S(day): the estimate at the last event day on or before ``day``."""
        index = self._index(day)
        return 1.0 if index < 0 else float(self.survival[index])

    def at(self, day: float) -> tuple[float, float, float, float]:
        """S(day), its Greenwood variance and the pointwise CI at ``day``."""
        index = self._index(day)
        if index < 0:
            return 1.0, 0.0, 1.0, 1.0
        s = float(self.survival[index])
        return s, s * s * float(self.greenwood[index]), float(self.ci_low[index]), float(self.ci_high[index])


def kaplan_meier(table: EventTable, arm: int, level: float = 0.95) -> KaplanMeier:
    """Kaplan-Meier estimate of one arm on the days where that arm has events."""
    at_risk_all = table.at_risk[arm]
    has_event = table.events[arm] > 0
    n = at_risk_all[has_event].astype(np.float64)
    d = table.events[arm][has_event].astype(np.float64)
    survival = np.cumprod(1.0 - d / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(d / (n * (n - d)))
        z = stats.norm.ppf(0.5 + level / 2.0)
        log_survival = np.log(survival)
        half_width = z * np.sqrt(greenwood) / np.abs(log_survival)
        low = np.exp(-np.exp(np.log(-log_survival) + half_width))
        high = np.exp(-np.exp(np.log(-log_survival) - half_width))
    defined = (survival > 0) & (survival < 1)
    return KaplanMeier(
        table.time[has_event], at_risk_all[has_event], table.events[arm][has_event], survival,
        np.where(defined, low, survival), np.where(defined, high, survival), greenwood,
    )


@dataclass(frozen=True)
class LogRank:
    """Observed and expected events in the exposed arm, the chi-square statistic and p."""

    observed: float
    expected: float
    variance: float
    statistic: float
    p_value: float


def logrank_test(table: EventTable) -> LogRank:
    """Two-arm log-rank test (hypergeometric variance) from a pooled event table."""
    n = table.at_risk.sum(axis=0).astype(np.float64)
    n1 = table.at_risk[1].astype(np.float64)
    d = table.events.sum(axis=0).astype(np.float64)
    used = d > 0
    n, n1, d = n[used], n1[used], d[used]
    expected = float(np.sum(d * n1 / n))
    with np.errstate(divide="ignore", invalid="ignore"):
        variance_terms = np.where(n > 1, d * (n1 / n) * (1.0 - n1 / n) * (n - d) / (n - 1.0), 0.0)
    variance = float(np.sum(variance_terms))
    observed = float(table.events[1][used].sum())
    if not variance > 0:
        raise ConvergenceError(
            "the log-rank test is undefined: no event day has persons at risk in both arms. "
            "Fix: check that both arms have follow-up and events."
        )
    statistic = (observed - expected) ** 2 / variance
    return LogRank(observed, expected, variance, statistic, float(stats.chi2.sf(statistic, 1)))
