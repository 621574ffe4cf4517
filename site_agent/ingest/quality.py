"""Data-quality checks of a site's OMOP tables: at ingest, and before a study (``check_lake``).

Errors (block every study until fixed): a study table missing; a required column missing,
of a type that cannot be read, or empty in every row; duplicate primary ids; observation
periods that end before they start; rows of persons absent from ``person``.
Warnings (the cohort rules cope; the steward should know): some rows empty in a required
column; other end-before-start rows; events outside every observation period of their
person; persons without an observation period; births in the future; deaths before
birth; links to visits absent from ``visit_occurrence``; concept ids absent from
``concept`` (when the site has one) and concept id 0 ('unmapped'); source values with
leading or trailing spaces (a source-code concept set would not match them).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from shared.omop import CDM_SCHEMAS, STUDY_TABLES, VOCABULARY_TABLES
from site_agent.ingest.cdm import row_id_column
from site_agent.ingest.dates import date_findings
from site_agent.ingest.lake import READ_ERRORS, LakeView, rows_finding
from site_agent.ingest.report import Finding, Report, Severity, TableRows

# The standard concept of each row, where 0 means the source code found no mapping.
MAIN_CONCEPTS: dict[str, tuple[str, ...]] = {
    "person": ("gender_concept_id", "race_concept_id", "ethnicity_concept_id"),
    "visit_occurrence": ("visit_concept_id",),
    "visit_detail": ("visit_detail_concept_id",),
    "condition_occurrence": ("condition_concept_id",),
    "drug_exposure": ("drug_concept_id",),
    "procedure_occurrence": ("procedure_concept_id",),
    "device_exposure": ("device_concept_id",),
    "measurement": ("measurement_concept_id",),
    "observation": ("observation_concept_id",),
    "drug_era": ("drug_concept_id",),
    "condition_era": ("condition_concept_id",),
}
# Tables whose first column is not unique by design (death's person_id should be: warning).
_NOT_KEYED = frozenset({"cdm_source", "concept_ancestor", "concept_relationship"})


def check_lake(lake: Path, *, site_id: str | None = None, today: dt.date | None = None) -> Report:
    """Check the OMOP tables in ``lake``; the report's errors block a study (``raise_for_errors``)."""
    view = LakeView(lake)
    site = site_id or _ingested_site_id(view) or lake.name
    day = today or dt.date.today()
    findings = [
        *_structure(view),
        *_duplicates(view),
        *date_findings(view, day),
        *_orphans(view),
        *_concepts(view),
        *_padded_source_values(view),
    ]
    findings.sort(key=lambda f: (f.severity != "error", f.table, f.column, f.check))
    tables = {name: TableRows(view.table(name).num_rows, view.version(name)) for name in view.names}
    return Report(site, str(lake), day.isoformat(), tables, tuple(findings))


def _ingested_site_id(view: LakeView) -> str | None:
    if not view.has("person"):
        return None
    try:
        value = DeltaTable(str(view.lake / "person")).history(1)[0].get("fedrwe.site_id")
    except READ_ERRORS:
        return None
    return str(value) if value else None


def _structure(view: LakeView) -> Iterator[Finding]:
    for name, reason in sorted(view.unreadable.items()):
        yield Finding("unreadable_table", "error", name, "", 0, None,
                      f"Delta table {name!r} cannot be read: {reason}.")
    for name in STUDY_TABLES:
        if not view.has(name) and name not in view.unreadable:
            yield Finding("missing_table", "error", name, "", 0, None,
                          f"no Delta table {name!r} in {view.lake}. Fix: ingest the export with its "
                          f"{name} file.")
    for name in view.names:
        data = view.table(name)
        for field in CDM_SCHEMAS[name]:
            if (name, field.name) in view.bad_types:
                yield Finding("column_type", "error", name, field.name, data.num_rows, None,
                              f"column is {view.bad_types[(name, field.name)]} and cannot be read as "
                              f"{field.type}. Fix: re-ingest the table with fedrwe site ingest.")
            elif field.nullable:
                continue
            elif field.name not in data.column_names:
                yield Finding("missing_column", "error", name, field.name, data.num_rows, None,
                              "required column is missing. Fix: re-ingest the table with its "
                              "CDM 5.4 columns.")
            elif data.num_rows and data[field.name].null_count == data.num_rows:
                yield Finding("null_required", "error", name, field.name, data.num_rows, None,
                              f"every one of the {data.num_rows} rows is empty in this required "
                              f"column. Fix: fill it in the source and ingest again.")
            elif data[field.name].null_count:
                yield from rows_finding(view, "null_required", "warning", name, field.name,
                                        pc.is_null(data[field.name]), "are empty in this required column "
                                        "and are ignored by the cohort rules",
                                        "fill it in the source and ingest again.")


