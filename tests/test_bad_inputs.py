"""Bad data and bad requests: each gets a clear error naming site, field or table, value and fix.

Every case is sent to a real site agent (one shared SparkSession, hand-built Delta tables)
and, after it, every Delta table of the site's lake has the version it had before; the
site's own tables under its workdir that existed before are unchanged too, except the
audit log, which gains exactly one entry per request (the decision is on record).

What the site does with each kind of bad data (docs/ingest.md, "Bad data"):

- refused with a clear error (a study on the tables would be wrong): an empty cohort or one
  below ``min_cohort_size``; a missing table, a missing data file, a dropped column, a
  column of an unreadable type; observation periods ending before they start; duplicate
  ``person_id`` or duplicate primary keys (OHDSI DQD's isPrimaryKey fails at any row);
- used, counted and reported (OHDSI DQD counts these as plausibility failures against a
  threshold, CohortMethod's study population drops such persons): a drug exposure ending
  before it starts (its end is taken as its start: warning ``end_before_start``); events
  dated before birth and births after the index date, i.e. negative ages (warning
  ``event_before_birth`` / ``birth_in_future``; the person fails the age step of the
  attrition, which counts them).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from deltalake import DeltaTable, write_deltalake
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from shared.errors import ProtocolError
from shared.protocol.messages import MAX_MESSAGE_BYTES, RoundReply, decode_reply
from shared.protocol.model import load_protocol, parse_protocol
from site_agent.agent import SiteAgent
from site_agent.service import bind
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.omop_builder import OmopBuilder
from tests.test_cohort_rules import hand_built_site

PROTOCOL_PATH = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"
PROTOCOL = load_protocol(PROTOCOL_PATH)
SITE = "site_bad"
QUALITY_REPORT = Path("studies") / PROTOCOL.study_id / "data_quality.json"


def reference() -> dict[str, Any]:
    data = yaml.safe_load(PROTOCOL_PATH.read_text())
    assert isinstance(data, dict)
    return data


def make_agent(root: Path, spark: SparkSession, builder: OmopBuilder | None = None,
               corrupt: Callable[[Path], None] | None = None, **policy: Any) -> SiteAgent:
    (builder or hand_built_site()).write(root / "lake")
    if corrupt is not None:
        corrupt(root / "lake")
    settings = SiteSettings(
        site_id=SITE, lake=root / "lake", workdir=root / "work", approval=ApprovalSettings(mode="auto"),
        policy=DisclosurePolicy(min_cell_count=1, max_parameters_per_patients=0.0, **policy),
    )
    return SiteAgent(settings, spark=spark)


def summary_request() -> dict[str, Any]:
    """The first round of a new run of the reference study, as JSON."""
    request = StudyPlan(PROTOCOL).next_request()
    assert request is not None
    data = json.loads(request.to_bytes())
    assert isinstance(data, dict)
    return data


def delta_versions(root: Path) -> dict[str, int]:
    """Version of every Delta table under ``root``, by path relative to it."""
    return {
        str(log.parent.relative_to(root)): DeltaTable(str(log.parent)).version()
        for log in sorted(root.rglob("_delta_log"))
    }


def send_untouched(agent: SiteAgent, payload: bytes) -> RoundReply:
    """The agent's reply to ``payload``, checking that the site's tables are as they were."""
    lake, work = agent.settings.lake, agent.settings.workdir
    lake_before, work_before = delta_versions(lake), delta_versions(work) if work.exists() else {}
    reply = decode_reply(agent.handle(payload))
    assert delta_versions(lake) == lake_before
    work_after = delta_versions(work)
    audit = {path for path in work_after if path.startswith("audit")}
    assert len(audit) == 1, audit
    for path, version in work_before.items():
        expected = version + 1 if path in audit else version  # one audit entry per request
        assert work_after[path] == expected, path
    return reply


def assert_clear(reply: RoundReply, status: str, *parts: str) -> str:
    """The reply is an error/refusal naming the site, each of ``parts`` and a fix; no stack trace."""
    assert reply.status == status, reply
    assert reply.site_id == SITE
    assert reply.results == {}
    message = reply.error or ""
    assert f"site {SITE!r}" in message
    for part in parts:
        assert part in message, (part, message)
    assert "Fix: " in message
    for raw in ("Traceback", "Py4J", "java.", "at org.apache", "internal error"):
        assert raw not in message, message
    return message


# 1. Malformed protocol fields -------------------------------------------------------------

def _comparisons(d: dict[str, Any], ids: tuple[str, ...], **extra: Any) -> None:
    arms = {"exposure": d.pop("exposure"), "comparator": d.pop("comparator")}
    d["comparisons"] = [{"id": i, **arms, **extra} for i in ids]


MISSING = None  # a missing field has no value to show
PROTOCOL_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str, str | None]] = [
    # (case, change to the reference protocol, field path named, value shown as `(got ...)`)
    ("washout_as_text", lambda d: d.update(washout_days="a year"), "washout_days", "'a year'"),
    ("washout_as_bool", lambda d: d.update(washout_days=True), "washout_days", "True"),
    ("washout_fractional", lambda d: d.update(washout_days=1.5), "washout_days", "1.5"),
    ("washout_negative", lambda d: d.update(washout_days=-1), "washout_days", "-1"),
    ("washout_number_in_quotes", lambda d: d.update(washout_days="365"), "washout_days", "'365'"),
    ("study_id_pattern", lambda d: d.update(study_id="Bad ID!"), "study_id", "'Bad ID!'"),
    ("protocol_schema_version", lambda d: d.update(schema_version=2), "schema_version", "2"),
    ("title_empty", lambda d: d.update(title=""), "title", "''"),
    ("unknown_top_level_key", lambda d: d.update(washout_dayz=365), "washout_dayz", "365"),
    ("unknown_nested_key", lambda d: d["population"].update(colour="red"), "population.colour", "'red'"),
    ("missing_outcome", lambda d: d.pop("outcome"), "outcome", MISSING),
    ("missing_exposure", lambda d: d.pop("exposure"), "exposure", "None"),
    ("population_not_a_mapping", lambda d: d.update(population="CUD"), "population", "'CUD'"),
    ("min_age_negative", lambda d: d["population"].update(min_age=-3), "population.min_age", "-3"),
    ("min_age_too_high", lambda d: d["population"].update(min_age=121), "population.min_age", "121"),
    ("unknown_vocabulary", lambda d: d["population"]["entry"].update(vocabulary="ICD11"),
     "population.entry.vocabulary", "'ICD11'"),
    ("empty_entry_concept_set", lambda d: d["population"]["entry"].update(include=[]),
     "population.entry.include", "[]"),
    ("empty_exposure_concept_set", lambda d: d["exposure"].update(codes={}), "exposure.codes.include", "[]"),
    ("malformed_code", lambda d: d["population"]["entry"].update(include=["F14.*", "F14 .2"]),
     "population.entry.include.1", "'F14 .2'"),
    ("codes_without_vocabulary", lambda d: d["outcome"].update(codes={"include": ["F14.1"]}),
     "outcome.codes.vocabulary", "None"),
    ("descendants_without_concepts", lambda d: d["outcome"]["codes"].update(include_descendants=True),
     "outcome.codes.concept_ids", "[]"),
    ("concept_id_as_text", lambda d: d["exposure"]["codes"].update(concept_ids=["ketamine"]),
     "exposure.codes.concept_ids.0", "'ketamine'"),
    ("unknown_domain", lambda d: d["exposure"].update(domain="device"), "exposure.domain", "'device'"),
    ("tar_start_negative", lambda d: d["time_at_risk"].update(start_day=-1), "time_at_risk.start_day", "-1"),
    ("tar_start_after_end", lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 10}),
     "time_at_risk.end_day", "10"),
    ("tar_zero_length", lambda d: d.update(time_at_risk={"start_day": 1, "end_day": 0}),
     "time_at_risk.end_day", "0"),
    ("tar_unknown_anchor", lambda d: d["time_at_risk"].update(end_anchor="discharge"),
     "time_at_risk.end_anchor", "'discharge'"),
    ("covariate_window_start_after_end", lambda d: d.update(covariate_window={"start_day": -1, "end_day": -30}),
     "covariate_window.end_day", "-30"),
    ("covariate_window_after_index", lambda d: d.update(covariate_window={"start_day": -30, "end_day": 5}),
     "covariate_window.end_day", "5"),
    ("caliper_zero", lambda d: d["matching"].update(caliper=0), "matching.caliper", "0"),
    ("caliper_too_wide", lambda d: d["matching"].update(caliper=11), "matching.caliper", "11"),
    ("matching_ratio_zero", lambda d: d["matching"].update(ratio=0), "matching.ratio", "0"),
    ("trim_half", lambda d: d["weighting"].update(trim=0.5), "weighting.trim", "0.5"),
    ("truncate_at_one", lambda d: d["weighting"].update(truncate_at=1.0), "weighting.truncate_at", "1.0"),
    ("l2_negative", lambda d: d.update(propensity={"l2": -1.0}), "propensity.l2", "-1.0"),
    ("unknown_analysis", lambda d: d.update(analyses=["crude", "magic"]), "analyses.1", "'magic'"),
    ("no_analyses", lambda d: d.update(analyses=[]), "analyses", "[]"),
    ("repeated_analysis", lambda d: d.update(analyses=["crude", "crude"]), "analyses", "['crude', 'crude']"),
    ("adjusted_without_propensity", lambda d: d.update(analyses=["crude", "matched"]),
     "analyses", "['crude', 'matched']"),
    ("horizon_beyond_follow_up", lambda d: d.update(risk_horizon_days=400), "risk_horizon_days", "400"),
    ("horizon_zero", lambda d: d.update(risk_horizon_days=0), "risk_horizon_days", "0"),
    ("ph_cuts_decreasing", lambda d: d.update(ph_check_cut_days=[180, 90]), "ph_check_cut_days", "[180, 90]"),
    ("min_days_at_risk_zero", lambda d: d.update(study_population={"min_days_at_risk": 0}),
     "study_population.min_days_at_risk", "0"),
    ("secure_aggregation_as_text", lambda d: d.update(secure_aggregation="yes"), "secure_aggregation", "'yes'"),
    ("duplicate_covariate_names", lambda d: d["covariates"].append({"name": "age", "kind": "age"}),
     "covariates", "['age']"),
    ("reserved_covariate_name", lambda d: d["covariates"].append({"name": "time", "kind": "age"}),
     "covariates", "['time']"),
    ("unknown_covariate_kind", lambda d: d.update(covariates=[{"name": "age", "kind": "age"},
                                                              {"name": "height", "kind": "height"}]),
     "covariates.1", "{'name': 'height', 'kind': 'height'}"),
    ("visit_count_without_concepts",
     lambda d: d.update(covariates=[{"name": "visits", "kind": "visit_count", "visit_concept_ids": []}]),
     "covariates.0.visit_count.visit_concept_ids", "[]"),
    ("duplicate_comparison_ids", lambda d: _comparisons(d, ("vs_a", "vs_a")), "comparisons.1.id", "'vs_a'"),
    ("comparison_id_pattern", lambda d: _comparisons(d, ("Vs-A",)), "comparisons.0.id", "'Vs-A'"),
    ("comparisons_and_arms", lambda d: (_comparisons(d, ("vs_a",)), d.update(exposure=d["comparisons"][0]["exposure"])),
     "comparisons", "['vs_a']"),
    ("exclude_unknown_covariate", lambda d: _comparisons(d, ("vs_a",), exclude_covariates=["weight"]),
     "comparisons.0.exclude_covariates", "['weight']"),
    ("large_scale_max_zero", lambda d: d.update(large_scale_covariates={"max_covariates": 0}),
     "large_scale_covariates.max_covariates", "0"),
    ("large_scale_window_after_index",
     lambda d: d.update(large_scale_covariates={"window": {"start_day": -30, "end_day": 0}}),
     "large_scale_covariates.window.end_day", "0"),
    ("large_scale_domain_repeated", lambda d: d.update(large_scale_covariates={"domains": ["drug", "drug"]}),
     "large_scale_covariates.domains", "['drug', 'drug']"),
]


@pytest.mark.parametrize(
    ("change", "field", "value"), [pytest.param(c, f, v, id=case) for case, c, f, v in PROTOCOL_CASES],
)
def test_a_malformed_protocol_field_is_named_with_its_value_and_fix(
    change: Callable[[dict[str, Any]], Any], field: str, value: str | None,
) -> None:
    data = reference()
    change(data)
    with pytest.raises(ProtocolError) as caught:
        parse_protocol(data, "bad.yaml")
    message = str(caught.value)
    line = next((line for line in message.splitlines() if f"field `{field}`:" in line), None)
    assert line is not None, message
    assert "Fix: " in line
    if value is None:
        assert "Fix: add the field" in line
    else:
        assert f"(got {value})" in line


@pytest.fixture(scope="module")
def good_agent(tmp_path_factory: pytest.TempPathFactory, spark: SparkSession) -> Iterator[SiteAgent]:
    agent = make_agent(tmp_path_factory.mktemp("good"), spark)
    yield agent
    agent.close()


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [pytest.param(c, f, v, id=case) for case, c, f, v in PROTOCOL_CASES],
)
def test_a_site_answers_a_malformed_protocol_with_the_field_and_touches_nothing(
    good_agent: SiteAgent, change: Callable[[dict[str, Any]], Any], field: str, value: str | None,
) -> None:
    request = summary_request()
    change(request["protocol"])
    reply = send_untouched(good_agent, json.dumps(request).encode())
    message = assert_clear(reply, "error", f"field `{field}`", "protocol in request '1-summary' is invalid")
    if value is not None:
        assert f"(got {value})" in message


# 2. Empty cohort, cohort below the site's minimum ----------------------------------------

def test_an_empty_cohort_is_refused_naming_the_site_and_the_fix(tmp_path: Path, spark: SparkSession) -> None:
    """Everyone is 6 at index, so no one passes the age step: nothing is computed or released."""
    builder = hand_built_site()
    for person in builder.rows["person"]:
        person["year_of_birth"] = 2010
    agent = make_agent(tmp_path, spark, builder)
    reply = send_untouched(agent, json.dumps(summary_request()).encode())
    assert_clear(reply, "refused", f"study {PROTOCOL.study_id!r}", "min_cohort_size 1")


def test_a_site_without_any_exposure_record_names_the_concept_set(tmp_path: Path, spark: SparkSession) -> None:
    """The site codes ketamine otherwise: its cohort would be empty, and the error says why."""
    builder = hand_built_site()
    for exposure in builder.rows["drug_exposure"]:
        if exposure["drug_source_value"] == "6130":
            exposure["drug_source_value"] = "K-6130"
    agent = make_agent(tmp_path, spark, builder)
    reply = send_untouched(agent, json.dumps(summary_request()).encode())
    assert_clear(reply, "error", "no record matches 1 concept set(s)", "`exposure.codes` (ketamine: RxNorm source "
                 "codes ['6130'])", "searched in drug_exposure")


def test_a_cohort_below_the_sites_minimum_is_refused_and_a_retry_changes_nothing(
    tmp_path: Path, spark: SparkSession,
) -> None:
    agent = make_agent(tmp_path, spark, min_cohort_size=50)
    first = send_untouched(agent, json.dumps(summary_request()).encode())
    message = assert_clear(first, "refused", "min_cohort_size 50", "run the study without this site")
    assert "cohort at this site is below" in message
    built = delta_versions(agent.settings.workdir)
    assert any(path.endswith("analysis_dataset") for path in built)  # the refused cohort stays at the site
    again = send_untouched(agent, json.dumps(summary_request()).encode())  # a new run: tables as they are
    assert again.status == "refused"


# 3. Corrupted Delta tables ---------------------------------------------------------------

def _delete_a_data_file(lake: Path) -> None:
    uri = DeltaTable(str(lake / "drug_exposure")).file_uris()[0]
    os.remove(uri.removeprefix("file://"))


def _drop_a_column(lake: Path) -> None:
    table = DeltaTable(str(lake / "person")).to_pyarrow_table().drop_columns(["year_of_birth"])
    write_deltalake(str(lake / "person"), table, mode="overwrite", schema_mode="overwrite")


def _year_of_birth_as_words(lake: Path) -> None:
    table = DeltaTable(str(lake / "person")).to_pyarrow_table()
    index = table.schema.get_field_index("year_of_birth")
    words = pa.array(["nineteen-eighty"] * table.num_rows)
    write_deltalake(str(lake / "person"), table.set_column(index, "year_of_birth", words),
                    mode="overwrite", schema_mode="overwrite")


def _delete_the_death_table(lake: Path) -> None:
    shutil.rmtree(lake / "death")


def _delete_the_delta_log(lake: Path) -> None:
    shutil.rmtree(lake / "person" / "_delta_log")


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        pytest.param(_delete_a_data_file, ["drug_exposure [unreadable_table]", "lists 1 data file(s) that are not in",
                                               ".parquet", "restore the file(s) from the site's backup"],
                     id="missing_parquet_file"),
        pytest.param(_drop_a_column, ["person.year_of_birth [missing_column]", "re-ingest the table"],
                     id="column_dropped"),
        pytest.param(_year_of_birth_as_words, ["person.year_of_birth [column_type]",
                                                   "column is string and cannot be read as int32"],
                     id="column_type_changed"),
        pytest.param(_delete_the_death_table, ["OMOP table 'death' is missing", "ingest the site's OMOP export"],
                     id="missing_table"),
        pytest.param(_delete_the_delta_log, ["OMOP table 'person'", "no readable Delta log",
                                                 "restore"], id="missing_delta_log"),
    ],
)
def test_a_corrupted_table_is_a_clear_error_naming_site_table_and_fix(
    tmp_path: Path, spark: SparkSession, corrupt: Callable[[Path], None], expected: list[str],
) -> None:
    agent = make_agent(tmp_path, spark, corrupt=corrupt)
    reply = send_untouched(agent, json.dumps(summary_request()).encode())
    assert_clear(reply, "error", *expected)


def test_a_lost_file_of_a_study_dataset_rebuilds_it_from_the_untouched_lake(tmp_path: Path, spark: SparkSession) -> None:
    """The analysis dataset is the site's cache of the cohort: a lost file means a new build."""
    agent = make_agent(tmp_path, spark)
    first = decode_reply(agent.handle(json.dumps(summary_request()).encode()))
    assert first.status == "ok", first.error
    dataset = agent.settings.workdir / "studies" / PROTOCOL.study_id / "analysis_dataset"
    version = DeltaTable(str(dataset)).version()
    for uri in DeltaTable(str(dataset)).file_uris():
        os.remove(uri.removeprefix("file://"))
    fresh = SiteAgent(agent.settings, spark=spark)  # a restarted agent: nothing cached in memory
    lake = delta_versions(agent.settings.lake)
    reply = decode_reply(fresh.handle(json.dumps(summary_request()).encode()))
    assert reply.status == "ok", reply.error
    assert reply.results["provenance"]["dataset_rebuilt"] is True
    assert reply.results["arm_summary"] == first.results["arm_summary"]
    assert DeltaTable(str(dataset)).version() == version + 1
    assert delta_versions(agent.settings.lake) == lake


