"""Pure statistical kernels, federated over k pseudo-sites vs the pooled fit by an
independent library (statsmodels, lifelines, numpy on the pooled rows).

Data are split over k = 1, 2, 3 and 7 sites; the last site of each split is tiny
(a handful of rows), which must not change the pooled answer.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
import statsmodels.api as sm
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from numpy.typing import NDArray
from scipy.special import expit
from statsmodels.duration.hazard_regression import PHReg

from shared.stats.balance import arm_moments, standardized_differences
from shared.stats.cox import (
    EventTable,
    binary_cox_derivatives,
    cox_derivatives,
    halley_step,
    newton_step,
)
from shared.stats.km import kaplan_meier, logrank_test, merge_event_tables
from shared.stats.logistic import logistic_covariance, logistic_derivatives, penalized_newton_step

RELATIVE = 1e-8
ABSOLUTE_PROBABILITY = 1e-12  # survival probabilities: lifelines prints them to 1e-15
SPLITS = (1, 2, 3, 7)


def split(n: int, k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Site of each row: k - 1 sizeable sites and, for k > 1, a last site of 5 rows."""
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    site = rng.integers(0, k - 1, n)
    site[rng.choice(n, 5, replace=False)] = k - 1
    return site


def survival_data(rng: np.random.Generator, n: int = 3000) -> tuple[NDArray[np.int64], ...]:
    arm = rng.integers(0, 2, n)
    event_day = np.ceil(rng.exponential(300 / np.exp(0.4 * arm))).astype(np.int64)
    censor_day = rng.integers(1, 366, n)
    return arm, np.minimum(event_day, censor_day), (event_day <= censor_day).astype(np.int64)


def event_table(time: NDArray[np.int64], event: NDArray[np.int64], arm: NDArray[np.int64]) -> EventTable:
    days = np.unique(time)
    events = np.zeros((2, len(days)), dtype=np.int64)
    exits = np.zeros((2, len(days)), dtype=np.int64)
    position = np.searchsorted(days, time)
    np.add.at(events, (arm, position), event)
    np.add.at(exits, (arm, position), 1)
    return EventTable(days, events, exits)


