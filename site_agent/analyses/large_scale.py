"""Partial computations of the large-scale covariates: which concepts a site releases, and their columns.

In the summary round a site releases, for each concept of its features, the number of
cohort members with it, but only when that number and the number without it (cohort size
minus it) are both at least the site's ``min_cell_count``; every released number is also
checked by the disclosure guard. Later rounds name the concepts the coordinator chose
(coordinator/large_scale.py); the site adds them as 0/1 design columns after the named
covariates, and refuses any concept it did not release.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from pyspark.sql import DataFrame

from shared.errors import DisclosureRefused, ProtocolError
from shared.protocol.model import FEATURE_DOMAINS, concept_column, parse_concept_column
from site_agent.analyses.release import Release
from site_agent.analyses.rows import AnalysisRows

_DOMAIN_CODE: dict[str, int] = {domain: i for i, domain in enumerate(FEATURE_DOMAINS, start=1)}
_KEY_BASE = 10**10  # above every concept id (32-bit in the CDM)


def _key(domain: str, concept_id: int) -> int:
    return _DOMAIN_CODE[domain] * _KEY_BASE + concept_id


def _column_of_key(key: int) -> str:
    return concept_column(FEATURE_DOMAINS[key // _KEY_BASE - 1], key % _KEY_BASE)


@dataclass(frozen=True)
class ConceptFeatures:
    """The cohort's (person, concept) pairs as arrays; they never leave the site."""

    person_id: NDArray[np.int64]
    key: NDArray[np.int64]  # domain code * 10^10 + concept id

    @classmethod
    def from_columns(cls, person_id: NDArray[np.int64], columns: list[str]) -> ConceptFeatures:
        """From (person, design column name) pairs, e.g. for in-memory test sites."""
        keys = [_key(*parsed) for c in columns if (parsed := parse_concept_column(c))]
        if len(keys) != len(columns):
            raise ValueError(f"not all of {sorted(set(columns))[:5]} are concept columns (domain_conceptid)")
        return cls(np.asarray(person_id, dtype=np.int64), np.asarray(keys, dtype=np.int64))

    def persons_per_column(self) -> dict[str, int]:
        """Cohort members with each concept (the pairs are distinct), by design column name."""
        keys, counts = np.unique(self.key, return_counts=True)
        return {_column_of_key(int(k)): int(c) for k, c in zip(keys, counts, strict=True)}


def read_features(frame: DataFrame) -> ConceptFeatures:
    """The features table (one Arrow transfer from the cached Spark frame)."""
    table = frame.select("person_id", "domain", "concept_id").toArrow()
    domain = np.asarray(table.column("domain").to_numpy(zero_copy_only=False), dtype=object)
    concept = np.asarray(table.column("concept_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    code = np.array([_DOMAIN_CODE[d] for d in domain], dtype=np.int64)
    return ConceptFeatures(
        np.asarray(table.column("person_id").to_numpy(zero_copy_only=False), dtype=np.int64),
        code * _KEY_BASE + concept,
    )


def releasable(features: ConceptFeatures, n_persons: int, min_cell_count: int) -> dict[str, int]:
    """Columns whose persons with and without the concept both reach ``min_cell_count``."""
    return {
        column: count for column, count in features.persons_per_column().items()
        if count >= min_cell_count and n_persons - count >= min_cell_count
    }


def concept_counts(features: ConceptFeatures, n_persons: int, min_cell_count: int) -> Release:
    """The summary round's release: persons per releasable concept, nothing below the minimum."""
    persons = releasable(features, n_persons, min_cell_count)
    counts: dict[str, int] = {}
    for column, count in persons.items():
        counts[f"large_scale.{column}.with"] = count
        counts[f"large_scale.{column}.without"] = n_persons - count
    return Release({"persons": persons}, counts)


def with_concepts(
    rows: AnalysisRows, features: ConceptFeatures, columns: list[str], min_cell_count: int,
) -> AnalysisRows:
    """``rows`` with one 0/1 design column per requested concept, after the named covariates.

    Refuses (withholding the model task) a concept this site would not release: its
    column's counts would otherwise enter the site's gradient and Hessian.
    """
    allowed = releasable(features, len(rows.person_id), min_cell_count)
    unknown = [c for c in columns if parse_concept_column(c) is None]
    if unknown or len(set(columns)) != len(columns):
        raise ProtocolError(
            f"the requested concept columns {unknown or columns} are malformed or repeated. Fix: run "
            f"the same fedrwe version on the coordinator and every site."
        )
    refused = [c for c in columns if c not in allowed]
    if refused:
        raise DisclosureRefused(
            f"concept column(s) {refused[:5]}{' ...' if len(refused) > 5 else ''} were not released by "
            f"this site (fewer persons with or without them than its minimum cell count {min_cell_count}), "
            f"so they are not evaluated. Fix: the coordinator must use only concepts every site released."
        )
    wanted = np.array([_key(*parsed) for c in columns if (parsed := parse_concept_column(c))], dtype=np.int64)
    order = np.argsort(wanted)
    chosen = np.isin(features.key, wanted)
    row = np.searchsorted(rows.person_id, features.person_id[chosen])  # rows are in person id order
    column = order[np.searchsorted(wanted[order], features.key[chosen])]
    block = np.zeros((len(rows.person_id), len(columns)))
    block[row, column] = 1.0
    return replace(rows, design=np.column_stack([rows.design, block]))