def test_a_table_written_with_compatible_types_is_read_as_the_cdm_types(
    tmp_path: Path, spark: SparkSession, baseline: RoundReply,
) -> None:
    """Dates written as text by another tool: the checks can read them, the study casts them."""
    def dates_as_text(lake: Path) -> None:
        table = DeltaTable(str(lake / "drug_exposure")).to_pyarrow_table()
        for column in ("drug_exposure_start_date", "drug_exposure_end_date"):
            index = table.schema.get_field_index(column)
            table = table.set_column(index, column, pc.cast(table[column], pa.string()))
        write_deltalake(str(lake / "drug_exposure"), table, mode="overwrite", schema_mode="overwrite")

    reply = send_untouched(make_agent(tmp_path, spark, corrupt=dates_as_text), json.dumps(summary_request()).encode())
    assert reply.status == "ok", reply.error
    assert reply.results["arm_summary"] == baseline.results["arm_summary"]


# 4. Data problems ------------------------------------------------------------------------

def _refused_data(tmp_path: Path, spark: SparkSession, builder: OmopBuilder, *expected: str) -> None:
    agent = make_agent(tmp_path, spark, builder)
    reply = send_untouched(agent, json.dumps(summary_request()).encode())
    message = assert_clear(reply, "error", "data-quality check(s) that block a study", *expected)
    report = agent.settings.workdir / QUALITY_REPORT
    assert str(report) in message  # the full report is where the message says
    assert json.loads(report.read_text())["errors"] >= 1


