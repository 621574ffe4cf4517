"""Cox proportional hazards with one covariate, Breslow ties, by exact Newton-Raphson.

Small on purpose: the generator needs the marginal hazard ratio of stacked potential
outcomes and the crude hazard ratio of its own cohort, without a run-time dependency on
lifelines or statsmodels (the tests check it against statsmodels' ``PHReg``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.errors import ConvergenceError

MAX_ITERATIONS = 50
TOLERANCE = 1e-10


@dataclass(frozen=True)
class CoxFit:
    """A fitted one-covariate Cox model."""

    log_hr: float
    se: float
    log_likelihood: float
    iterations: int

    @property
    def hr(self) -> float:
        """The hazard ratio per unit of the covariate."""
        return float(np.exp(self.log_hr))


@dataclass(frozen=True)
class _Stratum:
    x: npt.NDArray[np.float64]  # sorted by time
    first: npt.NDArray[np.int64]  # first row of each distinct time
    events: npt.NDArray[np.float64]  # events per distinct time
    event_x: npt.NDArray[np.float64]  # sum of x over the events per distinct time


def _stratum(
    time: npt.NDArray[np.float64], event: npt.NDArray[np.bool_], x: npt.NDArray[np.float64]
) -> _Stratum:
    order = np.argsort(time, kind="stable")
    t, e, xs = time[order], event[order].astype(np.float64), x[order]
    _, first = np.unique(t, return_index=True)
    return _Stratum(xs, first, np.add.reduceat(e, first), np.add.reduceat(e * xs, first))


def _derivatives(s: _Stratum, beta: float) -> tuple[float, float, float]:
    """Log partial likelihood, score and information of one stratum at ``beta``."""
    eta = beta * s.x
    shift = eta.max()
    w = np.exp(eta - shift)

    def at_risk(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.cumsum(values[::-1])[::-1][s.first]

    s0, s1, s2 = at_risk(w), at_risk(w * s.x), at_risk(w * s.x * s.x)
    used = s.events > 0
    d, s0, s1, s2 = s.events[used], s0[used], s1[used], s2[used]
    mean = s1 / s0
    loglik = float(beta * s.event_x[used].sum() - (d * (np.log(s0) + shift)).sum())
    score = float((s.event_x[used] - d * mean).sum())
    information = float((d * (s2 / s0 - mean * mean)).sum())
    return loglik, score, information


def fit_cox_breslow(
    time: npt.ArrayLike,
    event: npt.ArrayLike,
    x: npt.ArrayLike,
    strata: npt.ArrayLike | None = None,
) -> CoxFit:
    """Fit ``hazard = h0_stratum(t) * exp(beta * x)`` with Breslow's tie handling.

    Newton-Raphson from ``beta = 0`` with step halving; raises ``ConvergenceError`` when
    the information is zero (no events, or ``x`` constant in every risk set) or the fit
    does not converge in ``MAX_ITERATIONS`` steps.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=bool)
    xv = np.asarray(x, dtype=np.float64)
    labels = np.zeros(t.shape[0], dtype=np.int64) if strata is None else np.asarray(strata)
    groups = [_stratum(t[labels == g], e[labels == g], xv[labels == g]) for g in np.unique(labels)]

    def total(beta: float) -> tuple[float, float, float]:
        parts = np.array([_derivatives(s, beta) for s in groups])
        return float(parts[:, 0].sum()), float(parts[:, 1].sum()), float(parts[:, 2].sum())

    beta = 0.0
    loglik, score, information = total(beta)
    for iteration in range(1, MAX_ITERATIONS + 1):
        if not information > 0:
            raise ConvergenceError(
                "Cox fit: the information is zero (no events, or the covariate is constant in "
                "every risk set). Fix: check that both arms have events."
            )
        step = score / information
        candidate = beta + step
        new = total(candidate)
        while new[0] < loglik - 1e-12 and abs(step) > TOLERANCE:
            step /= 2
            candidate = beta + step
            new = total(candidate)
        beta, (loglik, score, information) = candidate, new
        if abs(step) < TOLERANCE:
            return CoxFit(beta, float(1 / np.sqrt(information)), loglik, iteration)
    raise ConvergenceError(
        f"Cox fit did not converge in {MAX_ITERATIONS} Newton steps (last beta {beta:.6g}, "
        f"score {score:.3g}). Fix: check for complete separation (all events in one arm)."
    )
