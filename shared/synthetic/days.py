"""Calendar dates as integer days since 1970-01-01, the encoding of Arrow's ``date32``.

The generator works on dates as plain integer arrays (fast, vectorised, exact); the
writer hands them to Arrow unchanged as ``date32`` values.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import numpy.typing as npt

Days = npt.NDArray[np.int64]

EPOCH = dt.date(1970, 1, 1)


def day_number(date: dt.date) -> int:
    """Days from 1970-01-01 to ``date`` (the Arrow ``date32`` value of ``date``)."""
    return (date - EPOCH).days


def calendar_date(day: int) -> dt.date:
    """The calendar date of a day number."""
    return EPOCH + dt.timedelta(days=int(day))


def calendar_year(days: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """Calendar year of each day number (vectorised)."""
    years = np.asarray(days, dtype="datetime64[D]").astype("datetime64[Y]")
    return years.astype(np.int64) + 1970


def uniform_day(rng: np.random.Generator, first: npt.ArrayLike, last: npt.ArrayLike) -> Days:
    """One uniform integer day per element in ``[first, last]`` (inclusive, ``first <= last``)."""
    first_arr = np.asarray(first, dtype=np.int64)
    last_arr = np.asarray(last, dtype=np.int64)
    width = last_arr - first_arr + 1
    if np.any(width < 1):
        raise ValueError("uniform_day needs first <= last for every element")
    return first_arr + np.floor(rng.random(np.broadcast(first_arr, last_arr).shape) * width).astype(
        np.int64
    )
