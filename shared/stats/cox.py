"""Cox proportional hazards with Breslow ties, from data a site may keep or release.

Two forms of the same partial likelihood:

* :func:`cox_derivatives` works on one site's rows (time, event, covariates, weights): the
  form for models with covariates (the estimators issue); tested against statsmodels.
* :func:`binary_cox_derivatives` works on an :class:`EventTable` (events and exits per day
  and arm). With a single binary treatment the table is a sufficient statistic, so a site
  can reduce its rows to it with one group-by.

Summed over sites (strata), the derivatives are those of the site-stratified Cox model on
the pooled rows; :func:`newton_step` is the central update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.errors import ConvergenceError

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class CoxDerivatives:
    """Log partial likelihood, gradient and Hessian at ``beta`` (sums over strata).

    For a one-parameter model ``third`` may carry the third derivative, which lets the
    centre take Halley steps and correct the final Hessian (fewer exchanges).
    """

    loglik: float
    gradient: FloatArray
    hessian: FloatArray
    third: float | None = None

    def __add__(self, other: CoxDerivatives) -> CoxDerivatives:
        third = None if self.third is None or other.third is None else self.third + other.third
        return CoxDerivatives(
            self.loglik + other.loglik, self.gradient + other.gradient,
            self.hessian + other.hessian, third,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "loglik": self.loglik,
            "gradient": self.gradient.tolist(),
            "hessian": self.hessian.tolist(),
            "third": self.third,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> CoxDerivatives:
        third = data.get("third")
        return cls(
            float(data["loglik"]),  # type: ignore[arg-type]
            np.asarray(data["gradient"], dtype=np.float64),
            np.atleast_2d(np.asarray(data["hessian"], dtype=np.float64)),
            None if third is None else float(third),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class EventTable:
    """Per-day counts for one stratum and a binary treatment (arm 0 comparator, 1 exposed).

    ``time`` holds the distinct follow-up days, ascending; ``events[a]`` the events and
    ``exits[a]`` the persons whose follow-up ends (event or censoring) on that day in arm a.
    Everyone enters at day 0, so the number at risk on a day is everyone who exits then
    or later.
    """

    time: NDArray[np.int64]
    events: NDArray[np.int64]  # shape (2, len(time))
    exits: NDArray[np.int64]  # shape (2, len(time))

    @property
    def at_risk(self) -> NDArray[np.int64]:
        """Persons at risk at the start of each day, per arm: shape (2, len(time))."""
        return np.cumsum(self.exits[:, ::-1], axis=1)[:, ::-1]


def binary_cox_derivatives(table: EventTable, beta: float) -> CoxDerivatives:
    """Breslow log partial likelihood and derivatives for a binary treatment, one stratum."""
    n_at_risk = table.at_risk.astype(np.float64)
    deaths = table.events.sum(axis=0).astype(np.float64)
    has_event = deaths > 0
    n0, n1 = n_at_risk[0, has_event], n_at_risk[1, has_event]
    d, d1 = deaths[has_event], table.events[1, has_event].astype(np.float64)
    risk_exposed = n1 * np.exp(beta)
    s0 = n0 + risk_exposed
    share = risk_exposed / s0
    loglik = float(np.sum(d1 * beta - d * np.log(s0)))
    gradient = float(np.sum(d1 - d * share))
    spread = share * (1.0 - share)
    hessian = -float(np.sum(d * spread))
    third = -float(np.sum(d * spread * (1.0 - 2.0 * share)))
    return CoxDerivatives(loglik, np.array([gradient]), np.array([[hessian]]), third)


def cox_derivatives(
    time: FloatArray,
    event: NDArray[np.bool_],
    covariates: FloatArray,
    beta: FloatArray,
    weights: FloatArray | None = None,
) -> CoxDerivatives:
    """Breslow log partial likelihood, gradient and Hessian for one stratum's rows.

    Weighted (``weights``) as in survival::coxph: each row counts ``w`` times in the
    risk sets and in the event sums.
    """
    x = np.asarray(covariates, dtype=np.float64).reshape(len(time), -1)
    w = np.ones(len(time)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-np.asarray(time), kind="stable")
    t, d, x, w = np.asarray(time)[order], np.asarray(event, bool)[order], x[order], w[order]
    risk = w * np.exp(x @ beta)
    s0 = np.cumsum(risk)
    s1 = np.cumsum(risk[:, None] * x, axis=0)
    s2 = np.cumsum(risk[:, None, None] * x[:, :, None] * x[:, None, :], axis=0)
    # Risk-set sums at a time are those at the last row (in descending order) with that time.
    last_of_time = np.r_[t[1:] != t[:-1], True]
    group_end = np.flatnonzero(last_of_time)
    group_of_row = np.searchsorted(group_end, np.arange(len(t)))
    end = group_end[group_of_row][d]
    wd = w[d]
    mean = s1[end] / s0[end, None]
    loglik = float(np.sum(wd * (x[d] @ beta - np.log(s0[end]))))
    gradient = np.sum(wd[:, None] * (x[d] - mean), axis=0)
    second = s2[end] / s0[end, None, None] - mean[:, :, None] * mean[:, None, :]
    hessian = -np.sum(wd[:, None, None] * second, axis=0)
    return CoxDerivatives(loglik, gradient, hessian)


@dataclass(frozen=True)
class NewtonStep:
    """One central Newton-Raphson update and the size of the step taken."""

    beta: FloatArray
    step: FloatArray
    max_abs_step: float


def newton_step(beta: FloatArray, total: CoxDerivatives) -> NewtonStep:
    """Newton update ``beta - H^-1 g`` from derivatives summed over all sites."""
    try:
        step: FloatArray = -np.linalg.solve(total.hessian, total.gradient).astype(np.float64)
    except np.linalg.LinAlgError:
        raise ConvergenceError(
            "the Cox information matrix is singular: a covariate is constant or an arm has "
            "no events in every site. Fix: drop the covariate or check the cohort counts."
        ) from None
    if not np.all(np.isfinite(step)):
        raise ConvergenceError(f"the Cox Newton step is not finite (step {step.tolist()})")
    return NewtonStep(beta + step, step, float(np.max(np.abs(step))))


def halley_step(beta: float, total: CoxDerivatives) -> NewtonStep:
    """Halley update for a one-parameter model (cubic convergence; needs ``third``)."""
    g, h, t = float(total.gradient[0]), float(total.hessian[0, 0]), total.third
    if t is None:
        return newton_step(np.array([beta]), total)
    denominator = 2.0 * h * h - g * t
    if h >= 0 or denominator == 0 or not np.isfinite(denominator):
        return newton_step(np.array([beta]), total)
    step = -2.0 * g * h / denominator
    return NewtonStep(np.array([beta + step]), np.array([step]), abs(step))


def fit_binary_cox(table: EventTable, tol: float = 1e-12, max_iter: int = 50) -> tuple[float, float]:
    """Local Cox fit on one stratum's event table: (log HR, its variance); a warm start."""
    beta = np.zeros(1)
    for _ in range(max_iter):
        update = newton_step(beta, binary_cox_derivatives(table, float(beta[0])))
        beta = update.beta
        if update.max_abs_step < tol:
            break
    else:
        raise ConvergenceError(f"local Cox fit did not converge in {max_iter} iterations")
    information = -binary_cox_derivatives(table, float(beta[0])).hessian[0, 0]
    return float(beta[0]), 1.0 / information
