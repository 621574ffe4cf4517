"""Code sets as Spark column predicates over ``*_source_value`` columns."""

from __future__ import annotations

from functools import reduce

from pyspark.sql import Column
from pyspark.sql import functions as F

from shared.protocol.model import CodeSet


def _matches_any(column: Column, codes: list[str]) -> Column:
    exact = [code for code in codes if not code.endswith("*")]
    prefixes = [code[:-1] for code in codes if code.endswith("*")]
    terms = [column.startswith(prefix) for prefix in prefixes]
    if exact:
        terms.append(column.isin(exact))
    return reduce(lambda a, b: a | b, terms, F.lit(False))


def code_predicate(column: Column, codes: CodeSet) -> Column:
    """True where ``column`` holds a code of ``codes`` (include minus exclude); null-safe."""
    keep = _matches_any(column, codes.include)
    if codes.exclude:
        keep = keep & ~_matches_any(column, codes.exclude)
    return F.coalesce(keep, F.lit(False))
