"""Attacks on the site policy, the disclosure guard's extensions, the differencing guard and
the audit log. Each test tries to learn one patient's data or to run something the site's
policy does not allow, and asserts the attempt is refused or made harmless: no count between
1 and ``min_cell_count - 1`` appears anywhere in what leaves the site.

The in-memory attacks run the coordinator's real plan against the sites' real partials and
guard (tests/rows_site.py); the cohort attacks run a real SiteAgent (Spark, Delta) on a
hand-built OMOP site; the audit attacks edit the real Delta files and run the real CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tomli_w
from lifelines import KaplanMeierFitter
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from coordinator.report import render_report
from coordinator.results import build_results
from flows.localnet import base_env, executable
from shared.errors import SiteError
from shared.protocol.messages import RoundReply, RoundRequest, decode_reply
from shared.protocol.model import StudyProtocol
from site_agent.agent import SiteAgent
from site_agent.audit.delta_log import DeltaAuditLog, verify
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.rows_site import RowsSite, rows_from_frame
from tests.test_adjusted_estimators import COVARIATES, make_rows, pooled_fit, protocol, split
from tests.test_cohort_rules import hand_built_site
from tests.test_site_agent import PROTOCOL

STUDY = protocol()
MIN = 5
EXACT = 1e-10  # same sums in the same order: equal to float round-off


def small_ints(data: Any, minimum: int) -> list[Any]:
    """Every integer from 1 to ``minimum - 1`` anywhere in ``data`` (bools aside)."""
    if isinstance(data, bool):
        return []
    if isinstance(data, int):
        return [data] if 0 < data < minimum else []
    if isinstance(data, dict):
        return [v for item in data.values() for v in small_ints(item, minimum)]
    if isinstance(data, list):
        return [v for item in data for v in small_ints(item, minimum)]
    return []


def bare_numbers(text: str) -> set[str]:
    """Numbers standing alone in a message (not inside names like site_1)."""
    return set(re.findall(r"(?<![\w.])\d+(?![\w.])", text))


def run_sites(sites: list[RowsSite], study: StudyProtocol = STUDY) -> tuple[StudyPlan, dict[str, list[RoundReply]]]:
    """The coordinator's plan against the sites; every reply each site sent, kept."""
    plan = StudyPlan(study)
    sent: dict[str, list[RoundReply]] = {site.site_id: [] for site in sites}
    while (request := plan.next_request()) is not None:
        replies = {site.site_id: site.reply(request) for site in sites}
        for site_id, reply in replies.items():
            sent[site_id].append(reply)
        plan.absorb(replies)
    return plan, sent


def rows_sites(frame: pd.DataFrame, policy: DisclosurePolicy, study: StudyProtocol = STUDY) -> list[RowsSite]:
    return [
        RowsSite(site_id, rows_from_frame(rows, COVARIATES), study, policy, rng=np.random.default_rng(3))
        for site_id, rows in frame.groupby("site_id")
    ]


def with_one_exposed(frame: pd.DataFrame, site_id: str) -> pd.DataFrame:
    """``frame`` where ``site_id`` has exactly one exposed patient (a one-patient stratum)."""
    frame = frame.copy()
    at_site = np.flatnonzero(frame.site_id == site_id)
    frame.loc[frame.index[at_site], "treatment"] = 0.0
    frame.loc[frame.index[at_site[0]], "treatment"] = 1.0
    return frame


# ---------------------------------------------------------------- attacks: in-memory sites

def test_attack_one_patient_stratum_is_suppressed_and_no_small_count_leaves() -> None:
    frame = with_one_exposed(split(make_rows(900, whole_days=True, seed=5), 2), "site_1")
    policy = DisclosurePolicy(min_cell_count=MIN, below_minimum="suppress")
    plan, sent = run_sites(rows_sites(frame, policy))
    for reply in sent["site_1"]:
        assert reply.status == "ok"
        assert small_ints(reply.results, MIN) == [], reply.results
        assert not bare_numbers(json.dumps(reply.results)) & {str(n) for n in range(1, MIN)}
    site = plan.sites["site_1"]
    assert site["n_exposed"] is None  # shown as suppressed, not as a number
    assert "arm_summary.exposed.n" in site["disclosure"]["suppressed"]
    analyses = plan.analyses()
    assert analyses["crude"]["n_exposed"] is None
    assert "site 'site_1'" in analyses["crude"]["error"]
    assert "suppressed" in analyses["crude"]["error"]
    report = render_report(build_results(plan, []))
    assert "site site_1 suppressed (below its minimum cell count): arm_summary.exposed.events" in report


