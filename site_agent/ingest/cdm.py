"""An export's tables in the CDM 5.4 shape fedrwe reads (``shared.omop.CDM_SCHEMAS``).

CDM 5.3 -> 5.4: the visit tables' admission/discharge columns were renamed (and
visit_detail's parent link); columns 5.4 added (procedure end dates, device units, the
measurement/observation event links, cdm_source's version concept) are added as nulls.
Columns the CDM 5.4 shape does not have are dropped, and listed in the ingest summary:
fedrwe's tables keep one known shape, and a site's extra columns (which may hold
identifiers) never reach a study. A required column that is missing, or holds a null, is
an error naming the file, column, row and fix; so is a value of the wrong type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from shared.errors import IngestError
from shared.omop import CDM_SCHEMAS
from site_agent.ingest.columns import convert, describe, first_bad_row
from site_agent.ingest.files import SourceFile, file_line

_COLUMNS_53 = {
    "admitting_source_concept_id": "admitted_from_concept_id",
    "admitting_source_value": "admitted_from_source_value",
    "discharge_to_concept_id": "discharged_to_concept_id",
    "discharge_to_source_value": "discharged_to_source_value",
}
RENAMED_IN_54: dict[str, dict[str, str]] = {
    "visit_occurrence": _COLUMNS_53,
    "visit_detail": {**_COLUMNS_53, "visit_detail_parent_id": "parent_visit_detail_id"},
}
READABLE_VERSIONS = ("5.3", "5.4")


@dataclass(frozen=True)
class Conformed:
    """One table in the 5.4 shape, and what the mapping did to reach it."""

    table: pa.Table
    renamed: dict[str, str]
    added: tuple[str, ...]
    dropped: tuple[str, ...]


def row_id_column(table: str) -> str:
    """The column that names a row in messages: the primary key (person_id for death)."""
    return str(CDM_SCHEMAS[table].names[0])


def cdm_version(raw: dict[str, pa.Table], site_id: str) -> str:
    """``5.3`` or ``5.4``: from cdm_source.cdm_version, else from the visit columns' names."""
    source = raw.get("cdm_source")
    declared = None
    if source is not None and "cdm_version" in source.column_names and source.num_rows:
        declared = source["cdm_version"][0].as_py()
    if declared:
        found = re.search(r"(\d+)\.(\d+)", str(declared))
        version = f"{found.group(1)}.{found.group(2)}" if found else None
        if version not in READABLE_VERSIONS:
            raise IngestError(
                f"site {site_id!r}: cdm_source.cdm_version is {declared!r}; fedrwe reads OMOP CDM "
                f"5.3 and 5.4. Fix: convert the export to CDM 5.4 (OHDSI's CommonDataModel "
                f"migration scripts), or correct cdm_version if the export is 5.3 or 5.4."
            )
        return str(version)
    visits = raw.get("visit_occurrence")
    if visits is not None and set(_COLUMNS_53) & set(visits.column_names):
        return "5.3"
    return "5.4"


def conform(raw: pa.Table, source: SourceFile, site_id: str) -> Conformed:
    """Rename 5.3 columns, type every 5.4 column, add absent optional ones, drop the rest."""
    schema = CDM_SCHEMAS[source.table]
    renames = {
        old: new for old, new in RENAMED_IN_54.get(source.table, {}).items()
        if old in raw.column_names and new not in raw.column_names
    }
    raw = raw.rename_columns([renames.get(name, name) for name in raw.column_names])
    missing = [f.name for f in schema if not f.nullable and f.name not in raw.column_names]
    if missing:
        raise IngestError(
            f"site {site_id!r}: {source.path.name} (OMOP table {source.table!r}) lacks the "
            f"required column(s) {missing}; its header has {raw.column_names}. Fix: export "
            f"the table with its CDM 5.3/5.4 columns (names as in the OHDSI DDL, any case)."
        )
    columns = []
    for field in schema:
        if field.name not in raw.column_names:
            columns.append(pa.nulls(raw.num_rows, field.type))
            continue
        values = _typed(raw[field.name], field, source, site_id)
        if not field.nullable and values.null_count:
            row = _first_null(values)
            raise IngestError(
                f"site {site_id!r}: {_where(source, row)}: required column {field.name!r} of "
                f"table {source.table!r} is empty ({values.null_count} of {len(values)} rows)"
                f"{_row_id(raw, source.table, row)}. Fix: fill it in the export (the OMOP CDM "
                f"requires it) or leave those rows out, then ingest again."
            )
        columns.append(values)
    added = tuple(f.name for f in schema if f.name not in raw.column_names)
    dropped = tuple(name for name in raw.column_names if name not in schema.names)
    return Conformed(pa.Table.from_arrays(columns, schema=schema), renames, added, dropped)


def _typed(values: pa.ChunkedArray, field: pa.Field, source: SourceFile, site_id: str) -> pa.ChunkedArray:
    try:
        return convert(values, field.type)
    except (pa.ArrowException, OverflowError):  # Arrow's invalid, type and unsupported casts
        pass
    row = first_bad_row(values, field.type)
    value = values[row].as_py()
    raise IngestError(
        f"site {site_id!r}: {_where(source, row)}: column {field.name!r} of table "
        f"{source.table!r} holds {value!r}, which is not {describe(field.type)}. Fix: correct "
        f"the value in the export"
        + (" (or leave the field empty: the column is optional)" if field.nullable else "")
        + ", then ingest again."
    )


def _where(source: SourceFile, row: int) -> str:
    line = file_line(source, row)
    return f"{source.path.name} row {row + 1}" + (f" (line {line})" if line is not None else "")


def _first_null(values: pa.ChunkedArray) -> int:
    return int(pc.index(pc.is_null(values), True).as_py())


def _row_id(raw: pa.Table, table: str, row: int) -> str:
    column = row_id_column(table)
    if column not in raw.column_names:
        return ""
    return f"; the first is row id {column}={raw[column][row].as_py()!r}"
