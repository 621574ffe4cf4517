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

from shared.omop import GENDER_FEMALE, RACE_ASIAN, RACE_BLACK, RACE_WHITE
from shared.protocol.model import RACE_LEVELS, CodeSet, Restriction, StudyProtocol
from site_agent.cohort.codes import code_predicate, resolve_concepts

_RACE_CONCEPTS = {"black": RACE_BLACK, "asian": RACE_ASIAN}
COHORT_RULES_VERSION = 4  # bump when a rule changes: cached datasets are then rebuilt


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
    return (
        records.where(arm)
        .join(entry, "person_id")
        .where(F.col("date") >= F.col("entry_date"))
        .groupBy("person_id")
        .agg(F.min("date").alias("index_date"))
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
    """Rules 3-7: washout, age, prior outcome, time at risk and the outcome, as flags."""
    index = F.col("index_date")
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
    outcomes = (
        conditions.where(match(protocol.outcome.codes))
        .join(candidates.select("person_id", "index_date"), "person_id")
        .groupBy("person_id")
        .agg(
            F.max(F.when((F.col("date") < index) & in_lookback, 1).otherwise(0)).alias("prior_outcome"),
            F.min(
                F.when(
                    F.datediff(F.col("date"), index) >= protocol.time_at_risk.start_day,
                    F.datediff(F.col("date"), index),
                )
            ).alias("outcome_day"),
        )
    )
    tar = protocol.time_at_risk
    at_least = tar.start_day + protocol.study_population.min_days_at_risk - 1  # last day at risk needed
    censor_day = F.least(
        F.lit(tar.end_day),
        F.datediff(F.col("obs_end"), index),
        F.coalesce(F.datediff(F.col("death_date"), index), F.lit(tar.end_day)),
    )
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
        .withColumn("ok_time_at_risk", F.coalesce(F.col("censor_day") >= at_least, F.lit(False)))
    )
    has_event = F.col("outcome_day").isNotNull() & (F.col("outcome_day") <= F.col("censor_day"))
    return frame.withColumn("event", F.when(has_event, 1).otherwise(0)).withColumn(
        "time", F.when(has_event, F.col("outcome_day")).otherwise(F.col("censor_day"))
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


def _records(table: DataFrame, date: str, code: str, concept: str) -> DataFrame:
    """A clinical table as ``person_id, date, code, concept_id`` records."""
    return table.select(
        "person_id", F.col(date).alias("date"), F.col(code).alias("code"), F.col(concept).alias("concept_id")
    )


def build_cohort(protocol: StudyProtocol, tables: dict[str, DataFrame]) -> Cohort:
    """The study's analysis dataset at this site and its attrition, per docs/cohort_rules.md.

    ``tables`` holds what :func:`site_agent.cohort.inputs.study_inputs` lists for the protocol.
    """
    match = _Matcher(tables.get("concept_ancestor"))
    conditions = _records(tables["condition_occurrence"], "condition_start_date", "condition_source_value",
                          "condition_concept_id")
    records = {"drug": _records(tables["drug_exposure"], "drug_exposure_start_date", "drug_source_value",
                                "drug_concept_id")}
    if "procedure_occurrence" in tables:
        records["procedure"] = _records(tables["procedure_occurrence"], "procedure_date", "procedure_source_value",
                                        "procedure_concept_id")
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
