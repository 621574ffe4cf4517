"""One round, sent and collected: the Prefect task, its retries, and the journal around it.

``exchange_round`` is the Prefect task (one task run per round, named after the round):
it sends the request to every connected SuperNode not known to be unreachable, verifies
the replies, and sorts them into answers and unreachable sites. A site is unreachable
when its node did not reply within the timeout, when the transport answered for it
(status ``unavailable``: its ClientApp could not reach the site service, or Flower
reported the node gone) or when a site taking part is no longer connected. While retries
are left the task then fails with a ``TransportError``, and Prefect runs it again: the
same signed bytes go out, sites that answered already answer from their cache, and a
site that came back answers too. On its last attempt the task returns the outcome with
the unreachable sites named; the study flow decides what happens (coordinator/participation.py).

``RoundRunner`` sends each request through the task and journals the outcome
(coordinator/journal.py), or, when a run resumes, answers from the journal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import task_run as prefect_task_run

from coordinator.envelopes import CoordinatorEnvelopes
from coordinator.flower_server import FlowerTransport
from coordinator.journal import RoundJournal
from coordinator.participation import UNAVAILABLE
from shared.crypto import is_envelope
from shared.errors import NoReply, ProtocolError, SettingsError, SiteError, TransportError
from shared.protocol.messages import RoundReply, RoundRequest, decode_reply

ROUND_RETRIES = 2
RETRY_DELAY_S = 2.0
ENVELOPE_MARGIN_S = 300.0


def request_lifetime_s(timeout_s: float) -> float:
    """How long a signed request stays valid: every attempt of its round, plus a margin."""
    return timeout_s * (ROUND_RETRIES + 1) + ENVELOPE_MARGIN_S


@dataclass
class RoundOutcome:
    """What one round brought back.

    Attributes:
        replies: site id -> its reply (ok, error or refused) among the sites taking part.
        unreachable: site id (or ``node-N`` for a node that never named its site) -> why.
        nodes: site id -> SuperNode id it answered from.
        verified: site id -> the key id that signed its reply (signed runs).
        record: the round's name, seconds and bytes, as results.json lists rounds.
        lost_nodes: SuperNodes that did not answer with a site's own reply (silent, or
            the transport answered for them): left out of the run's later rounds.
    """

    replies: dict[str, RoundReply]
    unreachable: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    lost_nodes: list[int] = field(default_factory=list)

    def ok(self) -> dict[str, RoundReply]:
        """The replies with results."""
        return {site: reply for site, reply in self.replies.items() if reply.status == "ok"}

    def failed(self) -> dict[str, tuple[str, str]]:
        """Site id -> (status, reason) for every site that did not answer with results."""
        failed = {site: (UNAVAILABLE, reason) for site, reason in self.unreachable.items()}
        for site, reply in self.replies.items():
            if reply.status != "ok":
                failed[site] = (reply.status, reply.error or f"status {reply.status} without a reason")
        return failed

    def to_json(self) -> dict[str, Any]:
        """The outcome as the journal stores it (replies as their canonical JSON)."""
        return {
            "replies": {site: reply.model_dump(mode="json") for site, reply in sorted(self.replies.items())},
            "unreachable": dict(sorted(self.unreachable.items())), "nodes": dict(sorted(self.nodes.items())),
            "verified": dict(sorted(self.verified.items())), "record": self.record,
            "lost_nodes": sorted(self.lost_nodes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundOutcome:
        """The outcome back from the journal."""
        return cls(
            replies={site: RoundReply.model_validate(reply) for site, reply in data["replies"].items()},
            unreachable=dict(data["unreachable"]), nodes={s: int(n) for s, n in data["nodes"].items()},
            verified=dict(data["verified"]), record=dict(data["record"]),
            lost_nodes=[int(node) for node in data["lost_nodes"]],
        )


def _retry_transport_only(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a round when the transport failed, never when a site refused or erred."""
    return isinstance(state.data, TransportError)


