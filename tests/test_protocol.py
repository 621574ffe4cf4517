"""The study protocol: the shipped study loads; every malformed field is named with its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import ProtocolError
from shared.protocol.model import load_protocol, parse_protocol, protocol_json_schema

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"


def reference() -> dict[str, Any]:
    data = yaml.safe_load(PROTOCOL.read_text())
    assert isinstance(data, dict)
    return data


def test_the_reference_study_loads_with_stable_hash_and_columns() -> None:
    protocol = load_protocol(PROTOCOL)
    assert protocol.sha256() == load_protocol(PROTOCOL).sha256()
    assert protocol.propensity_columns()[:4] == ["(intercept)", "age", "sex_female", "race_black"]
    assert protocol.covariate_columns()[-1] == "prior_emergency_visits"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("outcome"), r"field `outcome`: Field required. Fix: add the field"),
        (lambda d: d.update(washout_dayz=365), r"field `washout_dayz`: Extra inputs .* fix its spelling"),
        (lambda d: d.update(washout_days="a year"), r"field `washout_days`.*\(got 'a year'\)"),
        (lambda d: d["exposure"]["codes"].update(vocabulary="SNOMEDX"), r"exposure.codes.vocabulary"),
        (lambda d: d["exposure"]["codes"].update(include=["F14 .*"]), r"not a source code or a prefix"),
        (lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 1}), r"end_day 1 is before start_day 30"),
        (lambda d: d.update(time_at_risk={"start_day": -1, "end_day": 365}), r"field `time_at_risk.start_day`"),
        (lambda d: d["time_at_risk"].update(start_anchor="index"), r"field `time_at_risk.start_anchor`.*'index'"),
        (lambda d: d["time_at_risk"].update(end_anchor="cohort end"), r"field `time_at_risk.end_anchor`.*'cohort end'"),
        (lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 0, "start_anchor": "cohort_end",
                                          "end_anchor": "cohort_end"}), r"end_day 0 is before start_day 30"),
        (lambda d: d.update(time_at_risk={"start_day": 1, "end_day": 0, "end_anchor": "cohort_end"},
                            risk_horizon_days=None), r"follow-up length varies .* set risk_horizon_days"),
        (lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 365}),
         r"risk_horizon_days 365 is beyond the longest follow-up, 336 days .* at most 336"),
        (lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 365}, risk_horizon_days=None,
                            ph_check_cut_days=[90, 336]), r"ph_check_cut_days \[90, 336\] .* lie in 1..335"),
        (lambda d: d.update(study_population={"censor_at_death": "sometimes"}),
         r"field `study_population.censor_at_death`.*'sometimes'"),
        (lambda d: d["exposure"].update(domain="drug_era"),
         r"field `exposure`: .*drug_era .* `codes.include` \['6130'\] can never match. Fix: .*`codes.concept_ids`"),
        (lambda d: d["comparator"].update(domain="drug_era", codes={"vocabulary": "RxNorm", "include": ["8782"],
                                                                     "concept_ids": [753626]}),
         r"field `comparator`: .*drug_era .*`codes.include` \['8782'\]"),
        (lambda d: d["covariates"].append({"name": "time", "kind": "visit_count", "visit_concept_ids": [1]}), r"reserved"),
        (lambda d: d["covariates"].append({"name": "sex2", "kind": "sex"}), r"repeated columns \['sex_female'\]"),
        (lambda d: d.update(analyses=["matched_magic"]), r"field `analyses.0`"),
        (lambda d: d["outcome"].update(codes={"vocabulary": "ICD10CM"}), r"needs source codes .* or standard concepts"),
        (lambda d: d["outcome"].update(codes={"concept_ids": [], "include_descendants": True, "include": ["F1"],
                                              "vocabulary": "ICD10CM"}), r"`include_descendants` applies to"),
        (lambda d: d["outcome"].update(codes={"include": ["F14.1"]}), r"need their `vocabulary`"),
        (lambda d: d.update(analyses=["crude", "matched"]), r"use the propensity score: add 'propensity'"),
        (lambda d: d.update(ph_check_cut_days=[200, 100]), r"must increase strictly"),
        (lambda d: d.update(matching={"caliper": 0}), r"field `matching.caliper`"),
        (lambda d: d["exposure"].update(domain="device"), r"field `exposure.domain`"),
    ],
)
def test_malformed_fields_are_named(change: Any, expected: str) -> None:
    data = reference()
    change(data)
    with pytest.raises(ProtocolError, match=expected):
        parse_protocol(data, "test.yaml")


def test_a_concept_set_may_use_standard_concepts_with_descendants() -> None:
    data = reference()
    data["exposure"].update(domain="procedure", codes={"concept_ids": [4300000], "include_descendants": True,
                                                        "exclude_concept_ids": [4300001]})
    protocol = parse_protocol(data, "test.yaml")
    assert protocol.exposure.codes.uses_descendants()
    assert protocol.domains() == {"procedure", "drug"}


def test_time_at_risk_defaults_keep_the_reference_study_and_anchors_set_the_follow_up() -> None:
    reference_study = parse_protocol(reference(), "test.yaml")
    assert reference_study.time_at_risk.start_anchor == reference_study.time_at_risk.end_anchor == "cohort_start"
    assert reference_study.study_population.censor_at_death
    assert (reference_study.horizon_days(), reference_study.cut_days()) == (365, [90, 180])
    data = reference()
    data.pop("risk_horizon_days")
    data.pop("ph_check_cut_days")
    data["time_at_risk"] = {"start_day": 0, "end_day": 29}  # index day to day 29: 30 days
    fixed = parse_protocol(data, "test.yaml")
    assert (fixed.horizon_days(), fixed.cut_days()) == (30, [10, 20])  # thirds of 30
    data["time_at_risk"] = {"start_day": 1, "end_day": 30, "end_anchor": "cohort_end"}
    data["risk_horizon_days"] = 90  # the length varies per person: the horizon is given
    varying = parse_protocol(data, "test.yaml")
    assert varying.time_at_risk.longest_follow_up() is None
    assert varying.time_at_risk.uses_cohort_end()
    assert (varying.horizon_days(), varying.cut_days()) == (90, [30, 60])  # thirds of the horizon
    data["time_at_risk"] = {"start_day": 30, "end_day": 0, "end_anchor": "cohort_end"}  # exposures of 30+ days
    assert parse_protocol(data, "test.yaml").time_at_risk.end_day == 0


def test_drug_era_arms_take_concept_ids() -> None:
    data = reference()
    data["exposure"].update(domain="drug_era", codes={"concept_ids": [4300000], "include_descendants": True})
    protocol = parse_protocol(data, "test.yaml")
    assert protocol.domains() == {"drug_era", "drug"}


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot read protocol"):
        load_protocol(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("study_id: [unclosed\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(broken)


def _property_names(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        found.update(node.get("properties", {}))
        for value in node.values():
            _property_names(value, found)
    elif isinstance(node, list):
        for value in node:
            _property_names(value, found)
    return found


def test_the_committed_json_schema_is_current_and_every_field_is_documented() -> None:
    docs = Path(__file__).parents[1] / "docs"
    assert (docs / "protocol.schema.json").read_text() == protocol_json_schema(), (
        "regenerate it: fedrwe protocol schema --out docs/protocol.schema.json"
    )
    manual = (docs / "protocol.md").read_text()
    undocumented = sorted(n for n in _property_names(json.loads(protocol_json_schema()), set()) if f"`{n}`" not in manual)
    assert not undocumented, f"docs/protocol.md does not describe {undocumented}"


@pytest.mark.parametrize(
    ("block", "change", "expected"),
    [
        ({"window": {"start_day": -30, "end_day": 0}}, None, r"large_scale_covariates.window.end_day is 0.*Fix: end"),
        ({"domains": ["drug", "drug"]}, None, r"domains \['drug', 'drug'\] repeat a domain"),
        ({"domains": ["device"]}, None, r"field `large_scale_covariates.domains.0`"),
        ({"max_covariates": 0}, None, r"field `large_scale_covariates.max_covariates`"),
        ({}, lambda d: d.update(analyses=["crude"]), r"feed the propensity model: add 'propensity'"),
        ({}, lambda d: d["covariates"].append({"name": "drug_123", "kind": "age"}), r"\['drug_123'\] look like"),
    ],
)
def test_malformed_large_scale_covariates_are_named(block: dict[str, Any], change: Any, expected: str) -> None:
    data = reference()
    data["large_scale_covariates"] = block
    if change is not None:
        change(data)
    with pytest.raises(ProtocolError, match=expected):
        parse_protocol(data, "test.yaml")


# The reference protocol's hash under schema 1 as first released (fedrwe at 95911fa): sites
# that approved it must not have to approve it again because newer options exist.
SCHEMA_1_HASH = "836ad4673624a088568a8c63cae037ecf319f2b50a792d7cf408f3633b8e8326"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(restrict_to={"name": "depression", "codes": {"vocabulary": "ICD10CM", "include": ["F32.*"]}}),
        lambda d: d["time_at_risk"].update(end_anchor="cohort_end", start_day=0),
        lambda d: d.update(study_population={"censor_at_death": False}),
        lambda d: d.update(large_scale_covariates={"domains": ["drug"]}),
    ],
)
def test_unused_newer_options_keep_the_schema_1_hash_and_used_ones_change_it(change: Any) -> None:
    assert load_protocol(PROTOCOL).sha256() == SCHEMA_1_HASH
    data = reference()
    change(data)
    assert parse_protocol(data, "test.yaml").sha256() != SCHEMA_1_HASH


def test_large_scale_covariates_default_to_the_covariate_window() -> None:
    plain = load_protocol(PROTOCOL)
    data = reference()
    data["large_scale_covariates"] = {"domains": ["condition", "drug"]}
    data["covariates"] = []  # the adjusted analyses may rest on concepts alone
    protocol = parse_protocol(data, "test.yaml")
    assert protocol.large_scale_window() == protocol.covariate_window
    assert protocol.large_scale_covariates is not None
    assert protocol.large_scale_covariates.max_covariates == 1000
    assert protocol.sha256() != plain.sha256()