def test_observation_period_ending_before_it_starts_is_refused(tmp_path: Path, spark: SparkSession) -> None:
    """Refused: observation time is every study's follow-up (DQD: plausibleStartBeforeEnd)."""
    builder = hand_built_site()
    period = builder.rows["observation_period"][0]
    period["observation_period_end_date"] = period["observation_period_start_date"].replace(year=2000)
    _refused_data(tmp_path, spark, builder, "observation_period.observation_period_end_date [end_before_start]",
                  "observation_period_id 1", "correct the dates in the source")


def test_the_same_person_twice_is_refused(tmp_path: Path, spark: SparkSession) -> None:
    """Refused: two person rows make age, sex and follow-up ambiguous (DQD: isPrimaryKey)."""
    builder = hand_built_site()
    builder.rows["person"].append(dict(builder.rows["person"][0], year_of_birth=1950))
    _refused_data(tmp_path, spark, builder, "person.person_id [duplicate_id]", "person_id 1",
                  "give every row its own id")


def test_duplicate_drug_exposure_rows_are_refused(tmp_path: Path, spark: SparkSession) -> None:
    """Refused: a repeated primary key (here a whole row twice) means a broken export (DQD: isPrimaryKey)."""
    builder = hand_built_site()
    builder.rows["drug_exposure"].append(dict(builder.rows["drug_exposure"][0]))
    first_id = builder.rows["drug_exposure"][0]["drug_exposure_id"]
    _refused_data(tmp_path, spark, builder, "drug_exposure.drug_exposure_id [duplicate_id]",
                  f"drug_exposure_id {first_id}")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, spark: SparkSession) -> RoundReply:
    """The summary of the unchanged hand-built site."""
    agent = make_agent(tmp_path_factory.mktemp("baseline"), spark)
    reply = decode_reply(agent.handle(json.dumps(summary_request()).encode()))
    assert reply.status == "ok", reply.error
    return reply


