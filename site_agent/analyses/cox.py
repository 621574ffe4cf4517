"""Partial computation of the site-stratified Cox model with treatment only (crude HR).

The site is one stratum: it returns the Breslow log partial likelihood, gradient and
Hessian at the coordinator's ``beta``; no event time leaves. On request it adds its own
local fit, which the coordinator uses to warm-start Newton.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ConvergenceError
from shared.stats.cox import EventTable, binary_cox_derivatives, fit_binary_cox
from site_agent.analyses.release import Release


def crude_cox(table: EventTable, params: dict[str, Any]) -> Release:
    """Derivatives at ``params['beta']``; the local fit when ``params['local_fit']``."""
    beta = float(params.get("beta", 0.0))
    values: dict[str, Any] = binary_cox_derivatives(table, beta).to_json()
    values["beta"] = beta
    if params.get("local_fit", False):
        try:
            local_beta, local_variance = fit_binary_cox(table)
            values["local_fit"] = {"beta": local_beta, "variance": local_variance}
        except ConvergenceError:
            values["local_fit"] = None  # e.g. no events in one arm at this site
    counts = {
        "cox.n_exposed": int(table.exits[1].sum()),
        "cox.n_comparator": int(table.exits[0].sum()),
        "cox.events": int(table.events.sum()),
    }
    return Release(values, counts)
