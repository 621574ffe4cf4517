"""OMOP CDM ingest (CSV/parquet export -> the site's Delta tables) and data quality.

    files.py     find an export's tables (any case, ``2b_`` prefixes), read them as text
    columns.py   typed columns from text, and the row of a bad value
    cdm.py       CDM 5.3 -> 5.4 mapping, typing, required columns
    split.py     one care site of an export as a site of its own
    write.py     Delta writes, once per content (digest in the commit metadata)
    lake.py      a lake's tables as Arrow for the checks
    quality.py   the checks and ``check_lake`` (dates.py: the date checks)
    report.py    findings, the JSON report, the blocking ``DataQualityError``
    settings.py  ``IngestSettings`` (the command's options, site config merged in)
    load.py      ``ingest_omop``: all of the above in order
    display.py   rich tables of the ingest and the report for the terminal
"""

from site_agent.ingest.load import IngestResult, ingest_omop
from site_agent.ingest.quality import check_lake
from site_agent.ingest.report import Finding, Report
from site_agent.ingest.settings import IngestSettings

__all__ = ["Finding", "IngestResult", "IngestSettings", "Report", "check_lake", "ingest_omop"]