def test_attack_one_patient_stratum_under_refuse_stops_the_site_without_the_value() -> None:
    frame = with_one_exposed(split(make_rows(900, whole_days=True, seed=5), 2), "site_1")
    policy = DisclosurePolicy(min_cell_count=MIN)
    with pytest.raises(SiteError) as raised:
        run_sites(rows_sites(frame, policy))
    message = str(raised.value)
    assert "exposed.n" in message
    assert bare_numbers(message) <= {str(MIN)}


def test_attack_covariate_held_by_one_patient_refuses_the_propensity_task_naming_it() -> None:
    frame = split(make_rows(900, whole_days=True, seed=6), 1)
    frame["depression"] = 0.0
    frame.loc[frame.index[frame.site_id == "site_0"][0], "depression"] = 1.0
    plan, sent = run_sites(rows_sites(frame, DisclosurePolicy(min_cell_count=MIN)))
    withheld = [r.results["propensity"]["withheld"] for r in sent["site_0"] if "propensity" in r.results]
    assert withheld
    assert all("depression" in reason for reason in withheld)
    assert all(bare_numbers(reason) <= {str(MIN)} for reason in withheld)
    assert "depression" in (plan.propensity() or {})["error"]
    assert "hr" in plan.analyses()["crude"]  # the crude analysis does not need the model


def test_attack_request_for_per_day_tables_gets_the_sites_weekly_grid() -> None:
    frame = split(make_rows(900, whole_days=True, seed=7), 2)
    beta, caliper, share = pooled_fit(frame)
    policy = DisclosurePolicy(min_cell_count=1, time_grid="week")
    site = rows_sites(frame, policy)[0]
    asks = {"beta": beta.tolist(), "caliper": caliper, "exposed_share": share, "event_tables": True,
            "time_grid": "day", "grid_days": 1, "min_cell_count": 1}
    request = RoundRequest(
        study_id=STUDY.study_id, run_id="0" * 32, round_name="x-adjusted", round_index=1,
        protocol=STUDY.model_dump(mode="json"), protocol_sha256=STUDY.sha256(), tasks={"adjusted": asks},
    )
    reply = site.reply(request)
    assert reply.status == "ok", reply.error
    days = np.asarray(frame[frame.site_id == site.site_id].time)
    assert np.any(days % 7 != 0)  # the rows have days off the grid ...
    for name, part in reply.results["adjusted"]["parts"].items():
        times = np.asarray(part["table"]["time"])
        assert np.all(times % 7 == 0), name  # ... the tables that leave do not


def test_attack_task_outside_allowed_analyses_is_refused_with_a_named_reason() -> None:
    frame = split(make_rows(900, whole_days=True, seed=8), 2)
    policy = DisclosurePolicy(min_cell_count=1, allowed_analyses=["crude"])
    plan, sent = run_sites(rows_sites(frame, policy))
    reasons = [r.results["propensity"]["withheld"] for r in sent["site_0"] if "propensity" in r.results]
    assert reasons
    assert all("allowed_analyses" in reason and "'propensity'" in reason for reason in reasons)
    assert "allowed_analyses" in (plan.propensity() or {})["error"]
    assert all("adjusted" not in r.results for r in sent["site_0"])
    assert "hr" in plan.analyses()["crude"]


# ---------------------------------------------------------------- policy fields, unit level

def test_policy_defaults_are_the_documented_ones() -> None:
    policy = DisclosurePolicy()
    assert (policy.min_cell_count, policy.below_minimum, policy.time_grid) == (10, "refuse", "day")
    assert policy.allowed_analyses == ["crude", "propensity", "matched", "iptw_ate", "iptw_att", "overlap", "large_scale"]
    assert (policy.max_rounds_per_study, policy.max_studies_per_period, policy.period_days) == (100, 50, 30)
    assert policy.min_cohort_size is None
    assert policy.cohort_minimum() == 10
    assert policy.max_parameters_per_patients == 1.0
    assert policy.dp_noise is None
    assert DisclosurePolicy(min_cell_count=3, min_cohort_size=50).cohort_minimum() == 50


