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
        ("days_supply", _I32, True),
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

# --- The full CDM 5.4 shape of the tables fedrwe ingests ----------------------------------
# ``fedrwe site ingest`` writes every table below with all of its CDM 5.4 columns (OHDSI
# DDL names and order; ids 64-bit since real exports use them, concept ids 32-bit as in the
# DDL). Each is a superset of ``SCHEMAS[name]`` with the same types, so whatever reads the
# subset reads an ingested table. One deviation from the DDL, so that a CDM 5.3 export
# fits: columns that 5.4 made required but 5.3 lacked or left optional are nullable here
# (every cdm_source column but its name, vocabulary.vocabulary_reference).

_TS = pa.timestamp("us")  # OMOP datetimes carry no time zone
_F64 = pa.float64()


def _extend(base: pa.Schema, *fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([*base, *_schema(*fields)])


_PERSON_EVENT_KEYS = (("provider_id", _I64, True), ("visit_occurrence_id", _I64, True), ("visit_detail_id", _I64, True))

CDM_SCHEMAS: dict[str, pa.Schema] = {
    "person": _extend(
        SCHEMAS["person"],
        ("birth_datetime", _TS, True),
        ("location_id", _I64, True),
        ("provider_id", _I64, True),
        ("gender_source_concept_id", _I32, True),
        ("race_source_concept_id", _I32, True),
        ("ethnicity_source_value", _STR, True),
        ("ethnicity_source_concept_id", _I32, True),
    ),
    "observation_period": SCHEMAS["observation_period"],
    "visit_occurrence": _extend(
        SCHEMAS["visit_occurrence"],
        ("visit_start_datetime", _TS, True),
        ("visit_end_datetime", _TS, True),
        ("provider_id", _I64, True),
        ("visit_source_concept_id", _I32, True),
        ("admitted_from_concept_id", _I32, True),
        ("admitted_from_source_value", _STR, True),
        ("discharged_to_concept_id", _I32, True),
        ("discharged_to_source_value", _STR, True),
        ("preceding_visit_occurrence_id", _I64, True),
    ),
    "visit_detail": _schema(
        ("visit_detail_id", _I64, False),
        ("person_id", _I64, False),
        ("visit_detail_concept_id", _I32, False),
        ("visit_detail_start_date", _DATE, False),
        ("visit_detail_start_datetime", _TS, True),
        ("visit_detail_end_date", _DATE, False),
        ("visit_detail_end_datetime", _TS, True),
        ("visit_detail_type_concept_id", _I32, False),
        ("provider_id", _I64, True),
        ("care_site_id", _I64, True),
        ("visit_detail_source_value", _STR, True),
        ("visit_detail_source_concept_id", _I32, True),
        ("admitted_from_concept_id", _I32, True),
        ("admitted_from_source_value", _STR, True),
        ("discharged_to_source_value", _STR, True),
        ("discharged_to_concept_id", _I32, True),
        ("preceding_visit_detail_id", _I64, True),
        ("parent_visit_detail_id", _I64, True),
        ("visit_occurrence_id", _I64, False),
    ),
    "condition_occurrence": _extend(
        SCHEMAS["condition_occurrence"],
        ("condition_start_datetime", _TS, True),
        ("condition_end_datetime", _TS, True),
        ("condition_status_concept_id", _I32, True),
        ("stop_reason", _STR, True),
        ("provider_id", _I64, True),
        ("visit_detail_id", _I64, True),
        ("condition_status_source_value", _STR, True),
    ),
    "drug_exposure": _extend(
        SCHEMAS["drug_exposure"],
        ("drug_exposure_start_datetime", _TS, True),
        ("drug_exposure_end_datetime", _TS, True),
        ("verbatim_end_date", _DATE, True),
        ("stop_reason", _STR, True),
        ("refills", _I32, True),
        ("sig", _STR, True),
        ("route_concept_id", _I32, True),
        ("lot_number", _STR, True),
        ("provider_id", _I64, True),
        ("visit_detail_id", _I64, True),
        ("dose_unit_source_value", _STR, True),
    ),
    "procedure_occurrence": _schema(
        ("procedure_occurrence_id", _I64, False),
        ("person_id", _I64, False),
        ("procedure_concept_id", _I32, False),
        ("procedure_date", _DATE, False),
        ("procedure_datetime", _TS, True),
        ("procedure_end_date", _DATE, True),
        ("procedure_end_datetime", _TS, True),
        ("procedure_type_concept_id", _I32, False),
        ("modifier_concept_id", _I32, True),
        ("quantity", _I32, True),
        *_PERSON_EVENT_KEYS,
        ("procedure_source_value", _STR, True),
        ("procedure_source_concept_id", _I32, True),
        ("modifier_source_value", _STR, True),
    ),
    "device_exposure": _schema(
        ("device_exposure_id", _I64, False),
        ("person_id", _I64, False),
        ("device_concept_id", _I32, False),
        ("device_exposure_start_date", _DATE, False),
        ("device_exposure_start_datetime", _TS, True),
        ("device_exposure_end_date", _DATE, True),
        ("device_exposure_end_datetime", _TS, True),
        ("device_type_concept_id", _I32, False),
        ("unique_device_id", _STR, True),
        ("production_id", _STR, True),
        ("quantity", _I32, True),
        *_PERSON_EVENT_KEYS,
        ("device_source_value", _STR, True),
        ("device_source_concept_id", _I32, True),
        ("unit_concept_id", _I32, True),
        ("unit_source_value", _STR, True),
        ("unit_source_concept_id", _I32, True),
    ),
    "measurement": _schema(
        ("measurement_id", _I64, False),
        ("person_id", _I64, False),
        ("measurement_concept_id", _I32, False),
        ("measurement_date", _DATE, False),
        ("measurement_datetime", _TS, True),
        ("measurement_time", _STR, True),
        ("measurement_type_concept_id", _I32, False),
        ("operator_concept_id", _I32, True),
        ("value_as_number", _F64, True),
        ("value_as_concept_id", _I32, True),
        ("unit_concept_id", _I32, True),
        ("range_low", _F64, True),
        ("range_high", _F64, True),
        *_PERSON_EVENT_KEYS,
        ("measurement_source_value", _STR, True),
        ("measurement_source_concept_id", _I32, True),
        ("unit_source_value", _STR, True),
        ("unit_source_concept_id", _I32, True),
        ("value_source_value", _STR, True),
        ("measurement_event_id", _I64, True),
        ("meas_event_field_concept_id", _I32, True),
    ),
    "observation": _schema(
        ("observation_id", _I64, False),
        ("person_id", _I64, False),
        ("observation_concept_id", _I32, False),
        ("observation_date", _DATE, False),
        ("observation_datetime", _TS, True),
        ("observation_type_concept_id", _I32, False),
        ("value_as_number", _F64, True),
        ("value_as_string", _STR, True),
        ("value_as_concept_id", _I32, True),
        ("qualifier_concept_id", _I32, True),
        ("unit_concept_id", _I32, True),
        *_PERSON_EVENT_KEYS,
        ("observation_source_value", _STR, True),
        ("observation_source_concept_id", _I32, True),
        ("unit_source_value", _STR, True),
        ("qualifier_source_value", _STR, True),
        ("value_source_value", _STR, True),
        ("observation_event_id", _I64, True),
        ("obs_event_field_concept_id", _I32, True),
    ),
    "death": _extend(
        SCHEMAS["death"],
        ("death_datetime", _TS, True),
        ("cause_source_concept_id", _I32, True),
    ),
    "drug_era": _schema(
        ("drug_era_id", _I64, False),
        ("person_id", _I64, False),
        ("drug_concept_id", _I32, False),
        ("drug_era_start_date", _DATE, False),
        ("drug_era_end_date", _DATE, False),
        ("drug_exposure_count", _I32, True),
        ("gap_days", _I32, True),
    ),
    "condition_era": _schema(
        ("condition_era_id", _I64, False),
        ("person_id", _I64, False),
        ("condition_concept_id", _I32, False),
        ("condition_era_start_date", _DATE, False),
        ("condition_era_end_date", _DATE, False),
        ("condition_occurrence_count", _I32, True),
    ),
    "care_site": _schema(
        ("care_site_id", _I64, False),
        ("care_site_name", _STR, True),
        ("place_of_service_concept_id", _I32, True),
        ("location_id", _I64, True),
        ("care_site_source_value", _STR, True),
        ("place_of_service_source_value", _STR, True),
    ),
    "cdm_source": _schema(
        ("cdm_source_name", _STR, False),
        ("cdm_source_abbreviation", _STR, True),
        ("cdm_holder", _STR, True),
        ("source_description", _STR, True),
        ("source_documentation_reference", _STR, True),
        ("cdm_etl_reference", _STR, True),
        ("source_release_date", _DATE, True),
        ("cdm_release_date", _DATE, True),
        ("cdm_version", _STR, True),
        ("cdm_version_concept_id", _I32, True),
        ("vocabulary_version", _STR, True),
    ),
    "concept": SCHEMAS["concept"],
    "concept_ancestor": _schema(
        ("ancestor_concept_id", _I32, False),
        ("descendant_concept_id", _I32, False),
        ("min_levels_of_separation", _I32, False),
        ("max_levels_of_separation", _I32, False),
    ),
    "concept_relationship": _schema(
        ("concept_id_1", _I32, False),
        ("concept_id_2", _I32, False),
        ("relationship_id", _STR, False),
        ("valid_start_date", _DATE, False),
        ("valid_end_date", _DATE, False),
        ("invalid_reason", _STR, True),
    ),
    "vocabulary": _schema(
        ("vocabulary_id", _STR, False),
        ("vocabulary_name", _STR, False),
        ("vocabulary_reference", _STR, True),
        ("vocabulary_version", _STR, True),
        ("vocabulary_concept_id", _I32, False),
    ),
}
# Tables shared by every site of a network rather than about its patients.
VOCABULARY_TABLES: tuple[str, ...] = ("concept", "concept_ancestor", "concept_relationship", "vocabulary")
