"""Attacks on secure aggregation by a curious coordinator that wants one site's model values.

Each test plays a coordinator that bends the rounds (asks one site alone, reuses a round's
masks, shrinks or swaps the key list, strips the masking, asks for a site's own fit, ...)
and asserts that the site refuses or that what it gets back is harmless noise. The sites
are tests/rows_site.py's in-memory sites with the real guard and masking code
(site_agent/secure_aggregation.py) and real X25519 keys.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.plan import StudyPlan
from shared.errors import InsufficientSites
from shared.privacy.fixed_point import decode, encode
from shared.privacy.masked_tasks import MASKED_FIELDS, flatten
from shared.privacy.secure_sum import (
    CHECK_ENTRIES,
    announcement_bytes,
    new_private_key,
    public_key_text,
    unpack,
)
from shared.protocol.messages import RoundReply, RoundRequest
from site_agent.analyses.propensity import propensity
from site_agent.settings import DisclosurePolicy
from tests.rows_site import RowsSite
from tests.secure_sites import PLAIN, SECURE, frame_of, signed_sites, sites_of


def started() -> tuple[list[RowsSite], StudyPlan, RoundRequest]:
    """Three sites after the summary round of a secure study, and the first masked request."""
    sites = sites_of(frame_of(3), SECURE)
    plan = StudyPlan(SECURE)
    first = plan.next_request()
    assert first is not None
    plan.absorb({site.site_id: site.reply(first) for site in sites})
    request = plan.next_request()
    assert request is not None
    assert request.secure_aggregation_peers is not None
    return sites, plan, request


def refused(reply: RoundReply, why: str) -> None:
    assert reply.status != "ok"
    assert not reply.results
    assert reply.error is not None
    assert why in reply.error


def test_asking_one_site_alone_is_refused() -> None:
    sites, _, request = started()
    site = sites[0]
    alone = request.model_copy(update={
        "secure_aggregation_peers": {site.site_id: request.secure_aggregation_peers[site.site_id]},  # type: ignore[index]
        "round_name": "2-alone",
    })
    refused(site.reply(alone), "a masked sum over 1 site(s) would reveal this site's values")


def test_a_secure_study_with_one_site_stops_at_the_coordinator() -> None:
    frame = frame_of(3)
    site = sites_of(frame[frame.site_id == "site_0"], SECURE)[0]
    plan = StudyPlan(SECURE)
    first = plan.next_request()
    assert first is not None
    with pytest.raises(InsufficientSites, match="needs at least 2 sites"):
        plan.absorb({site.site_id: site.reply(first)})


def test_subtracting_two_consecutive_rounds_does_not_cancel_the_masks() -> None:
    sites, plan, request = started()
    site = sites[0]
    replies = [site.reply(request)]
    plan.absorb({s.site_id: s.reply(request) for s in sites})
    later = plan.next_request()
    assert later is not None
    replies.append(site.reply(later))
    plain = [
        flatten(propensity(site.rows, r.tasks["propensity"], 20.0).values, MASKED_FIELDS["propensity"])[0]
        for r in (request, later)
    ]
    length = len(plain[0]) + CHECK_ENTRIES
    vectors = [unpack(r.results["propensity"]["masked"], length, site.site_id) for r in replies]
    difference = decode([a - b for a, b in zip(*vectors, strict=True)][: len(plain[0])])
    assert all(abs(d - (p - q)) > 1e6 for d, p, q in zip(difference, *plain, strict=True))


def test_a_round_name_reused_with_other_inputs_is_refused_and_a_plain_retry_is_harmless() -> None:
    sites, _, request = started()
    site = sites[0]
    first = site.reply(request)
    assert first.status == "ok"
    assert site.reply(request) == first  # a retry of the same request: the same masked bytes, nothing new
    moved = {**request.tasks, "propensity": {"beta": [0.1, 0.0, 0.0, 0.0]}}
    refused(site.reply(request.model_copy(update={"tasks": moved})), "already answered with other inputs")


def test_dropping_sites_from_the_key_list_mid_run_is_refused() -> None:
    sites, _, request = started()
    site = sites[0]
    assert site.reply(request).status == "ok"
    peers = dict(request.secure_aggregation_peers or {})
    peers.pop("site_2")
    smaller = request.model_copy(update={"secure_aggregation_peers": peers, "round_name": "3-newton"})
    refused(site.reply(smaller), "the key list changed within the run")


def coordinator_key(run: RoundRequest, site_id: str, signer: Ed25519PrivateKey | None = None) -> dict[str, str]:
    """A run key the coordinator holds the private half of, announced under ``site_id``."""
    public_key = public_key_text(new_private_key())
    signature = (signer or Ed25519PrivateKey.generate()).sign(
        announcement_bytes(run.run_id, run.comparison, site_id, public_key),
    )
    return {"public_key": public_key, "signature": base64.b64encode(signature).decode()}


def signed_start(tmp_path: Path) -> tuple[list[RowsSite], RoundRequest]:
    sites = signed_sites(frame_of(3), SECURE, tmp_path)
    plan = StudyPlan(SECURE)
    first = plan.next_request()
    assert first is not None
    plan.absorb({site.site_id: site.reply(first) for site in sites})
    request = plan.next_request()
    assert request is not None
    assert all("signature" in announced for announced in (request.secure_aggregation_peers or {}).values())
    return sites, request


def test_swapping_the_other_sites_keys_for_the_coordinators_own_is_refused_by_a_site_with_a_roster(tmp_path: Path) -> None:
    """The man in the middle: site_0 would mask only with keys the coordinator can open."""
    sites, request = signed_start(tmp_path)
    peers = {
        **(request.secure_aggregation_peers or {}),
        "site_1": coordinator_key(request, "site_1"), "site_2": coordinator_key(request, "site_2"),
    }
    refused(
        sites[0].reply(request.model_copy(update={"secure_aggregation_peers": peers})),
        "the run key of site 'site_1' is not signed by that site's identity key",
    )


def test_a_ghost_site_invented_by_the_coordinator_is_refused_by_a_site_with_a_roster(tmp_path: Path) -> None:
    """Sybil: a made-up peer whose key the coordinator holds would let it remove that peer's masks."""
    sites, request = signed_start(tmp_path)
    ghost = Ed25519PrivateKey.generate()
    peers = {"site_0": (request.secure_aggregation_peers or {})["site_0"], "site_9": coordinator_key(request, "site_9", ghost)}
    refused(
        sites[0].reply(request.model_copy(update={"secure_aggregation_peers": peers})),
        "site 'site_9' in the key list is not in this site's roster",
    )


