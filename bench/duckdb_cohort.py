"""The site's cohort rules in DuckDB SQL: a benchmark-only re-implementation.

``bench/cohort_engines.py`` times the site's Spark cohort extraction against this. It
is not used by the site agent and is not a second implementation of the project's
rules to maintain: it covers only what the reference protocol (studies/ketamine_cud.yaml)
uses, and :func:`check_supported` refuses any protocol using more, naming the feature.

Supported, per docs/cohort_rules.md: concept sets of source codes (exact codes and ``X*``
prefixes, include minus exclude, trimmed ``*_source_value``); exposure and comparator from
``drug_exposure``, ``never_exposed`` either way; the unmatched-concept-set check (rule 0);
rules 1-8 with the risk window anchored on the cohort start, ``prior_outcome_lookback_days``,
``min_days_at_risk`` and ``censor_at_death``; covariates ``age``, ``sex``, ``race``,
``condition`` and ``visit_count``. Not supported: standard concepts (``concept_ids``,
``include_descendants``), procedure or drug-era arms, ``cohort_end`` anchors,
``restrict_to``, ``restrict_to_common_period``, ``large_scale_covariates`` and protocols
with several ``comparisons``.

Tables are read as their current Delta snapshot: delta-rs lists the snapshot's Parquet
files (``DeltaTable.file_uris``) and DuckDB reads exactly those (``read_parquet``), as the
site's Spark backend does; DuckDB's own Delta extension would need a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from shared.errors import ProtocolError, UnmatchedConceptSet, UnmatchedConceptSetError
from shared.omop import GENDER_FEMALE, RACE_ASIAN, RACE_BLACK, RACE_WHITE, STUDY_TABLES
from shared.protocol.model import RACE_LEVELS, CodeSet, StudyProtocol

_RACE_CONCEPTS = {"black": RACE_BLACK, "asian": RACE_ASIAN}


@dataclass(frozen=True)
class DuckDBCohort:
    """The analysis dataset (person_id order) and attrition as (step, persons, exposed, comparator)."""

    dataset: pa.Table
    attrition: list[tuple[str, int, int | None, int | None]]


def check_supported(protocol: StudyProtocol) -> None:
    """Raise ProtocolError naming every feature of ``protocol`` this module does not implement."""
    unsupported: list[str] = []
    if protocol.comparisons:
        unsupported.append("several comparisons")
    else:
        exposure, comparator = protocol.arms()
        if {exposure.domain, comparator.domain} != {"drug"}:
            unsupported.append(f"arm domains {sorted({exposure.domain, comparator.domain})} (only drug)")
        if any(codes.concept_ids or codes.exclude_concept_ids for codes in protocol.code_sets()):
            unsupported.append("standard concepts in concept sets (concept_ids)")
    if protocol.time_at_risk.uses_cohort_end():
        unsupported.append("a risk window anchored on cohort_end")
    if protocol.restrict_to is not None:
        unsupported.append("restrict_to")
    if protocol.study_population.restrict_to_common_period:
        unsupported.append("study_population.restrict_to_common_period")
    if protocol.large_scale_covariates is not None:
        unsupported.append("large_scale_covariates")
    if unsupported:
        raise ProtocolError(
            f"bench/duckdb_cohort.py re-implements only the cohort features of the reference protocol; "
            f"study {protocol.study_id!r} uses {'; '.join(unsupported)}. Fix: benchmark a protocol "
            f"without them, or extend the benchmark's DuckDB rules (and its equality test) first."
        )


def connect(threads: int = 2) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection limited to ``threads`` (Spark's local[2] has two)."""
    connection = duckdb.connect(":memory:")
    connection.execute(f"SET threads = {int(threads)}")
    return connection


def register_snapshots(connection: duckdb.DuckDBPyConnection, lake: Path) -> dict[str, int]:
    """One view per study table over its current Delta snapshot's Parquet files; returns versions."""
    versions = {}
    for name in STUDY_TABLES:
        table = DeltaTable(str(lake / name))
        files = [uri.removeprefix("file://") for uri in table.file_uris()]
        if not files:
            raise ProtocolError(f"bench: Delta table {name!r} at {lake / name} has no data files")
        listed = ", ".join(_literal(f) for f in files)
        connection.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet([{listed}])')
        versions[name] = table.version()
    return versions


