"""A study as a Prefect flow: every round is one task run; the statistics run between them.

``run_study(transport, run_config)`` is the ServerApp entrypoint. Run config keys:
``protocol-yaml`` (the protocol text), ``out-dir`` (where results.json and report.html go),
``round-timeout-s`` (default 3600), ``signing-key`` (the coordinator's private key) and
``site-keyring`` (its keyring of site public keys), ``resume`` ("true" continues the run
journaled in ``out-dir``), and in simulation ``truth-path``.

Retries and timeouts sit on the round task (flows/rounds.py). A request is signed once,
before its task runs, so a retried round resends the SAME signed bytes; sites answer a
repeated envelope from their cache (idempotence, see ``site_agent.envelopes``), and
replies to the earlier push are discarded by the transport. Replies are verified before
they are decoded. Sites that drop out are handled by the quorum rules of
coordinator/participation.py; every completed round is journaled (coordinator/journal.py).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.runtime import flow_run as prefect_flow_run

from coordinator.envelopes import CoordinatorEnvelopes
from coordinator.flower_server import FlowerTransport
from coordinator.journal import RoundJournal
from coordinator.participation import Participation, attempt_run_id
from coordinator.plan import StudyPlan
from coordinator.report import write_report
from coordinator.results import comparison_results, study_results, write_results
from flows.rounds import RoundRunner
from shared.errors import (
    FedRWEError,
    InsufficientSites,
    ProtocolError,
    SettingsError,
    TransportError,
)
from shared.protocol.model import StudyProtocol, parse_protocol

DEFAULT_ROUND_TIMEOUT_S = 3600.0  # equals the ClientApp's service timeout


def run_comparison(
    runner: RoundRunner, study: StudyProtocol, comparison: str | None, run_id: str, participation: Participation,
) -> tuple[StudyPlan, list[dict[str, Any]]]:
    """Run one comparison's rounds to the end; its final plan and every round's record.

    A site that drops out in the first round is left out and the rounds go on; later, the
    comparison restarts from its first round on the remaining sites (a new attempt), as
    long as the protocol's quorum holds (coordinator/participation.py).

    Raises:
        InsufficientSites: the quorum no longer holds.
    """
    rounds: list[dict[str, Any]] = []
    sites: list[str] | None = None
    attempt = 1
    while True:
        plan = StudyPlan(study, comparison, run_id=attempt_run_id(run_id, comparison, attempt),
                         participants=sites, attempt=attempt)
        restart = False
        while (request := plan.next_request()) is not None:
            outcome = runner.exchange(request)
            rounds.append(outcome.record)
            answered = outcome.ok()
            if failed := outcome.failed():  # only sites taking part: a restart always has fewer
                participation.drop(comparison, request.round_name, failed)
                participation.check(comparison, sorted(answered))
                if plan.rounds_absorbed > 0:  # a fit holds sums over the old sites: start again
                    sites, attempt, restart = sorted(answered), attempt + 1, True
                    print(f"{request.round_name}: {sorted(failed)} dropped out; restarting on {sites}")
                    break
            if plan.rounds_absorbed == 0:
                participation.check(comparison, sorted(answered))
            plan.absorb(answered)
        if not restart:
            return plan, rounds


def run_comparisons(
    runner: RoundRunner, study: StudyProtocol, run_id: str,
) -> list[tuple[str | None, dict[str, Any]]]:
    """Every comparison of the study, one after the other, each with its own rounds.

    With several comparisons, one that fails (a site error, no estimate, a broken quorum)
    is recorded with its error and the others still run; a transport failure stops the
    study. A protocol with one comparison fails as a whole.
    """
    participation = Participation(study.study_id, study.quorum)
    outcomes: list[tuple[str | None, dict[str, Any]]] = []
    for comparison in study.comparison_ids():
        try:
            plan, rounds = run_comparison(runner, study, comparison, run_id, participation)
            result = comparison_results(plan, rounds)
            result["participation"] = {
                "sites": sorted(plan.sites), "attempts": plan.attempt, "dropped": participation.of(comparison),
                "note": "every analysis of this comparison uses exactly these sites",
            }
            outcomes.append((comparison, result))
        except FedRWEError as error:
            if comparison is None or isinstance(error, TransportError):
                raise
            print(f"comparison {comparison}: failed: {error}")
            outcomes.append((comparison, {"error": f"{type(error).__name__}: {error}",
                                          "participation": {"dropped": participation.of(comparison)}}))
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
    resume: bool = False, submitted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the study's comparisons round by round, then write results.json and report.html.

    Every completed round is journaled in ``out_dir/journal``; with ``resume`` the run
    recorded there continues (same run id, journaled rounds replayed, coordinator/journal.py).
    ``signing_key``/``site_keyring`` are paths (keys are loaded here, never stored by Prefect).
    ``submitted`` is the run config as submitted, kept in the journal for a resume.
    """
    out = Path(out_dir)
    if resume:
        journal = RoundJournal.resume(out, protocol.study_id, protocol.sha256())
    else:
        journal = RoundJournal.start(out, protocol.study_id, protocol.sha256(), uuid.uuid4().hex, submitted)
    envelopes = coordinator_envelopes(signing_key, site_keyring)
    runner = RoundRunner(transport, timeout_s, envelopes, journal)
    try:
        comparisons = run_comparisons(runner, protocol, journal.run_id)
    except FedRWEError as error:  # the study failed (a crash never gets here: it stays "running")
        journal.fail(f"{type(error).__name__}: {error}")
        raise
    extra: dict[str, Any] = {
        "site_approvals": runner.approvals, "envelopes": envelope_provenance(envelopes, runner.verified),
        "quorum": protocol.quorum.model_dump(mode="json"),
    }
    truth = None
    if truth_path:
        truth = json.loads(Path(truth_path).read_text(encoding="utf-8"))
        extra["simulation"] = {"truth_path": truth_path, "note": "synthetic data with planted truth"}
    extra["orchestration"] = {"prefect_flow_run_id": str(prefect_flow_run.id), "resumed": resume,
                              "rounds_replayed": journal.replayed if resume else 0}
    results = study_results(protocol, journal.run_id, comparisons, extra)
    write_results(out / "results.json", results)
    write_report(out / "report.html", results, truth)
    journal.complete()
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


