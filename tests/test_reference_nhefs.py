"""Published NHEFS results, reproduced through fedrwe's federated kernels.

Source of every published number: M. A. Hernan and J. M. Robins, *Causal Inference: What
If* (Chapman & Hall/CRC, 2020), the text of chapters 12 and 17 and the programs that go
with them (12.1, 12.2, 12.3, 17.1). The data are the book's NHEFS extract, shipped in the
PyPI package ``causaldata`` (``nhefs``: 1,629 smokers; ``nhefs_complete``: the 1,566 of
them with a 1982 weight, the book's ``nhefs.nmv``).

Rows are split over three pseudo-sites (by ``seqn`` modulo 3, and by contiguous ``seqn``
blocks of unequal sizes). Each site reduces its rows to the aggregates fedrwe sends
(Newton derivatives, least-squares sums, event tables); every reply goes through JSON,
and the centre only adds replies and solves. Two kinds of check:

* federated equals pooled: the same model fitted by an independent library (statsmodels,
  lifelines) on the pooled rows, to 1e-8 relative;
* the book's printed numbers, to half a unit of the last printed digit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from causaldata import nhefs, nhefs_complete
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from numpy.typing import NDArray
from scipy import stats
from scipy.special import expit

from shared.stats.cox import EventTable
from shared.stats.km import kaplan_meier, logrank_test, merge_event_tables
from shared.stats.linear import (
    LinearResidualSums,
    LinearSums,
    linear_fit,
    linear_residual_sums,
    linear_sums,
    model_covariance,
    sandwich_covariance,
)
from shared.stats.logistic import (
    LogisticDerivatives,
    logistic_covariance,
    logistic_derivatives,
    penalized_newton_step,
)

FloatArray = NDArray[np.float64]

RELATIVE = 1e-8  # federated vs pooled (statsmodels, lifelines): the fedrwe contract
NEWTON_TOLERANCE = 1e-13  # largest coefficient change at which the central Newton stops
# Book numbers are compared to half a unit of their last printed digit:
PRINTED_1_DECIMAL = 0.05  # e.g. "3.4 kg", "16.7"
PRINTED_2_DECIMALS = 0.005  # e.g. "1.05", "2.00", "0.33"
PRINTED_PERCENT_1_DECIMAL = 0.0005  # e.g. "76.2%", as a proportion
PRINTED_3_DECIMALS = 0.0005  # e.g. "p = 0.005"
N_SITES = 3

# What If, program 12.2 (and 12.3): the propensity model for qsmk, in the program's order.
EDUCATION_LEVELS = ("2", "3", "4", "5")  # reference level 1
EXERCISE_LEVELS = ("1", "2")  # reference level 0
ACTIVE_LEVELS = ("1", "2")  # reference level 0
PROPENSITY_FORMULA = (
    "qsmk ~ sex + race + age + I(age**2) + C(education) + smokeintensity"
    " + I(smokeintensity**2) + smokeyrs + I(smokeyrs**2) + C(exercise) + C(active)"
    " + wt71 + I(wt71**2)"
)
# statsmodels' column for each column of the site design below, in the same order.
PROPENSITY_COLUMNS = (
    "Intercept", "sex[T.1]", "race[T.1]", "age", "I(age ** 2)",
    *(f"C(education)[T.{level}]" for level in EDUCATION_LEVELS),
    "smokeintensity", "I(smokeintensity ** 2)", "smokeyrs", "I(smokeyrs ** 2)",
    *(f"C(exercise)[T.{level}]" for level in EXERCISE_LEVELS),
    *(f"C(active)[T.{level}]" for level in ACTIVE_LEVELS),
    "wt71", "I(wt71 ** 2)",
)


def by_seqn_modulo(rows: pd.DataFrame) -> NDArray[np.int64]:
    site: NDArray[np.int64] = (rows.seqn.to_numpy() % N_SITES).astype(np.int64)
    return site


def by_unequal_seqn_blocks(rows: pd.DataFrame) -> NDArray[np.int64]:
    """Contiguous blocks of seqn holding about 55%, 30% and 15% of the rows."""
    rank = rows.seqn.rank(method="first").to_numpy() - 1
    site: NDArray[np.int64] = np.searchsorted(
        [0.55 * len(rows), 0.85 * len(rows)], rank, side="right"
    ).astype(np.int64)
    return site


SPLITS: dict[str, Callable[[pd.DataFrame], NDArray[np.int64]]] = {
    "seqn_modulo_3": by_seqn_modulo,
    "unequal_seqn_blocks": by_unequal_seqn_blocks,
}


def sites_of(rows: pd.DataFrame, split: str) -> list[pd.DataFrame]:
    site = SPLITS[split](rows)
    parts = [rows[site == s] for s in range(N_SITES)]
    assert all(len(part) > 0 for part in parts)
    return parts


def over_json(reply: Any) -> Any:
    """A site's reply as the centre receives it: serialised and parsed again."""
    return type(reply).from_json(json.loads(json.dumps(reply.to_json())))


