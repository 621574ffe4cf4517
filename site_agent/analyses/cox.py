"""Partial computation of the site-stratified Cox model with treatment only (crude HR).

The site is one stratum: it returns the Breslow log partial likelihood, gradient and
Hessian at the coordinator's ``beta``; no event time leaves. On request it adds its own
local fit, which the coordinator uses to warm-start Newton.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import ConvergenceError
from shared.stats.cox import EventTable, binary_cox_derivatives, fit_binary_cox
from site_agent.analyses.limits import check_coefficients
from site_agent.analyses.release import Release


def crude_cox(table: EventTable, params: dict[str, Any], max_abs_coefficient: float) -> Release:
    """Derivatives at ``params['beta']``; the local fit when ``params['local_fit']``."""
    beta = float(params.get("beta", 0.0))
    check_coefficients("crude_cox", np.array([beta]), max_abs_coefficient)
    values: dict[str, Any] = binary_cox_derivatives(table, beta).to_json()
    values["beta"] = beta
    if params.get("local_fit", False):
        try:
            local_beta, local_variance = fit_binary_cox(table)
            within = abs(local_beta) <= max_abs_coefficient
            values["local_fit"] = {"beta": local_beta, "variance": local_variance} if within else None
        except ConvergenceError:
            values["local_fit"] = None  # e.g. no events in one arm at this site
    counts = {
        "cox.n_exposed": int(table.exits[1].sum()),
        "cox.n_comparator": int(table.exits[0].sum()),
        "cox.events_exposed": int(table.events[1].sum()),
        "cox.events_comparator": int(table.events[0].sum()),
    }
    return Release(values, counts)
