"""Meta-analysis of per-site estimates: inverse-variance fixed effect and DerSimonian-Laird
random effects, with Cochran's Q, I^2 and tau^2.

A one-shot alternative to the exact federated fit, and a check of heterogeneity: each site
fits its own model and sends one estimate (e.g. a log hazard ratio) and its SE. Pooling them
is only an approximation of the pooled fit (it degrades with small sites), but a large Q or
I^2 says that the sites disagree more than chance allows, which the exact fit would hide.
Everything stays on the scale given (e.g. log HR); the caller exponentiates
(:func:`shared.stats.inference.wald_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from shared.errors import DataError

FloatArray = NDArray[np.float64]


def _require_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise DataError(
            f"meta-analysis: {name} is {value!r}, not a finite number (estimates or standard "
            f"errors of extreme size, e.g. an SE near 0 or an estimate not on the log scale). "
            f"Fix: check each site's estimate and SE before pooling."
        )


@dataclass(frozen=True)
class PooledEstimate:
    """One pooled estimate with its Wald ``level`` CI, z and two-sided p-value for 0."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float

    def __post_init__(self) -> None:
        for name in ("estimate", "se", "ci_low", "ci_high", "z", "p_value"):
            _require_finite(name, getattr(self, name))

    def to_json(self) -> dict[str, float]:
        return {
            "estimate": self.estimate, "se": self.se, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "z": self.z, "p_value": self.p_value,
        }


@dataclass(frozen=True)
class MetaAnalysis:
    """Fixed-effect and DerSimonian-Laird random-effects pooling of k site estimates.

    ``q_p_value`` is None when k = 1 (df = 0: no test). ``i_squared`` is a fraction in
    [0, 1] (0 when Q <= df); ``tau_squared`` is truncated at 0. Weights are normalised to
    sum to 1, in the order of the sites given.
    """

    fixed: PooledEstimate
    random: PooledEstimate
    q: float
    q_df: int
    q_p_value: float | None
    i_squared: float
    tau_squared: float
    k: int
    weights_fixed: tuple[float, ...]
    weights_random: tuple[float, ...]
    level: float

    def __post_init__(self) -> None:
        for name in ("q", "i_squared", "tau_squared", "level"):
            _require_finite(name, getattr(self, name))
        if self.q_p_value is not None:
            _require_finite("q_p_value", self.q_p_value)
        for name in ("weights_fixed", "weights_random"):
            for weight in getattr(self, name):
                _require_finite(name, weight)

    def to_json(self) -> dict[str, object]:
        """Plain floats, ints and None only (never NaN or infinity)."""
        return {
            "k": self.k, "level": self.level,
            "fixed": self.fixed.to_json(), "random": self.random.to_json(),
            "q": self.q, "q_df": self.q_df, "q_p_value": self.q_p_value,
            "i_squared": self.i_squared, "tau_squared": self.tau_squared,
            "weights_fixed": list(self.weights_fixed), "weights_random": list(self.weights_random),
        }


def _site(index: int, sites: Sequence[str] | None) -> str:
    return f"site {sites[index]!r} (index {index})" if sites is not None else f"site index {index}"


def _validated(
    estimates: ArrayLike, standard_errors: ArrayLike, level: float, sites: Sequence[str] | None
) -> tuple[FloatArray, FloatArray]:
    y = np.asarray(estimates, dtype=np.float64)
    se = np.asarray(standard_errors, dtype=np.float64)
    if y.ndim != 1 or se.ndim != 1:
        raise DataError(
            f"meta-analysis needs one estimate and one SE per site (1-D): got shapes {y.shape} "
            f"and {se.shape}. Fix: pass flat sequences in site order."
        )
    if len(y) != len(se) or (sites is not None and len(sites) != len(y)):
        named = "" if sites is None else f" for {len(sites)} sites"
        raise DataError(
            f"meta-analysis got {len(y)} estimates and {len(se)} standard errors{named}. "
            f"Fix: pass one estimate and one SE per site, in the same site order."
        )
    if len(y) == 0:
        raise DataError("meta-analysis got no sites. Fix: pass at least one site's estimate.")
    if not 0.0 < level < 1.0:
        raise DataError(
            f"meta-analysis level is {level!r}. Fix: give a fraction in (0, 1), e.g. 0.95."
        )
    for i in range(len(y)):
        if not math.isfinite(y[i]):
            raise DataError(
                f"meta-analysis: {_site(i, sites)} has estimate {float(y[i])!r}, not a finite "
                f"number. Fix: leave that site out (e.g. no events in one arm) or refit it."
            )
        with np.errstate(over="ignore", divide="ignore"):
            weight = 1.0 / (se[i] * se[i])
        if not (math.isfinite(se[i]) and se[i] > 0.0 and math.isfinite(weight) and weight > 0.0):
            raise DataError(
                f"meta-analysis: {_site(i, sites)} has standard error {float(se[i])!r}; it must "
                f"be finite and > 0 (and 1/SE^2 a finite number > 0). Fix: leave that site out "
                f"or refit it (an SE of 0 or infinity means the site's model did not fit)."
            )
    return y, se


def _pooled(
    y: FloatArray, weights: FloatArray, critical: float
) -> tuple[PooledEstimate, FloatArray]:
    """Inverse-variance pooling with (unnormalised) ``weights``; also the normalised weights."""
    total = weights.sum()
    share = weights / total
    estimate = share @ y
    se = 1.0 / np.sqrt(total)
    z = estimate / se
    pooled = PooledEstimate(
        float(estimate), float(se), float(estimate - critical * se),
        float(estimate + critical * se), float(z), float(2.0 * stats.norm.sf(abs(z))),
    )
    return pooled, share


def meta_analysis(
    estimates: ArrayLike,
    standard_errors: ArrayLike,
    level: float = 0.95,
    sites: Sequence[str] | None = None,
) -> MetaAnalysis:
    """Pool per-site estimates by fixed effect and by DerSimonian-Laird random effects.

    Parameters
    ----------
    estimates, standard_errors
        One estimate (on the log scale for ratios) and its SE per site, in the same order.
    level
        Coverage of the Wald confidence intervals.
    sites
        Optional site ids, only to name a site in error messages.

    Raises
    ------
    DataError
        Lengths differ, no site, a non-finite estimate, an SE that is not finite and > 0,
        or a level outside (0, 1).
    """
    y, se = _validated(estimates, standard_errors, level, sites)
    k = len(y)
    critical = float(stats.norm.isf((1.0 - level) / 2.0))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = 1.0 / (se * se)
        fixed, weights_fixed = _pooled(y, w, critical)
        q = float(w @ (y - fixed.estimate) ** 2)
        df = k - 1
        tau_squared = 0.0
        if q > df:
            # C = sum(w) - sum(w^2) / sum(w) = 2 * sum_{i<j} w_i w_j / sum(w): no cancellation
            pairs = w[1:] @ np.cumsum(w)[:-1]
            tau_squared = float((q - df) / (2.0 * pairs / w.sum()))
        random, weights_random = _pooled(y, 1.0 / (se * se + tau_squared), critical)
    return MetaAnalysis(
        fixed=fixed,
        random=random,
        q=q,
        q_df=df,
        q_p_value=float(stats.chi2.sf(q, df)) if df > 0 else None,
        i_squared=(q - df) / q if q > df else 0.0,
        tau_squared=tau_squared,
        k=k,
        weights_fixed=tuple(float(v) for v in weights_fixed),
        weights_random=tuple(float(v) for v in weights_random),
        level=float(level),
    )
