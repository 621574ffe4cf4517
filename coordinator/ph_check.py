"""Central half of the proportional-hazards check: HRs in follow-up windows and a test of their equality.

Follow-up is split at the protocol's cut days. Each window gets its own log HR (a
descriptive table), and the p-value comes from the score test at the common estimate
(shared/stats/stratified_cox.py: model-based for unweighted fits, robust for weighted
ones). For matching, the set-stratified window fits are independent and a Wald test of
their equality is used. With event tables the whole check is central; without, the
sites send their window scores and meat at the common estimate.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any

import numpy as np

from shared.errors import ConvergenceError
from shared.stats.cox import EventTable
from shared.stats.matched_cox import Configuration, fit_matched_cox
from shared.stats.stratified_cox import (
    WeightSquares,
    equality_test,
    fit_stratified_cox,
    ph_score_test,
    stratum_derivatives,
    window_meat,
)

_NOT_SPLIT = {"method": "none: the time at risk is too short to split"}


def windows_of(cuts: list[int]) -> list[tuple[float, float]]:
    """``[(0, c1), (c1, c2), ..., (ck, inf)]``: event days ``start <= day < end``."""
    return list(pairwise([0.0, *map(float, cuts), float("inf")]))


def _window_rows(cuts: list[int], log_hrs: list[float], ses: list[float]) -> list[dict[str, Any]]:
    return [
        {"start_day": int(a), "end_day": None if b == float("inf") else int(b), "hr": float(np.exp(h)),
         "log_hr": h, "se_log_hr": s}
        for (a, b), h, s in zip(windows_of(cuts), log_hrs, ses, strict=True)
    ]


def _score_method(weighted: bool) -> str:
    return ("score test at the common estimate, " + ("robust (weights as fixed)" if weighted else "model-based"))


def from_tables(
    tables: list[EventTable], squares: list[WeightSquares] | None, log_hr: float, cuts: list[int]
) -> dict[str, Any]:
    """Window HRs and the score test, from the sites' (weighted) event tables."""
    if not cuts:
        return dict(_NOT_SPLIT)
    windows = windows_of(cuts)
    try:
        fits = [fit_stratified_cox(tables, squares, w, what=f"the Cox model in days {w[0]:g}-{w[1]:g}") for w in windows]
        rows: list[dict[str, Any]] | None = _window_rows(cuts, [f.log_hr for f in fits], [f.se for f in fits])
    except ConvergenceError:
        rows = None  # a window without events in an arm: no HR there, the test still runs
    scores = sum(np.array([stratum_derivatives(t, log_hr, w)[1:] for w in windows]) for t in tables)
    meat = None if squares is None else sum(
        window_meat(t, s, log_hr, list(windows)) for t, s in zip(tables, squares, strict=True)
    )
    return from_scores(np.asarray(scores), None if meat is None else np.asarray(meat), cuts, rows)


def from_scores(
    windows: np.ndarray, meat: np.ndarray | None, cuts: list[int], rows: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The score test from summed per-window (score, information) and, when weighted, meat."""
    if not cuts:
        return dict(_NOT_SPLIT)
    statistic, df, p_value = ph_score_test(windows[:, 0], windows[:, 1], meat)
    check: dict[str, Any] = {
        "method": "log HR per follow-up window; " + _score_method(meat is not None), "cut_days": cuts,
        "statistic": statistic, "df": df, "p_value": p_value,
    }
    if rows is not None:
        check["windows"] = rows
    return check


def matched(configurations: Counter[Configuration], cuts: list[int]) -> dict[str, Any]:
    """Window HRs from the set-stratified model and the Wald test of their equality."""
    if not cuts:
        return dict(_NOT_SPLIT)
    try:
        fits = [fit_matched_cox(configurations, window) for window in range(len(cuts) + 1)]
    except ConvergenceError as error:
        return {"method": "log HR per follow-up window, stratified by matched set", "cut_days": cuts, "error": str(error)}
    log_hrs, ses = [f.log_hr for f in fits], [f.se for f in fits]
    statistic, df, p_value = equality_test(log_hrs, ses)
    return {
        "method": "log HR per follow-up window, stratified by matched set; Wald test of their equality",
        "cut_days": cuts, "windows": _window_rows(cuts, log_hrs, ses),
        "statistic": statistic, "df": df, "p_value": p_value,
    }

