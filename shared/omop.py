"""The subset of the OMOP CDM 5.4 that fedrwe reads, as Arrow schemas.

Both the synthetic generator (which writes these tables) and the site agent (which reads
them, and needs a schema when a table is empty) use these definitions. Column names are
lower case, as in the OHDSI DDL. Required columns are non-nullable.

Standard concept ids used by fedrwe's synthetic data are real OMOP ids for the
well-known ones (gender, race, visit, type concepts); codes of the study's source
vocabularies (ICD-10-CM, RxNorm) live in the ``*_source_value`` columns, and their
concepts in the ``concept`` table use the OMOP local range (ids above 2,000,000,000).
"""

from __future__ import annotations

import pyarrow as pa

# Standard OMOP concept ids (OHDSI vocabularies).
GENDER_MALE = 8507
GENDER_FEMALE = 8532
RACE_WHITE = 8527
RACE_BLACK = 8516
RACE_ASIAN = 8515
RACE_UNKNOWN = 0
ETHNICITY_HISPANIC = 38003563
ETHNICITY_NOT_HISPANIC = 38003564
VISIT_INPATIENT = 9201
VISIT_OUTPATIENT = 9202
VISIT_EMERGENCY = 9203
TYPE_EHR = 32817  # "EHR" type concept, for every *_type_concept_id

# First concept id of the OMOP range reserved for local (site- or study-specific) concepts.
LOCAL_CONCEPT_START = 2_000_000_001

_I64 = pa.int64()
_I32 = pa.int32()
_DATE = pa.date32()
_STR = pa.string()


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=nullable) for name, dtype, nullable in fields])


SCHEMAS: dict[str, pa.Schema] = {
    "person": _schema(
        ("person_id", _I64, False),
        ("gender_concept_id", _I32, False),
        ("year_of_birth", _I32, False),
        ("month_of_birth", _I32, True),
        ("day_of_birth", _I32, True),
        ("race_concept_id", _I32, False),
        ("ethnicity_concept_id", _I32, False),
        ("care_site_id", _I64, True),
        ("person_source_value", _STR, True),
        ("gender_source_value", _STR, True),
        ("race_source_value", _STR, True),
    ),
    "observation_period": _schema(
        ("observation_period_id", _I64, False),
        ("person_id", _I64, False),
        ("observation_period_start_date", _DATE, False),
        ("observation_period_end_date", _DATE, False),
        ("period_type_concept_id", _I32, False),
    ),
    "visit_occurrence": _schema(
        ("visit_occurrence_id", _I64, False),
        ("person_id", _I64, False),
        ("visit_concept_id", _I32, False),
        ("visit_start_date", _DATE, False),
        ("visit_end_date", _DATE, False),
        ("visit_type_concept_id", _I32, False),
        ("care_site_id", _I64, True),
        ("visit_source_value", _STR, True),
    ),
    "condition_occurrence": _schema(
        ("condition_occurrence_id", _I64, False),
        ("person_id", _I64, False),
        ("condition_concept_id", _I32, False),
        ("condition_start_date", _DATE, False),
        ("condition_end_date", _DATE, True),
        ("condition_type_concept_id", _I32, False),
        ("visit_occurrence_id", _I64, True),
        ("condition_source_value", _STR, True),
        ("condition_source_concept_id", _I32, True),
    ),
    "drug_exposure": _schema(
        ("drug_exposure_id", _I64, False),
        ("person_id", _I64, False),
        ("drug_concept_id", _I32, False),
        ("drug_exposure_start_date", _DATE, False),
        ("drug_exposure_end_date", _DATE, False),
        ("drug_type_concept_id", _I32, False),
        ("quantity", pa.float64(), True),
        ("visit_occurrence_id", _I64, True),
        ("drug_source_value", _STR, True),
        ("drug_source_concept_id", _I32, True),
        ("route_source_value", _STR, True),
    ),
    "death": _schema(
        ("person_id", _I64, False),
        ("death_date", _DATE, False),
        ("death_type_concept_id", _I32, True),
        ("cause_concept_id", _I32, True),
        ("cause_source_value", _STR, True),
    ),
    "concept": _schema(
        ("concept_id", _I32, False),
        ("concept_name", _STR, False),
        ("domain_id", _STR, False),
        ("vocabulary_id", _STR, False),
        ("concept_class_id", _STR, False),
        ("standard_concept", _STR, True),
        ("concept_code", _STR, False),
        ("valid_start_date", _DATE, False),
        ("valid_end_date", _DATE, False),
        ("invalid_reason", _STR, True),
    ),
}

# Tables a study needs at a site, and the columns the cohort rules read from each (some
# are optional in the CDM, e.g. the source values, yet a source-code study needs them).
STUDY_COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "year_of_birth", "gender_concept_id", "race_concept_id"),
    "observation_period": ("person_id", "observation_period_start_date", "observation_period_end_date"),
    "visit_occurrence": ("person_id", "visit_concept_id", "visit_start_date"),
    "condition_occurrence": ("person_id", "condition_start_date", "condition_source_value"),
    "drug_exposure": ("person_id", "drug_exposure_start_date", "drug_source_value"),
    "death": ("person_id", "death_date"),
}
STUDY_TABLES: tuple[str, ...] = tuple(STUDY_COLUMNS)