def total(replies: list[Any]) -> Any:
    return reduce(lambda a, b: a + b, [over_json(reply) for reply in replies])


def max_relative_difference(actual: Any, expected: Any) -> float:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e) / np.abs(e)))


# --- site side: each pseudo-site builds its own numpy arrays from its rows ---------------

def propensity_design(rows: pd.DataFrame) -> FloatArray:
    """The program 12.2 design at one site, levels fixed by the protocol (not by the site)."""
    def value(column: str) -> FloatArray:
        return rows[column].astype(float).to_numpy()

    def indicators(column: str, levels: tuple[str, ...]) -> list[FloatArray]:
        text = rows[column].astype(str).to_numpy()
        return [(text == level).astype(float) for level in levels]

    age, intensity, years, weight = value("age"), value("smokeintensity"), value("smokeyrs"), value("wt71")
    return np.column_stack([
        np.ones(len(rows)), value("sex"), value("race"), age, age**2,
        *indicators("education", EDUCATION_LEVELS),
        intensity, intensity**2, years, years**2,
        *indicators("exercise", EXERCISE_LEVELS), *indicators("active", ACTIVE_LEVELS),
        weight, weight**2,
    ])


def treatment(rows: pd.DataFrame) -> FloatArray:
    return rows.qsmk.to_numpy(dtype=float)


def arm_design(rows: pd.DataFrame) -> FloatArray:
    """The outcome model ``wt82_71 ~ qsmk`` of programs 12.1 to 12.3."""
    return np.column_stack([np.ones(len(rows)), treatment(rows)])


def ip_weights(rows: pd.DataFrame, beta: FloatArray, p_treated: float | None) -> FloatArray:
    """IP weights at a site from the central propensity ``beta``; stabilized if ``p_treated``."""
    propensity = expit(propensity_design(rows) @ beta)
    a = treatment(rows)
    numerator = np.ones(len(rows)) if p_treated is None else np.where(a == 1, p_treated, 1 - p_treated)
    weights: FloatArray = numerator / np.where(a == 1, propensity, 1.0 - propensity)
    return weights


def survival_time(rows: pd.DataFrame) -> NDArray[np.int64]:
    """Program 17.1: months from January 1983 to death, or 120 if alive at the end of 1992."""
    months = np.where(rows.death == 0, 120, (rows.yrdth - 83) * 12 + rows.modth)
    time: NDArray[np.int64] = months.astype(np.int64)
    return time


def site_event_table(rows: pd.DataFrame) -> EventTable:
    time, event, arm = survival_time(rows), rows.death.to_numpy(np.int64), rows.qsmk.to_numpy(np.int64)
    months, position = np.unique(time, return_inverse=True)
    events = np.zeros((2, len(months)), dtype=np.int64)
    exits = np.zeros((2, len(months)), dtype=np.int64)
    np.add.at(events, (arm, position), event)
    np.add.at(exits, (arm, position), 1)
    return EventTable(months, events, exits)


# --- centre side: adds replies, solves, sends parameters back -----------------------------

def federated_propensity(sites: list[pd.DataFrame]) -> tuple[FloatArray, LogisticDerivatives]:
    beta = np.zeros(len(PROPENSITY_COLUMNS))
    for _ in range(50):
        summed = total([logistic_derivatives(propensity_design(s), treatment(s), beta) for s in sites])
        step = penalized_newton_step(beta, summed)
        beta = step.beta
        if step.max_abs_step < NEWTON_TOLERANCE:
            break
    else:
        pytest.fail("the federated propensity Newton did not converge in 50 rounds")
    return beta, total([logistic_derivatives(propensity_design(s), treatment(s), beta) for s in sites])


