"""Covariate balance: standardized mean differences from per-arm (weighted) moments.

A site returns, per arm, the sum of weights and the weighted sums of each covariate and
of its square; summed over sites these give the pooled means and variances exactly, so
no row leaves. As in OHDSI's CohortMethod, variances divide by the sum of weights, and
the SMD is ``(mean_exposed - mean_comparator) / sqrt((var_exposed + var_comparator) / 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class ArmMoments:
    """Per arm (index 0 comparator, 1 exposed): sum of weights, and weighted sums of x and x^2."""

    weight: FloatArray  # shape (2,)
    total: FloatArray  # shape (2, p)
    total_squares: FloatArray  # shape (2, p)

    def __add__(self, other: ArmMoments) -> ArmMoments:
        return ArmMoments(
            self.weight + other.weight, self.total + other.total, self.total_squares + other.total_squares
        )

    def to_json(self) -> dict[str, object]:
        return {
            "weight": self.weight.tolist(), "total": self.total.tolist(),
            "total_squares": self.total_squares.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ArmMoments:
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("weight", "total", "total_squares")))


def arm_moments(covariates: FloatArray, treatment: NDArray[np.int64], weights: FloatArray | None = None) -> ArmMoments:
    """One site's moments per arm (weights default to 1)."""
    w = np.ones(len(treatment)) if weights is None else np.asarray(weights, dtype=np.float64)
    x = np.asarray(covariates, dtype=np.float64)
    rows = [treatment == arm for arm in (0, 1)]
    return ArmMoments(
        np.array([w[r].sum() for r in rows]),
        np.stack([w[r] @ x[r] for r in rows]),
        np.stack([w[r] @ (x[r] * x[r]) for r in rows]),
    )


@dataclass(frozen=True)
class Balance:
    """Means per arm and the standardized mean difference, per covariate."""

    mean_exposed: FloatArray
    mean_comparator: FloatArray
    smd: FloatArray


def standardized_differences(moments: ArmMoments) -> Balance:
    """SMDs from pooled moments; 0 where both arms have zero variance and equal means."""
    mean = moments.total / moments.weight[:, None]
    variance = np.maximum(moments.total_squares / moments.weight[:, None] - mean * mean, 0.0)
    spread = np.sqrt((variance[0] + variance[1]) / 2.0)
    difference = mean[1] - mean[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = np.where(spread > 0, difference / np.where(spread > 0, spread, 1.0), 0.0)
    return Balance(mean[1], mean[0], smd)
