"""The pooled reference for federated results: the same analysis on all sites' rows.

Computed by an independent library (statsmodels), never by fedrwe's own kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from statsmodels.duration.hazard_regression import PHReg

RELATIVE_TOLERANCE = 1e-8  # the contract: estimates to 1e-8 relative or better


def assert_crude_equals_pooled(crude: dict[str, Any], pooled: pd.DataFrame) -> None:
    """Counts exactly; log HR, SE and HR as statsmodels PHReg (Breslow, strata = site)."""
    for arm, treatment in (("exposed", 1), ("comparator", 0)):
        rows = pooled[pooled.treatment == treatment]
        assert crude[f"n_{arm}"] == len(rows)
        assert crude[f"events_{arm}"] == int(rows.event.sum())
        assert crude[f"person_days_{arm}"] == int(rows.time.sum())
    fit = PHReg(
        pooled.time.to_numpy(float), pooled[["treatment"]].to_numpy(float),
        status=pooled.event.to_numpy(int), ties="breslow", strata=pooled.site_id.to_numpy(),
    ).fit()
    assert crude["log_hr"] == pytest.approx(fit.params[0], rel=RELATIVE_TOLERANCE)
    assert crude["se_log_hr"] == pytest.approx(fit.bse[0], rel=RELATIVE_TOLERANCE)
    assert crude["hr"] == pytest.approx(np.exp(fit.params[0]), rel=RELATIVE_TOLERANCE)


def assert_propensity_equals_pooled(propensity: dict[str, Any], pooled: pd.DataFrame) -> None:
    """Coefficients and SEs as statsmodels Logit on the pooled rows, named as its columns."""
    import statsmodels.api as sm

    names = list(propensity["coefficients"])
    assert names[0] == "(intercept)"
    design = np.column_stack([np.ones(len(pooled)), pooled[names[1:]].to_numpy(float)])
    fit = sm.Logit(pooled.treatment.to_numpy(float), design).fit(disp=0, method="newton", tol=1e-14, maxiter=100)
    np.testing.assert_allclose(list(propensity["coefficients"].values()), fit.params, rtol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(list(propensity["standard_errors"].values()), fit.bse, rtol=RELATIVE_TOLERANCE)
    assert propensity["n"] == len(pooled)