@pytest.mark.parametrize("k", SPLITS)
def test_logistic_newton_equals_statsmodels_logit(k: int) -> None:
    rng = np.random.default_rng(k)
    n = 4000
    design = np.column_stack([np.ones(n), rng.normal(size=(n, 3)), rng.integers(0, 2, n)])
    outcome = (rng.random(n) < expit(design @ [-1.0, 0.5, -0.3, 0.2, 1.0])).astype(float)
    site = split(n, k, rng)
    beta = np.zeros(design.shape[1])
    for _ in range(30):
        parts = [logistic_derivatives(design[site == s], outcome[site == s], beta) for s in range(k)]
        total = reduce(lambda a, b: a + b, parts)
        update = penalized_newton_step(beta, total)
        beta = update.beta
        if update.max_abs_step < 1e-12:
            break
    total = reduce(lambda a, b: a + b, [logistic_derivatives(design[site == s], outcome[site == s], beta) for s in range(k)])
    reference = sm.Logit(outcome, design).fit(disp=0, method="newton", tol=1e-14, maxiter=100)
    assert total.n == n
    np.testing.assert_allclose(beta, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(np.sqrt(np.diag(logistic_covariance(total))), reference.bse, rtol=RELATIVE)
    assert total.loglik == pytest.approx(reference.llf, rel=RELATIVE)


@pytest.mark.parametrize("k", SPLITS)
def test_smd_from_summed_moments_equals_pooled_numpy(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    n = 2000
    x = np.column_stack([rng.normal(40, 10, n), rng.integers(0, 2, n), np.zeros(n)])
    arm = rng.integers(0, 2, n)
    weights = rng.uniform(0.2, 3.0, n)
    site = split(n, k, rng)
    for w in (None, weights):
        parts = [arm_moments(x[site == s], arm[site == s], None if w is None else w[site == s]) for s in range(k)]
        balance = standardized_differences(reduce(lambda a, b: a + b, parts))
        ww = np.ones(n) if w is None else w
        means = [np.average(x[arm == a], axis=0, weights=ww[arm == a]) for a in (0, 1)]
        variances = [np.average((x[arm == a] - means[a]) ** 2, axis=0, weights=ww[arm == a]) for a in (0, 1)]
        spread = np.sqrt((variances[0] + variances[1]) / 2)
        expected = np.where(spread > 0, (means[1] - means[0]) / np.where(spread > 0, spread, 1), 0.0)
        np.testing.assert_allclose(balance.smd, expected, rtol=RELATIVE, atol=1e-14)
        assert balance.smd[2] == 0.0  # constant covariate: no imbalance, never NaN


@pytest.mark.parametrize("k", SPLITS)
def test_kaplan_meier_and_logrank_equal_lifelines(k: int) -> None:
    rng = np.random.default_rng(20 + k)
    arm, time, event = survival_data(rng)
    site = split(len(arm), k, rng)
    pooled = merge_event_tables([event_table(time[site == s], event[site == s], arm[site == s]) for s in range(k)])
    for a in (0, 1):
        km = kaplan_meier(pooled, a)
        fitter = KaplanMeierFitter().fit(time[arm == a], event[arm == a])
        reference = fitter.survival_function_.iloc[:, 0].loc[km.time].to_numpy()
        bounds = fitter.confidence_interval_.loc[km.time]
        np.testing.assert_allclose(km.survival, reference, atol=ABSOLUTE_PROBABILITY)
        np.testing.assert_allclose(km.ci_low, bounds.iloc[:, 0].to_numpy(), atol=ABSOLUTE_PROBABILITY)
        np.testing.assert_allclose(km.ci_high, bounds.iloc[:, 1].to_numpy(), atol=ABSOLUTE_PROBABILITY)
        assert km.survival_at(365) == pytest.approx(float(fitter.predict(365)), abs=ABSOLUTE_PROBABILITY)
    reference_test = lifelines_logrank(time[arm == 1], time[arm == 0], event[arm == 1], event[arm == 0])
    mine = logrank_test(pooled)
    assert mine.statistic == pytest.approx(reference_test.test_statistic, rel=RELATIVE)
    assert mine.p_value == pytest.approx(reference_test.p_value, rel=RELATIVE)


@pytest.mark.parametrize("k", SPLITS)
def test_stratified_cox_equals_statsmodels_phreg(k: int) -> None:
    rng = np.random.default_rng(30 + k)
    arm, time, event = survival_data(rng)
    x = np.column_stack([arm, rng.normal(size=len(arm))])
    site = split(len(arm), k, rng)
    beta = np.zeros(2)
    for _ in range(30):
        total = reduce(lambda a, b: a + b, [cox_derivatives(time[site == s], event[site == s] == 1, x[site == s], beta) for s in range(k)])
        update = newton_step(beta, total)
        beta = update.beta
        if update.max_abs_step < 1e-12:
            break
    total = reduce(lambda a, b: a + b, [cox_derivatives(time[site == s], event[site == s] == 1, x[site == s], beta) for s in range(k)])
    reference = PHReg(time.astype(float), x, status=event, ties="breslow", strata=site).fit()
    np.testing.assert_allclose(beta, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(np.sqrt(np.diag(np.linalg.inv(-total.hessian))), reference.bse, rtol=RELATIVE)
    # The binary-treatment form from event tables, with Halley steps, gives the same crude fit.
    tables = [event_table(time[site == s], event[site == s], arm[site == s]) for s in range(k)]
    b = 0.0
    for _ in range(30):
        step = halley_step(b, reduce(lambda a, c: a + c, [binary_cox_derivatives(t, b) for t in tables]))
        b = float(step.beta[0])
        if step.max_abs_step < 1e-13:
            break
    crude = PHReg(time.astype(float), arm[:, None].astype(float), status=event, ties="breslow", strata=site).fit()
    assert b == pytest.approx(crude.params[0], rel=RELATIVE)
