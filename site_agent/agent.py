"""The site agent's request handling: decode, build or reuse the dataset, compute, guard, log.

Transport-free, so it can be driven by the HTTP service (production and simulation) and by
tests directly. Replies are idempotent per request: a retried round gets the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.sql import SparkSession

from shared.errors import (
    DisclosureRefused,
    FedRWEError,
    NotAParticipant,
    NotApproved,
    ProtocolError,
)
from shared.omop import STUDY_TABLES
from shared.privacy.masked_tasks import KEY_TASK
from shared.protocol.messages import (
    RoundReply,
    RoundRequest,
    canonical_json,
    decode_request,
    is_ping,
)
from shared.protocol.model import StudyProtocol, parse_protocol
from shared.protocol.task_params import check_task_params
from shared.stats.cox import EventTable
from site_agent.analyses.adjusted import adjusted, weighted_cox
from site_agent.analyses.counts import arm_summary, attrition
from site_agent.analyses.cox import crude_cox
from site_agent.analyses.large_scale import (
    ConceptFeatures,
    concept_counts,
    read_features,
    with_concepts,
)
from site_agent.analyses.propensity import propensity
from site_agent.analyses.release import Release
from site_agent.analyses.rows import AnalysisRows, analysis_rows
from site_agent.analyses.tables import event_table
from site_agent.approval import approval_store
from site_agent.audit.delta_log import DeltaAuditLog
from site_agent.cohort.store import AnalysisDataset, DatasetStore
from site_agent.data.delta import DeltaBackend, OmopTables
from site_agent.data.spark import start_spark
from site_agent.disclosure.differencing import CohortRegistry
from site_agent.disclosure.guard import compute_tasks, guarded
from site_agent.disclosure.ledger import RequestLedger
from site_agent.disclosure.policy_checks import (
    check_cohort_size,
    check_design,
    refused_task,
    restrict_parts,
)
from site_agent.secure_aggregation import from_settings
from site_agent.settings import SiteSettings

log = logging.getLogger("fedrwe.site")

_MAX_CACHED_REPLIES = 256


@dataclass
class _StudyState:
    protocol: StudyProtocol
    dataset: AnalysisDataset
    events: EventTable
    _rows: AnalysisRows | None = None
    _features: ConceptFeatures | None = None
    _with_concepts: dict[tuple[str, ...], AnalysisRows] = field(default_factory=dict)

    @property
    def rows(self) -> AnalysisRows:
        """The rows as arrays, read from Spark on first use."""
        if self._rows is None:
            self._rows = analysis_rows(self.dataset.frame, self.protocol)
        return self._rows

    @property
    def features(self) -> ConceptFeatures:
        """The large-scale covariates' (person, concept) pairs, read from Spark on first use."""
        if self._features is None:
            if self.dataset.features is None:
                raise ProtocolError(
                    f"study {self.protocol.study_id!r} has no large_scale_covariates, yet a round asks "
                    f"for concepts. Fix: run the same protocol and fedrwe version everywhere."
                )
            self._features = read_features(self.dataset.features)
        return self._features

    def rows_with(self, params: dict[str, Any], min_cell_count: int) -> AnalysisRows:
        """The rows with the round's large-scale concept columns (``params['concepts']``), if any."""
        columns = params.get("concepts") or []
        if not columns:
            return self.rows
        key = tuple(columns)
        if key not in self._with_concepts:  # one design per study: the concept list is fixed in a run
            self._with_concepts = {key: with_concepts(self.rows, self.features, list(columns), min_cell_count)}
        return self._with_concepts[key]


_ALWAYS_ALLOWED = frozenset({"provenance", "attrition", "arm_summary"})
CONCEPT_TASK = "large_scale_concepts"  # the summary round's release of large-scale concepts
_TASKS_OF_ANALYSIS = {
    "crude": {"crude_cox"}, "propensity": {"propensity"},
    **{name: {"adjusted", "weighted_cox"} for name in ("matched", "iptw_ate", "iptw_att", "overlap")},
}


def allowed_tasks(protocol: StudyProtocol) -> frozenset[str]:
    """The partial computations a protocol's analyses need; nothing else runs."""
    allowed = _ALWAYS_ALLOWED.union(*(_TASKS_OF_ANALYSIS[name] for name in protocol.analyses))
    if protocol.secure_aggregation:
        allowed |= {KEY_TASK}
    return allowed | {CONCEPT_TASK} if protocol.large_scale_covariates is not None else allowed


