"""Hand-built OMOP CDM tables for tests: write a few rows per table as Delta."""

from __future__ import annotations

import datetime as dt
from itertools import count
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import write_deltalake

from shared.omop import (
    CDM_SCHEMAS,
    GENDER_MALE,
    RACE_WHITE,
    SCHEMAS,
    STUDY_TABLES,
    TYPE_EHR,
    VISIT_OUTPATIENT,
)

_EXTRA_SCHEMAS = {  # CDM 5.4 tables beyond the study subset, as the tests need them
    "procedure_occurrence": pa.schema([
        ("procedure_occurrence_id", pa.int64()), ("person_id", pa.int64()), ("procedure_concept_id", pa.int32()),
        ("procedure_date", pa.date32()), ("procedure_type_concept_id", pa.int32()),
        ("procedure_source_value", pa.string()),
    ]),
    "concept_ancestor": pa.schema([
        ("ancestor_concept_id", pa.int32()), ("descendant_concept_id", pa.int32()),
        ("min_levels_of_separation", pa.int32()), ("max_levels_of_separation", pa.int32()),
    ]),
    "drug_era": CDM_SCHEMAS["drug_era"],
}


def _schema(name: str, rows: list[dict[str, Any]]) -> pa.Schema:
    """The table's schema; a required column left empty in some row becomes nullable, as a
    site's own ETL (not fedrwe's ingest, which refuses it) may write it."""
    schema = SCHEMAS.get(name) or _EXTRA_SCHEMAS[name]
    return pa.schema([
        f.with_nullable(True) if any(row.get(f.name) is None for row in rows) else f for f in schema
    ])


def d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


class OmopBuilder:
    """Collect rows person by person, then write every study table (empty ones too)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in STUDY_TABLES}
        self._ids = count(1)

    def person(self, person_id: int, year_of_birth: int = 1980, gender: int = GENDER_MALE,
               race: int = RACE_WHITE, obs: tuple[str, str] = ("2010-01-01", "2020-12-31")) -> None:
        self.rows["person"].append({
            "person_id": person_id, "gender_concept_id": gender, "year_of_birth": year_of_birth,
            "race_concept_id": race, "ethnicity_concept_id": 0,
        })
        self.rows["observation_period"].append({
            "observation_period_id": next(self._ids), "person_id": person_id,
            "observation_period_start_date": d(obs[0]), "observation_period_end_date": d(obs[1]),
            "period_type_concept_id": TYPE_EHR,
        })

    def condition(self, person_id: int, code: str, date: str, concept: int = 0) -> None:
        self.rows["condition_occurrence"].append({
            "condition_occurrence_id": next(self._ids), "person_id": person_id,
            "condition_concept_id": concept, "condition_start_date": d(date),
            "condition_type_concept_id": TYPE_EHR, "condition_source_value": code,
        })

    def drug(self, person_id: int, code: str, date: str, concept: int = 0, end: str | None = None) -> None:
        """A drug exposure from ``date`` to ``end`` (default: the same day)."""
        self.rows["drug_exposure"].append({
            "drug_exposure_id": next(self._ids), "person_id": person_id, "drug_concept_id": concept,
            "drug_exposure_start_date": d(date), "drug_exposure_end_date": d(end or date),
            "drug_type_concept_id": TYPE_EHR, "drug_source_value": code,
        })

    def drug_without_end(self, person_id: int, code: str, date: str, days_supply: int | None) -> None:
        """A drug exposure whose end date is empty, with or without its days of supply."""
        self.drug(person_id, code, date)
        self.rows["drug_exposure"][-1].update(drug_exposure_end_date=None, days_supply=days_supply)

    def drug_era(self, person_id: int, concept: int, start: str, end: str) -> None:
        self.rows.setdefault("drug_era", []).append({
            "drug_era_id": next(self._ids), "person_id": person_id, "drug_concept_id": concept,
            "drug_era_start_date": d(start), "drug_era_end_date": d(end),
        })

    def visit(self, person_id: int, date: str, concept: int = VISIT_OUTPATIENT) -> None:
        self.rows["visit_occurrence"].append({
            "visit_occurrence_id": next(self._ids), "person_id": person_id,
            "visit_concept_id": concept, "visit_start_date": d(date), "visit_end_date": d(date),
            "visit_type_concept_id": TYPE_EHR,
        })

    def procedure(self, person_id: int, code: str, date: str, concept: int = 0) -> None:
        self.rows.setdefault("procedure_occurrence", []).append({
            "procedure_occurrence_id": next(self._ids), "person_id": person_id, "procedure_concept_id": concept,
            "procedure_date": d(date), "procedure_type_concept_id": TYPE_EHR, "procedure_source_value": code,
        })

    def ancestor(self, ancestor: int, descendant: int, levels: int = 1) -> None:
        self.rows.setdefault("concept_ancestor", []).append({
            "ancestor_concept_id": ancestor, "descendant_concept_id": descendant,
            "min_levels_of_separation": levels, "max_levels_of_separation": levels,
        })

    def death(self, person_id: int, date: str) -> None:
        self.rows["death"].append({"person_id": person_id, "death_date": d(date)})

    def write(self, lake: Path, skip: tuple[str, ...] = ()) -> None:
        for name, rows in self.rows.items():
            if name in skip:
                continue
            schema = _schema(name, rows)
            columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
            write_deltalake(str(lake / name), pa.table(columns, schema=schema), mode="overwrite")
