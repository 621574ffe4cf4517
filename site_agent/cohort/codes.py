"""Concept sets as Spark column predicates over ``*_source_value`` and ``*_concept_id`` columns.

Standard concepts are resolved once per build (:func:`resolve_concepts`): the listed ids,
their descendants from ``concept_ancestor`` when asked, minus the exclusions (and their
descendants). The resolved ids are few enough to inline in the plan.
"""

from __future__ import annotations

from functools import reduce

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from shared.errors import DataError
from shared.protocol.model import CodeSet


def _matches_any(column: Column, codes: list[str]) -> Column:
    exact = [code for code in codes if not code.endswith("*")]
    prefixes = [code[:-1] for code in codes if code.endswith("*")]
    terms = [column.startswith(prefix) for prefix in prefixes]
    if exact:
        terms.append(column.isin(exact))
    return reduce(lambda a, b: a | b, terms, F.lit(False))


def _descendants(concept_ids: list[int], ancestors: DataFrame | None) -> set[int]:
    if not concept_ids:
        return set()
    if ancestors is None:
        raise ValueError("concept_ancestor is needed to expand descendants")  # guarded by the store
    rows = ancestors.where(F.col("ancestor_concept_id").isin(concept_ids)).select("descendant_concept_id").collect()
    return set(concept_ids) | {int(row[0]) for row in rows}


def resolve_concepts(codes: CodeSet, ancestors: DataFrame | None) -> list[int]:
    """The standard concept ids that ``codes`` matches, sorted."""
    if codes.include_descendants and ancestors is not None and ancestors.limit(1).count() == 0:
        raise DataError(
            "the OMOP table 'concept_ancestor' has no rows, so a concept set with include_descendants "
            f"(concepts {codes.concept_ids}) cannot be expanded. Fix: load the OHDSI vocabulary "
            "(concept_ancestor from Athena) into the site's lake, or list the descendants in concept_ids."
        )
    if codes.include_descendants:
        keep = _descendants(codes.concept_ids, ancestors) - _descendants(codes.exclude_concept_ids, ancestors)
    else:
        keep = set(codes.concept_ids) - set(codes.exclude_concept_ids)
    return sorted(keep)


def code_predicate(column: Column, codes: CodeSet, concept: Column | None = None, concepts: list[int] | None = None) -> Column:
    """True where the record matches ``codes``: a source code in ``column`` (include minus
    exclude), or a resolved standard concept (``concepts``) in ``concept``; null-safe."""
    code = F.trim(column)  # some ETLs pad source codes with spaces (MIMIC's ICD-9 codes)
    keep = _matches_any(code, codes.include) if codes.include else F.lit(False)
    if codes.exclude:
        keep = keep & ~_matches_any(code, codes.exclude)
    if concept is not None and concepts:
        keep = keep | concept.isin(concepts)
    return F.coalesce(keep, F.lit(False))