def extract(connection: duckdb.DuckDBPyConnection, lake: Path, protocol: StudyProtocol) -> DuckDBCohort:
    """The analysis dataset and attrition of ``protocol`` over the site's lake at ``lake``."""
    check_supported(protocol)
    register_snapshots(connection, lake)
    _check_concept_sets(connection, protocol)
    connection.execute(f"CREATE OR REPLACE TEMP TABLE followed AS {_followed_sql(protocol)}")
    attrition = _attrition(connection, protocol)
    dataset = connection.sql(_dataset_sql(protocol)).to_arrow_table()
    connection.execute("DROP TABLE followed")
    return DuckDBCohort(dataset, attrition)


def _one_row(connection: duckdb.DuckDBPyConnection, query: str) -> tuple[Any, ...]:
    """The one row of an aggregate query (fetched to the end, so the connection is free again)."""
    rows = connection.sql(query).fetchall()
    if len(rows) != 1:
        raise RuntimeError(f"bench: expected one row, got {len(rows)} from: {query[:200]}")
    return tuple(rows[0])


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _matches_any(codes: list[str]) -> str:
    exact = [c for c in codes if not c.endswith("*")]
    terms = [f"starts_with(code, {_literal(c[:-1])})" for c in codes if c.endswith("*")]
    if exact:
        terms.append(f"code IN ({', '.join(_literal(c) for c in exact)})")
    return "(" + " OR ".join(terms or ["false"]) + ")"


def _match(codes: CodeSet) -> str:
    """SQL: true where the record's trimmed ``code`` is in the set (null-safe)."""
    keep = _matches_any(codes.include)
    if codes.exclude:
        keep = f"{keep} AND NOT {_matches_any(codes.exclude)}"
    return f"coalesce({keep}, false)"


_CONDITIONS = "SELECT person_id, condition_start_date AS date, trim(condition_source_value) AS code FROM condition_occurrence"
_DRUGS = "SELECT person_id, drug_exposure_start_date AS date, trim(drug_source_value) AS code FROM drug_exposure"


def _check_concept_sets(connection: duckdb.DuckDBPyConnection, protocol: StudyProtocol) -> None:
    """Rule 0: the entry, exposure, comparator and outcome sets each match some record."""
    exposure, comparator = protocol.arms()
    checked = [
        ("population.entry", protocol.population.name, protocol.population.entry, "condition"),
        ("exposure.codes", exposure.name, exposure.codes, "drug"),
        ("comparator.codes", comparator.name, comparator.codes, "drug"),
        ("outcome.codes", protocol.outcome.name, protocol.outcome.codes, "condition"),
    ]
    parts = []
    for source, sql in (("condition", _CONDITIONS), ("drug", _DRUGS)):
        flags = ", ".join(f"bool_or({_match(codes)})" for _, _, codes, where in checked if where == source)
        parts.append(f"(SELECT {flags} FROM ({sql}))")
    row = _one_row(connection, "SELECT * FROM " + " CROSS JOIN ".join(parts))
    order = [c for c in checked if c[3] == "condition"] + [c for c in checked if c[3] == "drug"]
    tables = {"condition": "condition_occurrence (condition_source_value)", "drug": "drug_exposure (drug_source_value)"}
    unmatched = [
        UnmatchedConceptSet(field, name, f"{codes.vocabulary} source codes {codes.include}", tables[source])
        for (field, name, codes, source), found in zip(order, row, strict=True) if not found
    ]
    if unmatched:
        raise UnmatchedConceptSetError(unmatched)