def envelope_provenance(envelopes: CoordinatorEnvelopes | None, verified: dict[str, str]) -> dict[str, Any]:
    """What results.json says about signing: the coordinator's key and each site's verified key."""
    if envelopes is None:
        return {"signed": False}
    return {"signed": True, "coordinator_key_id": envelopes.key_id, "site_key_ids": dict(sorted(verified.items()))}


def flow_run_name(protocol: StudyProtocol, run_config: dict[str, Any], resume: bool) -> str:
    """The flow run's name in the Prefect UI: study, comparisons, Flower run, resumed or not."""
    count = len(protocol.comparison_ids())
    name = f"{protocol.study_id} ({count} comparison{'s' if count != 1 else ''})"
    if run_config.get("flower-run-id"):
        name += f" flower-run {run_config['flower-run-id']}"
    return name + (" resumed" if resume else "")


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
    resume = str(run_config.get("resume", "false")).lower() == "true"
    try:
        submitted = {key: value for key, value in run_config.items() if key not in ("resume", "flower-run-id")}
        named = study_flow.with_options(flow_run_name=flow_run_name(protocol, run_config, resume))
        return named(transport, protocol, out_dir, timeout_s, truth_path, *keys, resume=resume, submitted=submitted)
    except Exception as error:
        failure = Path(out_dir) / "error.txt"
        failure.parent.mkdir(parents=True, exist_ok=True)
        reason = str(error) if isinstance(error, FedRWEError) else f"internal error: {error!r}"
        failure.write_text(f"{type(error).__name__}: {reason}\n", encoding="utf-8")
        raise
