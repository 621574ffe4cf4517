"""One care site of an export as a site of its own (for multi-site tests on one export).

A person belongs to one care site: ``person.care_site_id`` when it is filled; otherwise
the care site of most of the person's visits (``visit_occurrence.care_site_id``), then of
most of their visit details (``visit_detail.care_site_id``) - MIMIC-IV's OMOP export fills
only the last. Ties go to the smaller care_site_id, so every person has at most one home
and the splits of an export are disjoint. A split keeps that care site's persons and their
rows in every person-keyed table; the other tables (vocabulary, care_site, cdm_source)
are kept whole.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from shared.errors import IngestError

# Where a person's care site is looked for, in order.
CARE_SITE_SOURCES = ("person", "visit_occurrence", "visit_detail")


def home_care_sites(tables: dict[str, pa.Table]) -> dict[int, int]:
    """person_id -> the person's care_site_id, for every person who has one."""
    home: dict[int, int] = {}
    for name in CARE_SITE_SOURCES:
        table = tables.get(name)
        if table is None:
            continue
        counts: dict[int, Counter[int]] = defaultdict(Counter)
        rows = table.select(["person_id", "care_site_id"]).filter(pc.is_valid(table["care_site_id"]))
        for person, care_site in zip(
            rows["person_id"].to_pylist(), rows["care_site_id"].to_pylist(), strict=True
        ):
            if person not in home:
                counts[person][care_site] += 1
        for person, sites in counts.items():
            home[person] = min(sites, key=lambda site: (-sites[site], site))
    return home


def keep_care_site(tables: dict[str, pa.Table], care_site_id: int, site_id: str) -> dict[str, pa.Table]:
    """The tables restricted to the persons whose home care site is ``care_site_id``."""
    home = home_care_sites(tables)
    persons = sorted(person for person, site in home.items() if site == care_site_id)
    if not persons:
        sizes = Counter(home.values()).most_common()
        listed = ", ".join(f"{site} ({n} persons)" for site, n in sizes[:12])
        raise IngestError(
            f"site {site_id!r}: no person's care site is {care_site_id} (a person's care site "
            f"is person.care_site_id, else that of most of their visits or visit details). "
            f"Fix: pass --care-site one of: {listed or 'none - the export has no care_site_id'}"
            + (f" and {len(sizes) - 12} more" if len(sizes) > 12 else "") + "."
        )
    keep = pa.array(persons, pa.int64())
    return {
        name: table.filter(pc.is_in(table["person_id"], value_set=keep))
        if "person_id" in table.column_names else table
        for name, table in tables.items()
    }
