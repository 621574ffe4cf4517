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
