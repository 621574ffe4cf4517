"""Wald inference for a log-scale estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio (e.g. a hazard ratio) with its Wald CI, from the log estimate and its SE."""

    log_estimate: float
    se: float
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    level: float


def wald_ratio(log_estimate: float, se: float, level: float = 0.95) -> RatioEstimate:
    """exp(log estimate) with the ``level`` Wald interval and the two-sided p-value for 1."""
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    p_value = float(2.0 * stats.norm.sf(abs(log_estimate) / se))
    return RatioEstimate(
        log_estimate, se, math.exp(log_estimate),
        math.exp(log_estimate - z * se), math.exp(log_estimate + z * se), p_value, level,
    )