@pytest.mark.parametrize("bad", [
    {"time_grid": "hour"}, {"below_minimum": "ignore"}, {"allowed_analyses": ["magic"]},
    {"allowed_analyses": []}, {"dp_noise": {"epsilon": 0}}, {"max_rounds_per_study": 0},
    {"max_parameters_per_patients": -1}, {"min_cohort_size": 0},
])
def test_policy_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        DisclosurePolicy.model_validate(bad)


def test_policy_loads_from_the_site_toml(tmp_path: Path) -> None:
    from site_agent.settings import load_site_settings

    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({
        "site_id": "s", "lake": str(tmp_path), "workdir": str(tmp_path),
        "policy": {"time_grid": "month", "below_minimum": "suppress", "dp_noise": {"epsilon": 1.5}},
    }))
    policy = load_site_settings(path).policy
    assert (policy.grid_days(), policy.below_minimum, policy.dp_noise and policy.dp_noise.epsilon) == (30, "suppress", 1.5)


def test_coarsen_days_rounds_up_to_the_grid() -> None:
    from site_agent.analyses.grid import coarsen_days

    days = np.array([1, 6, 7, 8, 14, 15, 30, 31])
    assert coarsen_days(days, 1).tolist() == days.tolist()
    assert coarsen_days(days, 7).tolist() == [7, 7, 7, 14, 14, 21, 35, 35]
    assert coarsen_days(days, 30).tolist() == [30, 30, 30, 30, 30, 30, 30, 60]


def test_weekly_grid_equals_the_pooled_analysis_on_coarsened_times() -> None:
    """Federated with a weekly policy == federated per-day on times rounded up to weeks
    (itself equal to the pooled fits, tests/test_adjusted_estimators.py) == lifelines' KM."""
    frame = split(make_rows(900, whole_days=True, seed=9), 3)
    coarse = frame.assign(time=np.ceil(frame.time / 7) * 7)
    weekly, _ = run_sites(rows_sites(frame, DisclosurePolicy(min_cell_count=1, time_grid="week")))
    daily, _ = run_sites(rows_sites(coarse, DisclosurePolicy(min_cell_count=1)))
    got, want = weekly.analyses(), daily.analyses()
    for name in ("matched", "iptw_ate", "iptw_att", "overlap"):
        for key in ("log_hr", "se_log_hr", "risk_exposed", "risk_comparator", "logrank_p"):
            np.testing.assert_allclose(got[name][key], want[name][key], rtol=EXACT, err_msg=f"{name}.{key}")
        assert "time_grid" in got[name]
        assert "time_grid" not in want[name]
    for label, arm in (("exposed", 1.0), ("comparator", 0.0)):
        curve = got["crude"]["km"][label]
        rows = coarse[coarse.treatment == arm]
        km = KaplanMeierFitter().fit(rows.time, rows.event)
        np.testing.assert_allclose(curve["survival"], km.survival_function_at_times(curve["time"]).to_numpy(), rtol=1e-12)
        assert np.all(np.asarray(curve["time"]) % 7 == 0)


def test_check_design_limits_parameters_per_patient_and_rare_binary_levels() -> None:
    from shared.errors import DisclosureRefused
    from site_agent.disclosure.policy_checks import check_design

    rng = np.random.default_rng(1)
    names = ["intercept", "age", "flag"]
    flag = np.zeros(40)
    flag[:MIN] = 1.0
    design = np.column_stack([np.ones(40), rng.normal(50, 9, 40), flag])
    check_design("propensity", design, names, DisclosurePolicy(min_cell_count=MIN), "s")  # MIN persons: fine
    check_design("propensity", np.column_stack([design[:, :2], np.zeros(40)]), names, DisclosurePolicy(min_cell_count=MIN), "s")
    with pytest.raises(DisclosureRefused, match="'flag'"):
        check_design("propensity", np.column_stack([design[:, :2], flag[::-1] * 0 + (np.arange(40) < MIN - 1)]),
                     names, DisclosurePolicy(min_cell_count=MIN), "s")
    with pytest.raises(DisclosureRefused, match="'flag'"):  # the other level is the rare one
        check_design("propensity", np.column_stack([design[:, :2], np.arange(40) > 0]), names, DisclosurePolicy(min_cell_count=MIN), "s")
    with pytest.raises(DisclosureRefused, match="3 parameters needs at least 60"):
        check_design("propensity", design, names, DisclosurePolicy(min_cell_count=MIN, max_parameters_per_patients=20), "s")


