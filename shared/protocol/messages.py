"""Round requests and replies: what travels between the coordinator and a site.

Both are canonical JSON (sorted keys, no spaces, UTF-8). Floats survive the trip exactly
(Python writes the shortest repr that reads back to the same double).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ProtocolError

MESSAGE_SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest request a site reads (replies may be larger: a Hessian of 1,000 concepts is ~20 MB)."""
_FIX_VERSIONS = "Fix: run the same fedrwe version on the coordinator and every site."
_SHOWN_CHARS = 100
_PING_BYTES = 1024


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        """Canonical bytes; a NaN or infinity anywhere is an error, never a silent null."""
        try:
            return canonical_json(self.model_dump())
        except ValueError as error:
            raise ProtocolError(f"{type(self).__name__} holds a non-finite number: {error}") from None


class RoundRequest(_Message):
    """One round of a study: which partial computations a site runs, with their inputs."""

    schema_version: Literal[1] = MESSAGE_SCHEMA_VERSION
    kind: Literal["study_round"] = "study_round"
    study_id: str
    run_id: str = Field(
        pattern=r"^[0-9a-f]{32}$",
        description="One study run; a retried round repeats it, a new run of the study does not.",
    )
    round_name: str = Field(description="e.g. '1-summary', '2-cox-newton'.")
    round_index: int = Field(ge=1)
    protocol: dict[str, Any] = Field(description="The full protocol, as JSON.")
    protocol_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    comparison: str | None = Field(
        default=None, description="Which of the protocol's comparisons (None: its only one).",
    )
    tasks: dict[str, dict[str, Any]] = Field(description="Partial computation name -> inputs.")
    participants: list[str] | None = Field(
        default=None,
        description=(
            "The sites taking part in this run of the comparison (None: every site that answers). "
            "After a site dropped out the comparison restarts without it; a site not listed "
            "computes nothing and answers 'refused'."
        ),
    )
    secure_aggregation_peers: dict[str, dict[str, str]] | None = Field(
        default=None,
        description=(
            "In a masked round of a study with secure aggregation: every site's announcement for the "
            "run (site id -> {public_key: base64 X25519 key, signature: base64 Ed25519 signature when "
            "the site signs}); the model tasks come back as masked vectors."
        ),
    )


class RoundReply(_Message):
    """A site's answer: the partial results, or why it could not or would not answer."""

    schema_version: Literal[1] = MESSAGE_SCHEMA_VERSION
    status: Literal["ok", "error", "refused", "unavailable"] = Field(
        description=(
            "ok; error or refused: the site's own answer; unavailable: made by the transport when "
            "the site could not be reached (retried, then the site drops out)."
        ),
    )
    site_id: str
    study_id: str | None = None
    round_name: str | None = None
    results: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    approval: dict[str, str] | None = Field(
        default=None,
        description="How the site approved the study: mode 'steward' (who, when, hash) or 'auto' (simulation).",
    )


M = TypeVar("M", bound="_Message")


def canonical_json(data: Any) -> bytes:
    """Canonical bytes of JSON data (also what gets hashed and signed)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _load(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"{what} is {len(payload):,} bytes, more than the {MAX_MESSAGE_BYTES:,} a site reads; "
            f"it was not read. Fix: send a real round request (a protocol and its tasks are far "
            f"smaller); if a study truly needs more, lower large_scale_covariates.max_covariates."
        )
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(
            f"{what} is not JSON ({error}; it starts {_shown(payload[:40])}). Fix: send a round "
            f"request as UTF-8 JSON, as the coordinator does, and check that nothing between it "
            f"and the site changes the bytes."
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"{what} must be a JSON object, got {type(data).__name__} {_shown(data)}. {_FIX_VERSIONS}"
        )
    version = data.get("schema_version")
    if version != MESSAGE_SCHEMA_VERSION:
        raise ProtocolError(
            f"{what} has schema_version {version!r}; this fedrwe speaks {MESSAGE_SCHEMA_VERSION}. "
            f"{_FIX_VERSIONS}"
        )
    return data


def _validate(model: type[M], data: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        fields = "; ".join(
            f"field `{'.'.join(map(str, e['loc']))}`: {e['msg']}"
            + ("" if e["type"] == "missing" else f" (got {_shown(e.get('input'))})")
            for e in error.errors()
        )
        raise ProtocolError(f"{what} is malformed: {fields}. {_FIX_VERSIONS}") from None


def decode_request(payload: bytes) -> RoundRequest:
    return _validate(RoundRequest, _load(payload, "round request"), "round request")


def decode_reply(payload: bytes) -> RoundReply:
    return _validate(RoundReply, _load(payload, "round reply"), "round reply")


def is_ping(payload: bytes) -> bool:
    """True for a health-check request ``{"kind": "ping"}`` (answered without a study)."""
    if len(payload) > _PING_BYTES:  # a ping is tiny: never parse a large body twice
        return False
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == "ping"