class SiteAgent:
    """One site: owns the SparkSession, the study datasets and the release log."""

    def __init__(self, settings: SiteSettings, spark: SparkSession | None = None) -> None:
        self.settings = settings
        self.site_id = settings.site_id
        self._owns_spark = spark is None
        self.spark = spark or start_spark(settings.spark, f"fedrwe-site-{settings.site_id}")
        backend = DeltaBackend(self.spark, settings.site_id)
        self._tables = OmopTables(backend, settings.lake, settings.site_id)
        self._store = DatasetStore(backend, self._tables, settings.workdir, settings.site_id)
        self._audit = DeltaAuditLog(settings.workdir / "audit")
        self._ledger = RequestLedger(settings.workdir / "disclosure" / "ledger.json", settings.site_id)
        self._cohorts = CohortRegistry(settings.workdir / "disclosure" / "cohorts", settings.site_id)
        self._rng = np.random.default_rng()  # OS entropy: the noise must not be reproducible off-site
        self._approvals = approval_store(settings.workdir)
        self._states: dict[str, _StudyState] = {}
        self._replies: dict[str, bytes] = {}
        self._secure = from_settings(settings.site_id, settings.secure_aggregation)
        self._lock = threading.Lock()

    def missing_tables(self) -> list[str]:
        """What is wrong with the site's OMOP tables right now (empty when all are present)."""
        problems = []
        for name in STUDY_TABLES:
            try:
                self._tables.version(name)
            except FedRWEError as error:
                problems.append(str(error))
        return problems

    def record(self, **fields: object) -> None:
        """Append a decision taken outside ``handle`` (e.g. a rejected envelope) to the audit log."""
        self._audit.append(site_id=self.site_id, **fields)

    def close(self) -> None:
        """Stop Spark if this agent started it."""
        if self._owns_spark:
            self.spark.stop()

    def handle(self, payload: bytes) -> bytes:
        """Answer one request (bytes in, bytes out); never raises.

        One request at a time, whatever its study: the service answers each HTTP request on
        a thread of its own, and several studies' rounds arrive at once when one coordinator
        runs several studies. This lock (and the envelope gate's around it) keeps the reply
        cache, the per-study state (``_states``), the Spark work and the Delta writes under
        the workdir, the request ledger, the cohort registry and the hash-chained audit log
        (one Delta commit per row, each naming the previous) in one order. Concurrent studies
        therefore queue at the site (docs/reliability.md, "Load"); narrowing this lock needs
        per-study locks around the study's dataset and a lock around every shared store.
        """
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            cached = self._replies.get(digest)
            if cached is not None:  # a retried round: the same bytes again, and on record
                self._audit.append(
                    site_id=self.site_id, request_sha256=digest, decision="replayed",
                    reply_sha256=hashlib.sha256(cached).hexdigest(),
                )
                return cached
            reply, cacheable = self._answer(payload, digest)
            if not cacheable:  # refused for lack of approval: once approved, the same bytes may run
                return reply
            if len(self._replies) >= _MAX_CACHED_REPLIES:
                self._replies.pop(next(iter(self._replies)))
            self._replies[digest] = reply
            return reply

    def _answer(self, payload: bytes, digest: str) -> tuple[bytes, bool]:
        request: RoundRequest | None = None
        withheld: dict[str, int] = {}
        approval = self._automatic_approval()
        cacheable = True
        suppressed: list[str] = []
        released_sha256: str | None = None
        try:
            if is_ping(payload):
                ping = RoundReply(status="ok", site_id=self.site_id, results={"ping": "pong"}, approval=approval)
                return ping.to_bytes(), True
            request = decode_request(payload)
            self._check_participant(request)
            approval = self._approval(request)
            released = guarded(lambda: self._compute(request), self.settings.policy, self.site_id, self._rng)
            reply = RoundReply(
                status="ok", site_id=self.site_id, study_id=request.study_id,
                round_name=request.round_name, results=self._secure.protect(request, released.values),
            )
            withheld = released.withheld  # parts withheld for small counts: values stay in the log
            suppressed = released.suppressed
            released_sha256 = hashlib.sha256(canonical_json(released.values)).hexdigest()
            decision = "suppressed" if suppressed else "released" if not withheld else "released with parts withheld"
        except NotAParticipant as refusal:
            reply = self._failure("refused", request, str(refusal))
            decision = "refused: not a participant of this run"
        except NotApproved as refusal:
            reply = self._failure("refused", request, self._named(refusal))
            decision = "refused: protocol not approved"
            cacheable = False
        except DisclosureRefused as refusal:
            withheld = refusal.counts  # the small counts themselves stay in the site's log
            reply = self._failure("refused", request, self._named(refusal))
            decision = "refused"
        except FedRWEError as error:
            reply = self._failure("error", request, self._named(error))
            decision = "error"
        except Exception:  # a bug or an engine failure: details stay in the site's log
            log.exception("site %s: unexpected failure (ref %s)", self.site_id, digest[:12])
            reply = self._failure(
                "error", request,
                f"site {self.site_id!r}: internal error (ref {digest[:12]}); the details are in the "
                f"site agent's log, which only the site can read. Fix: ask the site's IT to look it up.",
            )
            decision = "error"
        encoded = reply.model_copy(update={"approval": approval}).to_bytes()
        self._audit.append(
            site_id=self.site_id,
            study_id=request.study_id if request else None,
            round_name=request.round_name if request else None,
            request_sha256=digest,
            decision=decision,
            reply_sha256=hashlib.sha256(encoded).hexdigest(),
            reason=reply.error,
            withheld=withheld,
            suppressed=suppressed,
            released_sha256=released_sha256,
        )
        return encoded, cacheable

    def _check_participant(self, request: RoundRequest) -> None:
        """A run that restarted without this site (it dropped out) gets nothing computed."""
        if request.participants is not None and self.site_id not in request.participants:
            raise NotAParticipant(
                f"site {self.site_id!r}: run {request.run_id} of study {request.study_id!r} continues "
                f"with sites {request.participants} only (this site dropped out of it); nothing was "
                f"computed. Fix: none needed; the next run of the study includes this site again."
            )

    def _named(self, error: Exception) -> str:
        """The error's message, starting with this site's name."""
        message = str(error)
        return message if f"site {self.site_id!r}" in message else f"site {self.site_id!r}: {message}"

    def _failure(self, status: str, request: RoundRequest | None, message: str) -> RoundReply:
        return RoundReply(
            status=status,  # type: ignore[arg-type]
            site_id=self.site_id,
            study_id=request.study_id if request else None,
            round_name=request.round_name if request else None,
            error=message,
        )

    def _automatic_approval(self) -> dict[str, str] | None:
        """What every reply says in auto mode (simulation only); None under a steward."""
        if self.settings.approval.mode != "auto":
            return None
        return {"mode": "auto", "note": "approved automatically (approval mode 'auto': simulation only)"}

    def _approval(self, request: RoundRequest) -> dict[str, str] | None:
        """The approval of the request's whole protocol; a refusal names the study, hash and fix.

        Checked before any data is touched. The refused protocol is recorded as pending so the
        steward can review it (`fedrwe site pending`).
        """
        protocol = self._whole_protocol(request)
        automatic = self._automatic_approval()
        if automatic is not None:
            return automatic
        sha = protocol.sha256()
        approval = self._approvals.approval_for(protocol.study_id, sha)
        if approval is None:
            self._approvals.record_pending(protocol)
            raise NotApproved(
                f"site {self.site_id!r}: study {protocol.study_id!r} (protocol sha256 {sha}) is not "
                f"approved by the site's data steward. Fix: the steward reviews it and runs "
                f"`fedrwe site approve {protocol.study_id} --sha256 {sha} --config <site.toml>`, "
                f"then the study is run again."
            )
        return {"mode": "steward", "approved_by": approval.approved_by,
                "approved_at": approval.approved_at, "sha256": approval.sha256}

    def _whole_protocol(self, request: RoundRequest) -> StudyProtocol:
        """The request's whole protocol, checked against its announced hash and study id."""
        protocol = parse_protocol(request.protocol, f"in request {request.round_name!r}")
        if protocol.sha256() != request.protocol_sha256:
            raise ProtocolError(
                f"site {self.site_id!r}: the protocol in round {request.round_name!r} hashes to "
                f"{protocol.sha256()}, not the announced {request.protocol_sha256}. Fix: resend "
                f"the study from an unmodified protocol."
            )
        if protocol.study_id != request.study_id:
            raise ProtocolError(
                f"site {self.site_id!r}: request for study {request.study_id!r} carries the protocol "
                f"of study {protocol.study_id!r}. Fix: resend the study from its own protocol."
            )
        return protocol

    def _protocol(self, request: RoundRequest) -> StudyProtocol:
        """The request's comparison of its protocol; the whole protocol checked (see
        ``_whole_protocol``) and its tasks limited to what its analyses need."""
        protocol = self._whole_protocol(request)
        allowed = allowed_tasks(protocol)
        refused = sorted(set(request.tasks) - allowed)
        if refused:
            raise ProtocolError(
                f"site {self.site_id!r}: task(s) {refused} are not part of study "
                f"{protocol.study_id!r} (its analyses allow {sorted(allowed)}). Fix: add the "
                f"analysis to the protocol, which the site must then approve again."
            )
        return protocol.resolve(request.comparison)

    def _state(self, protocol: StudyProtocol) -> _StudyState:
        """The study's dataset and tables; a new cohort passes the cohort checks before any use."""
        dataset = self._store.get(protocol)
        state = self._states.get(protocol.study_id)
        if state is None or state.dataset.key != dataset.key:
            state = _StudyState(protocol, dataset, event_table(dataset.frame))
            self._check_cohort(protocol.study_id, state.rows.person_id)
            self._states[protocol.study_id] = state
        return state

    def _check_cohort(self, study_key: str, person_id: np.typing.NDArray[np.int64]) -> None:
        """min_cohort_size, then the differencing guard (docs/privacy.md); nothing released yet."""
        policy = self.settings.policy
        check_cohort_size(len(person_id), policy, self.site_id, study_key)
        self._cohorts.check_and_record(study_key, person_id, policy.min_cell_count)

    def _compute(self, request: RoundRequest) -> dict[str, Release]:
        protocol = self._protocol(request)
        check_task_params(request.tasks)
        self._secure.check(request, protocol, self.settings.policy)
        self._ledger.admit(protocol.study_id, hashlib.sha256(request.to_bytes()).hexdigest(), self.settings.policy)
        state = self._state(protocol)
        limit = self.settings.policy.max_abs_coefficient
        policy = self.settings.policy
        min_cell_count = policy.min_cell_count
        partials = {
            "attrition": lambda params: attrition(state.dataset.attrition, min_cell_count),
            "arm_summary": lambda params: arm_summary(state.events),
            "crude_cox": lambda params: crude_cox(state.events, params, limit),
            "propensity": lambda params: propensity(self._design(state, "propensity", params), params, limit),
            "adjusted": lambda params: restrict_parts(adjusted(
                self._design(state, "adjusted", params), protocol, params, limit, min_cell_count,
                event_tables=policy.event_tables and bool(params.get("event_tables", True)),
                grid_days=policy.grid_days(),  # the policy's grid: a request cannot make it finer
            ), policy, self.site_id),
            "weighted_cox": lambda params: restrict_parts(weighted_cox(
                self._design(state, "weighted_cox", params["propensity"]), protocol, params, limit,
            ), policy, self.site_id),
            KEY_TASK: lambda params: self._secure.key_release(request),
            CONCEPT_TASK: lambda params: concept_counts(state.features, len(state.rows.person_id), min_cell_count),
            "provenance": lambda params: Release({
                "input_versions": state.dataset.input_versions,
                "dataset_version": state.dataset.delta_version,
                "dataset_rebuilt": state.dataset.rebuilt,
                "cohort_seconds": state.dataset.build_seconds,
                "event_tables_allowed": policy.event_tables,
                "time_grid": policy.time_grid,
            }),
        }
        return compute_tasks({name: self._allowed(name, partial) for name, partial in partials.items()}, request.tasks)

    def _allowed(self, task: str, partial: Callable[[dict[str, Any]], Release]) -> Callable[[dict[str, Any]], Release]:
        """``partial``, or one refusing the task when the policy's allowed_analyses exclude it."""
        reason = refused_task(task, self.settings.policy, self.site_id)
        if reason is None:
            return partial

        def refuse(params: dict[str, Any]) -> Release:
            raise DisclosureRefused(reason)
        return refuse

    def _design(self, state: _StudyState, task: str, params: dict[str, Any]) -> AnalysisRows:
        """The PS model's rows for ``task``, checked against the policy's model limits."""
        rows = state.rows_with(params, self.settings.policy.min_cell_count)
        names = ["intercept", *state.protocol.covariate_columns(), *(params.get("concepts") or [])]
        check_design(task, rows.design, names, self.settings.policy, self.site_id)
        return rows