def test_restrict_parts_withholds_analyses_outside_the_policy() -> None:
    from site_agent.analyses.release import Release
    from site_agent.disclosure.policy_checks import refused_task, restrict_parts

    policy = DisclosurePolicy(allowed_analyses=["crude", "propensity", "iptw_ate"])
    release = Release({"x": 1}, parts={"crude": Release({"a": 1}), "matched": Release({"b": 2}), "iptw_ate": Release({"c": 3})})
    kept = restrict_parts(release, policy, "s")
    assert kept.parts["crude"].withheld is None
    assert kept.parts["iptw_ate"].withheld is None
    assert "allowed_analyses" in (kept.parts["matched"].withheld or "")
    assert refused_task("adjusted", policy, "s") is None  # iptw_ate needs it
    assert refused_task("large_scale_concepts", policy, "s") is not None
    assert refused_task("arm_summary", DisclosurePolicy(allowed_analyses=["crude"]), "s") is None


def test_suppress_blanks_the_cell_or_marks_the_whole_task() -> None:
    from shared.stats.cox import EventTable
    from site_agent.analyses.counts import arm_summary
    from site_agent.analyses.release import Release
    from site_agent.disclosure.guard import guarded

    table = EventTable(np.array([1, 2]), np.array([[3, 4], [0, 1]]), np.array([[20, 30], [1, 1]]))
    policy = DisclosurePolicy(min_cell_count=MIN, below_minimum="suppress")
    out = guarded(lambda: {"arm_summary": arm_summary(table), "model": Release({"g": 0.5}, {"n_small": 2})}, policy, "s")
    assert out.values["arm_summary"]["exposed"] is None  # 2 persons: the whole arm goes
    assert out.values["arm_summary"]["comparator"] == {"n": 50, "events": 7, "person_days": 80}
    assert out.values["model"] == {"withheld": out.values["model"]["withheld"], "suppressed": ["model.n_small"]}
    assert out.values["disclosure"]["suppressed"] == ["arm_summary.exposed.events", "arm_summary.exposed.n", "model.n_small"]
    assert out.withheld["arm_summary.exposed.n"] == 2  # the site's own log keeps the value


def test_laplace_noise_is_labelled_and_makes_estimates_approximate() -> None:
    frame = split(make_rows(900, whole_days=True, seed=10), 1)
    noisy = DisclosurePolicy(min_cell_count=1, dp_noise={"epsilon": 0.5})  # type: ignore[arg-type]
    plan, sent = run_sites(rows_sites(frame, noisy))
    label = sent["site_0"][0].results["disclosure"]["noise"]
    assert label["epsilon"] == 0.5
    assert "arm_summary.exposed.n" in label["counts"]
    keys = [f"{key}_{arm}" for key in ("n", "events") for arm in ("exposed", "comparator")]
    exact, _ = run_sites(rows_sites(frame, DisclosurePolicy(min_cell_count=1)))
    shown = [plan.sites[s][key] for s in ("site_0",) for key in keys]
    true = [exact.sites[s][key] for s in ("site_0",) for key in keys]
    assert shown != true  # the counts are noisy ...
    assert all(isinstance(n, int) and n >= 0 for n in shown)
    analyses = plan.analyses()
    assert all("approximate" in result for result in analyses.values())  # ... and said so
    assert all("approximate" not in result for result in exact.analyses().values())


