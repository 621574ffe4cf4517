"""Partial computation of the propensity model (logistic regression of treatment).

The site returns the log-likelihood, gradient and Hessian at the coordinator's ``beta``;
on request it adds its own (lightly ridged) fit and information, the warm start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import ConvergenceError, ProtocolError
from shared.stats.logistic import logistic_derivatives, penalized_newton_step
from site_agent.analyses.limits import check_coefficients
from site_agent.analyses.release import Release
from site_agent.analyses.rows import AnalysisRows

_LOCAL_RIDGE = 1e-4  # keeps a site's own fit defined when a covariate is constant there
_LOCAL_MAX_ITER = 50


def _local_fit(rows: AnalysisRows, max_abs_coefficient: float) -> dict[str, Any] | None:
    beta = np.zeros(rows.design.shape[1])
    for _ in range(_LOCAL_MAX_ITER):
        derivatives = logistic_derivatives(rows.design, rows.treatment, beta)
        try:
            update = penalized_newton_step(beta, derivatives, l2=_LOCAL_RIDGE)
        except ConvergenceError:
            return None
        beta = update.beta
        if np.any(np.abs(beta) > max_abs_coefficient):
            return None  # separation at this site: its own fit says too much, and helps little
        if update.max_abs_step < 1e-8:
            information = -logistic_derivatives(rows.design, rows.treatment, beta).hessian
            return {"beta": beta.tolist(), "information": information.tolist()}
    return None  # e.g. separation at this site: the coordinator starts elsewhere


def propensity(rows: AnalysisRows, params: dict[str, Any], max_abs_coefficient: float) -> Release:
    """Derivatives at ``params['beta']`` (zeros when absent); the local fit on request."""
    width = rows.design.shape[1]
    beta = np.asarray(params.get("beta", np.zeros(width)), dtype=np.float64)
    if beta.shape != (width,):
        raise ProtocolError(
            f"propensity beta has {beta.size} values but the design has {width} columns "
            f"(intercept + covariates). Fix: run the same protocol and fedrwe version everywhere."
        )
    check_coefficients("propensity", beta, max_abs_coefficient)
    values: dict[str, Any] = logistic_derivatives(rows.design, rows.treatment, beta).to_json()
    if params.get("local_fit", False):
        values["local_fit"] = _local_fit(rows, max_abs_coefficient)
    counts = {
        "propensity.n_exposed": int(rows.treatment.sum()),
        "propensity.n_comparator": int(len(rows.treatment) - rows.treatment.sum()),
    }
    return Release(values, counts)