def unsigned_only(raw: dict[int, bytes]) -> dict[int, bytes]:
    """An unsigned run's replies; sites answering with envelopes require signed requests."""
    signed = sorted(node for node, data in raw.items() if is_envelope(data))
    if signed:
        raise SettingsError(
            f"SuperNode(s) {signed} answered with signed envelopes: their sites accept only signed "
            f"requests, and this run is unsigned (envelope rejected). Fix: run the study with "
            f"--signing-key (the coordinator's private key) and --site-keyring (the sites' public keys)."
        )
    return raw


def decode_replies(raw: dict[int, bytes]) -> dict[str, RoundReply]:
    """Replies keyed by site id; a garbled reply or a repeated site id is an error."""
    return decode_with_nodes(raw)[0]


def decode_with_nodes(raw: dict[int, bytes]) -> tuple[dict[str, RoundReply], dict[str, int]]:
    """Replies keyed by site id, and the node each came from; a repeated site id is an error."""
    replies: dict[str, RoundReply] = {}
    nodes: dict[str, int] = {}
    for node_id, payload in sorted(raw.items()):
        try:
            reply = decode_reply(payload)
        except ProtocolError as error:
            raise SiteError(f"node-{node_id}", f"sent an unreadable reply: {error}") from None
        if reply.site_id in replies:
            raise ProtocolError(
                f"two SuperNodes answer as site {reply.site_id!r}. Fix: give every site agent "
                f"its own site_id in its settings."
            )
        replies[reply.site_id] = reply
        nodes[reply.site_id] = node_id
    return replies, nodes


def sort_replies(
    request: RoundRequest, replies: dict[str, RoundReply], nodes: dict[str, int],
    silent_nodes: list[int], known_nodes: dict[int, str], timeout_s: float,
) -> RoundOutcome:
    """Answers of the sites taking part, and who could not be reached (see the module doc).

    Once a request names its participants, only they count: a node that is no site of
    theirs (a site left out earlier, an unknown node) is neither an answer nor a loss.
    """
    def counts(site: str) -> bool:
        return request.participants is None or site in request.participants

    outcome = RoundOutcome(replies={})
    for site, reply in replies.items():
        if reply.status == UNAVAILABLE:
            outcome.lost_nodes.append(nodes[site])
            site_id = known_nodes.get(nodes[site], site)
            if counts(site_id):
                outcome.unreachable[site_id] = reply.error or "unreachable"
        elif counts(site):
            answered = (reply.study_id, reply.round_name)
            if reply.status == "ok" and answered != (request.study_id, request.round_name):
                reply = RoundReply(status="error", site_id=site, error=(
                    f"answered {answered} to round {(request.study_id, request.round_name)}. Fix: restart "
                    f"the site service (it holds a stale reply) and resume the study."))
            outcome.replies[site] = reply
            outcome.nodes[site] = nodes[site]
    for node in silent_nodes:
        outcome.lost_nodes.append(node)
        site_id = known_nodes.get(node, f"node-{node}")
        if counts(site_id):
            outcome.unreachable[site_id] = f"no reply within the round's timeout of {timeout_s:g} s"
    for site in request.participants or []:
        if site not in outcome.replies and site not in outcome.unreachable:
            outcome.unreachable[site] = "its SuperNode is not connected to the SuperLink"
    outcome.lost_nodes.sort()
    return outcome


