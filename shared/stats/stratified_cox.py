"""Site-stratified Cox model with a binary treatment, fitted centrally from event tables.

With one binary covariate, a stratum's (weighted) :class:`~shared.stats.cox.EventTable`
is a sufficient statistic for the Breslow partial likelihood, so the coordinator fits
the model on the sites' tables without another exchange. For weighted fits the site also
sends the sums of squared weights per day, arm and status (:class:`WeightSquares`): a
row's score residual depends only on its arm, exit day and status, so the robust
sandwich meat ``sum_i w_i^2 U_i^2`` (Lin & Wei 1989; R's ``coxph(..., robust = TRUE)``)
is exact from those sums.

The proportional-hazards check fits one log HR per window of follow-up (``days`` in
:func:`fit_stratified_cox`); the partial likelihood factorises over event days, so the
window fits are independent and a Wald test of their equality is the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from shared.errors import ConvergenceError
from shared.stats.cox import EventTable
from shared.stats.newton import maximize_1d

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class WeightSquares:
    """Per day and arm (as the event table): sums of squared weights of events and of censored exits."""

    events: FloatArray  # shape (2, len(time))
    censored: FloatArray  # shape (2, len(time))


@dataclass(frozen=True)
class WeightedTable:
    """A stratum's (weighted) event table and its squared-weight sums, as a site releases them."""

    table: EventTable
    squares: WeightSquares

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.table.time.tolist(), "events": self.table.events.tolist(), "exits": self.table.exits.tolist(),
            "events_sq": self.squares.events.tolist(), "censored_sq": self.squares.censored.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> WeightedTable:
        arrays = {k: np.asarray(data[k], dtype=np.float64).reshape(2, -1) for k in
                  ("events", "exits", "events_sq", "censored_sq")}
        time = np.asarray(data["time"])  # days (ints) from sites; any ordered numbers work
        return cls(
            EventTable(time, arrays["events"], arrays["exits"]),  # type: ignore[arg-type]
            WeightSquares(arrays["events_sq"], arrays["censored_sq"]),
        )


def weighted_event_table(
    time: NDArray[np.generic], treatment: NDArray[np.generic], event: NDArray[np.generic], weight: FloatArray
) -> WeightedTable:
    """Weighted events and exits per day and arm, and squared-weight sums, of the rows with w > 0."""
    keep = weight > 0
    t, arm = np.asarray(time)[keep], np.asarray(treatment)[keep].astype(np.int64)
    d, w = np.asarray(event)[keep].astype(np.float64), weight[keep]
    days = np.unique(t)
    position = np.searchsorted(days, t)
    sums = {name: np.zeros((2, len(days))) for name in ("events", "exits", "events_sq", "censored_sq")}
    np.add.at(sums["events"], (arm, position), w * d)
    np.add.at(sums["exits"], (arm, position), w)
    np.add.at(sums["events_sq"], (arm, position), w * w * d)
    np.add.at(sums["censored_sq"], (arm, position), w * w * (1.0 - d))
    return WeightedTable(
        EventTable(days, sums["events"], sums["exits"]),  # type: ignore[arg-type]
        WeightSquares(sums["events_sq"], sums["censored_sq"]),
    )


def merge_weighted(tables: list[WeightedTable]) -> WeightedTable:
    """All strata summed day by day: one stratum, as if the rows were pooled."""
    days = np.unique(np.concatenate([t.table.time for t in tables]))
    sums = [np.zeros((2, len(days))) for _ in range(4)]
    for t in tables:
        position = np.searchsorted(days, t.table.time)
        for total, part in zip(sums, (t.table.events, t.table.exits, t.squares.events, t.squares.censored), strict=True):
            total[:, position] += np.asarray(part, dtype=np.float64)
    return WeightedTable(EventTable(days, sums[0], sums[1]), WeightSquares(sums[2], sums[3]))  # type: ignore[arg-type]


def _event_day_mask(table: EventTable, days: tuple[float, float] | None) -> NDArray[np.bool_]:
    has_event = table.events.sum(axis=0) > 0
    if days is None:
        return np.asarray(has_event)
    return np.asarray(has_event & (table.time >= days[0]) & (table.time < days[1]))


