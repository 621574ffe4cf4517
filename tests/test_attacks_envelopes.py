"""Attacks on the wire and on approval: each tries to run something unauthorised at a site
(or to pass off a reply), and must be refused with the site's tables and datasets untouched.

Real parts: a real SiteAgent (real Spark, real Delta tables) behind the real envelope gate,
real Ed25519 keys in files, the coordinator's real sealing and verification. Only the clock
is a test clock, so expiry and key retirement can be reached without waiting.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pyspark.sql import SparkSession

import shared.crypto.envelope as envelope_module
from coordinator.envelopes import CoordinatorEnvelopes
from coordinator.plan import StudyPlan
from flows.keys import NetworkKeys, make_network_keys
from shared.crypto import generate_key, load_keyring, load_private_key, seal
from shared.errors import ENVELOPE_REJECTED, InvalidEnvelope
from shared.protocol.messages import RoundReply, decode_reply
from shared.protocol.model import StudyProtocol, load_protocol, parse_protocol
from site_agent.agent import SiteAgent
from site_agent.approval import approval_store
from site_agent.envelopes import EnvelopeGate, SiteKeys
from site_agent.settings import ApprovalSettings, DisclosurePolicy, EnvelopeSettings, SiteSettings
from tests.test_cohort_rules import hand_built_site

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")
SITE = "site_t"
LIFETIME_S = 600.0
OPAQUE = f"site {SITE!r}: {ENVELOPE_REJECTED}"


class Clock:
    """The gate's and the coordinator's clock; tests move it forward."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Site:
    """One site behind its gate, the network's keys, and the coordinator's envelopes."""

    gate: EnvelopeGate
    agent: SiteAgent
    keys: NetworkKeys
    coordinator: CoordinatorEnvelopes
    clock: Clock
    lake: Path
    workdir: Path

    def send(self, payload: bytes) -> tuple[bytes, RoundReply]:
        """Seal ``payload`` as the coordinator, pass it through the gate, verify the reply."""
        sealed = self.coordinator.seal(payload, LIFETIME_S)
        answer = self.gate.handle(sealed)
        return sealed, decode_reply(self.coordinator.open({1: answer}, sealed)[1])

    def refusal(self, data: bytes) -> RoundReply:
        """The gate's answer to ``data``, as the coordinator reads it (it is still signed)."""
        answer = self.gate.handle(data)
        return decode_reply(self.coordinator.open({1: answer}, data)[1])

    def decisions(self) -> list[str]:
        log = self.workdir / "audit" / "releases.jsonl"
        return [json.loads(line)["decision"] for line in log.read_text().splitlines()] if log.exists() else []


def make_site(
    root: Path, spark: SparkSession, mode: Literal["steward", "auto"] = "steward",
    old_key: tuple[Ed25519PublicKey, float] | None = None,
) -> Site:
    """A site with fresh keys; ``old_key`` = (a rotated-out coordinator key, seconds from now
    until it retires) is trusted besides the current one."""
    hand_built_site().write(root / "lake")
    keys = make_network_keys(root / "keys", [SITE, "site_u"])
    settings = SiteSettings(
        site_id=SITE, lake=root / "lake", workdir=root / "work",
        policy=DisclosurePolicy(min_cell_count=1), approval=ApprovalSettings(mode=mode),
        envelopes=EnvelopeSettings.model_validate(keys.site_settings(SITE)),
    )
    assert settings.envelopes is not None
    clock = Clock()
    agent = SiteAgent(settings, spark=spark)
    keyring = load_keyring(keys.coordinator_keyring)
    if old_key is not None:
        keyring.add("coordinator", old_key[0], retires_at=clock.now + old_key[1])
    site_keys = SiteKeys(keyring, load_private_key(keys.site_key(SITE)), settings.envelopes)
    coordinator = CoordinatorEnvelopes(load_private_key(keys.coordinator_key), load_keyring(keys.site_keyring), clock)
    return Site(EnvelopeGate(agent, site_keys, clock), agent, keys, coordinator, clock, root / "lake", root / "work")


