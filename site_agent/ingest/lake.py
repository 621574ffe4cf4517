"""A site's OMOP Delta tables as Arrow, for the data-quality checks (delta-rs, no Spark).

Columns are cast to their CDM 5.4 types where they differ (a lake written by another tool
may hold int32 ids or timestamps for dates); a column that cannot be cast is set aside and
reported as an error by the checks, which then treat it as absent. A table that cannot be
read at all (a data file its Delta log lists is gone, a corrupt file or log) is set aside in
``unreadable`` with the reason, and reported as an error too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from shared.omop import CDM_SCHEMAS
from site_agent.ingest.cdm import row_id_column
from site_agent.ingest.columns import convert
from site_agent.ingest.report import Finding, Severity

_CAST_ERRORS = (pa.ArrowException, OverflowError)  # Arrow's invalid, type and unsupported casts
READ_ERRORS = (OSError, DeltaError, pa.ArrowException)  # what delta-rs and Arrow raise on a broken table
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def missing_data_files(table: DeltaTable) -> list[str]:
    """The local data files the table's current version lists that are not on disk."""
    missing = []
    for uri in table.file_uris():
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file") and not Path(unquote(parsed.path)).exists():
            missing.append(unquote(parsed.path))
    return missing


def unreadable_reason(path: Path, error: Exception | None = None) -> str:
    """Why the Delta table at ``path`` cannot be read, in words, with the fix."""
    try:
        table = DeltaTable(str(path))
        missing = missing_data_files(table)
        version: int | None = table.version()
    except READ_ERRORS:
        missing, version = [], None
    if missing:
        shown = ", ".join(Path(file).name for file in missing[:3]) + (" ..." if len(missing) > 3 else "")
        return (
            f"its Delta log (version {version}) lists {len(missing)} data file(s) that are not in "
            f"{path}: {shown}. Fix: restore the file(s) from the site's backup; without one, move the "
            f"folder {path} aside and ingest the table's OMOP export again (fedrwe site ingest)"
        )
    detail = _ANSI.sub("", str(error) if error is not None else "unknown").strip().splitlines()
    return (
        f"reading it fails ({type(error).__name__}: {detail[0] if detail else ''}). Fix: restore the "
        f"table's folder {path} from the site's backup, or move it aside and ingest the table's OMOP "
        f"export again (fedrwe site ingest)"
    )


class LakeView:
    """Reads each CDM table of ``lake`` once, as Arrow with CDM 5.4 column types."""

    def __init__(self, lake: Path) -> None:
        self.lake = lake
        self.names = tuple(n for n in CDM_SCHEMAS if DeltaTable.is_deltatable(str(lake / n)))
        self.bad_types: dict[tuple[str, str], str] = {}
        self.unreadable: dict[str, str] = {}  # table -> why it cannot be read, with the fix
        self._tables: dict[str, pa.Table] = {}
        self._versions: dict[str, int] = {}
        for name in self.names:  # every check reads every table: read each once, up front
            try:
                if missing_data_files(DeltaTable(str(lake / name))):
                    raise FileNotFoundError(name)
                self.table(name)
            except READ_ERRORS as error:
                self.unreadable[name] = unreadable_reason(lake / name, error)
        self.names = tuple(n for n in self.names if n not in self.unreadable)

    def has(self, name: str) -> bool:
        return name in self.names

    def version(self, name: str) -> int:
        if name not in self._versions:
            self._versions[name] = DeltaTable(str(self.lake / name)).version()
        return self._versions[name]

    def table(self, name: str) -> pa.Table:
        """The table's current snapshot (columns of a wrong, uncastable type left out)."""
        if name not in self._tables:
            delta = DeltaTable(str(self.lake / name))
            self._versions[name] = delta.version()
            self._tables[name] = self._typed(name, pa.table(delta.to_pyarrow_table()))
        return self._tables[name]

    def column(self, name: str, column: str) -> pa.ChunkedArray | None:
        table = self.table(name)
        return table[column] if column in table.column_names else None

    def _typed(self, name: str, table: pa.Table) -> pa.Table:
        schema = CDM_SCHEMAS[name]
        for column in table.column_names:
            values = table[column]
            if column not in schema.names or values.type == schema.field(column).type:
                continue
            index = table.schema.get_field_index(column)
            try:
                table = table.set_column(index, column, convert(values, schema.field(column).type))
            except _CAST_ERRORS:
                self.bad_types[(name, column)] = str(values.type)
                table = table.remove_column(index)
        return table


def any_by_row(joined: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """Per row of a left table (``joined["_row"]`` = 0..n-1, each at least once after a left
    outer join), whether ``mask`` is true in any of its joined rows."""
    flags = pa.table({"_row": joined["_row"], "flag": pc.fill_null(mask, False)})
    return flags.group_by("_row").aggregate([("flag", "any")]).sort_by("_row")["flag_any"]


def numbered(**columns: pa.ChunkedArray) -> pa.Table:
    """A table of ``columns`` with ``_row`` = 0..n-1, to join and then regroup by row."""
    n = len(next(iter(columns.values())))
    return pa.table({"_row": pa.array(range(n), pa.int64()), **columns})


def rows_finding(view: LakeView, check: str, severity: Severity, table: str, column: str,
                 mask: pa.ChunkedArray | pa.Array, what: str, fix: str) -> Iterator[Finding]:
    """One finding for the rows of ``table`` where ``mask`` is true, if any."""
    count = int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)
    if not count:
        return
    data = view.table(table)
    id_column = row_id_column(table)
    example = None
    if id_column in data.column_names:  # the smallest id: the same whatever the rows' order
        example = pc.min(pc.filter(data[id_column], pc.fill_null(mask, False))).as_py()
    shown = f" (e.g. {id_column} {example})" if example is not None else ""
    yield Finding(check, severity, table, column, count, None if example is None else str(example),
                  f"{count} of {data.num_rows} rows {what}{shown}. Fix: {fix}")
