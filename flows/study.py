"""A study as a Prefect flow: every round is one task run; the statistics run between them.

``run_study(transport, run_config)`` is the ServerApp entrypoint. Run config keys:
``protocol-yaml`` (the protocol text), ``out-dir`` (where results.json and report.html go),
``round-timeout-s`` (default 3600), ``signing-key`` (the coordinator's private key) and
``site-keyring`` (its keyring of site public keys), and in simulation ``truth-path``.

Retries and timeouts sit on the transport task only. A request is signed once, before its
task runs, so a retried round resends the SAME signed bytes; sites answer a repeated
envelope from their cache (idempotence, see ``site_agent.envelopes``), and replies to the
earlier push are discarded by the transport. Replies are verified before they are decoded.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run as prefect_flow_run

from coordinator.envelopes import CoordinatorEnvelopes
from coordinator.flower_server import FlowerTransport
from coordinator.plan import StudyPlan
from coordinator.report import write_report
from coordinator.results import comparison_results, study_results, write_results
from shared.crypto import is_envelope
from shared.errors import (
    FedRWEError,
    InsufficientSites,
    ProtocolError,
    SettingsError,
    SiteError,
    TransportError,
)
from shared.protocol.messages import RoundReply, RoundRequest, decode_reply
from shared.protocol.model import StudyProtocol, parse_protocol

DEFAULT_ROUND_TIMEOUT_S = 3600.0  # equals the ClientApp's service timeout
ROUND_RETRIES = 2
ENVELOPE_MARGIN_S = 300.0


def request_lifetime_s(timeout_s: float) -> float:
    """How long a signed request stays valid: every attempt of its round, plus a margin."""
    return timeout_s * (ROUND_RETRIES + 1) + ENVELOPE_MARGIN_S


def _retry_transport_only(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a round when the transport failed, never when a site refused or erred."""
    return isinstance(state.data, TransportError)


def decode_replies(raw: dict[int, bytes]) -> dict[str, RoundReply]:
    """Replies keyed by site id; a garbled reply or a repeated site id is an error."""
    replies: dict[str, RoundReply] = {}
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
    return replies


def _unsigned_only(raw: dict[int, bytes]) -> dict[int, bytes]:
    """An unsigned run's replies; sites answering with envelopes require signed requests."""
    signed = sorted(node for node, data in raw.items() if is_envelope(data))
    if signed:
        raise SettingsError(
            f"SuperNode(s) {signed} answered with signed envelopes: their sites accept only signed "
            f"requests, and this run is unsigned (envelope rejected). Fix: run the study with "
            f"--signing-key (the coordinator's private key) and --site-keyring (the sites' public keys)."
        )
    return raw


@task(
    name="round",
    cache_policy=NONE,
    retries=ROUND_RETRIES,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_transport_only,
)
def exchange_round(
    transport: FlowerTransport, request: RoundRequest, timeout_s: float,
    envelopes: CoordinatorEnvelopes | None = None, sealed: bytes | None = None,
) -> dict[str, RoundReply]:
    """Send ``request`` (as ``sealed``, its signed envelope, when given) to every site and
    return their replies, verified by ``envelopes`` when given (transport only)."""
    payload = sealed if sealed is not None else request.to_bytes()
    raw = transport.exchange(request.round_name, dict.fromkeys(transport.node_ids(), payload), timeout_s)
    raw = envelopes.open(raw, payload) if envelopes is not None else _unsigned_only(raw)
    replies = decode_replies(raw)
    for site_id, reply in replies.items():
        answered = (reply.study_id, reply.round_name)
        if reply.status == "ok" and answered != (request.study_id, request.round_name):
            raise SiteError(
                site_id, f"answered {answered} to round {(request.study_id, request.round_name)}"
            )
    return replies


