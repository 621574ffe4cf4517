"""Rossi recidivism (432 released prisoners, arrest within 52 weeks), three pseudo-sites.

Data: ``lifelines.datasets.load_rossi()`` (Rossi, Berk & Lenihan 1980; as in Fox's
appendix on Cox regression). The rows are split into three contiguous pseudo-sites and
fitted with the pooled-baseline risk-set Cox model (:mod:`shared.stats.cox_riskset`).

References:

* Efron ties: lifelines ``CoxPHFitter().fit(rossi, "week", "arrest")`` (lifelines uses
  Efron ties), and the summary printed in lifelines' docs, ``docs/Survival Regression.rst``
  at commit 0fec0aa6acf5de94a93188e718c5bb59e682d58b (2 decimals; partial
  log-likelihood -658.75, log-likelihood ratio test 33.27 on 7 df).
* Breslow ties: statsmodels ``PHReg(..., ties="breslow")``, and the older summary in the
  same docs page at commit 02bc5a4409cbaaf9a454a5d5bb00d338a665b220 (4 decimals), whose
  coefficient table is the Breslow fit. (That page's "Likelihood ratio test = 33.266" line
  is the Efron value, so it is not used for Breslow.)
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from statsmodels.duration.hazard_regression import PHReg

from shared.stats.cox_riskset import (
    RiskSetCoxFit,
    RiskSetRequest,
    RiskSetSums,
    Ties,
    fit_risk_set_cox,
    risk_set_cox_derivatives,
    site_event_times,
    site_risk_set_sums,
    union_event_times,
)

COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
RELATIVE = 1e-8  # federated vs a pooled library fit run to its optimum
# lifelines with its default stopping rule (relative loglik change 1e-9, or Newton decrement
# below 1e-7) reports the coefficients *before* its last Newton step: on Rossi that is
# 5.2e-8 relative away from its own optimum (age), so the default fit is compared at this.
LIFELINES_DEFAULT_STOP = 1e-7
TIGHT_LIFELINES = {"precision": 1e-15, "r_precision": 0.0}  # run lifelines to the optimum
PRINTED_2_DECIMALS = 0.005  # half a unit in the last printed digit
PRINTED_4_DECIMALS = 0.00005

# docs/Survival Regression.rst @ 0fec0aa6 (Efron): coef, se(coef)
DOCS_EFRON = {
    "fin": (-0.38, 0.19), "age": (-0.06, 0.02), "race": (0.31, 0.31), "wexp": (-0.15, 0.21),
    "mar": (-0.43, 0.38), "paro": (-0.08, 0.20), "prio": (0.09, 0.03),
}
DOCS_EFRON_LOGLIK = -658.75
DOCS_EFRON_LR = 33.27
# docs/Survival Regression.rst @ 02bc5a44 (Breslow): coef, se(coef)
DOCS_BRESLOW = {
    "fin": (-0.3790, 0.1914), "age": (-0.0572, 0.0220), "race": (0.3141, 0.3080),
    "wexp": (-0.1511, 0.2121), "mar": (-0.4328, 0.3818), "paro": (-0.0850, 0.1957),
    "prio": (0.0911, 0.0286),
}


def rossi_sites() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rossi = load_rossi()
    assert len(rossi) == 432
    assert int(rossi["arrest"].sum()) == 114
    return [
        (part["week"].to_numpy(float), part["arrest"].to_numpy() == 1, part[COVARIATES].to_numpy(float))
        for part in (rossi.iloc[:150], rossi.iloc[150:300], rossi.iloc[300:])
    ]


def gather(request: RiskSetRequest) -> list[RiskSetSums]:
    return [site_risk_set_sums(t, e, x, request) for t, e, x in rossi_sites()]


def grid() -> np.ndarray:
    return union_event_times([site_event_times(t, e) for t, e, _ in rossi_sites()])


def federated(ties: Ties) -> RiskSetCoxFit:
    return fit_risk_set_cox(gather, grid(), len(COVARIATES), ties)


def null_loglik(ties: Ties) -> float:
    zeros = np.zeros(len(COVARIATES))
    total = reduce(lambda a, b: a + b, gather(RiskSetRequest(zeros, zeros, grid())))
    return risk_set_cox_derivatives(total, ties).loglik


def test_efron_equals_lifelines() -> None:
    fit = federated("efron")
    rossi = load_rossi()
    tight = CoxPHFitter().fit(rossi, "week", "arrest", fit_options=TIGHT_LIFELINES)
    np.testing.assert_allclose(fit.coefficients, tight.params_[COVARIATES], rtol=RELATIVE)
    np.testing.assert_allclose(fit.standard_errors, tight.standard_errors_[COVARIATES], rtol=RELATIVE)
    assert fit.loglik == pytest.approx(tight.log_likelihood_, rel=RELATIVE)
    default = CoxPHFitter().fit(rossi, "week", "arrest")
    np.testing.assert_allclose(fit.coefficients, default.params_[COVARIATES], rtol=LIFELINES_DEFAULT_STOP)
    np.testing.assert_allclose(fit.standard_errors, default.standard_errors_[COVARIATES], rtol=LIFELINES_DEFAULT_STOP)
    assert fit.loglik == pytest.approx(default.log_likelihood_, rel=RELATIVE)


def test_efron_equals_lifelines_documentation() -> None:
    fit = federated("efron")
    printed = np.array([DOCS_EFRON[name] for name in COVARIATES])
    np.testing.assert_allclose(fit.coefficients, printed[:, 0], rtol=0, atol=PRINTED_2_DECIMALS)
    np.testing.assert_allclose(fit.standard_errors, printed[:, 1], rtol=0, atol=PRINTED_2_DECIMALS)
    assert fit.loglik == pytest.approx(DOCS_EFRON_LOGLIK, abs=PRINTED_2_DECIMALS)
    assert 2 * (fit.loglik - null_loglik("efron")) == pytest.approx(DOCS_EFRON_LR, abs=PRINTED_2_DECIMALS)


def test_breslow_equals_statsmodels_phreg() -> None:
    fit = federated("breslow")
    rossi = load_rossi()
    reference = PHReg(
        rossi["week"].to_numpy(float), rossi[COVARIATES].to_numpy(float),
        status=rossi["arrest"].to_numpy(float), ties="breslow",
    ).fit()
    np.testing.assert_allclose(fit.coefficients, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(fit.standard_errors, reference.bse, rtol=RELATIVE)
    assert fit.loglik == pytest.approx(reference.llf, rel=RELATIVE)


def test_breslow_equals_older_lifelines_documentation() -> None:
    fit = federated("breslow")
    printed = np.array([DOCS_BRESLOW[name] for name in COVARIATES])
    np.testing.assert_allclose(fit.coefficients, printed[:, 0], rtol=0, atol=PRINTED_4_DECIMALS)
    np.testing.assert_allclose(fit.standard_errors, printed[:, 1], rtol=0, atol=PRINTED_4_DECIMALS)
