"""Arrow tables in the exact ``shared.omop`` schemas, and their Delta tables at a site.

Ids: a person is ``site_number * 10**9 + i`` (i = 1, 2, ... over the site); a record's id
is ``person_id * 1000 + k``, k its rank among the person's records of that table (sorted
by date, then code), so ids are unique network-wide and do not depend on chunking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from shared import omop
from shared.synthetic.events import NO_LINK, BlockRecords, Records
from shared.synthetic.persons import NO_DAY, Demographics, Ints
from shared.synthetic.vocabulary import (
    RXNORM,
    SOURCE_CODES,
    concept_id,
    concept_table,
    source_values,
)

PERSONS_PER_SITE = 10**9
ROWS_PER_PERSON = 1000
_SOURCE_VALUES = source_values()
_RACE_CONCEPTS = np.array([omop.RACE_WHITE, omop.RACE_BLACK, omop.RACE_ASIAN, omop.RACE_UNKNOWN])
_RACE_NAMES = pa.array(["white", "black", "asian", "other"])
_VISIT_NAMES = {omop.VISIT_INPATIENT: "IP", omop.VISIT_OUTPATIENT: "OP", omop.VISIT_EMERGENCY: "ER"}
_INTRAVENOUS = {
    "6130",
    "8782",
    "6960",
    "4177",
    "4337",
    "26225",
    "7242",
}  # + fentanyl, ondansetron, naloxone
_INHALED = {"36453"}  # sevoflurane


def _routes() -> pa.Array:
    """Route of administration of each code number (null for conditions)."""
    routes = [
        None
        if code.vocabulary_id != RXNORM
        else "intravenous"
        if code.code in _INTRAVENOUS
        else "inhalation"
        if code.code in _INHALED
        else "oral"
        for code in SOURCE_CODES
    ]
    return pa.array(routes, type=pa.string())


_ROUTES = _routes()


def person_ids(site_number: int, first_number: int, n: int) -> Ints:
    """Person ids of a block whose first person is the site's ``first_number``-th."""
    return site_number * PERSONS_PER_SITE + first_number + np.arange(n, dtype=np.int64)


def _dates(days: Ints) -> pa.Array:
    return pa.array(days.astype(np.int32), type=pa.date32())


def _int32(values: Ints | int, n: int) -> pa.Array:
    return pa.array(np.broadcast_to(np.asarray(values, dtype=np.int32), (n,)), type=pa.int32())


def _record_ids(ids: Ints, records: Records) -> tuple[Ints, Ints]:
    """Sort order of ``records`` (person, day, value) and the row id of each sorted row."""
    order = np.lexsort((records.value, records.day, records.person))
    person = records.person[order]
    rank = np.arange(len(person)) - np.searchsorted(person, person, side="left")
    if len(rank) and rank.max() >= ROWS_PER_PERSON:
        raise RuntimeError(f"a person has more than {ROWS_PER_PERSON} rows in one table")
    return order, ids[person] * ROWS_PER_PERSON + rank


def person_table(ids: Ints, demographics: Demographics) -> pa.Table:
    """``person`` rows."""
    n = len(ids)
    female = demographics.female
    return pa.table(
        {
            "person_id": ids,
            "gender_concept_id": _int32(np.where(female, omop.GENDER_FEMALE, omop.GENDER_MALE), n),
            "year_of_birth": _int32(demographics.year_of_birth, n),
            "month_of_birth": _int32(demographics.month_of_birth, n),
            "day_of_birth": _int32(demographics.day_of_birth, n),
            "race_concept_id": _int32(_RACE_CONCEPTS[demographics.race], n),
            "ethnicity_concept_id": _int32(
                np.where(
                    demographics.hispanic, omop.ETHNICITY_HISPANIC, omop.ETHNICITY_NOT_HISPANIC
                ),
                n,
            ),
            "care_site_id": pa.nulls(n, pa.int64()),
            "person_source_value": pa.nulls(n, pa.string()),
            "gender_source_value": pa.array(np.where(female, "F", "M"), type=pa.string()),
            "race_source_value": _RACE_NAMES.take(pa.array(demographics.race)),
        },
        schema=omop.SCHEMAS["person"],
    )


def observation_period_table(ids: Ints, start: Ints, end: Ints) -> pa.Table:
    """One ``observation_period`` per person; its id is the person id."""
    return pa.table(
        {
            "observation_period_id": ids,
            "person_id": ids,
            "observation_period_start_date": _dates(start),
            "observation_period_end_date": _dates(end),
            "period_type_concept_id": _int32(omop.TYPE_EHR, len(ids)),
        },
        schema=omop.SCHEMAS["observation_period"],
    )


def death_table(ids: Ints, death: Ints) -> pa.Table:
    """``death`` rows of the persons who died."""
    died = death != NO_DAY
    n = int(died.sum())
    return pa.table(
        {
            "person_id": ids[died],
            "death_date": _dates(death[died]),
            "death_type_concept_id": _int32(omop.TYPE_EHR, n),
            "cause_concept_id": pa.nulls(n, pa.int32()),
            "cause_source_value": pa.nulls(n, pa.string()),
        },
        schema=omop.SCHEMAS["death"],
    )