def run_comparison(
    transport: FlowerTransport, plan: StudyPlan, timeout_s: float,
    envelopes: CoordinatorEnvelopes | None = None, approvals: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run one comparison's rounds to the end; the round records (time, bytes).

    Each site's approval (as its replies state it) is recorded in ``approvals``.
    """
    rounds: list[dict[str, Any]] = []
    while (request := plan.next_request()) is not None:
        started = time.perf_counter()
        sealed = envelopes.seal(request.to_bytes(), request_lifetime_s(timeout_s)) if envelopes else None
        replies = exchange_round.with_options(task_run_name=request.round_name)(
            transport, request, timeout_s, envelopes, sealed
        )
        if approvals is not None:
            approvals.update({site: reply.approval for site, reply in replies.items() if reply.approval})
        plan.absorb(replies)
        record = transport.exchanges[-1]
        rounds.append({
            "name": request.round_name,
            "seconds": round(time.perf_counter() - started, 4),
            "bytes_sent": record["bytes_sent"],
            "bytes_received": record["bytes_received"],
        })
        print(f"round {request.round_name}: {rounds[-1]['seconds']:.2f} s, {len(replies)} sites")
    return rounds


def run_comparisons(
    transport: FlowerTransport, study: StudyProtocol, timeout_s: float, run_id: str,
    envelopes: CoordinatorEnvelopes | None = None, approvals: dict[str, Any] | None = None,
) -> list[tuple[str | None, dict[str, Any]]]:
    """Every comparison of the study, one after the other, each with its own rounds.

    With several comparisons, one that fails (a site error, no estimate) is recorded with
    its error and the others still run; a transport failure stops the study. A protocol
    with one comparison fails as a whole, as before.
    """
    outcomes: list[tuple[str | None, dict[str, Any]]] = []
    for comparison in study.comparison_ids():
        plan = StudyPlan(study, comparison, run_id=run_id)
        try:
            rounds = run_comparison(transport, plan, timeout_s, envelopes, approvals)
            outcomes.append((comparison, comparison_results(plan, rounds)))
        except FedRWEError as error:
            if comparison is None or isinstance(error, TransportError):
                raise
            print(f"comparison {comparison}: failed: {error}")
            outcomes.append((comparison, {"error": f"{type(error).__name__}: {error}"}))
    if all("error" in result for _, result in outcomes):
        raise InsufficientSites(
            f"study {study.study_id!r}: every comparison failed: "
            + "; ".join(f"{cid}: {result['error']}" for cid, result in outcomes)
        )
    return outcomes


@flow(name="fedrwe-study", validate_parameters=False, log_prints=True)
def study_flow(
    transport: FlowerTransport, protocol: StudyProtocol, out_dir: str, timeout_s: float,
    truth_path: str | None = None, signing_key: str | None = None, site_keyring: str | None = None,
) -> dict[str, Any]:
    """Run the study's comparisons round by round, then write results.json and report.html.

    ``signing_key``/``site_keyring`` are paths (keys are loaded here, never stored by Prefect).
    """
    run_id = uuid.uuid4().hex
    envelopes = coordinator_envelopes(signing_key, site_keyring)
    approvals: dict[str, Any] = {}
    comparisons = run_comparisons(transport, protocol, timeout_s, run_id, envelopes, approvals)
    extra: dict[str, Any] = {"site_approvals": approvals, "envelopes": envelope_provenance(envelopes)}
    truth = None
    if truth_path:
        truth = json.loads(Path(truth_path).read_text(encoding="utf-8"))
        extra["simulation"] = {"truth_path": truth_path, "note": "synthetic data with planted truth"}
    extra["orchestration"] = {"prefect_flow_run_id": str(prefect_flow_run.id)}
    results = study_results(protocol, run_id, comparisons, extra)
    out = Path(out_dir)
    write_results(out / "results.json", results)
    write_report(out / "report.html", results, truth)
    return results


def coordinator_envelopes(signing_key: str | None, site_keyring: str | None) -> CoordinatorEnvelopes | None:
    """The coordinator's keys, when both run config paths are given (neither: unsigned)."""
    if not signing_key and not site_keyring:
        return None
    if not signing_key or not site_keyring:
        missing = "signing-key" if not signing_key else "site-keyring"
        raise SettingsError(
            f"run config `{missing}` is missing while the other key setting is given. Fix: pass both "
            f"--signing-key (the coordinator's private key) and --site-keyring (the sites' public keys)."
        )
    return CoordinatorEnvelopes.load(Path(signing_key), Path(site_keyring))


def envelope_provenance(envelopes: CoordinatorEnvelopes | None) -> dict[str, Any]:
    """What results.json says about signing: the coordinator's key and each site's verified key."""
    if envelopes is None:
        return {"signed": False}
    return {"signed": True, "coordinator_key_id": envelopes.key_id, "site_key_ids": dict(envelopes.verified)}


def run_study(transport: FlowerTransport, run_config: dict[str, Any]) -> dict[str, Any]:
    """ServerApp entrypoint: read the run config and run the study flow."""
    text = str(run_config.get("protocol-yaml", ""))
    out_dir = str(run_config.get("out-dir", ""))
    if not text or not out_dir:
        raise ProtocolError(
            "a study run needs run config `protocol-yaml` (the protocol text) and `out-dir`. "
            "Fix: start it with `fedrwe study run PROTOCOL --out DIR`."
        )
    try:
        protocol = parse_protocol(yaml.safe_load(text), "in the run config")
    except yaml.YAMLError as error:
        raise ProtocolError(f"run config `protocol-yaml` is not valid YAML: {error}") from None
    timeout_s = float(run_config.get("round-timeout-s", DEFAULT_ROUND_TIMEOUT_S))
    truth_path = str(run_config.get("truth-path", "")) or None
    keys = (str(run_config.get("signing-key", "")) or None, str(run_config.get("site-keyring", "")) or None)
    try:
        return study_flow(transport, protocol, out_dir, timeout_s, truth_path, *keys)
    except Exception as error:
        failure = Path(out_dir) / "error.txt"
        failure.parent.mkdir(parents=True, exist_ok=True)
        reason = str(error) if isinstance(error, FedRWEError) else f"internal error: {error!r}"
        failure.write_text(f"{type(error).__name__}: {reason}\n", encoding="utf-8")
        raise