def test_ledger_limits_rounds_and_studies_per_period(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from shared.errors import DisclosureRefused
    from site_agent.disclosure.ledger import RequestLedger

    policy = DisclosurePolicy(max_rounds_per_study=2, max_studies_per_period=2, period_days=10)
    ledger = RequestLedger(tmp_path / "ledger.json", "s")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ledger.admit("a", "r1", policy, start)
    ledger.admit("a", "r1", policy, start)  # a retry is not a new round
    ledger.admit("a", "r2", policy, start)
    with pytest.raises(DisclosureRefused, match="max_rounds_per_study 2"):
        RequestLedger(tmp_path / "ledger.json", "s").admit("a", "r3", policy, start)  # survives a restart
    ledger.admit("b", "r1", policy, start + timedelta(days=1))
    with pytest.raises(DisclosureRefused, match="max_studies_per_period 2"):
        ledger.admit("c", "r1", policy, start + timedelta(days=2))
    ledger.admit("c", "r1", policy, start + timedelta(days=10, hours=1))  # "a" fell out of the period


def test_cohort_registry_refuses_near_duplicates_only(tmp_path: Path) -> None:
    from shared.errors import DisclosureRefused
    from site_agent.disclosure.differencing import CohortRegistry

    registry = CohortRegistry(tmp_path, "s")
    base = np.arange(1, 101)
    registry.check_and_record("first", base, MIN)
    registry.check_and_record("same", base[::-1], MIN)  # equal cohorts: nothing to subtract
    registry.check_and_record("far", base[MIN:], MIN)  # MIN persons apart: allowed
    with pytest.raises(DisclosureRefused, match="earlier study 'far'") as raised:
        registry.check_and_record("near", np.append(base[MIN:], 1000), MIN)
    assert bare_numbers(str(raised.value)) <= {str(MIN)}
    registry.check_and_record("far", np.append(base[MIN:], 1000), MIN)  # its own rebuild is not a second study


# ---------------------------------------------------------------- attacks: real site agent

def study_variant(study_id: str, **population: Any) -> StudyProtocol:
    data = PROTOCOL.model_dump(mode="json")
    data["study_id"] = study_id
    data["population"].update(population)
    return StudyProtocol.model_validate(data)


def summary_of(study: StudyProtocol, round_name: str = "1-summary") -> bytes:
    request = StudyPlan(study).next_request()
    assert request is not None
    return request.model_copy(update={"round_name": round_name}).to_bytes()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("attacked") / "lake"
    hand_built_site().write(path)
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of analysis datasets for every agent here: each cohort is built once."""
    return tmp_path_factory.mktemp("studies")


def site_agent(lake: Path, studies: Path, workdir: Path, spark: SparkSession, **policy: Any) -> SiteAgent:
    """A real agent with its own workdir (ledger, cohorts, audit) sharing the built datasets."""
    workdir.mkdir(parents=True)
    (workdir / "studies").symlink_to(studies)
    settings = SiteSettings(site_id="site_a", lake=lake, workdir=workdir, policy=DisclosurePolicy(**policy),
                            approval=ApprovalSettings(mode="auto"))
    return SiteAgent(settings, spark=spark)


ADULTS = study_variant("adults_18")


@pytest.mark.integration
def test_attack_tiny_cohort_is_refused_whole(lake: Path, studies: Path, tmp_path: Path, spark: SparkSession) -> None:
    agent = site_agent(lake, studies, tmp_path / "work", spark, min_cell_count=MIN, min_cohort_size=50)
    reply = decode_reply(agent.handle(summary_of(ADULTS)))
    assert reply.status == "refused"
    assert reply.results == {}
    assert "min_cohort_size 50" in (reply.error or "")
    assert bare_numbers(reply.error or "") <= {"50"}
    assert not list((tmp_path / "work" / "disclosure" / "cohorts").glob("*.npy"))  # not even recorded


@pytest.mark.integration
def test_attack_differencing_two_cohorts_one_person_apart(lake: Path, studies: Path, tmp_path: Path, spark: SparkSession) -> None:
    agent = site_agent(lake, studies, tmp_path / "work", spark, min_cell_count=MIN, min_cohort_size=1,
                       max_parameters_per_patients=0.0, below_minimum="suppress")
    first = decode_reply(agent.handle(summary_of(ADULTS)))
    assert first.status == "ok", first.error
    second = decode_reply(agent.handle(summary_of(study_variant("adults_16", min_age=16))))  # adds person 4
    assert second.status == "refused"
    assert second.results == {}
    assert "earlier study 'adults_18'" in (second.error or "")
    assert bare_numbers(second.error or "") <= {str(MIN)}
    assert small_ints(first.results, MIN) == []  # and the first study's reply showed no small count


@pytest.mark.integration
def test_attack_rounds_beyond_the_policy_and_disallowed_tasks(lake: Path, studies: Path, tmp_path: Path, spark: SparkSession) -> None:
    agent = site_agent(lake, studies, tmp_path / "work", spark, min_cell_count=1, min_cohort_size=1,
                       max_parameters_per_patients=0.0, max_rounds_per_study=2, allowed_analyses=["crude"])
    request = summary_of(ADULTS, "1-summary")
    first = decode_reply(agent.handle(request))
    assert first.status == "ok", first.error
    assert "allowed_analyses" in first.results["propensity"]["withheld"]
    assert "gradient" not in json.dumps(first.results["propensity"])
    assert agent.handle(request) == first.to_bytes()  # a retry: the same reply, not a new round
    assert decode_reply(agent.handle(summary_of(ADULTS, "2-probe"))).status == "ok"
    third = decode_reply(agent.handle(summary_of(ADULTS, "3-probe")))
    assert third.status == "refused"
    assert third.results == {}
    assert "max_rounds_per_study 2" in (third.error or "")
    audit = DeltaAuditLog(tmp_path / "work" / "audit").last(10)
    decisions = [row["decision"] for row in audit]
    assert decisions == ["released with parts withheld", "replayed", "released with parts withheld", "refused"]
    assert all(row["request_sha256"] for row in audit)
    assert verify(tmp_path / "work" / "audit").ok


# ---------------------------------------------------------------- attacks: the audit log

def data_file(folder: Path, version: int) -> Path:
    log = folder / "releases" / "_delta_log" / f"{version:020d}.json"
    add = next(json.loads(line)["add"] for line in log.read_text().splitlines() if '"add"' in line)
    return folder / "releases" / add["path"]


def written_log(folder: Path, entries: int = 5) -> None:
    log = DeltaAuditLog(folder)
    for i in range(entries):
        log.append(site_id="s", study_id="st", round_name=f"{i + 1}-r", request_sha256=f"{i:064x}", decision="released")


def test_attack_edited_audit_entry_is_found(tmp_path: Path) -> None:
    written_log(tmp_path)
    assert verify(tmp_path).ok
    path = data_file(tmp_path, 2)
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["decision"] = "refused"  # hide a release
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    result = verify(tmp_path)
    assert (result.first_bad, "edited" in (result.reason or "")) == (2, True)


def test_attack_deleted_audit_commit_is_found(tmp_path: Path) -> None:
    written_log(tmp_path)
    os.remove(tmp_path / "releases" / "_delta_log" / f"{1:020d}.json")
    assert verify(tmp_path).first_bad == 1


def test_attack_deleted_audit_data_file_and_cut_tail_are_found(tmp_path: Path) -> None:
    written_log(tmp_path / "a")
    os.remove(data_file(tmp_path / "a", 3))
    assert verify(tmp_path / "a").first_bad == 3
    written_log(tmp_path / "b")
    os.remove(tmp_path / "b" / "releases" / "_delta_log" / f"{4:020d}.json")  # the newest entry
    assert verify(tmp_path / "b").first_bad == 4


def test_attack_reordered_audit_entries_are_found(tmp_path: Path) -> None:
    written_log(tmp_path)
    one, two = data_file(tmp_path, 1), data_file(tmp_path, 2)
    first, second = one.read_bytes(), two.read_bytes()
    one.write_bytes(second)
    two.write_bytes(first)
    assert verify(tmp_path).first_bad == 1


def test_audit_cli_verifies_and_shows(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    written_log(workdir / "audit", 3)
    config = tmp_path / "site.toml"
    config.write_text(tomli_w.dumps({"site_id": "s", "lake": str(tmp_path), "workdir": str(workdir)}))
    env = {**base_env(), "COLUMNS": "200"}

    def fedrwe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([executable("fedrwe"), "site", "audit", *args, "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=120, check=False)

    ok = fedrwe("verify")
    assert ok.returncode == 0, ok.stderr
    assert "3 entries, chain intact" in ok.stdout
    shown = fedrwe("show")
    assert shown.returncode == 0, shown.stderr
    assert "3-r" in shown.stdout
    assert "released" in shown.stdout
    path = data_file(workdir / "audit", 1)
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["study_id"] = "another"
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    broken = fedrwe("verify")
    assert broken.returncode != 0
    assert "entry 1" in broken.stderr
