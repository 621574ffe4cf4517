"""Partial computation of the propensity-score analyses: matching, weighting, balance, tables.

One round, once the global propensity model has converged. With the model's coefficients,
the caliper (in logit units, from the coordinator's pooled moments) and the pooled share
of exposed rows, the site scores its rows, matches within itself, weights, and reduces
every analysis to aggregates: per-arm covariate moments (balance), a (weighted) event
table with the sums of squared weights (KM, log-rank, weighted Cox with robust variance),
and for matching the risk-set configurations of the matched sets (Cox stratified by set).
The coordinator's half is ``coordinator/adjusted.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit
from scipy.stats import rankdata

from shared.errors import ConvergenceError, ProtocolError
from shared.protocol.model import StudyProtocol
from shared.stats.balance import arm_moments
from shared.stats.cox import binary_cox_derivatives
from shared.stats.matched_cox import configurations_to_json, risk_set_configurations
from shared.stats.matching import greedy_match_sets
from shared.stats.stratified_cox import (
    fit_stratified_cox,
    stratum_derivatives,
    stratum_meat,
    weighted_event_table,
    window_meat,
)
from shared.stats.weights import propensity_weights
from site_agent.analyses.grid import coarsen_days
from site_agent.analyses.limits import check_coefficients
from site_agent.analyses.release import Release
from site_agent.analyses.rows import AnalysisRows

HISTOGRAM_BINS = 20  # propensity-score histogram per arm: bins of 0.05 on [0, 1]
_ESTIMAND = {"iptw_ate": "ate", "iptw_att": "att", "overlap": "overlap"}


def _arm_counts(rows: AnalysisRows, weight: NDArray[np.float64]) -> dict[str, list[float]]:
    keep = weight > 0
    arms = [keep & (rows.treatment == arm) for arm in (0, 1)]
    return {
        "n": [int(a.sum()) for a in arms],
        "events": [int(rows.event[a].sum()) for a in arms],
        "person_days": [int(rows.time[a].sum()) for a in arms],
        "weight": [float(weight[a].sum()) for a in arms],
        "weighted_events": [float((weight * rows.event)[a].sum()) for a in arms],
        "weighted_person_days": [float((weight * rows.time)[a].sum()) for a in arms],
    }


def _histogram(score: NDArray[np.float64], treatment: NDArray[np.float64], min_cell_count: int) -> dict[str, Any]:
    """Counts per bin and arm, small counts suppressed (None) so that none can be derived.

    A count from 1 to ``min_cell_count - 1`` is suppressed; since the arm's total is
    released elsewhere, further cells are suppressed (smallest first) until the suppressed
    cells of an arm hold at least ``min_cell_count`` persons together (or none).
    """
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    shown: list[list[int | None]] = []
    for arm in (0, 1):
        counts = np.histogram(score[treatment == arm], bins=edges)[0]
        hidden = (counts > 0) & (counts < min_cell_count)
        while 0 < counts[hidden].sum() < min_cell_count and (candidates := np.flatnonzero(~hidden & (counts > 0))).size:
            hidden[candidates[np.argmin(counts[candidates])]] = True
        shown.append([None if h else int(c) for c, h in zip(counts, hidden, strict=True)])
    return {"edges": edges.tolist(), "comparator": shown[0], "exposed": shown[1]}


def within_site_c_statistic(score: NDArray[np.float64], treatment: NDArray[np.float64]) -> dict[str, float]:
    """The site's own c-statistic (Mann-Whitney, ties one half) and its number of pairs."""
    exposed, comparator = int(treatment.sum()), int(len(treatment) - treatment.sum())
    if exposed == 0 or comparator == 0:
        return {"pairs": 0.0, "concordance": 0.0}
    ranks = rankdata(score)
    concordant = float(ranks[treatment == 1].sum()) - exposed * (exposed + 1) / 2.0
    return {"pairs": float(exposed) * comparator, "concordance": concordant}