def _share(table: EventTable, beta: float, mask: NDArray[np.bool_]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """At the masked event days: events (all arms), exposed share of the risk, and S0."""
    at_risk = table.at_risk.astype(np.float64)[:, mask]
    s0 = at_risk[0] + at_risk[1] * np.exp(beta)
    return table.events.sum(axis=0).astype(np.float64)[mask], at_risk[1] * np.exp(beta) / s0, s0


def stratum_derivatives(table: EventTable, beta: float, days: tuple[float, float] | None = None) -> FloatArray:
    """(log partial likelihood, score, information) of one stratum at ``beta``."""
    mask = _event_day_mask(table, days)
    deaths, share, s0 = _share(table, beta, mask)
    exposed_deaths = table.events[1].astype(np.float64)[mask]
    return np.array([
        float(np.sum(exposed_deaths * beta - deaths * np.log(s0))),
        float(np.sum(exposed_deaths - deaths * share)),
        float(np.sum(deaths * share * (1.0 - share))),
    ])


def _residuals(table: EventTable, beta: float, days: tuple[float, float] | None) -> list[tuple[FloatArray, FloatArray]]:
    """Per arm, the score residual of a row exiting on each day with an event, and without one."""
    mask = _event_day_mask(table, days)
    deaths_all, share_all, s0_all = np.zeros(len(table.time)), np.zeros(len(table.time)), np.ones(len(table.time))
    deaths_all[mask], share_all[mask], s0_all[mask] = _share(table, beta, mask)
    hazard = np.where(mask, deaths_all / s0_all, 0.0)  # Breslow increments of the baseline
    residuals = []
    for arm in (0, 1):
        # Compensator up to and including each day: risk of the row times its centred covariate.
        compensator = np.cumsum((arm - share_all) * np.exp(beta * arm) * hazard)
        residuals.append((np.where(mask, arm - share_all, 0.0) - compensator, -compensator))
    return residuals


def window_meat(
    table: EventTable, squares: WeightSquares, beta: float, windows: list[tuple[float, float] | None]
) -> FloatArray:
    """``sum_i w_i^2 U_i U_i'`` for one stratum, ``U_i`` the row's score residuals per window."""
    per_window = [_residuals(table, beta, days) for days in windows]
    meat = np.zeros((len(windows), len(windows)))
    for arm in (0, 1):
        on_event = np.stack([window[arm][0] for window in per_window])
        censored = np.stack([window[arm][1] for window in per_window])
        meat += (on_event * squares.events[arm]) @ on_event.T + (censored * squares.censored[arm]) @ censored.T
    return meat


def stratum_meat(
    table: EventTable, squares: WeightSquares, beta: float, days: tuple[float, float] | None = None
) -> float:
    """``sum_i w_i^2 U_i^2`` for one stratum, U_i the row's score residual at ``beta``."""
    return float(window_meat(table, squares, beta, [days])[0, 0])


def ph_score_test(score: FloatArray, information: FloatArray, meat: FloatArray | None = None) -> tuple[float, int, float]:
    """Score test that the log HR is the same in every window, at the common estimate.

    ``score`` and ``information`` are per window at the common estimate (the scores sum
    to 0 there). Model-based: ``sum_k U_k^2 / I_k`` (the information is block-diagonal
    over windows). Robust (``meat``: the sum over rows of ``w^2 U U'``): the scores'
    sandwich covariance with the common estimate's own error projected out, so weighted
    fits get a test that treats the weights as fixed, not as frequencies.
    """
    df = len(score) - 1
    if meat is None:
        statistic = float(np.sum(score**2 / information))
    else:
        projection = np.eye(len(score)) - np.outer(information, np.ones(len(score))) / information.sum()
        covariance = projection @ meat @ projection.T
        statistic = float(score @ np.linalg.pinv(covariance, rcond=1e-10, hermitian=True) @ score)
    return statistic, df, float(stats.chi2.sf(statistic, df))


@dataclass(frozen=True)
class StratifiedCoxFit:
    """Log HR, its model-based and (when weighted) robust SE, and the fit's bookkeeping."""

    log_hr: float
    se_model: float
    se_robust: float | None
    loglik: float
    iterations: int

    @property
    def se(self) -> float:
        """The SE to report: robust when the fit is weighted."""
        return self.se_model if self.se_robust is None else self.se_robust


def fit_stratified_cox(
    tables: list[EventTable],
    squares: list[WeightSquares] | None = None,
    days: tuple[float, float] | None = None,
    tolerance: float = 1e-12,
    max_iter: int = 100,
    what: str = "the Cox model",
) -> StratifiedCoxFit:
    """Newton-Raphson over the strata's summed derivatives (all central, no exchanges)."""
    def totals(b: float) -> tuple[float, float, float]:
        loglik, score, information = sum((stratum_derivatives(t, b, days) for t in tables), np.zeros(3))
        return float(loglik), float(score), float(information)

    events = [float(t.events[arm][_event_day_mask(t, days)].sum()) for t in tables for arm in (0, 1)]
    exposed_events, comparator_events = sum(events[1::2]), sum(events[0::2])
    if exposed_events == 0 or comparator_events == 0:
        raise ConvergenceError(
            f"{what} has no finite estimate: {exposed_events:g} exposed and {comparator_events:g} "
            f"comparator events{'' if days is None else f' in days {days[0]:g}-{days[1]:g}'}. Fix: "
            f"lengthen the time at risk or widen the cohort; an arm without events has no hazard ratio."
        )
    beta, iterations = maximize_1d(totals, what, tolerance, max_iter)
    loglik, _, information = totals(beta)
    robust = None
    if squares is not None:
        meat = sum(stratum_meat(t, s, beta, days) for t, s in zip(tables, squares, strict=True))
        robust = float(np.sqrt(meat) / information)
    return StratifiedCoxFit(beta, float(np.sqrt(1.0 / information)), robust, float(loglik), iterations)


@dataclass(frozen=True)
class ProportionalHazardsCheck:
    """Log HR per window of follow-up and the Wald test that they are equal."""

    windows: list[tuple[float, float]]
    log_hr: list[float]
    se: list[float]
    statistic: float
    df: int
    p_value: float


def equality_test(log_hr: list[float], se: list[float]) -> tuple[float, int, float]:
    """Wald test that independent log HRs are equal: (chi-square, df, p)."""
    estimates, precision = np.asarray(log_hr), 1.0 / np.asarray(se) ** 2
    common = float(np.sum(precision * estimates) / np.sum(precision))
    statistic = float(np.sum(precision * (estimates - common) ** 2))
    df = len(estimates) - 1
    return statistic, df, float(stats.chi2.sf(statistic, df))


def ph_windows_check(
    tables: list[EventTable], squares: list[WeightSquares] | None, cuts: list[float]
) -> ProportionalHazardsCheck:
    """Fit the log HR in each window between ``cuts`` and test the windows' equality."""
    edges = [0.0, *cuts, float("inf")]
    windows = list(pairwise(edges))
    fits = [fit_stratified_cox(tables, squares, w, what=f"the Cox model in days {w[0]:g}-{w[1]:g}") for w in windows]
    log_hr, se = [f.log_hr for f in fits], [f.se for f in fits]
    return ProportionalHazardsCheck(windows, log_hr, se, *equality_test(log_hr, se))