def visit_table(ids: Ints, visits: Records) -> tuple[pa.Table, Ints]:
    """``visit_occurrence`` rows, and the visit id of each record in its original order."""
    order, row_ids = _record_ids(ids, visits)
    concept = visits.value[order]
    visit_id = np.empty_like(row_ids)
    visit_id[order] = row_ids
    names = pa.array([_VISIT_NAMES[c] for c in _VISIT_NAMES])
    name_of = np.searchsorted(np.array(list(_VISIT_NAMES)), concept)
    table = pa.table(
        {
            "visit_occurrence_id": row_ids,
            "person_id": ids[visits.person[order]],
            "visit_concept_id": _int32(concept, len(concept)),
            "visit_start_date": _dates(visits.day[order]),
            "visit_end_date": _dates(visits.end_day[order]),
            "visit_type_concept_id": _int32(omop.TYPE_EHR, len(concept)),
            "care_site_id": pa.nulls(len(concept), pa.int64()),
            "visit_source_value": names.take(pa.array(name_of)),
        },
        schema=omop.SCHEMAS["visit_occurrence"],
    )
    return table, visit_id


def condition_table(ids: Ints, conditions: Records) -> pa.Table:
    """``condition_occurrence`` rows; source value is the ICD-10-CM code."""
    order, row_ids = _record_ids(ids, conditions)
    code = conditions.value[order]
    n = len(code)
    concepts = pa.array(concept_id(code), type=pa.int32())
    return pa.table(
        {
            "condition_occurrence_id": row_ids,
            "person_id": ids[conditions.person[order]],
            "condition_concept_id": concepts,
            "condition_start_date": _dates(conditions.day[order]),
            "condition_end_date": pa.nulls(n, pa.date32()),
            "condition_type_concept_id": _int32(omop.TYPE_EHR, n),
            "visit_occurrence_id": pa.nulls(n, pa.int64()),
            "condition_source_value": _SOURCE_VALUES.take(pa.array(code)),
            "condition_source_concept_id": concepts,
        },
        schema=omop.SCHEMAS["condition_occurrence"],
    )


def drug_table(ids: Ints, drugs: Records, visit_id: Ints) -> pa.Table:
    """``drug_exposure`` rows; source value is the RxNorm ingredient code."""
    order, row_ids = _record_ids(ids, drugs)
    code = drugs.value[order]
    link = drugs.link[order]
    n = len(code)
    linked = link != NO_LINK
    visit_of_drug = visit_id[link[linked]]  # every linked drug has its visit in the block
    visit_values = np.zeros(n, dtype=np.int64)
    visit_values[linked] = visit_of_drug
    visit = pa.array(visit_values, mask=~linked, type=pa.int64())
    concepts = pa.array(concept_id(code), type=pa.int32())
    return pa.table(
        {
            "drug_exposure_id": row_ids,
            "person_id": ids[drugs.person[order]],
            "drug_concept_id": concepts,
            "drug_exposure_start_date": _dates(drugs.day[order]),
            "drug_exposure_end_date": _dates(drugs.end_day[order]),
            "drug_type_concept_id": _int32(omop.TYPE_EHR, n),
            "quantity": pa.array(np.ones(n), type=pa.float64()),
            "visit_occurrence_id": visit,
            "drug_source_value": _SOURCE_VALUES.take(pa.array(code)),
            "drug_source_concept_id": concepts,
            "route_source_value": _ROUTES.take(pa.array(code)),
            "days_supply": _int32(drugs.end_day[order] - drugs.day[order] + 1, n),
        },
        schema=omop.SCHEMAS["drug_exposure"],
    )


def block_tables(
    ids: Ints,
    demographics: Demographics,
    observation: tuple[Ints, Ints],
    death: Ints,
    records: BlockRecords,
) -> dict[str, pa.Table]:
    """Every OMOP table's rows for one block (the concept table is written separately)."""
    visits, visit_id = visit_table(ids, records.visits)
    return {
        "person": person_table(ids, demographics),
        "observation_period": observation_period_table(ids, *observation),
        "visit_occurrence": visits,
        "condition_occurrence": condition_table(ids, records.conditions),
        "drug_exposure": drug_table(ids, records.drugs, visit_id),
        "death": death_table(ids, death),
    }


class SiteLake:
    """A site's Delta tables, filled chunk by chunk.

    Blocks are buffered until ``chunk_size`` persons are waiting, then appended to each
    table in one commit. The first commit of a table overwrites whatever an earlier run
    left there, so a rerun into the same folder gives the same current snapshot.
    """

    def __init__(self, lake: Path, chunk_size: int) -> None:
        self.lake = lake
        self.chunk_size = chunk_size
        self._buffer: dict[str, list[pa.Table]] = {
            name: [] for name in omop.SCHEMAS if name != "concept"
        }
        self._buffered_persons = 0
        self._created: set[str] = set()

    def add(self, tables: dict[str, pa.Table], n_persons: int) -> None:
        """Buffer one block; write when a chunk is full."""
        for name, table in tables.items():
            self._buffer[name].append(table)
        self._buffered_persons += n_persons
        if self._buffered_persons >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows to every table."""
        for name, parts in self._buffer.items():
            table = pa.concat_tables(parts) if parts else omop.SCHEMAS[name].empty_table()
            self._write(name, table)
            parts.clear()
        self._buffered_persons = 0

    def close(self) -> None:
        """Write what is left and the concept table."""
        if self._buffered_persons or len(self._created) < len(self._buffer):
            self.flush()
        self._write("concept", concept_table())

    def _write(self, name: str, table: pa.Table) -> None:
        path = str(self.lake / name)
        if name not in self._created:
            write_deltalake(path, table, mode="overwrite")
            self._created.add(name)
        elif table.num_rows:
            write_deltalake(path, table, mode="append")