@task(
    name="round",
    cache_policy=NONE,
    retries=ROUND_RETRIES,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=_retry_transport_only,
)
def exchange_round(
    transport: FlowerTransport, request: RoundRequest, timeout_s: float,
    envelopes: CoordinatorEnvelopes | None = None, sealed: bytes | None = None,
    left_out_nodes: frozenset[int] = frozenset(), known_nodes: dict[int, str] | None = None,
) -> RoundOutcome:
    """Send ``request`` (as ``sealed``, its signed envelope, when given) to every connected
    node but ``left_out_nodes``; verify the replies with ``envelopes`` when given.

    Raises:
        TransportError: a site could not be reached and a retry is left (Prefect retries).
    """
    started = time.perf_counter()
    payload = sealed if sealed is not None else request.to_bytes()
    nodes = [node for node in transport.node_ids() if node not in left_out_nodes]
    try:
        raw, silent = transport.exchange(request.round_name, dict.fromkeys(nodes, payload), timeout_s), []
    except NoReply as partial:
        raw, silent = partial.replies, partial.missing
    raw = envelopes.open(raw, payload) if envelopes is not None else unsigned_only(raw)
    replies, by_site = decode_with_nodes(raw)
    outcome = sort_replies(request, replies, by_site, silent, known_nodes or {}, timeout_s)
    if envelopes is not None:
        outcome.verified = {site: envelopes.verified[site] for site in outcome.replies if site in envelopes.verified}
    attempt = prefect_task_run.get_run_count()  # 1, 2, ... inside Prefect; 0 when called directly
    if outcome.unreachable and 0 < attempt <= ROUND_RETRIES:
        raise TransportError(
            f"round {request.round_name!r}: unreachable {outcome.unreachable}; retrying "
            f"(attempt {attempt} of {ROUND_RETRIES + 1})"
        )
    sent = transport.exchanges[-1] if transport.exchanges else {}
    outcome.record = {
        "name": request.round_name,
        "seconds": round(time.perf_counter() - started, 4),
        "bytes_sent": sent.get("bytes_sent", 0),
        "bytes_received": sent.get("bytes_received", 0),
        "bytes_by_site": {
            site: dict(zip(("sent", "received"), sent["bytes_by_node"][node], strict=True))
            for site, node in sorted(by_site.items()) if node in sent.get("bytes_by_node", {})
        },
        "sites": sorted(outcome.replies),
    }
    return outcome


class RoundRunner:
    """Sends a study run's rounds, journals each outcome, replays them on resume.

    Attributes:
        approvals: site id -> the approval its replies state.
        known_nodes: SuperNode id -> the site that answered from it.
    """

    def __init__(
        self, transport: FlowerTransport, timeout_s: float, envelopes: CoordinatorEnvelopes | None,
        journal: RoundJournal | None,
    ) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.envelopes = envelopes
        self.journal = journal
        self.approvals: dict[str, Any] = {}
        self.known_nodes: dict[int, str] = {}
        self.verified: dict[str, str] = {}
        self.lost_nodes: set[int] = set()  # nodes that could not be reached: left out from then on

    def exchange(self, request: RoundRequest) -> RoundOutcome:
        """The outcome of ``request``: from the journal while it lasts, else from the sites."""
        plain = request.to_bytes()
        stored = self.journal.replay(request.round_name, plain) if self.journal is not None else None
        if stored is not None:
            outcome = RoundOutcome.from_json(stored)
            print(f"round {request.round_name}: replayed from the journal")
        else:
            sealed = self.envelopes.seal(plain, request_lifetime_s(self.timeout_s)) if self.envelopes else None
            outcome = exchange_round.with_options(task_run_name=request.round_name)(
                self.transport, request, self.timeout_s, self.envelopes, sealed,
                frozenset(self.lost_nodes), dict(self.known_nodes),
            )
            if self.journal is not None:
                self.journal.record(request.round_name, plain, outcome.to_json())
            lost = f"; unreachable: {sorted(outcome.unreachable)}" if outcome.unreachable else ""
            print(f"round {request.round_name}: {outcome.record['seconds']:.2f} s, {len(outcome.replies)} sites{lost}")
        self.known_nodes.update({node: site for site, node in outcome.nodes.items()})
        self.lost_nodes.update(outcome.lost_nodes)
        self.verified.update(outcome.verified)
        self.approvals.update({site: reply.approval for site, reply in outcome.replies.items() if reply.approval})
        return outcome
