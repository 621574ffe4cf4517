"""Protocol -> Spark plan -> the per-study analysis dataset of one site.

The rules are written out in docs/cohort_rules.md; each step below names its rule. One
row per person in the final cohort: ``person_id, treatment, index_date, time, event`` and
one column per covariate (``StudyProtocol.covariate_columns``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from shared.errors import UnmatchedConceptSetError
from shared.omop import GENDER_FEMALE, RACE_ASIAN, RACE_BLACK, RACE_WHITE
from shared.protocol.model import RACE_LEVELS, CodeSet, Restriction, StudyProtocol
from site_agent.cohort.codes import code_predicate, resolve_concepts
from site_agent.cohort.coverage import unmatched_concept_sets

_RACE_CONCEPTS = {"black": RACE_BLACK, "asian": RACE_ASIAN}
COHORT_RULES_VERSION = 5  # bump when a rule changes: cached datasets are then rebuilt


class _Matcher:
    """Concept-set predicates over records with ``code`` and ``concept_id`` columns."""

    def __init__(self, ancestors: DataFrame | None) -> None:
        self._ancestors = ancestors
        self._resolved: dict[str, list[int]] = {}

    def __call__(self, codes: CodeSet) -> Column:
        key = codes.model_dump_json()
        if key not in self._resolved:
            self._resolved[key] = resolve_concepts(codes, self._ancestors)
        return code_predicate(F.col("code"), codes, F.col("concept_id"), self._resolved[key])


@dataclass(frozen=True)
class AttritionStep:
    """Persons remaining after one inclusion rule, per arm once arms exist."""

    step: str
    description: str
    n_persons: int
    n_exposed: int | None
    n_comparator: int | None

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Cohort:
    """The analysis dataset (a Spark plan) and the attrition that led to it."""

    dataset: DataFrame
    attrition: list[AttritionStep]
    intermediate: DataFrame  # cached while the dataset is materialised

    def release(self) -> None:
        """Drop the cached intermediate once the dataset has been written."""
        self.intermediate.unpersist()


def _first_date_on_or_after_entry(records: DataFrame, entry: DataFrame, arm: Column) -> DataFrame:
    """``index_date``, the first arm record on or after entry, and ``cohort_end``, its end
    (the latest end among the arm's records starting on the index date)."""
    longest_first = F.struct(F.col("date"), F.datediff(F.col("date"), F.col("end")))
    return (
        records.where(arm)
        .join(entry, "person_id")
        .where(F.col("date") >= F.col("entry_date"))
        .groupBy("person_id")
        .agg(F.min("date").alias("index_date"), F.min_by("end", longest_first).alias("cohort_end"))
    )


def _candidates(
    protocol: StudyProtocol, conditions: DataFrame, records: dict[str, DataFrame], match: _Matcher
) -> tuple[DataFrame, DataFrame]:
    """Rules 1-2: entry date, then the arm and index date of each person."""
    entry = (
        conditions.where(match(protocol.population.entry))
        .groupBy("person_id")
        .agg(F.min("date").alias("entry_date"))
    )
    exposure_arm, comparator_arm = protocol.arms()
    exposures, comparators = records[exposure_arm.domain], records[comparator_arm.domain]
    is_exposure = match(exposure_arm.codes)
    exposed = _first_date_on_or_after_entry(exposures, entry, is_exposure).withColumn("treatment", F.lit(1))
    comparator = _first_date_on_or_after_entry(comparators, entry, match(comparator_arm.codes))
    if comparator_arm.never_exposed:
        ever_exposed = exposures.where(is_exposure).select("person_id").distinct()
        comparator = comparator.join(ever_exposed, "person_id", "left_anti")
    else:
        comparator = comparator.join(exposed.select("person_id"), "person_id", "left_anti")
    comparator = comparator.withColumn("treatment", F.lit(0))
    return entry, exposed.unionByName(comparator)


def _with_common_period_flag(candidates: DataFrame, among: Column) -> DataFrame:
    """``ok_common_period``: the index date lies between the later of the arms' first and
    the earlier of their last index dates at this site (over the candidates ``among``
    selects: those that passed the earlier steps)."""
    bounds = candidates.where(among).groupBy("treatment").agg(F.min("index_date").alias("first"), F.max("index_date").alias("last"))
    common = bounds.agg(F.max("first").alias("start"), F.min("last").alias("end"), F.count(F.lit(1)).alias("arms"))
    inside = (F.col("arms") == 2) & (F.col("index_date") >= F.col("start")) & (F.col("index_date") <= F.col("end"))
    return candidates.crossJoin(common).withColumn("ok_common_period", inside).drop("start", "end", "arms")


def _with_restriction_flag(
    restriction: Restriction, candidates: DataFrame, conditions: DataFrame, match: _Matcher
) -> DataFrame:
    """``ok_restriction``: a record of the restriction's codes within its window of index."""
    offset = F.datediff(F.col("date"), F.col("index_date"))
    window = restriction.window
    having = (
        conditions.where(match(restriction.codes))
        .join(candidates.select("person_id", "index_date"), "person_id")
        .where((offset >= window.start_day) & (offset <= window.end_day))
        .select("person_id", F.lit(True).alias("ok_restriction"))
        .distinct()
    )
    flagged = candidates.join(having, "person_id", "left")
    return flagged.withColumn("ok_restriction", F.coalesce(F.col("ok_restriction"), F.lit(False)))


def _follow_up(
    protocol: StudyProtocol,
    candidates: DataFrame,
    tables: dict[str, DataFrame],
    conditions: DataFrame,
    match: _Matcher,
) -> DataFrame:
    """Rules 3-7: washout, age, prior outcome, time at risk and the outcome, as flags.

    ``risk_start`` and ``risk_end`` are the risk window's days after index; ``time`` counts
    follow-up days from ``risk_start`` (day ``risk_start`` is 1), as CohortMethod does.
    """
    index = F.col("index_date")
    candidates = _with_risk_window(protocol, candidates)
    periods = (
        tables["observation_period"]
        .select(
            "person_id",
            F.col("observation_period_start_date").alias("obs_start"),
            F.col("observation_period_end_date").alias("obs_end"),
        )
        .join(candidates.select("person_id", "index_date"), "person_id")
        .where((F.col("obs_start") <= index) & (index <= F.col("obs_end")))
        .groupBy("person_id")
        .agg(F.min("obs_start").alias("obs_start"), F.max("obs_end").alias("obs_end"))
    )
    deaths = tables["death"].groupBy("person_id").agg(F.min("death_date").alias("death_date"))
    person = tables["person"].select("person_id", "year_of_birth", "gender_concept_id", "race_concept_id")
    lookback = protocol.study_population.prior_outcome_lookback_days
    in_lookback = F.lit(True) if lookback is None else F.datediff(index, F.col("date")) <= lookback
    day = F.datediff(F.col("date"), index)
    # Before index (within the lookback), or after the index day but before the risk window.
    prior = ((F.col("date") < index) & in_lookback) | ((day >= 1) & (day < F.col("risk_start")))
    outcomes = (
        conditions.where(match(protocol.outcome.codes))
        .join(candidates.select("person_id", "index_date", "risk_start"), "person_id")
        .groupBy("person_id")
        .agg(
            F.max(F.when(prior, 1).otherwise(0)).alias("prior_outcome"),
            F.min(F.when(day >= F.col("risk_start"), day)).alias("outcome_day"),
        )
    )
    risk_start, risk_end = F.col("risk_start"), F.col("risk_end")
    censor_day = F.least(
        risk_end,
        F.datediff(F.col("obs_end"), index),
        F.coalesce(F.datediff(F.col("death_date"), index), risk_end)
        if protocol.study_population.censor_at_death else risk_end,
    )
    days_at_risk = F.col("censor_day") - risk_start + 1
    frame = (
        candidates.join(person, "person_id", "left")
        .join(periods, "person_id", "left")
        .join(deaths, "person_id", "left")
        .join(outcomes, "person_id", "left")
        .withColumn("censor_day", censor_day)
        .withColumn(
            "ok_washout",
            F.coalesce(F.datediff(index, F.col("obs_start")) >= protocol.washout_days, F.lit(False)),
        )
        .withColumn(
            "ok_age",
            F.coalesce(F.year(index) - F.col("year_of_birth") >= protocol.population.min_age, F.lit(False)),
        )
        .withColumn(
            "ok_no_prior_outcome",
            F.lit(True) if not protocol.outcome.exclude_prior
            else F.coalesce(F.col("prior_outcome"), F.lit(0)) == 0,
        )
        .withColumn(
            "ok_time_at_risk",
            F.coalesce(days_at_risk >= protocol.study_population.min_days_at_risk, F.lit(False)),
        )
    )
    has_event = F.col("outcome_day").isNotNull() & (F.col("outcome_day") <= F.col("censor_day"))
    return frame.withColumn("event", F.when(has_event, 1).otherwise(0)).withColumn(
        "time", F.when(has_event, F.col("outcome_day")).otherwise(F.col("censor_day")) - risk_start + 1
    )


def _with_risk_window(protocol: StudyProtocol, candidates: DataFrame) -> DataFrame:
    """``risk_start`` and ``risk_end``: the risk window's ends in days after index, each
    ``time_at_risk`` day counted from its anchor (the index date or ``cohort_end``)."""
    tar = protocol.time_at_risk
    days_to_cohort_end = F.datediff(F.col("cohort_end"), F.col("index_date"))

    def after(anchor: str, day: int) -> Column:
        return F.lit(day) + days_to_cohort_end if anchor == "cohort_end" else F.lit(day)

    return candidates.withColumn("risk_start", after(tar.start_anchor, tar.start_day)).withColumn(
        "risk_end", after(tar.end_anchor, tar.end_day)
    )


_RULES: tuple[tuple[str, str], ...] = (
    ("ok_washout", "observation for at least the washout period before index"),
    ("ok_age", "at least the minimum age at index"),
    ("ok_no_prior_outcome", "no outcome before index (within the lookback)"),
    ("ok_time_at_risk", "at least the minimum days at risk"),
)


def _attrition(entry: DataFrame, followed: DataFrame, rules: list[tuple[str, str]]) -> list[AttritionStep]:
    """Counts after each rule, per arm, in one Spark job over the candidates."""
    n_entry = entry.count()
    passed = F.lit(True)
    aggregations = []
    for flag, _ in ((None, None), *rules):
        if flag is not None:
            passed = passed & F.col(flag)
        for arm in (1, 0):
            aggregations.append(F.sum(F.when(passed & (F.col("treatment") == arm), 1).otherwise(0)))
    row = followed.agg(*aggregations).first()
    counts = [int(value or 0) for value in row] if row is not None else [0] * len(aggregations)
    steps = [AttritionStep("entry", "persons with an entry condition", n_entry, None, None)]
    labels = (("arm", "first exposure or comparator on or after entry"), *rules)
    for i, (step, description) in enumerate(labels):
        exposed, comparator = counts[2 * i], counts[2 * i + 1]
        steps.append(AttritionStep(step.removeprefix("ok_"), description, exposed + comparator, exposed, comparator))
    return steps


def _with_covariates(
    protocol: StudyProtocol, cohort: DataFrame, conditions: DataFrame, visits: DataFrame, match: _Matcher
) -> DataFrame:
    """Rule 8: covariates measured in the covariate window before index."""
    window = protocol.covariate_window
    keys = cohort.select("person_id", "index_date")

    def in_window(date: Column) -> Column:
        offset = F.datediff(date, F.col("index_date"))
        return (offset >= window.start_day) & (offset <= window.end_day)

    frame = cohort
    condition_covariates = [c for c in protocol.covariates if c.kind == "condition"]
    if condition_covariates:
        flags = (
            conditions.join(keys, "person_id")
            .where(in_window(F.col("date")))
            .groupBy("person_id")
            .agg(*[
                F.max(F.when(match(c.codes), 1).otherwise(0)).alias(c.name)
                for c in condition_covariates
            ])
        )
        frame = frame.join(flags, "person_id", "left")
    visit_covariates = [c for c in protocol.covariates if c.kind == "visit_count"]
    if visit_covariates:
        counts = (
            visits.join(keys, "person_id")
            .where(in_window(F.col("visit_start_date")))
            .groupBy("person_id")
            .agg(*[
                F.sum(F.when(F.col("visit_concept_id").isin(c.visit_concept_ids), 1).otherwise(0)).alias(c.name)
                for c in visit_covariates
            ])
        )
        frame = frame.join(counts, "person_id", "left")
    columns: list[Column] = [
        F.col("person_id"), F.col("treatment").cast("int"), F.col("index_date"),
        F.col("time").cast("int"), F.col("event").cast("int"),
    ]
    for cov in protocol.covariates:
        if cov.kind == "age":
            columns.append((F.year("index_date") - F.col("year_of_birth")).cast("double").alias(cov.name))
        elif cov.kind == "sex":
            is_female = F.coalesce(F.col("gender_concept_id") == GENDER_FEMALE, F.lit(False))
            columns.append(is_female.cast("int").alias("sex_female"))
        elif cov.kind == "race":
            for level in RACE_LEVELS:
                race = F.col("race_concept_id")
                is_level = (
                    race == _RACE_CONCEPTS[level] if level in _RACE_CONCEPTS
                    else ~race.isin(RACE_WHITE, RACE_BLACK, RACE_ASIAN)
                )
                unknown_is_level = level not in _RACE_CONCEPTS  # a missing race counts as "other"
                columns.append(
                    F.coalesce(is_level, F.lit(unknown_is_level)).cast("int").alias(f"race_{level}")
                )
        else:
            columns.append(F.coalesce(F.col(cov.name), F.lit(0)).cast("int").alias(cov.name))
    return frame.select(*columns)


def _records(table: DataFrame, date: str, code: str | None, concept: str, end: Column | None = None) -> DataFrame:
    """A clinical table as ``person_id, date, code, concept_id, end`` records.

    ``code`` is null for a table without source values (drug_era); ``end`` is the record's
    end date (default: its date), the cohort end when the record is an index exposure.
    """
    return table.select(
        "person_id", F.col(date).alias("date"),
        (F.col(code) if code is not None else F.lit(None).cast("string")).alias("code"),
        F.col(concept).alias("concept_id"),
        (F.col(date) if end is None else end).alias("end"),
    )


def _drug_exposure_end() -> Column:
    """A drug exposure's end: drug_exposure_end_date; if null, start + days_supply - 1; if
    that is null too, the start. An end before the start counts as the start."""
    start = F.col("drug_exposure_start_date")
    supplied = F.date_add(start, F.col("days_supply") - 1)
    return F.greatest(start, F.coalesce(F.col("drug_exposure_end_date"), supplied))


def _arm_records(protocol: StudyProtocol, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
    """Records by arm domain: drugs always, procedures and drug eras when the tables are read.

    Drug ends are read only when the risk window is anchored on the cohort end.
    """
    needs_drug_end = protocol.time_at_risk.uses_cohort_end() and "drug" in protocol.domains()
    drug_end = _drug_exposure_end() if needs_drug_end else None
    records = {"drug": _records(tables["drug_exposure"], "drug_exposure_start_date", "drug_source_value",
                                "drug_concept_id", drug_end)}
    if "procedure_occurrence" in tables:
        records["procedure"] = _records(tables["procedure_occurrence"], "procedure_date", "procedure_source_value",
                                        "procedure_concept_id")
    if "drug_era" in tables:
        era_end = F.greatest(F.col("drug_era_start_date"), F.col("drug_era_end_date"))
        records["drug_era"] = _records(tables["drug_era"], "drug_era_start_date", None, "drug_concept_id", era_end)
    return records


def build_cohort(protocol: StudyProtocol, tables: dict[str, DataFrame]) -> Cohort:
    """The study's analysis dataset at this site and its attrition, per docs/cohort_rules.md.

    ``tables`` holds what :func:`site_agent.cohort.inputs.study_inputs` lists for the protocol.
    """
    match = _Matcher(tables.get("concept_ancestor"))
    conditions = _records(tables["condition_occurrence"], "condition_start_date", "condition_source_value",
                          "condition_concept_id")
    records = _arm_records(protocol, tables)
    unmatched = unmatched_concept_sets(protocol, conditions, records, match)
    if unmatched:
        raise UnmatchedConceptSetError(unmatched)
    entry, candidates = _candidates(protocol, conditions, records, match)
    rules: list[tuple[str, str]] = []  # the optional steps first, then _RULES
    if protocol.restrict_to is not None:
        candidates = _with_restriction_flag(protocol.restrict_to, candidates, conditions, match)
        rules.append(("ok_restriction", f"{protocol.restrict_to.name} recorded in the restriction window"))
    if protocol.study_population.restrict_to_common_period:
        among = F.col("ok_restriction") if protocol.restrict_to is not None else F.lit(True)
        candidates = _with_common_period_flag(candidates, among)
        rules.append(("ok_common_period", "index date in the period where both arms have index dates"))
    rules.extend(_RULES)
    followed = _follow_up(protocol, candidates, tables, conditions, match).cache()
    attrition = _attrition(entry, followed, rules)
    eligible = followed.where(reduce(lambda a, b: a & b, [F.col(flag) for flag, _ in rules]))
    dataset = _with_covariates(protocol, eligible, conditions, tables["visit_occurrence"], match)
    return Cohort(dataset.orderBy("person_id"), attrition, followed)
