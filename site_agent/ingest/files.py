"""Finding the tables of an OMOP CDM export on disk, and reading them as text.

Exports name their files in any case (``PERSON.csv``, ``person.csv``) and some prefix
them with an ETL step (MIMIC-IV's ``2b_concept.csv``); a file names a CDM table when its
name, lower-cased and without such a ``<digits><letter>_`` prefix, is one fedrwe ingests.
CSV files are read with every column as text (empty field = null) so that typing can
name the row of a bad value; a tab-separated header (OHDSI Athena's vocabulary files) is
recognised. Parquet exports are one ``<table>.parquet`` file or a ``<table>/`` folder of parts.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from shared.errors import IngestError
from shared.omop import CDM_SCHEMAS

SourceFormat = Literal["csv", "parquet"]

_PREFIX = re.compile(r"^[0-9]+[a-z]?_")
_SUFFIXES: dict[SourceFormat, tuple[str, ...]] = {
    "csv": (".csv.gz", ".csv", ".tsv"),
    "parquet": (".parquet",),
}


@dataclass(frozen=True)
class SourceFile:
    """One CDM table of an export: its table name and where it is."""

    table: str
    path: Path
    format: SourceFormat


@dataclass(frozen=True)
class ExportFiles:
    """The tables found in an export folder, and the files that name no table fedrwe reads."""

    folder: Path
    tables: dict[str, SourceFile]
    skipped: tuple[str, ...]


def table_name(path: Path, fmt: SourceFormat) -> str | None:
    """The CDM table a file (or parquet folder) stands for, lower case without prefix; or None."""
    lowered = path.name.lower()
    if path.is_dir():
        return _PREFIX.sub("", lowered) if fmt == "parquet" else None
    for suffix in _SUFFIXES[fmt]:
        if lowered.endswith(suffix):
            return _PREFIX.sub("", lowered[: -len(suffix)])
    return None


def find_tables(folder: Path, fmt: SourceFormat, site_id: str) -> ExportFiles:
    """Map the files of ``folder`` to CDM tables; two files for one table is an error."""
    if not folder.is_dir():
        raise IngestError(
            f"site {site_id!r}: the OMOP export folder {folder} does not exist or is not a "
            f"folder. Fix: pass --omop the folder that holds the export's {fmt} files."
        )
    tables: dict[str, SourceFile] = {}
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        name = table_name(path, fmt)
        if name is None:
            continue
        if name not in CDM_SCHEMAS:
            skipped.append(path.name)
            continue
        if name in tables:
            raise IngestError(
                f"site {site_id!r}: the export {folder} has two files for OMOP table "
                f"{name!r}: {tables[name].path.name} and {path.name}. Fix: keep one of them."
            )
        tables[name] = SourceFile(name, path, fmt)
    if not tables:
        hint = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and _has_files(p, fmt)]
        raise IngestError(
            f"site {site_id!r}: no OMOP CDM {fmt} file (person.{fmt}, PERSON.{fmt}, ...) in "
            f"{folder}. Fix: pass --omop the folder holding them"
            + (f", e.g. {folder / hint[0]}" if hint else "")
            + (", or use --format parquet" if fmt == "csv" else ", or use --format csv") + "."
        )
    ordered = {name: tables[name] for name in CDM_SCHEMAS if name in tables}  # the CDM's order
    return ExportFiles(folder, ordered, tuple(skipped))


def _has_files(folder: Path, fmt: SourceFormat) -> bool:
    return any(table_name(p, fmt) in CDM_SCHEMAS for p in folder.iterdir())


def file_digest(source: SourceFile) -> str:
    """SHA-256 of the file's bytes (of every part, in name order, for a parquet folder)."""
    digest = hashlib.sha256()
    parts = sorted(p for p in source.path.rglob("*") if p.is_file()) if source.path.is_dir() else [source.path]
    for part in parts:
        digest.update(part.relative_to(source.path.parent).as_posix().lower().encode() + b"\0")
        with part.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_text_table(source: SourceFile, site_id: str) -> pa.Table:
    """The file as an Arrow table with lower-case column names (CSV: every column text)."""
    if source.format == "parquet":
        table = pq.read_table(source.path)
    else:
        table = _read_csv(source, site_id)
    names = [name.strip().lower() for name in table.column_names]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise IngestError(
            f"site {site_id!r}: {source.path.name} has the column(s) {repeated} more than once "
            f"(column names are compared in lower case). Fix: keep one column of each name."
        )
    return table.rename_columns(names)


def _read_csv(source: SourceFile, site_id: str) -> pa.Table:
    delimiter, header = _header(source.path)
    try:
        return pa_csv.read_csv(
            source.path,
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as error:
        raise IngestError(
            f"site {site_id!r}: cannot read {source.path} as CSV ({error}). Fix: export the "
            f"table as UTF-8 CSV with a header row, one record per row, fields separated by "
            f"{'tabs' if delimiter == chr(9) else 'commas'} and quoted when they contain one."
        ) from None


def _header(path: Path) -> tuple[str, list[str]]:
    """The delimiter (comma, or tab for a tab-separated header) and the header's names."""
    with _open_text(path) as stream:
        first = stream.readline()
    delimiter = "\t" if "\t" in first and "," not in first else ","
    return delimiter, next(csv.reader([first], delimiter=delimiter), [])


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return path.open(encoding="utf-8-sig", errors="replace", newline="")


def file_line(source: SourceFile, row: int) -> int | None:
    """The line of the file where data row ``row`` (0-based, header excluded) starts."""
    if source.format != "csv":
        return None
    delimiter, _ = _header(source.path)
    with _open_text(source.path) as stream:
        reader = csv.reader(stream, delimiter=delimiter)
        line = 1
        for index, _record in enumerate(reader):
            if index == row + 1:
                return line
            line = reader.line_num + 1
    return None