def _followed_sql(protocol: StudyProtocol) -> str:
    """Rules 1-7 as one query: every candidate with its flags, ``time`` and ``event``."""
    exposure, comparator = protocol.arms()
    tar, population = protocol.time_at_risk, protocol.study_population
    lookback = population.prior_outcome_lookback_days
    in_lookback = "true" if lookback is None else f"(index_date - date) <= {lookback}"
    excluded = (
        f"SELECT DISTINCT person_id FROM drugs WHERE {_match(exposure.codes)}" if comparator.never_exposed
        else "SELECT person_id FROM exposed"
    )
    death_day = "coalesce(death_date - index_date, risk_end)" if population.censor_at_death else "risk_end"
    no_prior = "coalesce(prior_outcome, 0) = 0" if protocol.outcome.exclude_prior else "true"
    return f"""
    WITH conditions AS ({_CONDITIONS}),
    drugs AS ({_DRUGS}),
    entry AS (
        SELECT person_id, min(date) AS entry_date FROM conditions
        WHERE {_match(protocol.population.entry)} GROUP BY person_id
    ),
    exposed AS (
        SELECT d.person_id, min(d.date) AS index_date FROM drugs d JOIN entry e USING (person_id)
        WHERE {_match(exposure.codes)} AND d.date >= e.entry_date GROUP BY d.person_id
    ),
    comparator AS (
        SELECT d.person_id, min(d.date) AS index_date FROM drugs d JOIN entry e USING (person_id)
        WHERE {_match(comparator.codes)} AND d.date >= e.entry_date GROUP BY d.person_id
    ),
    candidates AS (
        SELECT person_id, index_date, 1 AS treatment, {tar.start_day} AS risk_start, {tar.end_day} AS risk_end
        FROM exposed
        UNION ALL
        SELECT person_id, index_date, 0, {tar.start_day}, {tar.end_day} FROM comparator
        WHERE person_id NOT IN ({excluded})
    ),
    periods AS (
        SELECT o.person_id, min(o.observation_period_start_date) AS obs_start,
               max(o.observation_period_end_date) AS obs_end
        FROM observation_period o JOIN candidates c USING (person_id)
        WHERE o.observation_period_start_date <= c.index_date AND c.index_date <= o.observation_period_end_date
        GROUP BY o.person_id
    ),
    deaths AS (SELECT person_id, min(death_date) AS death_date FROM death GROUP BY person_id),
    outcomes AS (
        SELECT o.person_id,
               max(CASE WHEN (o.date < index_date AND {in_lookback})
                          OR (o.date - index_date >= 1 AND o.date - index_date < risk_start)
                        THEN 1 ELSE 0 END) AS prior_outcome,
               min(CASE WHEN o.date - index_date >= risk_start THEN o.date - index_date END) AS outcome_day
        FROM conditions o JOIN candidates c USING (person_id)
        WHERE {_match(protocol.outcome.codes)}
        GROUP BY o.person_id
    ),
    joined AS (
        SELECT c.*, p.year_of_birth, p.gender_concept_id, p.race_concept_id, obs_start, obs_end,
               death_date, prior_outcome, outcome_day,
               least(risk_end, obs_end - index_date, {death_day}) AS censor_day
        FROM candidates c
        LEFT JOIN (SELECT person_id, year_of_birth, gender_concept_id, race_concept_id FROM person) p USING (person_id)
        LEFT JOIN periods USING (person_id)
        LEFT JOIN deaths USING (person_id)
        LEFT JOIN outcomes USING (person_id)
    )
    SELECT *,
        coalesce(index_date - obs_start >= {protocol.washout_days}, false) AS ok_washout,
        coalesce(year(index_date) - year_of_birth >= {protocol.population.min_age}, false) AS ok_age,
        {no_prior} AS ok_no_prior_outcome,
        coalesce(censor_day - risk_start + 1 >= {population.min_days_at_risk}, false) AS ok_time_at_risk,
        CASE WHEN outcome_day IS NOT NULL AND outcome_day <= censor_day THEN 1 ELSE 0 END AS event,
        CASE WHEN outcome_day IS NOT NULL AND outcome_day <= censor_day THEN outcome_day ELSE censor_day END
            - risk_start + 1 AS time
    FROM joined
    """


_FLAGS = ("ok_washout", "ok_age", "ok_no_prior_outcome", "ok_time_at_risk")


