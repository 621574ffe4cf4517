"""The study protocol: what a study lead declares and every site agrees to run.

A protocol is YAML validated by these pydantic models. Unknown fields are errors (a typo
must not silently change a study).

A protocol holds one comparison (top-level ``exposure`` and ``comparator``) or several
(``comparisons``, as OHDSI CohortMethod's target-comparator-outcome lists). Sites and the
coordinator work on one comparison at a time: :meth:`StudyProtocol.resolve` turns a
protocol and a comparison id into the single-comparison protocol the cohort rules and
estimators read, while requests carry (and sites approve) the whole protocol.
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
    # strict: `true` is not a day count and "365" is text; a protocol must say what it means
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FieldProblem(ValueError):
    """A value that is wrong given the protocol's other fields, raised by a model validator.

    ``field`` is its path below the model that raises it (e.g. ``end_day`` in a window,
    ``comparisons.1.id`` at the top level); the error then names that field, the value and
    the fix rather than the whole model.
    """

    def __init__(self, field: str, value: object, problem: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(problem)


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
        for index, code in enumerate(codes):
            if not _CODE.match(code):
                raise FieldProblem(
                    str(index), code, f"code {code!r} is not a source code or a prefix ending in '*'",
                    "write a code such as 'F14.20' (letters, digits, '.', '-') or a prefix such as 'F14.*'",
                )
        return codes

    @model_validator(mode="after")
    def _not_empty(self) -> CodeSet:
        if not self.include and not self.concept_ids:
            raise FieldProblem(
                "include", self.include,
                "a code set needs source codes (`include`) or standard concepts (`concept_ids`)",
                "list source codes in `include` (with their `vocabulary`) or OMOP concept ids in `concept_ids`",
            )
        if self.include and self.vocabulary is None:
            raise FieldProblem(
                "vocabulary", None, "source codes (`include`) need their `vocabulary`",
                "add the vocabulary of the codes, e.g. `vocabulary: ICD10CM`",
            )
        if self.include_descendants and not self.concept_ids:
            raise FieldProblem(
                "concept_ids", self.concept_ids, "`include_descendants` applies to `concept_ids`; list some",
                "list the ancestor concepts in `concept_ids`, or remove `include_descendants`",
            )
        return self

    def uses_descendants(self) -> bool:
        """True when matching needs the site's concept_ancestor table."""
        return self.include_descendants


class Population(_Strict):
    """Who can enter the study: persons with an entry condition, of a minimum age at index."""

    name: str = Field(min_length=1)
    entry: CodeSet = Field(description="Condition codes whose first record is the entry date.")
    min_age: int = Field(default=18, ge=0, le=120, description="Minimum age in years at index.")


Domain = Literal["drug", "procedure", "drug_era"]
_DOMAIN_DESCRIPTION = "drug_exposure, procedure_occurrence or drug_era records."


def _era_codes_are_concepts(domain: str, codes: CodeSet) -> None:
    """drug_era has no source values: source codes on it would silently match nothing."""
    if domain == "drug_era" and codes.include:
        raise ValueError(
            f"domain drug_era reads the drug_era table, which has no source values, so `codes.include` "
            f"{codes.include} can never match. Fix: list the drugs' RxNorm ingredient concepts in "
            f"`codes.concept_ids` (drug eras are recorded by ingredient) and remove `include`"
        )


class Exposure(_Strict):
    """The drug (or procedure: anaesthesia is often recorded as one) given to the exposed arm."""

    name: str = Field(min_length=1)
    codes: CodeSet
    domain: Domain = Field(default="drug", description=_DOMAIN_DESCRIPTION)

    @model_validator(mode="after")
    def _codes_fit_domain(self) -> Exposure:
        _era_codes_are_concepts(self.domain, self.codes)
        return self