def _steps(reply: RoundReply) -> dict[str, tuple[int, int]]:
    return {row["step"]: (row["n_exposed"], row["n_comparator"]) for row in reply.results["attrition"]["steps"]}


def _warnings(agent: SiteAgent, check: str) -> dict[str, int]:
    report = json.loads((agent.settings.workdir / QUALITY_REPORT).read_text())
    return {f["table"]: f["count"] for f in report["findings"] if f["check"] == check and f["severity"] == "warning"}


def test_implausible_dates_and_negative_ages_are_used_or_dropped_counted_and_reported(
    tmp_path: Path, spark: SparkSession, baseline: RoundReply,
) -> None:
    """Used and counted, on one site (one cohort build):

    - person 2's propofol (comparator, index 2016-06-01) ends in 2000, before it starts: the
      exposure's end is taken as its start (docs/cohort_rules.md); warning ``end_before_start``;
    - person 1 (exposed, index 2016) is born in 2017: events before birth, age -1 at index;
    - person 11 (exposed, index 2016) is born in 2090, after today: age -74 at index.
    Both are dropped at the age step of the attrition (which counts them) with warnings
    ``event_before_birth`` and ``birth_in_future``.
    """
    builder = hand_built_site()
    births = {1: 2017, 11: 2090}
    for person in builder.rows["person"]:
        person["year_of_birth"] = births.get(person["person_id"], person["year_of_birth"])
    propofol = next(row for row in builder.rows["drug_exposure"] if row["person_id"] == 2)
    propofol["drug_exposure_end_date"] = propofol["drug_exposure_start_date"].replace(year=2000)
    agent = make_agent(tmp_path, spark, builder)
    reply = send_untouched(agent, json.dumps(summary_request()).encode())
    assert reply.status == "ok", reply.error
    before, after = _steps(baseline), _steps(reply)
    assert after["washout"] == before["washout"]
    assert after["age"] == (before["age"][0] - 2, before["age"][1])  # two exposed persons fewer
    exposed, comparator = (reply.results["arm_summary"][arm] for arm in ("exposed", "comparator"))
    assert exposed["n"] == baseline.results["arm_summary"]["exposed"]["n"] - 2
    assert comparator == baseline.results["arm_summary"]["comparator"]  # person 2 as before
    assert _warnings(agent, "end_before_start") == {"drug_exposure": 1}
    assert _warnings(agent, "birth_in_future") == {"person": 1}
    before_birth = _warnings(agent, "event_before_birth")
    assert before_birth["observation_period"] == 2
    assert before_birth["condition_occurrence"] >= 2
    assert before_birth["drug_exposure"] == 2


