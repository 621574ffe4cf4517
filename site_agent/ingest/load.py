"""``fedrwe site ingest``: an OMOP CDM export -> the site's Delta tables -> the DQ report.

Every file is read, mapped and typed before anything is written, so an export with one bad
value leaves the site's tables as they were. Then each table is written unless it already
holds the same content (see ``write``), and the data-quality report is computed on the
tables as written and saved next to them (``LAKE/_fedrwe/data_quality.json``), with a
summary of the ingest (``LAKE/_fedrwe/ingest.json``).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from site_agent.ingest.cdm import Conformed, cdm_version, conform
from site_agent.ingest.files import ExportFiles, file_digest, find_tables, read_text_table
from site_agent.ingest.quality import check_lake
from site_agent.ingest.report import REPORT_FOLDER, Report, write_report
from site_agent.ingest.settings import IngestSettings
from site_agent.ingest.split import CARE_SITE_SOURCES, keep_care_site
from site_agent.ingest.write import MAPPING_VERSION, content_digest, write_table


@dataclass(frozen=True)
class TableIngest:
    """What happened to one table."""

    table: str
    source: str
    rows: int
    version: int
    changed: bool
    renamed: dict[str, str]
    added: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class IngestResult:
    """One ingest: the tables written (or kept), the files skipped and the DQ report."""

    site_id: str
    lake: str
    source: str
    cdm_version: str
    care_site_id: int | None
    tables: tuple[TableIngest, ...]
    skipped: tuple[str, ...]
    report: Report
    report_path: str


def ingest_omop(settings: IngestSettings, today: dt.date | None = None) -> IngestResult:
    """Load the export into the lake and report its quality (``result.report.raise_for_errors()``
    is the caller's choice: a warning-only report never blocks)."""
    site = settings.site_id
    export = find_tables(settings.omop, settings.source_format, site)
    raw = {name: read_text_table(source, site) for name, source in export.tables.items()}
    version = cdm_version(raw, site)
    mapped = {name: conform(raw[name], export.tables[name], site) for name in raw}
    del raw
    tables = {name: result.table for name, result in mapped.items()}
    if settings.care_site_id is not None:
        tables = keep_care_site(tables, settings.care_site_id, site)
    digests = _digests(export, tables, site, settings.care_site_id)
    settings.lake.mkdir(parents=True, exist_ok=True)
    metadata = {
        "fedrwe.site_id": site, "fedrwe.cdm_version": version,
        "fedrwe.care_site_id": "" if settings.care_site_id is None else str(settings.care_site_id),
    }
    written = [
        write_table(settings.lake / name, table, digests[name],
                    {**metadata, "fedrwe.source": export.tables[name].path.name})
        for name, table in tables.items()
    ]
    report = check_lake(settings.lake, site_id=site, today=today)
    result = IngestResult(
        site, str(settings.lake), str(settings.omop), version, settings.care_site_id,
        tuple(_summary(w.table, export, mapped[w.table], w.rows, w.version, w.changed) for w in written),
        export.skipped, report, str(write_report(report)),
    )
    _write_summary(result, settings.lake)
    return result


def _digests(
    export: ExportFiles, tables: dict[str, pa.Table], site_id: str, care_site_id: int | None
) -> dict[str, str]:
    files = {name: file_digest(source) for name, source in export.tables.items()}
    split_inputs = {name: files[name] for name in CARE_SITE_SOURCES if name in files}
    digests = {}
    for name, table in tables.items():
        parts: dict[str, object] = {"file": files[name], "site_id": site_id}
        if care_site_id is not None and "person_id" in table.column_names:
            parts |= {"care_site_id": care_site_id, "split_from": split_inputs}
        digests[name] = content_digest(parts)
    return digests


def _summary(name: str, export: ExportFiles, mapped: Conformed, rows: int, version: int,
             changed: bool) -> TableIngest:
    return TableIngest(name, export.tables[name].path.name, rows, version, changed,
                       mapped.renamed, mapped.added, mapped.dropped)


def _write_summary(result: IngestResult, lake: Path) -> None:
    summary = {
        "mapping": MAPPING_VERSION,
        **{key: value for key, value in asdict(result).items() if key != "report"},
    }
    path = lake / REPORT_FOLDER / "ingest.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
