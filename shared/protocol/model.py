"""The study protocol: what a study lead declares and every site agrees to run.

A protocol is YAML validated by these pydantic models. Unknown fields are errors (a typo
must not silently change a study). Codes are source codes by vocabulary for now; a later
schema version adds standard concept ids with descendants, next to ``include``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import ProtocolError
from shared.protocol.messages import canonical_json

SCHEMA_VERSION = 1
_CODE = re.compile(r"^[A-Za-z0-9.\-]+\*?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Vocabulary = Literal["ICD10CM", "ICD9CM", "ICD10PCS", "RxNorm", "CPT4", "HCPCS", "SNOMED", "LOINC", "NDC"]


class CodeSet(_Strict):
    """A concept set: source codes of one vocabulary and/or standard OMOP concepts.

    Source codes match the table's ``*_source_value`` (``F14.*`` matches every code
    starting with ``F14.``). Standard concepts match its ``*_concept_id``; with
    ``include_descendants`` every descendant in the site's ``concept_ancestor`` table
    matches too (as in OHDSI/ATLAS concept sets). A record matches when it matches either
    part, and neither ``exclude`` nor ``exclude_concept_ids`` (descendants too, when
    ``include_descendants``).
    """

    vocabulary: Vocabulary | None = Field(default=None, description="Vocabulary of the source codes.")
    include: list[str] = Field(default_factory=list, description="Source codes or prefixes ending in `*`.")
    exclude: list[str] = Field(default_factory=list, description="Source codes removed from `include`.")
    concept_ids: list[int] = Field(default_factory=list, description="Standard OMOP concept ids.")
    include_descendants: bool = Field(
        default=False, description="Also match every descendant of `concept_ids` (needs concept_ancestor).",
    )
    exclude_concept_ids: list[int] = Field(default_factory=list, description="Concepts removed from the set.")

    @field_validator("include", "exclude")
    @classmethod
    def _codes_are_well_formed(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not _CODE.match(code):
                raise ValueError(
                    f"code {code!r} is not a source code or a prefix ending in '*' (e.g. 'F14.*')"
                )
        return codes

    @model_validator(mode="after")
    def _not_empty(self) -> CodeSet:
        if not self.include and not self.concept_ids:
            raise ValueError("a code set needs source codes (`include`) or standard concepts (`concept_ids`)")
        if self.include and self.vocabulary is None:
            raise ValueError("source codes (`include`) need their `vocabulary`, e.g. ICD10CM")
        if self.include_descendants and not self.concept_ids:
            raise ValueError("`include_descendants` applies to `concept_ids`; list some")
        return self

    def uses_descendants(self) -> bool:
        """True when matching needs the site's concept_ancestor table."""
        return self.include_descendants


class Population(_Strict):
    """Who can enter the study: persons with an entry condition, of a minimum age at index."""

    name: str = Field(min_length=1)
    entry: CodeSet = Field(description="Condition codes whose first record is the entry date.")
    min_age: int = Field(default=18, ge=0, le=120, description="Minimum age in years at index.")


Domain = Literal["drug", "procedure"]


class Exposure(_Strict):
    """The drug (or procedure: anaesthesia is often recorded as one) given to the exposed arm."""

    name: str = Field(min_length=1)
    codes: CodeSet
    domain: Domain = Field(default="drug", description="drug_exposure or procedure_occurrence records.")


class Comparator(_Strict):
    """The active comparator drugs."""

    name: str = Field(min_length=1)
    codes: CodeSet
    domain: Domain = Field(default="drug", description="drug_exposure or procedure_occurrence records.")
    never_exposed: bool = Field(
        default=True, description="Comparator patients never received the exposure drug."
    )


class Outcome(_Strict):
    """The outcome condition; its first record in the time at risk is the event."""

    name: str = Field(min_length=1)
    codes: CodeSet
    exclude_prior: bool = Field(default=True, description="Drop persons with the outcome before index.")


class IndexRule(_Strict):
    """How the index date is chosen."""

    rule: Literal["first_exposure_after_entry"] = "first_exposure_after_entry"


class DayWindow(_Strict):
    """A window of days relative to the index date, both ends inclusive."""

    start_day: int = Field(ge=-36_500, le=36_500)
    end_day: int = Field(ge=-36_500, le=36_500)

    @model_validator(mode="after")
    def _ordered(self) -> DayWindow:
        if self.end_day < self.start_day:
            raise ValueError(f"end_day {self.end_day} is before start_day {self.start_day}")
        return self


