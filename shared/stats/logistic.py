"""Logistic regression (the propensity model) by distributed Newton-Raphson.

A site computes :func:`logistic_derivatives` on its own rows at the coordinator's
``beta``; the coordinator sums them over sites and takes :func:`penalized_newton_step`.
The sum of the sites' derivatives is exactly the pooled derivative, so the fit is the
pooled maximum-likelihood fit (optionally with an L2 penalty, applied centrally).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit, log_expit

from shared.errors import ConvergenceError

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class LogisticDerivatives:
    """Log-likelihood, gradient and Hessian at ``beta``, and the rows they came from."""

    loglik: float
    gradient: FloatArray
    hessian: FloatArray
    n: int

    def __add__(self, other: LogisticDerivatives) -> LogisticDerivatives:
        return LogisticDerivatives(
            self.loglik + other.loglik, self.gradient + other.gradient,
            self.hessian + other.hessian, self.n + other.n,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "loglik": self.loglik, "gradient": self.gradient.tolist(),
            "hessian": self.hessian.tolist(), "n": self.n,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LogisticDerivatives:
        return cls(
            float(data["loglik"]),  # type: ignore[arg-type]
            np.asarray(data["gradient"], dtype=np.float64),
            np.atleast_2d(np.asarray(data["hessian"], dtype=np.float64)),
            int(data["n"]),  # type: ignore[call-overload]
        )


def logistic_derivatives(design: FloatArray, outcome: FloatArray, beta: FloatArray) -> LogisticDerivatives:
    """Derivatives of the Bernoulli log-likelihood with a logit link at ``beta``.

    ``design`` already holds the intercept column.
    """
    eta = design @ beta
    p = expit(eta)
    loglik = float(np.sum(outcome * log_expit(eta) + (1.0 - outcome) * log_expit(-eta)))
    gradient = design.T @ (outcome - p)
    hessian = -(design * (p * (1.0 - p))[:, None]).T @ design
    return LogisticDerivatives(loglik, gradient, hessian, len(outcome))


@dataclass(frozen=True)
class LogisticStep:
    """A central Newton update and whether it meets the convergence rule."""

    beta: FloatArray
    max_abs_step: float
    penalized_loglik: float


def penalized_newton_step(
    beta: FloatArray, total: LogisticDerivatives, l2: float = 0.0, intercept_index: int = 0
) -> LogisticStep:
    """Newton step on ``loglik - l2/2 * ||beta_without_intercept||^2`` from summed derivatives."""
    penalty = np.full(len(beta), l2)
    penalty[intercept_index] = 0.0
    gradient = total.gradient - penalty * beta
    hessian = total.hessian - np.diag(penalty)
    try:
        step = -np.linalg.solve(hessian, gradient)
    except np.linalg.LinAlgError:
        raise ConvergenceError(
            "the propensity model's information matrix is singular: a covariate is constant, "
            "or two covariates are collinear, over all sites. Fix: drop one of them from the "
            "protocol or set an L2 penalty."
        ) from None
    if not np.all(np.isfinite(step)):
        raise ConvergenceError(f"the propensity Newton step is not finite: {step.tolist()}")
    penalized = total.loglik - 0.5 * float(np.sum(penalty * beta * beta))
    return LogisticStep(beta + step, float(np.max(np.abs(step))), penalized)


def logistic_covariance(total: LogisticDerivatives, l2: float = 0.0, intercept_index: int = 0) -> FloatArray:
    """Inverse of the (penalized) observed information at the fitted ``beta``."""
    penalty = np.full(total.hessian.shape[0], l2)
    penalty[intercept_index] = 0.0
    covariance: FloatArray = np.linalg.inv(-(total.hessian - np.diag(penalty))).astype(np.float64)
    return covariance
