"""Secure aggregation: the coordinator gets only sums of the sites' model values, and the same estimates.

Sites are in-memory (tests/secure_sites.py) with the real partial computations, guard and
masking (real X25519 keys, HKDF, ChaCha20); replies are captured as the bytes that travel.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import statsmodels.api as sm

from coordinator.plan import StudyPlan
from coordinator.results import build_results
from shared.errors import InsufficientSites, SecureAggregationError
from shared.privacy.fixed_point import FRACTION_BITS, MAX_ABS, add, decode, encode
from shared.privacy.masked_tasks import MASKED_FIELDS, flatten
from shared.privacy.secure_sum import CHECK_ENTRIES, WORD_BYTES, unpack
from shared.protocol.messages import RoundReply
from site_agent.analyses.cox import crude_cox
from site_agent.analyses.propensity import propensity
from tests.pooled_reference import RELATIVE_TOLERANCE, assert_crude_equals_pooled
from tests.rows_site import RowsSite
from tests.secure_sites import PLAIN, SECURE, Exchange, frame_of, run, signed_sites, sites_of
from tests.test_adjusted_estimators import COVARIATES

SUM_TOLERANCE = 1e-9  # relative, per entry of a secure sum vs the plain float sum (the bound is ~1e-15 absolute)


def plain_values(site: RowsSite, task: str, params: dict[str, Any]) -> list[float]:
    """What the site would send for ``task`` without secure aggregation, flattened like the mask."""
    limit = site.policy.max_abs_coefficient
    release = crude_cox(site.table, params, limit) if task == "crude_cox" else propensity(site.rows, params, limit)
    return flatten(release.values, MASKED_FIELDS[task])[0]


def masked_rounds(exchanges: list[Exchange]) -> list[Exchange]:
    return [e for e in exchanges if e.request.secure_aggregation_peers is not None]


# --- fixed point -------------------------------------------------------------------------------


def test_fixed_point_sums_equal_the_float_sums_within_the_documented_bound() -> None:
    rng = np.random.default_rng(3)
    for k in (2, 3, 7):
        values = rng.normal(0, 1, (k, 500)) * 10.0 ** rng.integers(-8, 12, (k, 500))
        decoded = decode(add([encode(row) for row in values]))
        bound = k * 2.0 ** -(FRACTION_BITS + 1) + 4 * np.spacing(np.abs(values).sum(axis=0))
        assert np.all(np.abs(np.array(decoded) - values.sum(axis=0)) <= bound)


def test_fixed_point_refuses_overflow_and_non_finite_values() -> None:
    assert decode(encode([MAX_ABS, -MAX_ABS])) == [MAX_ABS, -MAX_ABS]
    for bad in (MAX_ABS * 2, -MAX_ABS * 2, math.inf, math.nan):
        with pytest.raises(Exception, match=r"cannot be encoded for a secure sum"):
            encode([1.0, bad])


# --- (a) what the coordinator receives from one site ---------------------------------------------


def test_one_sites_masked_reply_looks_like_noise_and_never_holds_its_plain_values() -> None:
    frame = frame_of(3)
    sites = sites_of(frame, SECURE)
    _, exchanges = run(sites, SECURE)
    rounds = masked_rounds(exchanges)
    assert rounds, "a secure study has masked rounds"
    for exchange in rounds:
        for site in sites:
            raw = exchange.replies[site.site_id]
            results = RoundReply.model_validate_json(raw).results
            for task in set(results) & set(MASKED_FIELDS):
                part = results[task]
                assert set(part) == {"masked", "layout"}, f"{task} sends only the masked vector"
                plain = plain_values(site, task, exchange.request.tasks[task])
                entries = unpack(part["masked"], len(plain) + CHECK_ENTRIES, site.site_id)
                own = encode(plain)
                assert all(m != p for m, p in zip(entries, own, strict=False)), "every entry is masked"
                alone = decode(entries[: len(plain)])
                # decoded alone the entries are spread over the whole 2^79 range: garbage
                assert all(abs(a - p) > 1e6 for a, p in zip(alone, plain, strict=True))
            for name in (b"\"gradient\":", b"\"hessian\":", b"local_fit"):  # field names as keys, not in the layout
                assert name not in raw


def test_masked_words_are_uniform_over_the_whole_modulus() -> None:
    """Chi-square of the top 4 bits of every masked word a 7-site run sends: plain encodings
    would sit in the lowest and highest bins only."""
    from scipy.stats import chisquare

    _, exchanges = run(sites_of(frame_of(7), SECURE), SECURE)
    words = []
    for exchange in masked_rounds(exchanges):
        for reply in exchange.decoded().values():
            for task in set(reply.results) & set(MASKED_FIELDS):
                raw = base64.b64decode(reply.results[task]["masked"])
                words.extend(raw[i] >> 4 for i in range(0, len(raw), WORD_BYTES))
    assert len(words) > 500
    assert chisquare(np.bincount(words, minlength=16)).pvalue > 1e-6


def _recording(calls: list[tuple[str, list[dict[str, Any]]]], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def record(partials: list[dict[str, Any]]) -> Any:
        calls.append((name, partials))
        return method(partials)
    return record


def test_the_fits_only_ever_see_the_sum_over_sites() -> None:
    frame = frame_of(3)
    sites = sites_of(frame, SECURE)
    plan, calls = StudyPlan(SECURE), []
    for fit in plan.fits:
        for name in ("warm_start", "absorb", "finish"):
            if hasattr(fit, name):
                setattr(fit, name, _recording(calls, f"{fit.task}.{name}", getattr(fit, name)))
    while (request := plan.next_request()) is not None:
        plan.absorb({site.site_id: site.reply(request) for site in sites})
        for label, partials in calls:
            task = label.split(".")[0]
            assert len(partials) == 1, f"{label} got {len(partials)} partials: per-site values"
            params = request.tasks[task]
            per_site = np.array([plain_values(site, task, params) for site in sites])
            summed = np.array(flatten(partials[0], MASKED_FIELDS[task])[0])
            np.testing.assert_allclose(summed, per_site.sum(axis=0), rtol=SUM_TOLERANCE, atol=1e-12)
            for row in per_site:  # and is no one site's values
                assert not np.allclose(summed, row)
        calls.clear()
    assert plan.propensity()["converged"]


# --- (b) the same estimates ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 7])
def test_secure_estimates_equal_the_plain_run_and_the_pooled_fit(k: int) -> None:
    frame = frame_of(k)
    plain, _ = run(sites_of(frame, PLAIN), PLAIN)
    secure, _ = run(sites_of(frame, SECURE), SECURE)
    expected, got = plain.propensity(), secure.propensity()
    for column in expected["coefficients"]:
        assert got["coefficients"][column] == pytest.approx(expected["coefficients"][column], rel=RELATIVE_TOLERANCE)
        assert got["standard_errors"][column] == pytest.approx(expected["standard_errors"][column], rel=RELATIVE_TOLERANCE)
    assert got["n"] == expected["n"] == len(frame)
    design = sm.add_constant(frame[COVARIATES].to_numpy(float))
    pooled = sm.Logit(frame.treatment.to_numpy(float), design).fit(disp=0, method="newton", tol=1e-14)
    np.testing.assert_allclose(list(got["coefficients"].values()), pooled.params, rtol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(list(got["standard_errors"].values()), pooled.bse, rtol=RELATIVE_TOLERANCE)
    assert build_results(secure, [])["secure_aggregation"]["sites"] == sorted(frame.site_id.unique())
    assert "secure_aggregation" not in build_results(plain, [])
    crude = secure.analyses()["crude"]
    assert crude["hr"] == pytest.approx(plain.analyses()["crude"]["hr"], rel=RELATIVE_TOLERANCE)
    assert_crude_equals_pooled(crude, frame)


def test_sites_that_sign_their_keys_and_check_a_roster_give_the_same_estimates(tmp_path: Path) -> None:
    frame = frame_of(3)
    plain, _ = run(sites_of(frame, PLAIN), PLAIN)
    signed, exchanges = run(signed_sites(frame, SECURE, tmp_path), SECURE)
    assert all("signature" in a for a in (exchanges[1].request.secure_aggregation_peers or {}).values())
    for column, value in plain.propensity()["coefficients"].items():
        assert signed.propensity()["coefficients"][column] == pytest.approx(value, rel=RELATIVE_TOLERANCE)
    assert signed.analyses()["crude"]["hr"] == pytest.approx(plain.analyses()["crude"]["hr"], rel=RELATIVE_TOLERANCE)


# --- (c) tampering ------------------------------------------------------------------------------


def _tampered(raw: bytes, task: str, word: int) -> RoundReply:
    reply = RoundReply.model_validate_json(raw)
    blob = bytearray(base64.b64decode(reply.results[task]["masked"]))
    blob[word * WORD_BYTES + WORD_BYTES - 1] ^= 1  # one bit of one entry
    results = {**reply.results, task: {**reply.results[task], "masked": base64.b64encode(bytes(blob)).decode()}}
    return reply.model_copy(update={"results": results})


@pytest.mark.parametrize("word", [0, 5, 21, 22, 23])  # loglik, a Hessian entry, n, the count of sites, the checksum
def test_a_tampered_masked_value_fails_the_self_check(word: int) -> None:
    sites = sites_of(frame_of(3), SECURE)
    plan = StudyPlan(SECURE)
    plan.absorb({site.site_id: site.reply(plan.next_request()) for site in sites})  # type: ignore[arg-type]
    request = plan.next_request()
    assert request is not None
    assert "propensity" in request.tasks
    replies = {site.site_id: site.reply(request) for site in sites}
    replies["site_1"] = _tampered(replies["site_1"].to_bytes(), "propensity", word)
    with pytest.raises(SecureAggregationError, match="failed its self-check"):
        plan.absorb(replies)


def test_a_replayed_reply_from_an_earlier_round_fails_the_self_check() -> None:
    sites = sites_of(frame_of(3), SECURE)
    plan = StudyPlan(SECURE)
    plan.absorb({site.site_id: site.reply(plan.next_request()) for site in sites})  # type: ignore[arg-type]
    first = plan.next_request()
    assert first is not None
    old = {site.site_id: site.reply(first) for site in sites}
    plan.absorb(old)
    second = plan.next_request()
    assert second is not None
    replies = {site.site_id: site.reply(second) for site in sites}
    replies["site_2"] = old["site_2"]
    with pytest.raises(SecureAggregationError, match="failed its self-check"):
        plan.absorb(replies)


# --- (d) a site lost mid-fit ----------------------------------------------------------------------


def test_a_site_lost_mid_fit_ends_the_run_and_a_new_run_on_the_others_gives_their_estimates() -> None:
    frame = frame_of(3)
    sites = sites_of(frame, SECURE)
    plan = StudyPlan(SECURE)
    plan.absorb({site.site_id: site.reply(plan.next_request()) for site in sites})  # type: ignore[arg-type]
    first_keys = dict(plan.peer_keys)
    request = plan.next_request()
    assert request is not None
    with pytest.raises(InsufficientSites, match=r"lacks the masked replies of \['site_2'\].*new keys"):
        plan.absorb({site.site_id: site.reply(request) for site in sites[:2]})
    remaining = frame[frame.site_id != "site_2"]
    rerun, _ = run(sites[:2], SECURE)  # the same site processes: a new run makes new keys
    assert all(rerun.peer_keys[s] != first_keys[s] for s in rerun.peer_keys)
    plain, _ = run(sites_of(remaining, PLAIN), PLAIN)
    for column, value in plain.propensity()["coefficients"].items():
        assert rerun.propensity()["coefficients"][column] == pytest.approx(value, rel=RELATIVE_TOLERANCE)
    assert_crude_equals_pooled(rerun.analyses()["crude"], remaining)


def test_a_secure_study_refuses_adjusted_analyses_at_validation() -> None:
    from tests.test_adjusted_estimators import protocol

    with pytest.raises(Exception, match=r"secure aggregation does not release"):
        protocol(secure_aggregation=True)


def test_secure_aggregation_off_keeps_the_protocol_hash_and_on_changes_it() -> None:
    assert PLAIN.sha256() == PLAIN.model_copy(update={"secure_aggregation": False}).sha256()
    assert b"secure_aggregation" not in PLAIN.canonical_bytes()
    assert SECURE.sha256() != PLAIN.sha256()


def test_large_scale_covariates_under_secure_aggregation_equal_the_plain_fit() -> None:
    """The concept list is chosen from the summary round's per-site counts (as without masking);
    the model over it, with an L2 penalty, then runs on masked sums alone."""
    from site_agent.settings import DisclosurePolicy
    from tests.test_adjusted_estimators import make_rows
    from tests.test_large_scale_covariates import make_concepts, study
    from tests.test_large_scale_covariates import run as run_large_scale
    from tests.test_large_scale_covariates import split as split_large_scale

    rows = make_rows(900, whole_days=True, seed=41)
    frame, pairs = split_large_scale(rows, 3), make_concepts(rows, seed=42)
    plain_study = study().model_copy(update={"analyses": ["crude", "propensity"]})
    secure_study = plain_study.model_copy(update={"secure_aggregation": True})
    policy = DisclosurePolicy(min_cell_count=5)
    plain, _ = run_large_scale(frame, pairs, plain_study, policy)
    secure, replies = run_large_scale(frame, pairs, secure_study, policy)
    expected, got = plain.propensity(), secure.propensity()
    assert got["large_scale_covariates"]["columns"] == expected["large_scale_covariates"]["columns"]
    for column, value in expected["coefficients"].items():
        assert got["coefficients"][column] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-12)
    masked = [r["site_0"].results["propensity"] for r in replies[1:] if "propensity" in r["site_0"].results]
    assert masked
    assert all(set(part) == {"masked", "layout"} for part in masked)