_COVARIATE_NAME = r"^[a-z][a-z0-9_]{0,62}$"


class DemographicCovariate(_Strict):
    """Age at index (years, column named as the covariate), sex (``sex_female``) or race
    (one-hot ``race_black``, ``race_asian``, ``race_other``; white is the reference)."""

    name: str = Field(pattern=_COVARIATE_NAME)
    kind: Literal["age", "sex", "race"]


class ConditionCovariate(_Strict):
    """1 when any of the codes starts within the covariate window, else 0."""

    name: str = Field(pattern=_COVARIATE_NAME)
    kind: Literal["condition"]
    codes: CodeSet


class VisitCountCovariate(_Strict):
    """Number of visits of the given visit concepts starting within the covariate window."""

    name: str = Field(pattern=_COVARIATE_NAME)
    kind: Literal["visit_count"]
    visit_concept_ids: list[int] = Field(min_length=1)


Covariate = Annotated[
    DemographicCovariate | ConditionCovariate | VisitCountCovariate, Field(discriminator="kind")
]

FeatureDomain = Literal["condition", "drug", "procedure"]
FEATURE_DOMAINS: tuple[FeatureDomain, ...] = ("condition", "drug", "procedure")
_CONCEPT_COLUMN = re.compile(r"^(condition|drug|procedure)_([0-9]+)$")


def concept_column(domain: str, concept_id: int) -> str:
    """The PS design column of a large-scale covariate, e.g. ``drug_1125315``."""
    return f"{domain}_{concept_id}"


def parse_concept_column(column: str) -> tuple[str, int] | None:
    """``(domain, concept_id)`` of a large-scale covariate column, or None for any other name."""
    found = _CONCEPT_COLUMN.match(column)
    return (found.group(1), int(found.group(2))) if found else None


class LargeScaleCovariates(_Strict):
    """One binary covariate per standard concept recorded in a window before index, for the PS model.

    OHDSI FeatureExtraction's condition / drug / procedure occurrence features: 1 when the
    person has any record of the concept (``*_concept_id``, not 0) in the window. Records of
    the arms' code sets and of the named condition covariates' code sets are excluded
    (docs/cohort_rules.md). A concept enters the model only when every site has at least its
    minimum cell count of persons with it and without it (docs/estimators.md).
    """

    domains: list[FeatureDomain] = Field(
        default_factory=lambda: list(FEATURE_DOMAINS), min_length=1,
        description="Record domains the concepts come from (condition_occurrence, drug_exposure, procedure_occurrence).",
    )
    window: DayWindow | None = Field(
        default=None, description="Days relative to index where records count (default: covariate_window); end_day < 0.",
    )
    max_covariates: int = Field(
        default=1000, ge=1, le=2000,
        description="Most concepts in the model, those with the most persons over all sites first.",
    )

    @model_validator(mode="after")
    def _valid(self) -> LargeScaleCovariates:
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"large_scale_covariates.domains {self.domains} repeat a domain; list each once")
        if self.window is not None and self.window.end_day >= 0:
            raise ValueError(
                f"large_scale_covariates.window.end_day is {self.window.end_day}; it must be < 0 "
                f"(covariates precede index). Fix: end the window on day -1 or earlier"
            )
        return self


RACE_LEVELS: tuple[str, ...] = ("black", "asian", "other")  # white is the reference level
RESERVED_COLUMNS = frozenset({"site_id", "person_id", "treatment", "index_date", "time", "event"})

AnalysisName = Literal["crude", "propensity", "matched", "iptw_ate", "iptw_att", "overlap"]
ADJUSTED_ANALYSES: tuple[str, ...] = ("matched", "iptw_ate", "iptw_att", "overlap")


class PropensityModel(_Strict):
    """The propensity score model: logistic regression of treatment on every covariate."""

    l2: float = Field(
        default=0.0, ge=0.0, le=1e6,
        description="L2 penalty on the coefficients (not the intercept), applied centrally.",
    )


