"""Does every concept set of the protocol match some record at this site?

A set that matches nothing (a site coding drugs in NDC while the protocol lists RxNorm
codes, say) would give an empty cohort, or one without outcomes, and the study would fail
later with a puzzling "no events". The entry, exposure, comparator, outcome and restriction
sets are checked up front, all in one Spark job: each table is scanned once, with one ``max`` per
set, and the one-row results are joined into a single row. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from shared.errors import UnmatchedConceptSet
from shared.protocol.model import CodeSet, StudyProtocol

# Where each source of records comes from, and the columns a concept set is matched on.
SEARCHED: dict[str, str] = {
    "condition": "condition_occurrence (condition_source_value, condition_concept_id)",
    "drug": "drug_exposure (drug_source_value, drug_concept_id)",
    "procedure": "procedure_occurrence (procedure_source_value, procedure_concept_id)",
    "drug_era": "drug_era (drug_concept_id)",
}


def describe_codes(codes: CodeSet) -> str:
    """A concept set in words, for error messages."""
    parts = []
    if codes.include:
        excluded = f" except {codes.exclude}" if codes.exclude else ""
        parts.append(f"{codes.vocabulary} source codes {codes.include}{excluded}")
    if codes.concept_ids:
        descendants = " with descendants" if codes.include_descendants else ""
        excluded = f" except {codes.exclude_concept_ids}" if codes.exclude_concept_ids else ""
        parts.append(f"concepts {codes.concept_ids}{descendants}{excluded}")
    return " or ".join(parts)


def _checked_sets(protocol: StudyProtocol) -> list[tuple[str, str, CodeSet, str]]:
    """(protocol field, name, concept set, record source) of every set that must match."""
    exposure, comparator = protocol.arms()
    checked = [
        ("population.entry", protocol.population.name, protocol.population.entry, "condition"),
        ("exposure.codes", exposure.name, exposure.codes, exposure.domain),
        ("comparator.codes", comparator.name, comparator.codes, comparator.domain),
        ("outcome.codes", protocol.outcome.name, protocol.outcome.codes, "condition"),
    ]
    if protocol.restrict_to is not None:
        checked.append(("restrict_to.codes", protocol.restrict_to.name, protocol.restrict_to.codes, "condition"))
    return checked


def unmatched_concept_sets(
    protocol: StudyProtocol,
    conditions: DataFrame,
    records: dict[str, DataFrame],
    match: Callable[[CodeSet], Column],
) -> list[UnmatchedConceptSet]:
    """The checked concept sets that match no record of their table (protocol order)."""
    checked = _checked_sets(protocol)
    sources = {"condition": conditions, **records}
    found_by_source = []
    for source, frame in sources.items():
        flags = [
            F.max(match(codes).cast("int")).alias(f"set_{i}")
            for i, (_, _, codes, where) in enumerate(checked) if where == source
        ]
        if flags:
            found_by_source.append(frame.agg(*flags))
    row = reduce(lambda a, b: a.crossJoin(b), found_by_source).first()
    found = row.asDict() if row is not None else {}
    return [
        UnmatchedConceptSet(field, name, describe_codes(codes), SEARCHED[source])
        for i, (field, name, codes, source) in enumerate(checked)
        if not found.get(f"set_{i}")
    ]