# 5. Bad messages ---------------------------------------------------------------------------

def _with(**fields: Any) -> bytes:
    return json.dumps({**summary_request(), **fields}).encode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(lambda: _with(schema_version=2), ["schema_version 2", "this fedrwe speaks 1",
                                                       "same fedrwe version"], id="other_schema_version"),
        pytest.param(lambda: _with(schema_version="1"), ["schema_version '1'"], id="schema_version_as_text"),
        pytest.param(lambda: json.dumps({k: v for k, v in summary_request().items() if k != "schema_version"}).encode(),
                     ["schema_version None"], id="no_schema_version"),
        pytest.param(lambda: _with(priority="high"), ["field `priority`", "Extra inputs", "(got 'high')"],
                     id="unknown_field"),
        pytest.param(lambda: _with(run_id="run-1"), ["field `run_id`", "(got 'run-1')"], id="run_id_pattern"),
        pytest.param(lambda: _with(round_index="one"), ["field `round_index`", "(got 'one')"], id="round_index_type"),
        pytest.param(lambda: _with(round_index=0), ["field `round_index`", "(got 0)"], id="round_index_zero"),
        pytest.param(lambda: _with(protocol_sha256="abc"), ["field `protocol_sha256`", "(got 'abc')"],
                     id="protocol_hash_pattern"),
        pytest.param(lambda: _with(tasks=["attrition"]), ["field `tasks`", "(got ['attrition'])"], id="tasks_type"),
        pytest.param(lambda: _with(kind="study_end"), ["field `kind`", "(got 'study_end')"], id="unknown_kind"),
        pytest.param(lambda: json.dumps({k: v for k, v in summary_request().items() if k != "run_id"}).encode(),
                     ["field `run_id`", "Field required"], id="missing_field"),
        pytest.param(lambda: _with(protocol=["not", "a", "protocol"]), ["field `protocol`"], id="protocol_type"),
        pytest.param(lambda: _with(tasks={"magic": {}}), ["task(s) ['magic'] are not part of study",
                                                          "add the analysis"], id="unknown_task"),
        pytest.param(lambda: _with(comparison="vs_nothing"), ["has no comparison 'vs_nothing'", "name one of them"],
                     id="unknown_comparison"),
        pytest.param(lambda: _with(tasks={"crude_cox": {"beta": "zero"}}),
                     ["field `tasks.crude_cox.beta`", "(got 'zero')"], id="task_input_type"),
        pytest.param(lambda: json.dumps({**summary_request(), "tasks": {"crude_cox": {"beta": float("nan")}}}).encode(),
                     ["field `tasks.crude_cox.beta`", "finite number", "(got nan)"], id="task_input_nan"),
        pytest.param(lambda: _with(tasks={"propensity": {"beta": "all zero"}}),
                     ["field `tasks.propensity.beta`", "(got 'all zero')"], id="task_input_list_type"),
        pytest.param(lambda: _with(tasks={"propensity": {"beta": [0.0]}}),
                     ["propensity beta has 1 values but the design has 18 columns"], id="task_input_length"),
        pytest.param(lambda: _with(tasks={"adjusted": {"beta": [0.0] * 18, "caliper": -1.0, "exposed_share": 0.5}}),
                     ["field `tasks.adjusted.caliper`", "(got -1.0)"], id="task_input_negative_caliper"),
        pytest.param(lambda: _with(tasks={"weighted_cox": {"fits": {}}}),
                     ["field `tasks.weighted_cox.propensity`", "Field required", "field `tasks.weighted_cox.fits`"],
                     id="task_inputs_missing"),
        pytest.param(lambda: b"not json at all", ["round request is not JSON", "it starts b'not json"],
                     id="not_json"),
        pytest.param(lambda: b"\xff\xfe\x00", ["round request is not JSON"], id="not_utf8"),
        pytest.param(lambda: b"", ["round request is not JSON"], id="empty"),
        pytest.param(lambda: b"[1, 2]", ["must be a JSON object, got list [1, 2]"], id="json_array"),
        pytest.param(lambda: b"x" * (MAX_MESSAGE_BYTES + 1), [f"{MAX_MESSAGE_BYTES + 1:,} bytes",
                                                             f"more than the {MAX_MESSAGE_BYTES:,}"],
                     id="too_large"),
    ],
)
def test_a_bad_message_gets_a_reply_naming_the_field_value_and_fix(
    good_agent: SiteAgent, payload: Callable[[], bytes], expected: list[str],
) -> None:
    reply = send_untouched(good_agent, payload())
    assert_clear(reply, "error", *expected)


def test_the_service_answers_an_oversized_body_without_reading_it(good_agent: SiteAgent) -> None:
    settings = good_agent.settings.model_copy(update={"port": 0})
    server = bind(settings, good_agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.putrequest("POST", "/v1/round")
        connection.putheader("Content-Length", str(MAX_MESSAGE_BYTES + 1))
        connection.endheaders()  # no body follows: the site must not wait for 64 MB
        response = connection.getresponse()
        assert response.status == 413
        reply = decode_reply(response.read())
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert reply.status == "error"
    assert reply.error is not None
    assert f"site {SITE!r}" in reply.error
    assert f"Content-Length '{MAX_MESSAGE_BYTES + 1}'" in reply.error
    assert "Fix: " in reply.error