class StudyPopulation(_Strict):
    """Options of OHDSI CohortMethod's ``createStudyPopulation`` beyond washout and time at risk."""

    prior_outcome_lookback_days: int | None = Field(
        default=None, ge=1, le=36_500,
        description="With outcome.exclude_prior: look back this many days for a prior outcome (default: all time).",
    )
    min_days_at_risk: int = Field(default=1, ge=1, le=36_500, description="Drop persons with fewer days at risk.")
    restrict_to_common_period: bool = Field(
        default=False,
        description="Keep only index dates within the period where both arms have index dates (per site).",
    )


class Matching(_Strict):
    """Within-site greedy nearest-neighbour matching on the logit of the global propensity score."""

    ratio: int = Field(default=1, ge=1, le=10, description="Comparator persons per exposed person (1:ratio).")
    caliper: float = Field(
        default=0.1, gt=0.0, le=10.0,
        description="Caliper in standard deviations of the logit of the propensity score over all sites.",
    )


class Weighting(_Strict):
    """Propensity-score weights (IPTW for the ATE and ATT, overlap weights)."""

    stabilized: bool = Field(default=False, description="Stabilize the ATE weights by the arms' pooled shares.")
    trim: float = Field(
        default=0.0, ge=0.0, lt=0.5, description="Drop rows with a propensity score outside [trim, 1 - trim]."
    )
    truncate_at: float | None = Field(default=None, gt=1.0, description="Cap every weight at this value.")


