"""Spark reductions of an analysis dataset to the small tables the partials use."""

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from shared.stats.cox import EventTable


def event_table(frame: DataFrame) -> EventTable:
    """Events and exits per follow-up day and arm (one Spark group-by)."""
    rows = (
        frame.groupBy("time", "treatment")
        .agg(F.sum("event").alias("events"), F.count(F.lit(1)).alias("exits"))
        .toArrow()
    )
    time = np.asarray(rows.column("time").to_numpy(zero_copy_only=False), dtype=np.int64)
    arm = np.asarray(rows.column("treatment").to_numpy(zero_copy_only=False), dtype=np.int64)
    days = np.unique(time)
    position = np.searchsorted(days, time)
    events = np.zeros((2, len(days)), dtype=np.int64)
    exits = np.zeros((2, len(days)), dtype=np.int64)
    events[arm, position] = rows.column("events").to_numpy(zero_copy_only=False)
    exits[arm, position] = rows.column("exits").to_numpy(zero_copy_only=False)
    return EventTable(days, events, exits)
