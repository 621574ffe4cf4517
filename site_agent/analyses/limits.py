"""Bounds a site puts on the model points it evaluates.

At an extreme coefficient a gradient collapses into a plain count (e.g. the number of
exposed events), which would bypass the minimum cell count. The bound comes from the
site's policy, never from the request.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.errors import DisclosureRefused


def check_coefficients(task: str, beta: NDArray[np.float64], limit: float) -> None:
    """Refuse to evaluate a model at a coefficient beyond the site's bound."""
    if not np.all(np.isfinite(beta)) or np.any(np.abs(beta) > limit):
        raise DisclosureRefused(
            f"{task!r}: coefficients beyond the site's bound |beta| <= {limit:g} (or not finite) "
            f"are not evaluated. Fix: a fit that needs them is separating the arms; drop or "
            f"merge the covariate, or set an L2 penalty."
        )