class StudyProtocol(_Strict):
    """A complete, declarative study: population, arms, outcome, windows, covariates, analyses."""

    schema_version: Literal[1] = Field(description="Protocol schema version.")
    study_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$", description="Stable study id.")
    title: str = Field(min_length=1)
    population: Population
    exposure: Exposure
    comparator: Comparator
    outcome: Outcome
    index: IndexRule = IndexRule()
    washout_days: int = Field(default=365, ge=0, le=3650)
    time_at_risk: DayWindow = Field(description="Days after index at risk, e.g. 1..365.")
    covariate_window: DayWindow = Field(description="Days before index where covariates are measured.")
    study_population: StudyPopulation = StudyPopulation()
    covariates: list[Covariate] = Field(default_factory=list)
    large_scale_covariates: LargeScaleCovariates | None = Field(
        default=None, description="Optional concept covariates (condition/drug/procedure occurrence) for the PS model.",
    )
    propensity: PropensityModel = PropensityModel()
    matching: Matching = Matching()
    weighting: Weighting = Weighting()
    risk_horizon_days: int | None = Field(
        default=None, ge=1, le=36_500,
        description="Day at which risks are read off the Kaplan-Meier curves (default: end of time at risk).",
    )
    ph_check_cut_days: list[int] | None = Field(
        default=None, description="Days splitting follow-up into windows for the PH check (default: thirds).",
    )
    analyses: list[AnalysisName] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> StudyProtocol:
        columns = self.covariate_columns()
        duplicates = sorted({n for n in columns if columns.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"covariates give repeated columns {duplicates} (names must be unique; sex and "
                f"race may appear once)"
            )
        reserved = sorted(set(columns) & RESERVED_COLUMNS)
        if reserved:
            raise ValueError(f"covariate names {reserved} are reserved for the analysis dataset")
        if self.time_at_risk.start_day != 1:
            raise ValueError(
                "time_at_risk.start_day must be 1 in this version (follow-up starts the day "
                "after index; other starts need delayed entry, not supported yet)"
            )
        if self.covariate_window.end_day >= 0:
            raise ValueError("covariate_window.end_day must be < 0 (covariates precede index)")
        adjusted = sorted(set(self.analyses) & set(ADJUSTED_ANALYSES))
        if adjusted and "propensity" not in self.analyses:
            raise ValueError(f"analyses {adjusted} use the propensity score: add 'propensity' to analyses")
        self._check_large_scale(columns)
        if adjusted and not self.covariates and self.large_scale_covariates is None:
            raise ValueError(f"analyses {adjusted} need covariates for the propensity model; add some")
        if len(set(self.analyses)) != len(self.analyses):
            raise ValueError(f"analyses {self.analyses} repeat a name; list each once")
        cuts = self.cut_days()
        if cuts != sorted(set(cuts)) or any(not 1 <= c < self.time_at_risk.end_day for c in cuts):
            raise ValueError(
                f"ph_check_cut_days {cuts} must increase strictly and lie in 1..{self.time_at_risk.end_day - 1}"
            )
        return self

    def _check_large_scale(self, columns: list[str]) -> None:
        """Large-scale covariates feed the PS model, and their column names are theirs alone."""
        if self.large_scale_covariates is None:
            return
        if "propensity" not in self.analyses:
            raise ValueError(
                "large_scale_covariates feed the propensity model: add 'propensity' to analyses "
                "(or remove large_scale_covariates)"
            )
        clashing = [column for column in columns if parse_concept_column(column) is not None]
        if clashing:
            raise ValueError(
                f"covariate names {clashing} look like large-scale concept columns (domain_conceptid); "
                f"rename them"
            )

    def large_scale_window(self) -> DayWindow:
        """The window of the large-scale covariates (the covariate window unless set)."""
        block = self.large_scale_covariates
        return block.window if block is not None and block.window is not None else self.covariate_window

    def code_sets(self) -> list[CodeSet]:
        """Every concept set of the protocol (entry, arms, outcome, condition covariates)."""
        sets = [self.population.entry, self.exposure.codes, self.comparator.codes, self.outcome.codes]
        return sets + [c.codes for c in self.covariates if c.kind == "condition"]

    def domains(self) -> set[str]:
        """The record domains the arms are drawn from."""
        return {self.exposure.domain, self.comparator.domain}

    def adjusted_analyses(self) -> list[str]:
        """The propensity-score analyses, in the order the protocol lists them."""
        return [name for name in self.analyses if name in ADJUSTED_ANALYSES]

    def horizon_days(self) -> int:
        """The day risks are read at."""
        return self.risk_horizon_days or self.time_at_risk.end_day

    def cut_days(self) -> list[int]:
        """Days splitting follow-up into windows for the proportional-hazards check."""
        if self.ph_check_cut_days is not None:
            return list(self.ph_check_cut_days)
        end = self.time_at_risk.end_day
        return sorted({max(1, round(end / 3)), max(1, round(2 * end / 3))} - {end}) if end > 2 else []

    def covariate_columns(self) -> list[str]:
        """Columns the covariates become in the analysis dataset, in protocol order."""
        columns: list[str] = []
        for cov in self.covariates:
            if cov.kind == "sex":
                columns.append("sex_female")
            elif cov.kind == "race":
                columns.extend(f"race_{level}" for level in RACE_LEVELS)
            else:
                columns.append(cov.name)
        return columns

    def propensity_columns(self) -> list[str]:
        """Design-matrix columns of the propensity model, named as in the analysis dataset."""
        return ["(intercept)", *self.covariate_columns()]

    def canonical_bytes(self) -> bytes:
        """The protocol as canonical JSON: the bytes that are hashed, signed and approved."""
        data = self.model_dump(mode="json")
        for name in _OMITTED_WHEN_NULL:
            if data[name] is None:
                del data[name]  # protocols without the newer blocks keep their hash
        return canonical_json(data)

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical bytes: the protocol's identity at every site."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


_OMITTED_WHEN_NULL = ("large_scale_covariates",)


def protocol_json_schema() -> str:
    """The protocol's JSON Schema as stable, indented JSON text."""
    schema = StudyProtocol.model_json_schema()
    schema["$id"] = "https://fedrwe.invalid/protocol/v1.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"protocol {source} is invalid:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if item["type"] == "missing" else f" (got {value!r})"
        fix = {
            "missing": "add the field",
            "extra_forbidden": "remove it or fix its spelling",
        }.get(item["type"], "correct the value")
        lines.append(f"  - field `{where}`: {item['msg']}{shown}. Fix: {fix}.")
    return "\n".join(lines)


def parse_protocol(data: object, source: str = "<data>") -> StudyProtocol:
    """Validate parsed YAML/JSON data as a protocol; errors name every bad field and the fix."""
    if not isinstance(data, dict):
        raise ProtocolError(f"protocol {source} must be a mapping of fields, got {type(data).__name__}")
    try:
        return StudyProtocol.model_validate(data)
    except ValidationError as error:
        raise ProtocolError(_describe(error, source)) from None


def load_protocol(path: str | Path) -> StudyProtocol:
    """Read and validate a protocol YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProtocolError(f"cannot read protocol {path}: {error.strerror}. Fix: check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProtocolError(f"protocol {path} is not valid YAML: {error}") from None
    return parse_protocol(data, str(path))
