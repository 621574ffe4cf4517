"""Writing ingested tables as Delta, once per content.

Every commit carries ``fedrwe.ingest_digest`` in its Delta commit metadata: the SHA-256 of
what decided the table's content (the source file's bytes, the files that decide a
care-site split, the options and the ingest's mapping version). Ingesting the same export
again finds the same digest and writes nothing, so the table keeps its version; a changed
file gives a new digest and one overwrite, i.e. one new version in the Delta history.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake

# Bump when the mapping from an export to the tables changes: every table is then rewritten.
MAPPING_VERSION = "fedrwe-ingest-1"
DIGEST_KEY = "fedrwe.ingest_digest"


@dataclass(frozen=True)
class Written:
    """The outcome of writing one table."""

    table: str
    rows: int
    version: int
    changed: bool


def content_digest(parts: dict[str, object]) -> str:
    """SHA-256 of ``parts`` (file digests, options) with the mapping version, canonically."""
    text = json.dumps({"mapping": MAPPING_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stored_digest(path: Path) -> str | None:
    """The digest recorded by the table's latest commit, if fedrwe wrote it."""
    if not DeltaTable.is_deltatable(str(path)):
        return None
    value = DeltaTable(str(path)).history(1)[0].get(DIGEST_KEY)
    return str(value) if value is not None else None


def write_table(path: Path, table: pa.Table, digest: str, metadata: dict[str, str]) -> Written:
    """Overwrite the Delta table at ``path`` with ``table`` unless it already holds ``digest``."""
    name = path.name
    if stored_digest(path) == digest:
        current = DeltaTable(str(path))
        return Written(name, table.num_rows, current.version(), changed=False)
    write_deltalake(
        str(path), table, mode="overwrite", schema_mode="overwrite",
        commit_properties=CommitProperties(custom_metadata={**metadata, DIGEST_KEY: digest}),
    )
    return Written(name, table.num_rows, DeltaTable(str(path)).version(), changed=True)
