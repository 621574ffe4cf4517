"""Which OMOP tables and columns a protocol needs at a site.

Every study reads the tables of ``shared.omop.STUDY_COLUMNS``; arms drawn from procedures
add ``procedure_occurrence``, arms drawn from drug eras ``drug_era``, and concept sets with
``include_descendants`` add the vocabulary's ``concept_ancestor``. A risk window anchored on
the cohort end also reads the end of drug exposures (``drug_exposure_end_date``,
``days_supply``). Large-scale covariates add the ``*_concept_id`` column of each of their
domains (and ``procedure_occurrence`` for procedures).
"""

from __future__ import annotations

from shared.omop import STUDY_COLUMNS
from shared.protocol.model import StudyProtocol

PROCEDURE_COLUMNS = ("person_id", "procedure_date", "procedure_concept_id", "procedure_source_value")
ANCESTOR_COLUMNS = ("ancestor_concept_id", "descendant_concept_id")
DRUG_ERA_COLUMNS = ("person_id", "drug_concept_id", "drug_era_start_date", "drug_era_end_date")
DRUG_END_COLUMNS = ("drug_exposure_end_date", "days_supply")
FEATURE_TABLES = {"condition": "condition_occurrence", "drug": "drug_exposure", "procedure": "procedure_occurrence"}


def study_inputs(protocol: StudyProtocol) -> dict[str, tuple[str, ...]]:
    """Table name -> the columns the cohort rules read from it, for this protocol."""
    inputs = dict(STUDY_COLUMNS)
    if "procedure" in protocol.domains():
        inputs["procedure_occurrence"] = PROCEDURE_COLUMNS
    if "drug_era" in protocol.domains():
        inputs["drug_era"] = DRUG_ERA_COLUMNS
    if "drug" in protocol.domains() and protocol.time_at_risk.uses_cohort_end():
        inputs["drug_exposure"] = (*inputs["drug_exposure"], *DRUG_END_COLUMNS)
    if any(codes.uses_descendants() for codes in protocol.code_sets()):
        inputs["concept_ancestor"] = ANCESTOR_COLUMNS
    if protocol.large_scale_covariates is not None:
        for domain in protocol.large_scale_covariates.domains:
            table = FEATURE_TABLES[domain]
            base = inputs.get(table, PROCEDURE_COLUMNS if domain == "procedure" else ())
            inputs[table] = (*base, *(c for c in (f"{domain}_concept_id",) if c not in base))
    return inputs


def why_needed(protocol: StudyProtocol, table: str) -> str:
    """One phrase saying which part of the protocol needs ``table`` (for error messages)."""
    if table == "concept_ancestor":
        return "its concept sets use include_descendants"
    if table == "procedure_occurrence":
        if "procedure" not in protocol.domains():
            return "its large_scale_covariates list the procedure domain"
        return "an arm is drawn from procedures (domain: procedure)"
    if table == "drug_era":
        return "an arm is drawn from drug eras (domain: drug_era)"
    return "every study reads it"
