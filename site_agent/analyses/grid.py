"""The site policy's time grid for tables that carry follow-up times.

A follow-up time in days becomes the last day of its grid cell: with a week grid, days
1-7 become 7, days 8-14 become 14, and so on. Events and exits within one cell become
ties at its end, so the coordinator's Kaplan-Meier and Breslow Cox fits from these tables
equal the pooled fits on the coarsened times.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def coarsen_days(time: NDArray[np.int64], width: int) -> NDArray[np.int64]:
    """Each time rounded up to a multiple of ``width`` days (unchanged for a day grid)."""
    if width == 1:
        return time
    return (-(-np.asarray(time, dtype=np.int64) // width)) * width
