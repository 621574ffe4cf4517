"""A study's analysis rows at the site as numpy arrays, for the model partials.

Read once per dataset version from the cached Spark frame (one Arrow transfer); they never
leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pyspark.sql import DataFrame

from shared.protocol.model import StudyProtocol


@dataclass(frozen=True)
class AnalysisRows:
    """Treatment, follow-up and the propensity design matrix (intercept first)."""

    person_id: NDArray[np.int64]
    treatment: NDArray[np.float64]
    time: NDArray[np.int64]
    event: NDArray[np.int64]
    design: NDArray[np.float64]


def analysis_rows(frame: DataFrame, protocol: StudyProtocol) -> AnalysisRows:
    """Columns of the analysis dataset as arrays, rows in person id order."""
    covariates = protocol.covariate_columns()
    table = frame.select("person_id", "treatment", "time", "event", *covariates).orderBy("person_id").toArrow()

    def column(name: str) -> NDArray[np.float64]:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

    design = np.column_stack([np.ones(table.num_rows), *(column(c) for c in covariates)])
    return AnalysisRows(
        np.asarray(table.column("person_id").to_numpy(zero_copy_only=False), dtype=np.int64),
        column("treatment"),
        column("time").astype(np.int64),
        column("event").astype(np.int64),
        design,
    )