class Comparator(_Strict):
    """The active comparator drugs."""

    name: str = Field(min_length=1)
    codes: CodeSet
    domain: Domain = Field(default="drug", description=_DOMAIN_DESCRIPTION)
    never_exposed: bool = Field(
        default=True, description="Comparator patients never received the exposure drug."
    )

    @model_validator(mode="after")
    def _codes_fit_domain(self) -> Comparator:
        _era_codes_are_concepts(self.domain, self.codes)
        return self


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
            raise FieldProblem(
                "end_day", self.end_day, f"end_day {self.end_day} is before start_day {self.start_day}",
                "make end_day at least start_day (both ends are days relative to index, inclusive)",
            )
        return self


Anchor = Literal["cohort_start", "cohort_end"]


class TimeAtRisk(_Strict):
    """The risk window (CohortMethod's riskWindowStart/startAnchor, riskWindowEnd/endAnchor).

    Each end is a number of days after its anchor: ``cohort_start`` is the index date,
    ``cohort_end`` the end of the index exposure record (docs/cohort_rules.md). Both ends
    are inclusive; follow-up time is counted from the window's start (its first day is 1).
    """

    start_day: int = Field(ge=0, le=36_500, description="First day at risk, in days after `start_anchor`.")
    end_day: int = Field(ge=0, le=36_500, description="Last day at risk, in days after `end_anchor`.")
    start_anchor: Anchor = Field(
        default="cohort_start", description="What `start_day` counts from: cohort_start (index) or cohort_end.",
    )
    end_anchor: Anchor = Field(
        default="cohort_start", description="What `end_day` counts from: cohort_start (index) or cohort_end.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> TimeAtRisk:
        if self.end_day < self.start_day and self.longest_follow_up() is not None:
            raise FieldProblem(
                "end_day", self.end_day, f"end_day {self.end_day} is before start_day {self.start_day}",
                "make end_day at least start_day (both count days after their anchors, inclusive)",
            )
        return self

    def uses_cohort_end(self) -> bool:
        """True when a window end is anchored on the end of the index exposure."""
        return "cohort_end" in (self.start_anchor, self.end_anchor)

    def longest_follow_up(self) -> int | None:
        """The most days at risk anyone can have, or None when the window starts at cohort
        start and ends at cohort end: its length then grows with the exposure's."""
        if self.start_anchor == "cohort_start" and self.end_anchor == "cohort_end":
            return None
        return self.end_day - self.start_day + 1


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
            raise FieldProblem(
                "domains", self.domains,
                f"large_scale_covariates.domains {self.domains} repeat a domain", "list each domain once",
            )
        if self.window is not None and self.window.end_day >= 0:
            raise FieldProblem(
                "window.end_day", self.window.end_day,
                f"large_scale_covariates.window.end_day is {self.window.end_day}; it must be < 0 "
                f"(covariates precede index)", "end the window on day -1 or earlier",
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
    censor_at_death: bool = Field(
        default=True, description="End follow-up at death (the end of observation always ends it).",
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


class Quorum(_Strict):
    """Which sites a comparison needs: a site that drops out (no answer after the round's
    retries, or an error or refusal) is left out and the comparison restarts on the others,
    as long as this quorum still holds (docs/reliability.md)."""

    min_sites: int = Field(default=1, ge=1, le=1000, description="Fewest sites a comparison may finish with.")
    required_sites: list[str] = Field(
        default_factory=list,
        description="Sites (by site id) without which no comparison runs; their dropping out fails it.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> Quorum:
        if len(set(self.required_sites)) != len(self.required_sites):
            raise ValueError(f"quorum.required_sites {self.required_sites} repeat a site; list each once")
        return self


class Restriction(_Strict):
    """A required condition: only persons with a record of ``codes`` in ``window`` stay
    (e.g. CUD patients with depression for the paper's second comparison)."""

    name: str = Field(min_length=1)
    codes: CodeSet
    window: DayWindow = Field(
        default_factory=lambda: DayWindow(start_day=-36_500, end_day=0),
        description="Days relative to index where the condition must be recorded (default: any day up to index).",
    )


_COMPARISON_ID = r"^[a-z][a-z0-9_]{0,31}$"


class Comparison(_Strict):
    """One target-comparator(-outcome) comparison of a protocol with several."""

    id: str = Field(pattern=_COMPARISON_ID, description="Short id, e.g. `vs_midazolam`; names its results.")
    title: str | None = Field(default=None, description="What the comparison asks (default: the arms' names).")
    exposure: Exposure
    comparator: Comparator
    outcome: Outcome | None = Field(default=None, description="Overrides the protocol's outcome.")
    restrict_to: Restriction | None = Field(default=None, description="Overrides the protocol's restriction.")
    exclude_covariates: list[str] = Field(
        default_factory=list,
        description="Covariates (by name) left out of this comparison, e.g. the condition it is restricted to.",
    )


class StudyProtocol(_Strict):
    """A complete, declarative study: population, arms, outcome, windows, covariates, analyses."""

    schema_version: Literal[1] = Field(description="Protocol schema version.")
    study_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$", description="Stable study id.")
    title: str = Field(min_length=1)
    population: Population
    exposure: Exposure | None = Field(default=None, description="The exposed arm (one comparison).")
    comparator: Comparator | None = Field(default=None, description="The comparator arm (one comparison).")
    comparisons: list[Comparison] = Field(
        default_factory=list, description="Several comparisons, instead of `exposure` and `comparator`.",
    )
    outcome: Outcome
    restrict_to: Restriction | None = Field(default=None, description="Keep only persons with this condition.")
    index: IndexRule = IndexRule()
    washout_days: int = Field(default=365, ge=0, le=3650)
    time_at_risk: TimeAtRisk = Field(description="Days at risk after index (or after the exposure's end), e.g. 1..365.")
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
        description="Day of follow-up at which risks are read off the Kaplan-Meier curves (default: the last).",
    )
    ph_check_cut_days: list[int] | None = Field(
        default=None, description="Days splitting follow-up into windows for the PH check (default: thirds).",
    )
    analyses: list[AnalysisName] = Field(min_length=1)
    secure_aggregation: bool = Field(
        default=False,
        description=(
            "Model rounds (propensity and crude Cox derivatives) travel as pairwise-masked sums: "
            "the coordinator learns only their sum over sites. Allows the crude and propensity "
            "analyses only (docs/privacy.md)."
        ),
    )

    quorum: Quorum = Field(
        default_factory=Quorum,
        description="Fewest sites (and named required sites) a comparison may finish with when sites drop out.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StudyProtocol:
        self._check_comparisons()
        columns = self.covariate_columns()
        duplicates = sorted({n for n in columns if columns.count(n) > 1})
        if duplicates:
            raise FieldProblem(
                "covariates", duplicates,
                f"covariates give repeated columns {duplicates} (names must be unique; sex and "
                f"race may appear once)", "give each covariate its own name and list sex and race once",
            )
        reserved = sorted(set(columns) & RESERVED_COLUMNS)
        if reserved:
            raise FieldProblem(
                "covariates", reserved, f"covariate names {reserved} are reserved for the analysis dataset",
                f"rename them (reserved: {sorted(RESERVED_COLUMNS)})",
            )
        if self.covariate_window.end_day >= 0:
            raise FieldProblem(
                "covariate_window.end_day", self.covariate_window.end_day,
                "covariate_window.end_day must be < 0 (covariates precede index)",
                "end the covariate window on day -1 or earlier",
            )
        adjusted = sorted(set(self.analyses) & set(ADJUSTED_ANALYSES))
        if adjusted and "propensity" not in self.analyses:
            raise FieldProblem(
                "analyses", self.analyses, f"analyses {adjusted} use the propensity score: add 'propensity' to analyses",
                "add 'propensity' to analyses",
            )
        self._check_large_scale(columns)
        if adjusted and not self.covariates and self.large_scale_covariates is None:
            raise FieldProblem(
                "covariates", self.covariates, f"analyses {adjusted} need covariates for the propensity model",
                "add covariates (or large_scale_covariates), or keep only the crude analysis",
            )
        if adjusted and self.secure_aggregation:
            raise FieldProblem(
                "analyses", self.analyses,
                f"analyses {adjusted} need per-site matching, balance and event tables, which secure "
                f"aggregation does not release", "with secure_aggregation: true use analyses crude and propensity",
            )
        if len(set(self.analyses)) != len(self.analyses):
            raise FieldProblem(
                "analyses", self.analyses, f"analyses {self.analyses} repeat a name", "list each analysis once",
            )
        self._follow_up_days_fit()
        return self

    def _check_comparisons(self) -> None:
        one = self.exposure is not None or self.comparator is not None
        if self.comparisons and one:
            raise FieldProblem(
                "comparisons", [c.id for c in self.comparisons],
                "the protocol gives both `exposure`/`comparator` and `comparisons`",
                "give either `exposure` and `comparator` or `comparisons`, not both",
            )
        if not self.comparisons and (self.exposure is None or self.comparator is None):
            missing = [name for name in ("exposure", "comparator") if getattr(self, name) is None]
            raise FieldProblem(
                missing[0], None, f"missing {' and '.join(missing)}: a protocol needs both arms (or `comparisons`)",
                f"add {' and '.join(missing)}",
            )
        ids = [c.id for c in self.comparisons]
        for index, comparison_id in enumerate(ids):
            if comparison_id in ids[:index]:
                raise FieldProblem(
                    f"comparisons.{index}.id", comparison_id, f"comparison ids {ids} repeat",
                    "give each comparison its own id",
                )
        names = {c.name for c in self.covariates}
        for index, c in enumerate(self.comparisons):
            unknown = sorted(set(c.exclude_covariates) - names)
            if unknown:
                raise FieldProblem(
                    f"comparisons.{index}.exclude_covariates", unknown,
                    f"comparison {c.id!r}: exclude_covariates {unknown} are not covariates of the "
                    f"protocol (it has {sorted(names)})", "list only names of the protocol's covariates",
                )

    def comparison_ids(self) -> list[str | None]:
        """The comparisons to run, in protocol order (``[None]`` for a one-comparison protocol)."""
        return [c.id for c in self.comparisons] or [None]

    def resolve(self, comparison: str | None) -> StudyProtocol:
        """The single-comparison protocol of ``comparison`` (``None``: this one-comparison protocol).

        Its study id is ``STUDY__COMPARISON``, so each comparison's datasets and caches stay
        apart; its arms, outcome and restriction are the comparison's; excluded covariates
        are gone. It is not what sites approve: requests carry the whole protocol.
        """
        if comparison is None:
            if self.comparisons:
                raise ProtocolError(
                    f"study {self.study_id!r} has comparisons {[c.id for c in self.comparisons]}; a "
                    f"request must name one. Fix: run the study with the coordinator of this version."
                )
            return self
        chosen = next((c for c in self.comparisons if c.id == comparison), None)
        if chosen is None:
            raise ProtocolError(
                f"study {self.study_id!r} has no comparison {comparison!r} (it has "
                f"{[c.id for c in self.comparisons] or 'none'}). Fix: name one of them."
            )
        return self.model_copy(update={
            "study_id": f"{self.study_id}__{chosen.id}",
            "title": chosen.title or f"{self.title}: {chosen.exposure.name} vs {chosen.comparator.name}",
            "exposure": chosen.exposure,
            "comparator": chosen.comparator,
            "comparisons": [],
            "outcome": chosen.outcome or self.outcome,
            "restrict_to": chosen.restrict_to or self.restrict_to,
            "covariates": [c for c in self.covariates if c.name not in chosen.exclude_covariates],
        })

    def arms(self) -> tuple[Exposure, Comparator]:
        """The exposure and comparator of a one-comparison (or resolved) protocol."""
        if self.exposure is None or self.comparator is None:
            raise ProtocolError(
                f"study {self.study_id!r} has several comparisons; resolve one first "
                f"(StudyProtocol.resolve)"
            )
        return self.exposure, self.comparator

    def _follow_up_days_fit(self) -> None:
        """risk_horizon_days and ph_check_cut_days are days of follow-up: within the longest."""
        longest = self.time_at_risk.longest_follow_up()
        if longest is None and self.risk_horizon_days is None:
            raise FieldProblem(
                "risk_horizon_days", None,
                "time_at_risk starts at cohort_start and ends at cohort_end, so the follow-up length "
                "varies with each exposure's", "set risk_horizon_days (the day of follow-up at which "
                "risks are read, e.g. 365)",
            )
        if longest is not None and self.risk_horizon_days is not None and self.risk_horizon_days > longest:
            raise FieldProblem(
                "risk_horizon_days", self.risk_horizon_days,
                f"risk_horizon_days {self.risk_horizon_days} is beyond the longest follow-up, {longest} "
                f"days (time_at_risk day {self.time_at_risk.start_day}..{self.time_at_risk.end_day})",
                f"set it to at most {longest}",
            )
        cuts = self.cut_days()
        last = 36_500 if longest is None else longest - 1
        if cuts != sorted(set(cuts)) or any(not 1 <= c <= last for c in cuts):
            raise FieldProblem(
                "ph_check_cut_days", cuts, f"ph_check_cut_days {cuts} must increase strictly and lie in 1..{last}",
                f"list increasing days of follow-up between 1 and {last}",
            )

    def _check_large_scale(self, columns: list[str]) -> None:
        """Large-scale covariates feed the PS model, and their column names are theirs alone."""
        if self.large_scale_covariates is None:
            return
        if "propensity" not in self.analyses:
            raise FieldProblem(
                "analyses", self.analyses,
                "large_scale_covariates feed the propensity model: add 'propensity' to analyses",
                "add 'propensity' to analyses (or remove large_scale_covariates)",
            )
        clashing = [column for column in columns if parse_concept_column(column) is not None]
        if clashing:
            raise FieldProblem(
                "covariates", clashing,
                f"covariate names {clashing} look like large-scale concept columns (domain_conceptid)",
                "rename them",
            )

    def large_scale_window(self) -> DayWindow:
        """The window of the large-scale covariates (the covariate window unless set)."""
        block = self.large_scale_covariates
        return block.window if block is not None and block.window is not None else self.covariate_window

    def code_sets(self) -> list[CodeSet]:
        """Every concept set of a one-comparison protocol (entry, arms, outcome, restriction,
        condition covariates)."""
        exposure, comparator = self.arms()
        sets = [self.population.entry, exposure.codes, comparator.codes, self.outcome.codes]
        if self.restrict_to is not None:
            sets.append(self.restrict_to.codes)
        return sets + [c.codes for c in self.covariates if c.kind == "condition"]

    def domains(self) -> set[str]:
        """The record domains the arms of a one-comparison protocol are drawn from."""
        exposure, comparator = self.arms()
        return {exposure.domain, comparator.domain}

    def adjusted_analyses(self) -> list[str]:
        """The propensity-score analyses, in the order the protocol lists them."""
        return [name for name in self.analyses if name in ADJUSTED_ANALYSES]

    def horizon_days(self) -> int:
        """The day of follow-up risks are read at (default: the longest follow-up)."""
        if self.risk_horizon_days is not None:
            return self.risk_horizon_days
        longest = self.time_at_risk.longest_follow_up()
        if longest is None:  # the validator asks for risk_horizon_days then
            raise ValueError("risk_horizon_days is needed when the follow-up length varies per person")
        return longest

    def cut_days(self) -> list[int]:
        """Days of follow-up splitting it into windows for the proportional-hazards check
        (default: thirds of the longest follow-up, or of the horizon when the length varies)."""
        if self.ph_check_cut_days is not None:
            return list(self.ph_check_cut_days)
        end = self.time_at_risk.longest_follow_up() or self.horizon_days()
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
        for path, default in _ADDED_SINCE_SCHEMA_1:  # unused newer options keep a protocol's hash
            *parents, name = path
            holder = data
            for parent in parents:
                holder = holder[parent]
            if holder[name] == default:
                del holder[name]
        return canonical_json(data)

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical bytes: the protocol's identity at every site."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


# Fields added after schema 1's first release, with their defaults: left out of the hashed
# bytes while unused, so a protocol written before them keeps the hash its sites approved.
_ADDED_SINCE_SCHEMA_1: tuple[tuple[tuple[str, ...], object], ...] = (
    (("comparisons",), []),
    (("restrict_to",), None),
    (("large_scale_covariates",), None),
    (("time_at_risk", "start_anchor"), "cohort_start"),
    (("time_at_risk", "end_anchor"), "cohort_start"),
    (("study_population", "censor_at_death"), True),
    (("secure_aggregation",), False),
    (("quorum",), {"min_sites": 1, "required_sites": []}),
)


def protocol_json_schema() -> str:
    """The protocol's JSON Schema as stable, indented JSON text."""
    schema = StudyProtocol.model_json_schema()
    schema["$id"] = "https://fedrwe.invalid/protocol/v1.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


_SHOWN_CHARS = 200  # a value longer than this is cut in messages (a whole sub-model says little)

# The fix of each pydantic error type, from its context (``ctx``); the rest: "correct the value".
_FIXES: dict[str, str] = {
    "missing": "add the field",
    "extra_forbidden": "remove it or fix its spelling",
    "greater_than_equal": "use a value of at least {ge}",
    "greater_than": "use a value above {gt}",
    "less_than_equal": "use a value of at most {le}",
    "less_than": "use a value below {lt}",
    "literal_error": "use one of {expected}",
    "union_tag_invalid": "use one of {expected_tags}",
    "union_tag_not_found": "add `{discriminator}`",
    "string_pattern_mismatch": "use a value matching {pattern}",
    "string_too_short": "fill it in",
    "too_short": "list at least {min_length}",
    "int_type": "write a whole number, without quotes",
    "int_parsing": "write a whole number, without quotes",
    "int_from_float": "write a whole number",
    "float_type": "write a number, without quotes",
    "bool_type": "write true or false, without quotes",
    "string_type": "write text",
    "list_type": "write a list, e.g. [a, b]",
    "model_type": "write a mapping of its fields",
    "dict_type": "write a mapping",
}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"protocol {source} is invalid:"]
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        context = item.get("ctx") or {}
        cause = context.get("error")
        if isinstance(cause, FieldProblem):
            where = ".".join([*loc, cause.field])
            lines.append(f"  - field `{where}`: {cause} (got {_shown(cause.value)}). Fix: {cause.fix}.")
            continue
        where = ".".join(loc) or "(top level)"
        shown = "" if item["type"] == "missing" else f" (got {_shown(item.get('input'))})"
        if "Fix:" in item["msg"]:
            lines.append(f"  - field `{where}`: {item['msg']}{shown}.")
            continue
        try:
            fix = _FIXES.get(item["type"], "correct the value").format(**context)
        except (KeyError, IndexError):
            fix = "correct the value"
        lines.append(f"  - field `{where}`: {item['msg']}{shown}. Fix: {fix}.")
    return "\n".join(lines)


def parse_protocol(data: object, source: str = "<data>") -> StudyProtocol:
    """Validate parsed YAML/JSON data as a protocol; errors name every bad field and the fix."""
    if not isinstance(data, dict):
        raise ProtocolError(
            f"protocol {source} must be a mapping of fields, got {type(data).__name__} {_shown(data)}. "
            f"Fix: write the protocol as fields (schema_version, study_id, ...; docs/protocol.md)."
        )
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
        raise ProtocolError(
            f"protocol {path} is not valid YAML: {error}. Fix: correct the YAML at the line shown."
        ) from None
    return parse_protocol(data, str(path))
