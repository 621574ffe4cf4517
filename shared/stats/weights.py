"""Propensity-score weights: IPTW for the ATE and the ATT, and overlap weights.

Every site computes its rows' weights from the global propensity model, so a weighted
sum over sites is the pooled weighted sum. Definitions (``e`` is the propensity score,
``t`` the treatment):

=========  ==========================  ============================
estimand   exposed                     comparator
=========  ==========================  ============================
ATE        1 / e                       1 / (1 - e)
ATT        1                           e / (1 - e)
overlap    1 - e                       e
=========  ==========================  ============================

Stabilized ATE weights multiply by the pooled share of the row's arm (P(t = 1) or
P(t = 0)); the option applies to the ATE only, as ATT and overlap weights already keep
the arms on the scale of the exposed and of the overlap population. Trimming drops rows whose score lies
outside ``[trim, 1 - trim]`` (weight 0); truncation caps weights at ``truncate_at``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
Estimand = Literal["ate", "att", "overlap"]


def propensity_weights(
    score: FloatArray,
    treatment: FloatArray,
    estimand: Estimand,
    *,
    stabilized: bool = False,
    exposed_share: float | None = None,
    trim: float = 0.0,
    truncate_at: float | None = None,
) -> FloatArray:
    """Each row's weight for ``estimand``; 0 for rows removed by trimming."""
    e = np.asarray(score, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if estimand == "ate":
        weight = t / e + (1.0 - t) / (1.0 - e)
        if stabilized:
            if exposed_share is None:
                raise ValueError("stabilized ATE weights need the pooled share of exposed rows")
            weight = weight * (t * exposed_share + (1.0 - t) * (1.0 - exposed_share))
    elif estimand == "att":
        weight = t + (1.0 - t) * e / (1.0 - e)
    elif estimand == "overlap":
        weight = t * (1.0 - e) + (1.0 - t) * e
    else:
        raise ValueError(f"unknown estimand {estimand!r}; expected 'ate', 'att' or 'overlap'")
    if truncate_at is not None:
        weight = np.minimum(weight, truncate_at)
    if trim > 0.0:
        weight = np.where((e >= trim) & (e <= 1.0 - trim), weight, 0.0)
    return np.asarray(weight, dtype=np.float64)