def test_an_old_runs_signed_key_replayed_into_a_new_run_is_refused(tmp_path: Path) -> None:
    """A signature binds a key to its run: one from another run does not verify."""
    sites, request = signed_start(tmp_path)
    old_announcement = dict((request.secure_aggregation_peers or {})["site_1"])
    second = StudyPlan(SECURE)  # a new run with the same sites
    first = second.next_request()
    assert first is not None
    second.absorb({site.site_id: site.reply(first) for site in sites})
    masked = second.next_request()
    assert masked is not None
    assert masked.run_id != request.run_id
    peers = {**(masked.secure_aggregation_peers or {}), "site_1": old_announcement}
    refused(
        sites[0].reply(masked.model_copy(update={"secure_aggregation_peers": peers})),
        "not signed by that site's identity key",
    )


def test_replacing_the_sites_own_key_is_refused() -> None:
    sites, _, request = started()
    peers = {**(request.secure_aggregation_peers or {}), "site_0": {"public_key": public_key_text(new_private_key())}}
    refused(sites[0].reply(request.model_copy(update={"secure_aggregation_peers": peers})), "own key")


def test_stripping_the_masking_from_a_secure_study_is_refused() -> None:
    sites, _, request = started()
    plain = request.model_copy(update={"secure_aggregation_peers": None})
    for site in sites:
        refused(site.reply(plain), "the study's protocol requires secure aggregation")


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_study() -> None:
    strict = DisclosurePolicy(min_cell_count=1, require_secure_aggregation=True)
    site = sites_of(frame_of(3), PLAIN, strict)[0]
    request = StudyPlan(PLAIN).next_request()
    assert request is not None
    assert {"propensity", "crude_cox"} <= set(request.tasks)
    refused(site.reply(request), "this site's policy requires secure aggregation")


def test_asking_for_a_sites_own_fit_in_a_masked_round_is_refused() -> None:
    sites, _, request = started()
    tasks = {**request.tasks, "propensity": {**request.tasks["propensity"], "local_fit": True}}
    refused(sites[0].reply(request.model_copy(update={"tasks": tasks})), "this site's own fit")


def test_a_degenerate_peer_key_with_a_known_shared_secret_is_refused() -> None:
    sites, _, request = started()
    zero = base64.b64encode(bytes(32)).decode()  # a low-order point: X25519 with it gives all zeros
    peers = {**(request.secure_aggregation_peers or {}), "site_2": {"public_key": zero}}
    reply = sites[0].reply(request.model_copy(update={"secure_aggregation_peers": peers}))
    refused(reply, "degenerate X25519 point")


def test_a_masked_round_of_a_run_without_announced_keys_is_refused() -> None:
    sites, _, request = started()
    other_run = request.model_copy(update={"run_id": "f" * 32})
    refused(sites[0].reply(other_run), "holds no secure-aggregation key for run")


def test_a_masked_reply_decoded_alone_does_not_reveal_even_the_number_of_rows() -> None:
    sites, _, request = started()
    site = sites[0]
    reply = site.reply(request)
    plain = flatten(propensity(site.rows, request.tasks["propensity"], 20.0).values, MASKED_FIELDS["propensity"])[0]
    entries = unpack(reply.results["propensity"]["masked"], len(plain) + CHECK_ENTRIES, site.site_id)
    n_entry = entries[len(plain) - 1]
    assert n_entry != encode([float(len(site.rows.treatment))])[0]
    assert not np.isclose(decode([n_entry])[0], len(site.rows.treatment))
