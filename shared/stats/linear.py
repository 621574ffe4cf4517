"""Weighted least squares from sums that sites add up, with a sandwich variance.

Two rounds, each a site partial and a central step named alike:

1. A site reduces its rows (design ``X`` with the intercept column, outcome ``y``,
   weights ``w``) to :func:`linear_sums`: ``X'WX``, ``X'Wy``, the sum of the weights and
   the row count. Summed over sites these are the pooled sums, and :func:`linear_fit`
   solves the pooled normal equations for ``beta``.
2. At the central ``beta`` a site returns :func:`linear_residual_sums`: the meat
   ``sum_i w_i^2 e_i^2 x_i x_i'`` (``e = y - x'beta``) and the weighted residual sum of
   squares. :func:`sandwich_covariance` gives ``(X'WX)^-1 meat (X'WX)^-1``: the
   heteroskedasticity-robust (HC0) variance, which is also the GEE independence
   (robust) variance with one row per cluster, weights treated as known. This is the
   variance of an inverse-probability-weighted outcome model. :func:`model_covariance`
   is the classical ``sigma^2 (X'WX)^-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import linalg

from shared.errors import DataError, ProtocolError

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class LinearSums:
    """A site's (or the sum over sites') ``X'WX``, ``X'Wy``, sum of weights and rows."""

    xtwx: FloatArray
    xtwy: FloatArray
    sum_weights: float
    n: int

    def __add__(self, other: LinearSums) -> LinearSums:
        _check_same_width(self.xtwy, other.xtwy, "linear sums")
        return LinearSums(
            self.xtwx + other.xtwx, self.xtwy + other.xtwy,
            self.sum_weights + other.sum_weights, self.n + other.n,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "xtwx": self.xtwx.tolist(), "xtwy": self.xtwy.tolist(),
            "sum_weights": self.sum_weights, "n": self.n,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LinearSums:
        return cls(
            np.atleast_2d(np.asarray(data["xtwx"], dtype=np.float64)),
            np.atleast_1d(np.asarray(data["xtwy"], dtype=np.float64)),
            float(data["sum_weights"]),  # type: ignore[arg-type]
            int(data["n"]),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class LinearResidualSums:
    """A site's meat ``sum w^2 e^2 x x'`` and weighted residual sum of squares at ``beta``."""

    meat: FloatArray
    weighted_rss: float
    n: int

    def __add__(self, other: LinearResidualSums) -> LinearResidualSums:
        _check_same_width(self.meat[0], other.meat[0], "residual sums")
        return LinearResidualSums(
            self.meat + other.meat, self.weighted_rss + other.weighted_rss, self.n + other.n
        )

    def to_json(self) -> dict[str, object]:
        return {"meat": self.meat.tolist(), "weighted_rss": self.weighted_rss, "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LinearResidualSums:
        return cls(
            np.atleast_2d(np.asarray(data["meat"], dtype=np.float64)),
            float(data["weighted_rss"]),  # type: ignore[arg-type]
            int(data["n"]),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class LinearFit:
    """Central solution: coefficients and the bread ``(X'WX)^-1`` of every variance."""

    beta: FloatArray
    bread: FloatArray
    sum_weights: float
    n: int


def linear_sums(design: FloatArray, outcome: FloatArray, weights: FloatArray | None = None) -> LinearSums:
    """Site partial, round 1: the weighted cross-products of this site's rows.

    ``design`` already holds the intercept column; ``weights`` default to 1.
    """
    x, y, w = _rows(design, outcome, weights)
    weighted_x = x * w[:, None]
    return LinearSums(weighted_x.T @ x, weighted_x.T @ y, float(np.sum(w)), len(y))


def linear_fit(total: LinearSums) -> LinearFit:
    """Central, round 1: ``beta`` solving the pooled normal equations ``X'WX beta = X'Wy``."""
    try:
        factor = linalg.cho_factor(total.xtwx, lower=True)
    except linalg.LinAlgError:
        raise DataError(
            f"the weighted design over all sites ({total.n} rows, {total.xtwx.shape[0]} columns) "
            "is singular: a column is constant or collinear with others, or the weights are "
            "zero where it varies. Fix: drop or merge that column in the protocol."
        ) from None
    beta: FloatArray = linalg.cho_solve(factor, total.xtwy).astype(np.float64)
    bread: FloatArray = linalg.cho_solve(factor, np.eye(len(beta))).astype(np.float64)
    return LinearFit(beta, (bread + bread.T) / 2.0, total.sum_weights, total.n)


def linear_residual_sums(
    design: FloatArray, outcome: FloatArray, beta: FloatArray, weights: FloatArray | None = None
) -> LinearResidualSums:
    """Site partial, round 2: the sandwich meat and weighted RSS at the central ``beta``."""
    x, y, w = _rows(design, outcome, weights)
    if x.shape[1] != len(beta):
        raise ProtocolError(
            f"beta has {len(beta)} coefficients but the site's design has {x.shape[1]} columns. "
            "Fix: send the beta of this model's fit."
        )
    residual = y - x @ beta
    score = x * (w * residual)[:, None]
    return LinearResidualSums(score.T @ score, float(np.sum(w * residual**2)), len(y))


def sandwich_covariance(fit: LinearFit, residuals: LinearResidualSums) -> FloatArray:
    """Central, round 2: robust (HC0) covariance ``bread @ meat @ bread``, weights fixed."""
    if residuals.n != fit.n:
        raise ProtocolError(
            f"the residual sums cover {residuals.n} rows but the fit {fit.n}. "
            "Fix: collect round 2 from the same sites and rows as round 1."
        )
    covariance: FloatArray = fit.bread @ residuals.meat @ fit.bread
    return (covariance + covariance.T) / 2.0


def model_covariance(fit: LinearFit, residuals: LinearResidualSums) -> FloatArray:
    """Central, round 2: classical ``sigma^2 (X'WX)^-1``, ``sigma^2 = RSS_w / (n - p)``."""
    degrees_of_freedom = fit.n - len(fit.beta)
    if degrees_of_freedom <= 0:
        raise DataError(
            f"{fit.n} rows cannot estimate the residual variance of {len(fit.beta)} "
            "coefficients. Fix: use more rows or fewer covariates."
        )
    scale = residuals.weighted_rss / degrees_of_freedom
    covariance: FloatArray = scale * fit.bread
    return covariance


def _rows(
    design: FloatArray, outcome: FloatArray, weights: FloatArray | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    y = np.asarray(outcome, dtype=np.float64).ravel()
    x = np.asarray(design, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != len(y) or len(w) != len(y):
        raise DataError(
            f"design of shape {x.shape}, {len(y)} outcomes and {len(w)} weights do not match. "
            "Fix: give one design row, one outcome and one weight per person."
        )
    finite = np.isfinite(x).all(axis=1) & np.isfinite(y) & np.isfinite(w)
    if not finite.all():
        raise DataError(
            f"{int((~finite).sum())} of {len(y)} rows have a missing or infinite design value, "
            "outcome or weight. Fix: drop or impute them before the fit."
        )
    if (w < 0).any():
        raise DataError(
            f"{int((w < 0).sum())} weights are negative (smallest {float(w.min())}). "
            "Fix: weights must be >= 0; check how they were computed."
        )
    return x, y, w


def _check_same_width(mine: FloatArray, theirs: FloatArray, what: str) -> None:
    if mine.shape != theirs.shape:
        raise ProtocolError(
            f"cannot add {what} for {mine.shape[0]} and {theirs.shape[0]} coefficients. "
            "Fix: every site must build the design from the same protocol."
        )