def _duplicates(view: LakeView) -> Iterator[Finding]:
    for name in view.names:
        column = view.column(name, row_id_column(name))
        if name in _NOT_KEYED or column is None or len(column) == 0:
            continue
        counts = pa.table({"id": column}).group_by("id").aggregate([([], "count_all")])
        repeated = counts.filter(pc.greater(counts["count_all"], 1)).sort_by("id")
        if repeated.num_rows:
            extra = int(pc.sum(repeated["count_all"]).as_py()) - repeated.num_rows
            severity: Severity = "warning" if name == "death" else "error"
            what = "death records beyond one per person" if name == "death" else "repeat an id"
            yield Finding("duplicate_id", severity, name, row_id_column(name), extra,
                          str(repeated["id"][0].as_py()),
                          f"{extra} rows {what} (e.g. {row_id_column(name)} "
                          f"{repeated['id'][0].as_py()}). Fix: give every row its own id in the "
                          f"source, then ingest again.")


def _orphans(view: LakeView) -> Iterator[Finding]:
    persons = view.column("person", "person_id") if view.has("person") else None
    visits = view.column("visit_occurrence", "visit_occurrence_id") if view.has("visit_occurrence") else None
    for name in view.names:
        data = view.table(name)
        if persons is not None and name != "person" and "person_id" in data.column_names:
            yield from rows_finding(view, "orphan_person", "error", name, "person_id",
                                    pc.invert(pc.is_in(data["person_id"], value_set=persons)),
                                    "belong to a person_id absent from person",
                                    "export the person rows of every person the tables refer to.")
        if visits is not None and name != "visit_occurrence" and "visit_occurrence_id" in data.column_names:
            link = data["visit_occurrence_id"]
            dangling = pc.and_(pc.is_valid(link), pc.invert(pc.is_in(link, value_set=visits)))
            yield from rows_finding(view, "orphan_visit", "warning", name, "visit_occurrence_id",
                                    dangling, "link to a visit_occurrence_id absent from visit_occurrence",
                                    "export the visits the rows refer to, or leave the link empty.")


def _concepts(view: LakeView) -> Iterator[Finding]:
    known = view.column("concept", "concept_id") if view.has("concept") else None
    for name in view.names:
        if name in VOCABULARY_TABLES or name == "cdm_source":
            continue
        data = view.table(name)
        for field in CDM_SCHEMAS[name]:
            if not field.name.endswith("_concept_id") or field.name not in data.column_names:
                continue
            values = data[field.name]
            if field.name in MAIN_CONCEPTS.get(name, ()):
                yield from rows_finding(view, "unmapped_concept", "warning", name, field.name,
                                        pc.equal(values, 0), "have concept id 0 (no standard concept)",
                                        "map the source codes to standard concepts (OHDSI Usagi) if a "
                                        "study needs them; source-code concept sets still match.")
            if known is not None and len(known):
                unknown = pc.and_(pc.not_equal(values, 0), pc.invert(pc.is_in(values, value_set=known)))
                yield from rows_finding(view, "unknown_concept", "warning", name, field.name, unknown,
                                        "have a concept id absent from the concept table",
                                        "ingest the vocabulary tables (concept) that the export's "
                                        "concepts come from.")


def _padded_source_values(view: LakeView) -> Iterator[Finding]:
    for name in view.names:
        data = view.table(name)
        for column in data.column_names:
            if column.endswith("_source_value") and pa.types.is_string(data[column].type):
                values = data[column]
                padded = pc.not_equal(pc.utf8_trim_whitespace(values), values)
                yield from rows_finding(view, "padded_source_value", "warning", name, column, padded,
                                        "have leading or trailing spaces, which a source-code concept "
                                        "set does not match", "trim the values in the source.")