def federated_linear(
    sites: list[pd.DataFrame], weights: list[FloatArray] | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``wt82_71 ~ qsmk``: (beta, robust HC0 covariance, classical covariance)."""
    w: list[FloatArray | None] = [None] * len(sites) if weights is None else list(weights)
    sums: LinearSums = total([
        linear_sums(arm_design(s), s.wt82_71.to_numpy(float), ws) for s, ws in zip(sites, w, strict=True)
    ])
    fit = linear_fit(sums)
    residuals: LinearResidualSums = total([
        linear_residual_sums(arm_design(s), s.wt82_71.to_numpy(float), fit.beta, ws)
        for s, ws in zip(sites, w, strict=True)
    ])
    assert fit.n == sum(len(s) for s in sites)
    return fit.beta, sandwich_covariance(fit, residuals), model_covariance(fit, residuals)


def federated_proportion_treated(sites: list[pd.DataFrame]) -> float:
    """P(qsmk = 1), the stabilizing numerator: the intercept-only least-squares fit."""
    sums: LinearSums = total([linear_sums(np.ones((len(s), 1)), treatment(s)) for s in sites])
    return float(linear_fit(sums).beta[0])


def normal_interval(estimate: float, se: float) -> tuple[float, float]:
    z = float(stats.norm.ppf(0.975))
    return estimate - z * se, estimate + z * se


# --- tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def complete() -> pd.DataFrame:
    rows: pd.DataFrame = nhefs_complete.load_pandas().data
    return rows


@pytest.fixture(scope="module")
def everyone() -> pd.DataFrame:
    rows: pd.DataFrame = nhefs.load_pandas().data
    return rows


def test_cohort_sizes_as_printed(complete: pd.DataFrame, everyone: pd.DataFrame) -> None:
    # What If 12.1: 1,566 smokers with a 1982 weight, 403 quitters and 1,163 non-quitters;
    # 17.1: all 1,629 smokers, 318 deaths by 1992 (102 of 428 quitters, 216 of 1,201).
    assert len(complete) == 1566
    assert int((complete.qsmk == 1).sum()) == 403
    assert len(everyone) == 1629
    assert int(everyone.death.sum()) == 318
    assert int(everyone.death[everyone.qsmk == 1].sum()) == 102
    assert int((everyone.qsmk == 1).sum()) == 428


@pytest.mark.parametrize("split", SPLITS)
def test_crude_difference_program_12_1(complete: pd.DataFrame, split: str) -> None:
    beta, _, covariance = federated_linear(sites_of(complete, split), None)
    reference = smf.ols("wt82_71 ~ qsmk", data=complete).fit()
    np.testing.assert_allclose(beta, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(np.sqrt(np.diag(covariance)), reference.bse, rtol=RELATIVE)
    # What If 12.1 (program 12.1): mean weight gain 4.5 kg in quitters, 2.0 kg in
    # non-quitters; difference 2.5 kg (95% CI 1.7 to 3.4), a t interval from lm().
    se = float(np.sqrt(covariance[1, 1]))
    t = float(stats.t.ppf(0.975, len(complete) - 2))
    assert beta[0] + beta[1] == pytest.approx(4.5, abs=PRINTED_1_DECIMAL)
    assert beta[0] == pytest.approx(2.0, abs=PRINTED_1_DECIMAL)
    assert beta[1] == pytest.approx(2.5, abs=PRINTED_1_DECIMAL)
    assert beta[1] - t * se == pytest.approx(1.7, abs=PRINTED_1_DECIMAL)
    assert beta[1] + t * se == pytest.approx(3.4, abs=PRINTED_1_DECIMAL)


@pytest.mark.parametrize("split", SPLITS)
def test_propensity_model_program_12_2_equals_statsmodels_logit(complete: pd.DataFrame, split: str) -> None:
    beta, summed = federated_propensity(sites_of(complete, split))
    reference = smf.logit(PROPENSITY_FORMULA, data=complete).fit(disp=0, method="newton", tol=1e-14, maxiter=100)
    assert summed.n == 1566
    np.testing.assert_allclose(beta, reference.params[list(PROPENSITY_COLUMNS)], rtol=RELATIVE)
    np.testing.assert_allclose(
        np.sqrt(np.diag(logistic_covariance(summed))), reference.bse[list(PROPENSITY_COLUMNS)], rtol=RELATIVE
    )
    assert summed.loglik == pytest.approx(reference.llf, rel=RELATIVE)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("stabilized", [False, True], ids=["program_12_2_nonstabilized", "program_12_3_stabilized"])
def test_ip_weighted_effect_equals_pooled_and_book(complete: pd.DataFrame, split: str, stabilized: bool) -> None:
    sites = sites_of(complete, split)
    beta_propensity, _ = federated_propensity(sites)
    p_treated = federated_proportion_treated(sites) if stabilized else None
    weights = [ip_weights(s, beta_propensity, p_treated) for s in sites]
    beta, robust, _ = federated_linear(sites, weights)
    se = np.sqrt(np.diag(robust))

    # Pooled reference: statsmodels WLS with HC0 errors on the pooled rows, with weights
    # from statsmodels' own propensity fit ...
    propensity = smf.logit(PROPENSITY_FORMULA, data=complete).fit(disp=0, method="newton", tol=1e-14, maxiter=100)
    p = propensity.predict(complete).to_numpy()
    a = treatment(complete)
    numerator = np.where(a == 1, a.mean(), 1.0 - a.mean()) if stabilized else np.ones(len(a))
    pooled_weights = numerator / np.where(a == 1, p, 1.0 - p)
    wls = sm.WLS(complete.wt82_71.to_numpy(), sm.add_constant(a), weights=pooled_weights).fit(cov_type="HC0")
    in_site_order = np.argsort(SPLITS[split](complete), kind="stable")
    np.testing.assert_allclose(np.concatenate(weights), pooled_weights[in_site_order], rtol=RELATIVE)
    np.testing.assert_allclose(beta, wls.params, rtol=RELATIVE)
    np.testing.assert_allclose(se, wls.bse, rtol=RELATIVE)
    # ... which is the book's model: GEE, independence working correlation, one person per
    # cluster (geepack::geeglm(id = seqn) in the R programs), robust variance.
    gee = smf.gee(
        "wt82_71 ~ qsmk", groups="seqn", data=complete, weights=pooled_weights,
        cov_struct=sm.cov_struct.Independence(),
    ).fit()
    np.testing.assert_allclose(gee.params, wls.params, rtol=RELATIVE)
    np.testing.assert_allclose(gee.bse, wls.bse, rtol=RELATIVE)

    # What If 12.2 (program 12.2) and 12.3 (program 12.3) print the same result for the
    # nonstabilized and the stabilized weights: 3.4 kg (95% CI 2.4 to 4.5).
    low, high = normal_interval(float(beta[1]), float(se[1]))
    assert beta[1] == pytest.approx(3.4, abs=PRINTED_1_DECIMAL)
    assert low == pytest.approx(2.4, abs=PRINTED_1_DECIMAL)
    assert high == pytest.approx(4.5, abs=PRINTED_1_DECIMAL)

    # The weights' summary, as printed in the text (mean from the summed weights).
    mean = sum(float(w.sum()) for w in weights) / len(complete)
    smallest, largest = min(float(w.min()) for w in weights), max(float(w.max()) for w in weights)
    if stabilized:  # What If 12.3: SW ranged from 0.33 to 4.30, mean 1.00
        assert (smallest, largest, mean) == pytest.approx((0.33, 4.30, 1.00), abs=PRINTED_2_DECIMALS)
    else:  # What If 12.2: W ranged from 1.05 to 16.7, mean 2.00
        assert smallest == pytest.approx(1.05, abs=PRINTED_2_DECIMALS)
        assert largest == pytest.approx(16.7, abs=PRINTED_1_DECIMAL)
        assert mean == pytest.approx(2.00, abs=PRINTED_2_DECIMALS)


@pytest.mark.parametrize("split", SPLITS)
def test_survival_program_17_1_equals_lifelines_and_book(everyone: pd.DataFrame, split: str) -> None:
    sites = sites_of(everyone, split)
    pooled = merge_event_tables([site_event_table(s) for s in sites])
    time, event, arm = survival_time(everyone), everyone.death.to_numpy(int), everyone.qsmk.to_numpy(int)
    assert pooled.exits.sum() == 1629
    assert pooled.events.sum() == 318
    curves = {}
    for a in (0, 1):
        km = kaplan_meier(pooled, a)
        # lifelines' default interval is the log(-log) "exponential Greenwood" one, as km.py's.
        fitter = KaplanMeierFitter().fit(time[arm == a], event[arm == a])
        reference_survival = fitter.survival_function_.iloc[:, 0].loc[km.time]
        np.testing.assert_allclose(km.survival, reference_survival, rtol=RELATIVE)
        bounds = fitter.confidence_interval_.loc[km.time]
        np.testing.assert_allclose(km.ci_low, bounds.iloc[:, 0], rtol=RELATIVE)
        np.testing.assert_allclose(km.ci_high, bounds.iloc[:, 1], rtol=RELATIVE)
        assert km.survival_at(120) == pytest.approx(float(fitter.predict(120)), rel=RELATIVE)
        curves[a] = km
    reference = lifelines_logrank(time[arm == 1], time[arm == 0], event[arm == 1], event[arm == 0])
    mine = logrank_test(pooled)
    assert mine.statistic == pytest.approx(reference.test_statistic, rel=RELATIVE)
    assert mine.p_value == pytest.approx(reference.p_value, rel=RELATIVE)

    # What If 17.1 (program 17.1): survival at 120 months 76.2% in quitters and 82.0% in
    # non-quitters; log-rank p = 0.005.
    assert curves[1].survival_at(120) == pytest.approx(0.762, abs=PRINTED_PERCENT_1_DECIMAL)
    assert curves[0].survival_at(120) == pytest.approx(0.820, abs=PRINTED_PERCENT_1_DECIMAL)
    assert mine.p_value == pytest.approx(0.005, abs=PRINTED_3_DECIMALS)
