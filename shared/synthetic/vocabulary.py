"""The source codes the synthetic network uses, and their concepts.

ICD-10-CM and RxNorm codes live in the ``*_source_value`` columns. Each code has a
concept in the OMOP local range (from ``LOCAL_CONCEPT_START``, in the order of
``SOURCE_CODES``), used as both the ``*_concept_id`` and the ``*_source_concept_id``.
The codes cover every include list of ``studies/ketamine_cud.yaml`` and of the reference
protocol's comparison B (antidepressants, midazolam) plus near misses (codes next to a
protocol pattern that must not match it).

Code numbers are positions in ``SOURCE_CODES`` and draws pick codes by number, so a list
only ever grows at its end, and a code is replaced in place (the routine drugs' seventh
was sertraline, an antidepressant of comparison B1: gabapentin took its place, so that
the only antidepressants are the planted ones of ``antidepressants.py``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from shared import omop

ICD10CM = "ICD10CM"
RXNORM = "RxNorm"

FIRST_VALID = dt.date(1970, 1, 1)
LAST_VALID = dt.date(2099, 12, 31)
F14_91_FIRST_VALID = dt.date(2020, 10, 1)  # F14.91 exists since ICD-10-CM FY2021


@dataclass(frozen=True)
class SourceCode:
    """One code of a source vocabulary."""

    code: str
    name: str
    vocabulary_id: str
    valid_start: dt.date = FIRST_VALID


# CUD codes that make a person enter the population (F14.* minus the remission codes).
ENTRY_CODES: tuple[SourceCode, ...] = (
    SourceCode("F14.10", "Cocaine abuse, uncomplicated", ICD10CM),
    SourceCode("F14.20", "Cocaine dependence, uncomplicated", ICD10CM),
    SourceCode("F14.90", "Cocaine use, unspecified, uncomplicated", ICD10CM),
    SourceCode("F14.120", "Cocaine abuse with intoxication, uncomplicated", ICD10CM),
    SourceCode("F14.23", "Cocaine dependence with withdrawal", ICD10CM),
)
ENTRY_CODE_WEIGHTS: tuple[float, ...] = (0.35, 0.30, 0.20, 0.10, 0.05)

# The outcome: CUD in remission.
REMISSION_CODES: tuple[SourceCode, ...] = (
    SourceCode("F14.11", "Cocaine abuse, in remission", ICD10CM),
    SourceCode("F14.21", "Cocaine dependence, in remission", ICD10CM),
    SourceCode("F14.91", "Cocaine use, unspecified, in remission", ICD10CM, F14_91_FIRST_VALID),
)

# Codes that make each condition covariate of the protocol true.
COVARIATE_CODES: dict[str, tuple[SourceCode, ...]] = {
    "depression": (
        SourceCode("F32.9", "Major depressive disorder, single episode, unspecified", ICD10CM),
        SourceCode("F33.1", "Major depressive disorder, recurrent, moderate", ICD10CM),
    ),
    "anxiety": (
        SourceCode("F41.1", "Generalized anxiety disorder", ICD10CM),
        SourceCode("F41.9", "Anxiety disorder, unspecified", ICD10CM),
    ),
    "ptsd": (
        SourceCode("F43.10", "Post-traumatic stress disorder, unspecified", ICD10CM),
        SourceCode("F43.12", "Post-traumatic stress disorder, chronic", ICD10CM),
    ),
    "bipolar": (
        SourceCode("F31.9", "Bipolar disorder, unspecified", ICD10CM),
        SourceCode("F31.81", "Bipolar II disorder", ICD10CM),
    ),
    "alcohol_use_disorder": (
        SourceCode("F10.20", "Alcohol dependence, uncomplicated", ICD10CM),
        SourceCode("F10.10", "Alcohol abuse, uncomplicated", ICD10CM),
    ),
    "opioid_use_disorder": (
        SourceCode("F11.20", "Opioid dependence, uncomplicated", ICD10CM),
        SourceCode("F11.10", "Opioid abuse, uncomplicated", ICD10CM),
    ),
    "cannabis_use_disorder": (
        SourceCode("F12.20", "Cannabis dependence, uncomplicated", ICD10CM),
        SourceCode("F12.10", "Cannabis abuse, uncomplicated", ICD10CM),
    ),
    "tobacco_use_disorder": (
        SourceCode("F17.210", "Nicotine dependence, cigarettes, uncomplicated", ICD10CM),
        SourceCode("F17.200", "Nicotine dependence, unspecified, uncomplicated", ICD10CM),
    ),
    "chronic_pain": (
        SourceCode("G89.29", "Other chronic pain", ICD10CM),
        SourceCode("G89.4", "Chronic pain syndrome", ICD10CM),
        SourceCode("G89.21", "Chronic pain due to trauma", ICD10CM),
    ),
    "hiv": (
        SourceCode("B20", "Human immunodeficiency virus [HIV] disease", ICD10CM),
        SourceCode("Z21", "Asymptomatic HIV infection status", ICD10CM),
    ),
    "hepatitis_c": (
        SourceCode("B18.2", "Chronic viral hepatitis C", ICD10CM),
        SourceCode("B17.10", "Acute hepatitis C without hepatic coma", ICD10CM),
    ),
}

# Other conditions; the last six are near misses of protocol patterns and match none.
OTHER_CONDITION_CODES: tuple[SourceCode, ...] = (
    SourceCode("I10", "Essential (primary) hypertension", ICD10CM),
    SourceCode("E11.9", "Type 2 diabetes mellitus without complications", ICD10CM),
    SourceCode("J45.909", "Unspecified asthma, uncomplicated", ICD10CM),
    SourceCode("M54.9", "Dorsalgia, unspecified", ICD10CM),
    SourceCode("K21.9", "Gastro-esophageal reflux disease without esophagitis", ICD10CM),
    SourceCode("F43.0", "Acute stress reaction", ICD10CM),
    SourceCode("F34.1", "Dysthymic disorder", ICD10CM),
    SourceCode("G89.3", "Neoplasm related pain (acute) (chronic)", ICD10CM),
    SourceCode("B18.1", "Chronic viral hepatitis B without delta-agent", ICD10CM),
    SourceCode("B17.2", "Acute hepatitis E", ICD10CM),
    SourceCode("F15.10", "Other stimulant abuse, uncomplicated", ICD10CM),
)

KETAMINE = SourceCode("6130", "ketamine", RXNORM)
COMPARATOR_DRUGS: tuple[SourceCode, ...] = (
    SourceCode("8782", "propofol", RXNORM),
    SourceCode("6960", "midazolam", RXNORM),
    SourceCode("4177", "etomidate", RXNORM),
    SourceCode("36453", "sevoflurane", RXNORM),
)
COMPARATOR_WEIGHTS: tuple[float, ...] = (0.50, 0.20, 0.10, 0.20)
FENTANYL = SourceCode("4337", "fentanyl", RXNORM)
OTHER_DRUGS: tuple[SourceCode, ...] = (
    FENTANYL,
    SourceCode("26225", "ondansetron", RXNORM),
    SourceCode("161", "acetaminophen", RXNORM),
    SourceCode("5640", "ibuprofen", RXNORM),
    SourceCode("7242", "naloxone", RXNORM),
    SourceCode("1819", "buprenorphine", RXNORM),
    SourceCode("25480", "gabapentin", RXNORM),  # no antidepressant among routine drugs
    SourceCode("6470", "lorazepam", RXNORM),
)
# Comparison B1's comparator (studies/ketamine_cud_reference.yaml, vs_antidepressants),
# started only by the planted antidepressant block; weights roughly US prescribing shares.
ANTIDEPRESSANTS: tuple[SourceCode, ...] = (
    SourceCode("36437", "sertraline", RXNORM),
    SourceCode("4493", "fluoxetine", RXNORM),
    SourceCode("2556", "citalopram", RXNORM),
    SourceCode("321988", "escitalopram", RXNORM),
    SourceCode("32937", "paroxetine", RXNORM),
    SourceCode("39786", "venlafaxine", RXNORM),
    SourceCode("72625", "duloxetine", RXNORM),
    SourceCode("42347", "bupropion", RXNORM),
    SourceCode("15996", "mirtazapine", RXNORM),
    SourceCode("10737", "trazodone", RXNORM),
)
ANTIDEPRESSANT_WEIGHTS: tuple[float, ...] = (22, 12, 10, 14, 4, 7, 7, 12, 5, 7)  # per cent

SOURCE_CODES: tuple[SourceCode, ...] = (
    *ENTRY_CODES,
    *REMISSION_CODES,
    *(code for codes in COVARIATE_CODES.values() for code in codes),
    *OTHER_CONDITION_CODES,
    KETAMINE,
    *COMPARATOR_DRUGS,
    *OTHER_DRUGS,
    *ANTIDEPRESSANTS,  # last: the earlier code numbers do not move
)
_POSITION: dict[str, int] = {code.code: i for i, code in enumerate(SOURCE_CODES)}
if len(_POSITION) != len(SOURCE_CODES):  # pragma: no cover - guards edits of the lists
    raise RuntimeError("duplicate source code in shared.synthetic.vocabulary")


def code_index(codes: Sequence[SourceCode]) -> npt.NDArray[np.int64]:
    """Positions of ``codes`` in ``SOURCE_CODES`` (the generator's code numbers)."""
    return np.array([_POSITION[code.code] for code in codes], dtype=np.int64)


def concept_id(code_numbers: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]:
    """Local concept ids of code numbers."""
    return (omop.LOCAL_CONCEPT_START + code_numbers).astype(np.int32)


def source_values() -> pa.Array:
    """The code strings, indexable by code number (``source_values().take(numbers)``)."""
    return pa.array([code.code for code in SOURCE_CODES], type=pa.string())


# Standard OMOP concepts the tables use: (id, name, domain, vocabulary, class, code).
_STANDARD_CONCEPTS: tuple[tuple[int, str, str, str, str, str], ...] = (
    (omop.GENDER_MALE, "MALE", "Gender", "Gender", "Gender", "M"),
    (omop.GENDER_FEMALE, "FEMALE", "Gender", "Gender", "Gender", "F"),
    (omop.RACE_WHITE, "White", "Race", "Race", "Race", "5"),
    (omop.RACE_BLACK, "Black or African American", "Race", "Race", "Race", "3"),
    (omop.RACE_ASIAN, "Asian", "Race", "Race", "Race", "2"),
    (
        omop.ETHNICITY_HISPANIC,
        "Hispanic or Latino",
        "Ethnicity",
        "Ethnicity",
        "Ethnicity",
        "Hispanic",
    ),
    (
        omop.ETHNICITY_NOT_HISPANIC,
        "Not Hispanic or Latino",
        "Ethnicity",
        "Ethnicity",
        "Ethnicity",
        "Not Hispanic",
    ),
    (omop.VISIT_INPATIENT, "Inpatient Visit", "Visit", "Visit", "Visit", "IP"),
    (omop.VISIT_OUTPATIENT, "Outpatient Visit", "Visit", "Visit", "Visit", "OP"),
    (omop.VISIT_EMERGENCY, "Emergency Room Visit", "Visit", "Visit", "Visit", "ER"),
    (omop.TYPE_EHR, "EHR", "Type Concept", "Type Concept", "Type Concept", "OMOP4976890"),
)


def _concept_class(code: SourceCode) -> str:
    if code.vocabulary_id == RXNORM:
        return "Ingredient"
    return f"{len(code.code.replace('.', ''))}-char billing code"


def concept_table() -> pa.Table:
    """The ``concept`` table: the standard concepts used plus every local source concept."""
    rows: list[dict[str, object]] = [
        {
            "concept_id": cid,
            "concept_name": name,
            "domain_id": domain,
            "vocabulary_id": vocabulary,
            "concept_class_id": concept_class,
            "standard_concept": "S",
            "concept_code": code,
            "valid_start_date": FIRST_VALID,
            "valid_end_date": LAST_VALID,
            "invalid_reason": None,
        }
        for cid, name, domain, vocabulary, concept_class, code in _STANDARD_CONCEPTS
    ]
    rows.extend(
        {
            "concept_id": omop.LOCAL_CONCEPT_START + i,
            "concept_name": code.name,
            "domain_id": "Drug" if code.vocabulary_id == RXNORM else "Condition",
            "vocabulary_id": code.vocabulary_id,
            "concept_class_id": _concept_class(code),
            "standard_concept": None,
            "concept_code": code.code,
            "valid_start_date": code.valid_start,
            "valid_end_date": LAST_VALID,
            "invalid_reason": None,
        }
        for i, code in enumerate(SOURCE_CODES)
    )
    return pa.Table.from_pylist(rows, schema=omop.SCHEMAS["concept"])