def _attrition(
    connection: duckdb.DuckDBPyConnection, protocol: StudyProtocol
) -> list[tuple[str, int, int | None, int | None]]:
    """Persons after entry, arm and each rule (per arm), as the builder's attrition."""
    entry_sql = (
        f"SELECT count(DISTINCT person_id) FROM ({_CONDITIONS}) WHERE {_match(protocol.population.entry)}"
    )
    n_entry = int(_one_row(connection, entry_sql)[0] or 0)
    sums = []
    passed = "true"
    for flag in (None, *_FLAGS):
        if flag is not None:
            passed = f"{passed} AND {flag}"
        sums += [f"sum(CASE WHEN {passed} AND treatment = {arm} THEN 1 ELSE 0 END)" for arm in (1, 0)]
    counts = [int(v or 0) for v in _one_row(connection, f"SELECT {', '.join(sums)} FROM followed")]
    steps: list[tuple[str, int, int | None, int | None]] = [("entry", n_entry, None, None)]
    for i, step in enumerate(("arm", *(f.removeprefix("ok_") for f in _FLAGS))):
        steps.append((step, counts[2 * i] + counts[2 * i + 1], counts[2 * i], counts[2 * i + 1]))
    return steps


def _dataset_sql(protocol: StudyProtocol) -> str:
    """Rule 8 over the persons passing every rule: the analysis dataset, person_id order."""
    window = protocol.covariate_window
    in_window = f"(date - k.index_date) BETWEEN {window.start_day} AND {window.end_day}"
    conditions = [c for c in protocol.covariates if c.kind == "condition"]
    visits = [c for c in protocol.covariates if c.kind == "visit_count"]
    ctes = [
        "eligible AS (SELECT * FROM followed WHERE " + " AND ".join(_FLAGS) + ")",
        "keys AS (SELECT person_id, index_date FROM eligible)",
    ]
    joins = []
    if conditions:
        flags = ", ".join(f'max(CASE WHEN {_match(c.codes)} THEN 1 ELSE 0 END) AS "{c.name}"' for c in conditions)
        ctes.append(
            f"condition_flags AS (SELECT o.person_id, {flags} FROM ({_CONDITIONS}) o JOIN keys k USING (person_id) "
            f"WHERE {in_window} GROUP BY o.person_id)"
        )
        joins.append("LEFT JOIN condition_flags USING (person_id)")
    if visits:
        counts = ", ".join(
            f"sum(CASE WHEN visit_concept_id IN ({', '.join(str(int(v)) for v in c.visit_concept_ids)}) "
            f'THEN 1 ELSE 0 END) AS "{c.name}"' for c in visits
        )
        ctes.append(
            f"visit_counts AS (SELECT v.person_id, {counts} FROM (SELECT person_id, visit_concept_id, "
            f"visit_start_date AS date FROM visit_occurrence) v JOIN keys k USING (person_id) "
            f"WHERE {in_window} GROUP BY v.person_id)"
        )
        joins.append("LEFT JOIN visit_counts USING (person_id)")
    columns = [
        "person_id", "CAST(treatment AS INTEGER) AS treatment", "index_date",
        'CAST("time" AS INTEGER) AS "time"', "CAST(event AS INTEGER) AS event",
    ]
    for cov in protocol.covariates:
        if cov.kind == "age":
            columns.append(f'CAST(year(index_date) - year_of_birth AS DOUBLE) AS "{cov.name}"')
        elif cov.kind == "sex":
            columns.append(f"CAST(coalesce(gender_concept_id = {GENDER_FEMALE}, false) AS INTEGER) AS sex_female")
        elif cov.kind == "race":
            for level in RACE_LEVELS:
                if level in _RACE_CONCEPTS:
                    test, unknown = f"race_concept_id = {_RACE_CONCEPTS[level]}", "false"
                else:
                    test, unknown = f"NOT race_concept_id IN ({RACE_WHITE}, {RACE_BLACK}, {RACE_ASIAN})", "true"
                columns.append(f"CAST(coalesce({test}, {unknown}) AS INTEGER) AS race_{level}")
        else:
            columns.append(f'CAST(coalesce("{cov.name}", 0) AS INTEGER) AS "{cov.name}"')
    return (
        f"WITH {', '.join(ctes)} SELECT {', '.join(columns)} FROM eligible {' '.join(joins)} ORDER BY person_id"
    )