@pytest.fixture
def site(tmp_path: Path, spark: SparkSession) -> Site:
    made = make_site(tmp_path, spark)
    approval_store(made.workdir).approve(PROTOCOL.study_id, PROTOCOL.sha256(), by="steward")
    return made


def summary_request(protocol: StudyProtocol = PROTOCOL, run_id: str | None = None) -> bytes:
    plan = StudyPlan(protocol) if run_id is None else StudyPlan(protocol, run_id=run_id)
    request = plan.next_request()
    assert request is not None
    return request.to_bytes()


def snapshot(site: Site) -> dict[str, str]:
    """Every file of the site's Delta tables and study datasets, with its content hash."""
    files = [*site.lake.rglob("*"), *(site.workdir / "studies").rglob("*")]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def assert_refused_untouched(site: Site, attack: Callable[[], RoundReply]) -> None:
    """The attack gets the one opaque refusal; tables and datasets stay as they were."""
    before = snapshot(site)
    reply = attack()
    assert reply.status == "refused"
    assert reply.error == OPAQUE
    assert reply.results == {}
    assert snapshot(site) == before
    assert not (site.workdir / "studies").exists()
    assert site.decisions()[-1] == "envelope rejected"


def _edit(data: bytes, **changes: object) -> bytes:
    fields = json.loads(data)
    fields.update(changes)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- the baseline the attacks depart from


def test_a_signed_approved_request_is_answered_and_signed(site: Site) -> None:
    _, reply = site.send(summary_request())
    assert reply.status == "ok", reply.error
    assert reply.results["arm_summary"]["exposed"]["n"] == 3
    assert reply.approval is not None
    assert reply.approval["mode"] == "steward"
    assert reply.approval["approved_by"] == "steward"
    assert (site.workdir / "studies" / PROTOCOL.study_id).exists()
    assert site.coordinator.verified == {SITE: site.coordinator.verified[SITE]}


# ---------------------------------------------------------------- forged or altered requests


def test_attack_forged_signature(site: Site) -> None:
    """An attacker signs with its own key but claims the coordinator's key id."""
    genuine = site.coordinator.seal(summary_request(), LIFETIME_S)
    forged = seal(summary_request(), generate_key(), kind="request", lifetime_s=LIFETIME_S, now=site.clock.now)
    forged = _edit(forged, key_id=json.loads(genuine)["key_id"])
    assert_refused_untouched(site, lambda: site.refusal(forged))


def test_attack_one_byte_of_the_protocol_changed(site: Site) -> None:
    """A man in the middle shortens the washout (365 -> 065) inside a genuinely signed request."""
    sealed = site.coordinator.seal(summary_request(), LIFETIME_S)
    payload = base64.b64decode(json.loads(sealed)["payload"])
    changed = payload.replace(b'"washout_days":365', b'"washout_days":065', 1)
    assert changed != payload
    assert len(changed) == len(payload)
    tampered = _edit(sealed, payload=base64.b64encode(changed).decode())
    assert_refused_untouched(site, lambda: site.refusal(tampered))


def test_attack_unknown_key(site: Site) -> None:
    """A request signed by a key the site never trusted (here: another site's own key)."""
    other = load_private_key(site.keys.site_key("site_u"))
    sealed = seal(summary_request(), other, kind="request", lifetime_s=LIFETIME_S, now=site.clock.now)
    assert_refused_untouched(site, lambda: site.refusal(sealed))


def test_attack_unsigned_request(site: Site) -> None:
    """A plain round request, as fedrwe sent before envelopes: never parsed."""
    assert_refused_untouched(site, lambda: site.refusal(summary_request()))


def test_attack_expired_request(site: Site) -> None:
    sealed = site.coordinator.seal(summary_request(), LIFETIME_S)
    site.clock.now += LIFETIME_S + 1
    assert_refused_untouched(site, lambda: site.refusal(sealed))


def test_attack_a_reply_sent_back_as_a_request(site: Site) -> None:
    """A site-signed envelope is no request, even to a site that trusts that key."""
    reply_env = seal(summary_request(), load_private_key(site.keys.site_key(SITE)),
                     kind="reply", lifetime_s=LIFETIME_S, now=site.clock.now)
    assert_refused_untouched(site, lambda: site.refusal(reply_env))