def matched_weights(rows: AnalysisRows, logit: NDArray[np.float64], caliper: float, ratio: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Weight per row (exposed 1, comparator 1 / its set's size, unmatched 0) and set id (-1 unmatched)."""
    exposed = rows.treatment == 1
    sets = greedy_match_sets(
        rows.person_id[exposed], logit[exposed], rows.person_id[~exposed], logit[~exposed], caliper, ratio
    )
    row_of = {int(p): i for i, p in enumerate(rows.person_id)}
    weight = np.zeros(len(rows.person_id))
    set_id = np.full(len(rows.person_id), -1, dtype=np.int64)
    for person, controls in sets.items():
        weight[row_of[person]] = 1.0
        set_id[row_of[person]] = person
        for control in controls:
            weight[row_of[control]] = 1.0 / len(controls)
            set_id[row_of[control]] = person
    return weight, set_id


@dataclass(frozen=True)
class Scored:
    """The site's rows scored by the global propensity model, and each analysis's weights."""

    score: NDArray[np.float64]
    weights: dict[str, NDArray[np.float64]]
    set_id: NDArray[np.int64] | None  # matched set per row (-1 unmatched), when matching runs


def score_and_weight(rows: AnalysisRows, protocol: StudyProtocol, params: dict[str, Any], max_abs_coefficient: float) -> Scored:
    """Propensity scores at ``params['beta']``, matching within the site, and every analysis's weights."""
    beta = np.asarray(params["beta"], dtype=np.float64)
    if beta.shape != (rows.design.shape[1],):
        raise ProtocolError(
            f"adjusted round: beta has {beta.size} values but the design has {rows.design.shape[1]} "
            f"columns. Fix: run the same protocol and fedrwe version everywhere."
        )
    check_coefficients("propensity", beta, max_abs_coefficient)
    logit = rows.design @ beta
    score = expit(logit)
    weights = {"crude": np.ones(len(score))}
    set_id = None
    for name in protocol.adjusted_analyses():
        if name == "matched":
            weights[name], set_id = matched_weights(rows, logit, float(params["caliper"]), protocol.matching.ratio)
        else:
            weights[name] = propensity_weights(
                score, rows.treatment, _ESTIMAND[name],  # type: ignore[arg-type]
                stabilized=protocol.weighting.stabilized, exposed_share=float(params["exposed_share"]),
                trim=protocol.weighting.trim, truncate_at=protocol.weighting.truncate_at,
            )
    return Scored(score, weights, set_id)


def _counts(part: dict[str, Any]) -> dict[str, int]:
    return {f"{key}_{label}": part[key][arm] for key in ("n", "events") for arm, label in ((0, "comparator"), (1, "exposed"))}


def adjusted(
    rows: AnalysisRows, protocol: StudyProtocol, params: dict[str, Any], max_abs_coefficient: float,
    min_cell_count: int, event_tables: bool = True, grid_days: int = 1,
) -> Release:
    """Every propensity-score analysis of the protocol on this site's rows, as aggregates.

    Each analysis is a separable part of the release: if one has a count below the site's
    minimum, the guard withholds that analysis alone. Without ``event_tables`` (the site's
    policy keeps event days at the site) a part carries the site's own fit instead of its
    event table, and the weighted Cox models continue in ``weighted_cox`` rounds. The event
    tables and matched risk-set configurations carry follow-up times on the policy's grid
    (``grid_days``; site_agent/analyses/grid.py), person-days stay exact.
    """
    scored = score_and_weight(rows, protocol, params, max_abs_coefficient)
    time = coarsen_days(rows.time, grid_days)
    treatment = rows.treatment.astype(np.int64)
    values: dict[str, Any] = {
        "histogram": _histogram(scored.score, rows.treatment, min_cell_count),
        "c_statistic": within_site_c_statistic(scored.score, rows.treatment),
        "event_tables": event_tables,
    }
    parts: dict[str, Release] = {}
    for name, weight in scored.weights.items():
        part: dict[str, Any] = {
            **_arm_counts(rows, weight),
            "moments": arm_moments(rows.design[:, 1:], treatment, weight).to_json(),
        }
        if event_tables:
            part["table"] = weighted_event_table(time, rows.treatment, rows.event, weight).to_json()
        elif name != "matched":
            part["local_fit"] = local_fit(rows, weight, robust=name != "crude")
        if name == "matched" and scored.set_id is not None:
            matched = scored.set_id >= 0
            part["configurations"] = configurations_to_json(risk_set_configurations(
                scored.set_id[matched], treatment[matched], time[matched], rows.event[matched], protocol.cut_days(),
            ))
        parts[name] = Release(part, _counts(part))
    return Release(values, parts=parts)


def local_fit(rows: AnalysisRows, weight: NDArray[np.float64], robust: bool) -> dict[str, float] | None:
    """The site's own (weighted) Cox fit, a warm start for the federated one (None if it has none)."""
    site = weighted_event_table(rows.time, rows.treatment, rows.event, weight)
    try:
        fit = fit_stratified_cox([site.table], [site.squares] if robust else None, what="the site's own Cox model")
    except ConvergenceError:
        return None
    return {"beta": fit.log_hr, "variance": fit.se**2}


def weighted_cox(
    rows: AnalysisRows, protocol: StudyProtocol, params: dict[str, Any], max_abs_coefficient: float
) -> Release:
    """Derivatives of each analysis's weighted Cox likelihood at the coordinator's log HR.

    With ``final``, also the robust meat and, per follow-up window, the score and
    information at that point (the PH check's score test). No event day leaves.
    """
    scored = score_and_weight(rows, protocol, params["propensity"], max_abs_coefficient)
    cuts = [0.0, *protocol.cut_days(), float("inf")]
    parts: dict[str, Release] = {}
    for name, fit in params["fits"].items():
        beta = float(fit["beta"])
        check_coefficients(f"weighted_cox.{name}", np.array([beta]), max_abs_coefficient)
        weight = scored.weights[name]
        site = weighted_event_table(rows.time, rows.treatment, rows.event, weight)
        table, squares = site.table, site.squares
        part: dict[str, Any] = binary_cox_derivatives(table, beta).to_json()
        if fit.get("final"):
            windows = list(pairwise(cuts))
            part["meat"] = stratum_meat(table, squares, beta)
            part["windows"] = [stratum_derivatives(table, beta, window)[1:].tolist() for window in windows]
            part["window_meat"] = window_meat(table, squares, beta, list(windows)).tolist()
        parts[name] = Release(part, _counts(_arm_counts(rows, weight)))
    return Release({}, parts=parts)
