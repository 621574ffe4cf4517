"""The site's Delta tables, read by Spark and written by delta-rs.

Delta's JVM jars cannot be resolved on machines without Maven access, so the backend here
uses delta-rs (``deltalake``) for the transaction log - writes, versions, time travel -
and hands Spark the exact Parquet files of the table's current snapshot. Reading the
folder directly would be wrong after an overwrite (old files stay until vacuum). Tables
whose snapshot cannot be expressed as a list of Parquet files (deletion vectors, column
mapping) are refused with a clear error rather than read wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, from_arrow_type

from shared.errors import DataError, MissingTableError
from shared.omop import SCHEMAS, STUDY_COLUMNS
from site_agent.ingest.lake import missing_data_files, unreadable_reason

_UNSUPPORTED_READER_FEATURES = frozenset({"deletionVectors", "columnMapping"})


@dataclass(frozen=True)
class TableSnapshot:
    """One table as read: its Spark DataFrame and the Delta version it came from."""

    name: str
    version: int
    frame: DataFrame


class DeltaBackend:
    """Reads and writes the Delta tables of one site."""

    def __init__(self, spark: SparkSession, site_id: str) -> None:
        self._spark = spark
        self._site_id = site_id

    def exists(self, path: Path) -> bool:
        return DeltaTable.is_deltatable(str(path))

    def read(self, name: str, path: Path, schema: pa.Schema | None = None) -> TableSnapshot:
        """The current snapshot of the table at ``path`` as a Spark DataFrame."""
        if not self.exists(path):
            raise MissingTableError(self._site_id, name, str(path))
        table = DeltaTable(str(path))
        features = set(table.protocol().reader_features or [])
        refused = features & _UNSUPPORTED_READER_FEATURES
        mapping = table.metadata().configuration.get("delta.columnMapping.mode", "none")
        if refused or mapping != "none":
            raise DataError(
                f"site {self._site_id!r}: Delta table {name!r} at {path} uses "
                f"{sorted(refused) or ['columnMapping']}, which this backend cannot read "
                f"correctly. Fix: rewrite the table without them (e.g. REORG/rewrite with "
                f"delta-rs), or run the agent with delta-spark's jars."
            )
        if missing_data_files(table):  # Spark would fail with a Java stack trace
            raise DataError(
                f"site {self._site_id!r}: Delta table {name!r} cannot be read: {unreadable_reason(path)}."
            )
        files = table.file_uris()
        arrow_schema = schema or table.schema().to_arrow()
        if not files:
            frame = self._spark.createDataFrame([], from_arrow_schema(pa.schema(arrow_schema)))
        else:
            frame = self._spark.read.option("basePath", table.table_uri).parquet(*files)
        return TableSnapshot(name, table.version(), frame)

    def write_arrow(self, path: Path, data: pa.Table, metadata: dict[str, str]) -> int:
        """Overwrite the table at ``path`` with ``data``; returns the new Delta version."""
        write_deltalake(
            str(path), data, mode="overwrite", schema_mode="overwrite",
            commit_properties=CommitProperties(custom_metadata=metadata),
        )
        return DeltaTable(str(path)).version()

    def lost_files(self, path: Path) -> bool:
        """True when the table at ``path`` exists but a data file its log lists is gone."""
        return self.exists(path) and bool(missing_data_files(DeltaTable(str(path))))

    def last_commit_metadata(self, path: Path) -> dict[str, object]:
        """The custom metadata of the table's latest commit (empty if no table)."""
        if not self.exists(path):
            return {}
        return dict(DeltaTable(str(path)).history(1)[0])


class OmopTables:
    """A site's OMOP CDM tables, checked for presence and required columns."""

    def __init__(self, backend: DeltaBackend, lake: Path, site_id: str) -> None:
        self._backend = backend
        self._lake = lake
        self._site_id = site_id

    @property
    def lake(self) -> Path:
        """The folder holding the site's OMOP tables."""
        return self._lake

    def version(self, name: str) -> int:
        """The current Delta version of table ``name`` (no Spark involved)."""
        path = self._lake / name
        if not self._backend.exists(path):
            if path.is_dir() and any(path.iterdir()):
                raise DataError(
                    f"site {self._site_id!r}: OMOP table {name!r}: the folder {path} holds files but no "
                    f"readable Delta log (_delta_log), so no version of the table can be read. Fix: "
                    f"restore {path / '_delta_log'} from the site's backup, or move the folder aside "
                    f"and ingest the table's OMOP export again (fedrwe site ingest)."
                )
            raise MissingTableError(self._site_id, name, str(path))
        return DeltaTable(str(path)).version()

    def read(self, name: str, columns: tuple[str, ...] | None = None) -> TableSnapshot:
        """Table ``name``, checked for its required columns and ``columns`` (default: the study's)."""
        expected = SCHEMAS.get(name)
        snapshot = _as_cdm_types(self._backend.read(name, self._lake / name, expected), expected)
        present = set(snapshot.frame.columns)
        required = [] if expected is None else [f.name for f in expected if not f.nullable]
        needed = STUDY_COLUMNS.get(name, ()) if columns is None else columns
        required += [c for c in needed if c not in required]
        missing = [column for column in required if column not in present]
        if missing:
            raise DataError(
                f"site {self._site_id!r}: OMOP table {name!r} (Delta version {snapshot.version}) "
                f"lacks column(s) {missing} that the study needs. Fix: re-ingest {name} with "
                f"the OMOP CDM 5.4 columns (lower-case names), source values included."
            )
        return snapshot


def _as_cdm_types(snapshot: TableSnapshot, expected: pa.Schema | None) -> TableSnapshot:
    """The snapshot with each CDM column cast to its CDM type where the files hold another
    (a lake written by another tool; the data-quality checks have refused uncastable ones)."""
    if expected is None:
        return snapshot
    types = {f.name: from_arrow_type(f.type) for f in expected if f.name in snapshot.frame.columns}
    changed = {name: kind for name, kind in types.items() if snapshot.frame.schema[name].dataType != kind}
    if not changed:
        return snapshot
    frame = snapshot.frame.withColumns({name: F.col(name).cast(kind) for name, kind in changed.items()})
    return replace(snapshot, frame=frame)
