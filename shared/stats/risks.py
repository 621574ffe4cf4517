"""Risks at a horizon from Kaplan-Meier curves, their ratio and difference, and crude rates.

The risk by day ``h`` is ``1 - S(h)`` with the Kaplan-Meier CI turned around. The risk
difference and the log risk ratio get Wald CIs from the Greenwood variances (the arms
are independent samples). When a ratio is undefined (a zero risk) its fields are None
with a reason, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

from shared.stats.km import KaplanMeier

DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class ArmRisk:
    """Cumulative incidence by the horizon in one arm, with its variance and 95% CI."""

    risk: float
    variance: float
    ci_low: float
    ci_high: float


def risk_at(curve: KaplanMeier, horizon_days: float) -> ArmRisk:
    """``1 - S(horizon)`` with the KM (log-log) CI turned around."""
    survival, variance, low, high = curve.at(horizon_days)
    return ArmRisk(1.0 - survival, variance if survival > 0 else 0.0, 1.0 - high, 1.0 - low)


@dataclass(frozen=True)
class RiskContrast:
    """Risk ratio and risk difference (exposed vs comparator) with Wald CIs."""

    risk_ratio: float | None
    risk_ratio_ci_low: float | None
    risk_ratio_ci_high: float | None
    risk_difference: float
    risk_difference_ci_low: float
    risk_difference_ci_high: float
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def contrast_risks(exposed: ArmRisk, comparator: ArmRisk, level: float = 0.95) -> RiskContrast:
    """RD = r1 - r0 (variance v1 + v0); log RR = log r1 - log r0 (variance v1/r1^2 + v0/r0^2)."""
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    difference = exposed.risk - comparator.risk
    half = z * math.sqrt(exposed.variance + comparator.variance)
    if exposed.risk <= 0.0 or comparator.risk <= 0.0:
        return RiskContrast(
            None, None, None, difference, difference - half, difference + half,
            note="risk ratio undefined: an arm has zero risk by the horizon",
        )
    ratio = exposed.risk / comparator.risk
    log_se = math.sqrt(exposed.variance / exposed.risk**2 + comparator.variance / comparator.risk**2)
    return RiskContrast(
        ratio, ratio * math.exp(-z * log_se), ratio * math.exp(z * log_se),
        difference, difference - half, difference + half,
    )


def rate_per_1000_person_years(events: float, person_days: float) -> float | None:
    """Crude incidence rate; None when there is no follow-up."""
    return None if person_days <= 0 else 1000.0 * events / (person_days / DAYS_PER_YEAR)