# ---------------------------------------------------------------- replays


def test_attack_replay_of_an_old_request_of_an_earlier_run(site: Site) -> None:
    """Run A's request, captured. Inside its validity a replay gets the very same signed bytes
    back (idempotence, nothing recomputed); after it expires the replay is refused."""
    sealed = site.coordinator.seal(summary_request(run_id="a" * 32), LIFETIME_S)
    first = site.gate.handle(sealed)
    assert decode_reply(site.coordinator.open({1: first}, sealed)[1]).status == "ok"
    released = site.decisions().count("released")
    assert site.gate.handle(sealed) == first
    assert site.decisions().count("released") == released
    assert site.decisions()[-1] == "replayed envelope"
    before = snapshot(site)
    site.clock.now += LIFETIME_S + 1  # run B starts later; run A's request has expired
    reply = site.refusal(sealed)
    assert (reply.status, reply.error) == ("refused", OPAQUE)
    assert snapshot(site) == before
    assert site.decisions()[-1] == "envelope rejected"


def test_attack_nonce_reused_by_another_request(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different requests with one nonce: the second is refused even though the key is good
    (in case the coordinator's nonce source ever failed)."""
    key = load_private_key(site.keys.coordinator_key)
    first = seal(summary_request(run_id="b" * 32), key, kind="request", lifetime_s=LIFETIME_S, now=site.clock.now)
    site.gate.handle(first)
    monkeypatch.setattr(envelope_module.secrets, "token_hex", lambda n=16: json.loads(first)["nonce"])
    second = seal(summary_request(run_id="c" * 32), key, kind="request", lifetime_s=LIFETIME_S, now=site.clock.now)
    assert second != first
    reply = site.refusal(second)
    assert (reply.status, reply.error) == ("refused", OPAQUE)
    assert site.decisions()[-1] == "envelope rejected"


def test_attack_replay_of_a_captured_reply(site: Site) -> None:
    """A reply captured in round 1 is substituted for the site's reply to another request."""
    _, _ = site.send(summary_request(run_id="d" * 32))
    first_sealed = site.coordinator.seal(summary_request(run_id="e" * 32), LIFETIME_S)
    captured = site.gate.handle(first_sealed)
    second_sealed = site.coordinator.seal(summary_request(run_id="f" * 32), LIFETIME_S)
    with pytest.raises(InvalidEnvelope) as caught:
        site.coordinator.open({101: captured}, second_sealed)
    assert str(caught.value) == f"reply from SuperNode 101: {ENVELOPE_REJECTED}"


def test_attack_a_site_answers_in_another_sites_name(site: Site) -> None:
    """site_u signs a reply that claims to come from site_t: refused, site_u's key is not site_t's."""
    sealed = site.coordinator.seal(summary_request(), LIFETIME_S)
    fake = RoundReply(status="ok", site_id=SITE, study_id=PROTOCOL.study_id, round_name="1-summary",
                      results={"arm_summary": {}}).to_bytes()
    signed = seal(fake, load_private_key(site.keys.site_key("site_u")), kind="reply", lifetime_s=60,
                  now=site.clock.now, in_reply_to=hashlib.sha256(sealed).hexdigest())
    with pytest.raises(InvalidEnvelope):
        site.coordinator.open({101: signed}, sealed)


def test_attack_an_unsigned_reply_with_results(site: Site) -> None:
    """Stripping the site's signature and injecting results: refused; only a transport's own
    unsigned error (no results) passes, as an error."""
    sealed = site.coordinator.seal(summary_request(), LIFETIME_S)
    fake = RoundReply(status="ok", site_id=SITE, results={"arm_summary": {"n": 1}}).to_bytes()
    with pytest.raises(InvalidEnvelope):
        site.coordinator.open({101: fake}, sealed)
    error = RoundReply(status="unavailable", site_id=SITE, error="site service unreachable").to_bytes()
    assert site.coordinator.open({101: error}, sealed) == {101: error}
    # a site's own error is signed: an unsigned one is not the transport's, so it is refused
    forged = RoundReply(status="error", site_id=SITE, error="disk full").to_bytes()
    with pytest.raises(InvalidEnvelope):
        site.coordinator.open({101: forged}, sealed)


# ---------------------------------------------------------------- key rotation


def test_attack_a_rotated_out_key_after_its_retirement(tmp_path: Path, spark: SparkSession) -> None:
    """The site trusts the old coordinator key until T and the new one after: the old key's
    requests are answered before T and refused after, the new key's both times."""
    old = generate_key()
    site = make_site(tmp_path, spark, mode="auto", old_key=(old.public_key(), 100.0))
    retire_at = site.clock.now + 100.0

    def by_old(run: str) -> bytes:
        return seal(summary_request(run_id=run * 32), old, kind="request", lifetime_s=LIFETIME_S, now=site.clock.now)

    before_t = site.refusal(by_old("1"))
    assert before_t.status == "ok", before_t.error
    site.clock.now = retire_at + 1
    assert_refused_untouched_after_use(site, lambda: site.refusal(by_old("2")))
    _, by_new = site.send(summary_request(run_id="3" * 32))
    assert by_new.status == "ok", by_new.error


def assert_refused_untouched_after_use(site: Site, attack: Callable[[], RoundReply]) -> None:
    """As ``assert_refused_untouched``, for a site that has already built its dataset."""
    before = snapshot(site)
    reply = attack()
    assert (reply.status, reply.error, reply.results) == ("refused", OPAQUE, {})
    assert snapshot(site) == before
    assert site.decisions()[-1] == "envelope rejected"


# ---------------------------------------------------------------- steward approval


def test_attack_an_unapproved_protocol(tmp_path: Path, spark: SparkSession) -> None:
    """A genuinely signed request for a study the steward never approved: refused before any
    data is read, named with its study, hash and the fix; listed as pending; audited."""
    site = make_site(tmp_path, spark)
    before = snapshot(site)
    _, reply = site.send(summary_request())
    assert reply.status == "refused"
    assert PROTOCOL.study_id in (reply.error or "")
    assert PROTOCOL.sha256() in (reply.error or "")
    assert f"fedrwe site approve {PROTOCOL.study_id}" in (reply.error or "")
    assert reply.results == {}
    assert snapshot(site) == before
    assert not (site.workdir / "studies").exists()
    assert site.decisions()[-1] == "refused: protocol not approved"
    pending = approval_store(site.workdir).pending()
    assert [(p.study_id, p.sha256) for p in pending] == [(PROTOCOL.study_id, PROTOCOL.sha256())]
    assert pending[0].title == PROTOCOL.title
    approval = approval_store(site.workdir).approve(PROTOCOL.study_id, None, by="dr_steward")  # the pending one
    assert approval.sha256 == PROTOCOL.sha256()
    assert approval_store(site.workdir).pending() == []
    _, after = site.send(summary_request())  # a new run (new envelope) now runs
    assert after.status == "ok", after.error
    assert after.approval is not None
    assert after.approval["approved_by"] == "dr_steward"


def test_attack_a_protocol_changed_after_approval(site: Site) -> None:
    """The approved protocol with one change (washout 365 -> 30): a new hash, so refused."""
    data = json.loads(PROTOCOL.canonical_bytes())
    data["washout_days"] = 30
    changed = parse_protocol(data)
    assert changed.study_id == PROTOCOL.study_id
    assert changed.sha256() != PROTOCOL.sha256()
    before = snapshot(site)
    _, reply = site.send(summary_request(changed))
    assert reply.status == "refused"
    assert changed.sha256() in (reply.error or "")
    assert snapshot(site) == before
    assert not (site.workdir / "studies").exists()
    _, approved = site.send(summary_request())
    assert approved.status == "ok", approved.error


def test_auto_approval_says_so_in_every_reply(tmp_path: Path, spark: SparkSession) -> None:
    site = make_site(tmp_path, spark, mode="auto")
    _, reply = site.send(summary_request())
    assert reply.status == "ok", reply.error
    assert reply.approval is not None
    assert reply.approval["mode"] == "auto"
    _, error = site.send(b"not json")
    assert error.status == "error"
    assert error.approval is not None
    assert error.approval["mode"] == "auto"
