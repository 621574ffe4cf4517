"""An envelope: a payload, signed with a nonce and a validity window.

Wire form (canonical JSON)::

    {"fedrwe_envelope": 1, "kind": "request" | "reply", "payload": <base64>,
     "key_id": <signer's key id>, "nonce": <32 hex>, "issued_at": <epoch s>,
     "expires_at": <epoch s>, "in_reply_to": <sha256 of the request envelope> | null,
     "signature": <base64 Ed25519 over the canonical JSON of every other field>}

``kind`` keeps a reply from passing as a request; ``in_reply_to`` binds a reply to the one
request it answers, so a captured reply cannot answer another round. The payload's own
fields (study_id, run_id, round) are signed with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto.keys import Keyring, key_id
from shared.errors import InvalidEnvelope
from shared.protocol.messages import canonical_json

ENVELOPE_VERSION = 1
DEFAULT_MAX_LIFETIME_S = 24 * 3600.0  # longest validity a receiver accepts
DEFAULT_CLOCK_SKEW_S = 300.0  # how far a sender's clock may run ahead
_DOMAIN = b"fedrwe-envelope-v1\n"  # signatures made for envelopes are valid for nothing else
_FIELDS = frozenset(
    {"fedrwe_envelope", "kind", "payload", "key_id", "nonce", "issued_at", "expires_at", "in_reply_to", "signature"}
)
Kind = Literal["request", "reply"]


@dataclass(frozen=True)
class Opened:
    """A verified envelope: the payload, who signed it and its validity."""

    payload: bytes
    owner: str
    key_id: str
    nonce: str
    issued_at: float
    expires_at: float
    digest: str  # SHA-256 of the whole envelope's bytes


def seal(
    payload: bytes, key: Ed25519PrivateKey, *, kind: Kind, lifetime_s: float, now: float,
    in_reply_to: str | None = None,
) -> bytes:
    """Sign ``payload`` into envelope bytes valid from ``now`` for ``lifetime_s`` seconds."""
    fields: dict[str, Any] = {
        "fedrwe_envelope": ENVELOPE_VERSION,
        "kind": kind,
        "payload": base64.b64encode(payload).decode(),
        "key_id": key_id(key.public_key()),
        "nonce": secrets.token_hex(16),
        "issued_at": round(now, 3),
        "expires_at": round(now + lifetime_s, 3),
        "in_reply_to": in_reply_to,
    }
    signature = key.sign(_DOMAIN + canonical_json(fields))
    return canonical_json({**fields, "signature": base64.b64encode(signature).decode()})


def is_envelope(data: bytes) -> bool:
    """Whether ``data`` claims to be an envelope (says nothing about its validity)."""
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(parsed, dict) and "fedrwe_envelope" in parsed


def _reject(detail: str) -> InvalidEnvelope:
    return InvalidEnvelope(detail=detail)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _reject("not JSON") from None
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise _reject("not an envelope (fields)")
    if fields["fedrwe_envelope"] != ENVELOPE_VERSION:
        raise _reject(f"envelope version {fields['fedrwe_envelope']!r}")
    numbers = (fields["issued_at"], fields["expires_at"])
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        raise _reject("times are not numbers")
    texts = ("kind", "payload", "key_id", "nonce", "signature")
    if not all(isinstance(fields[name], str) for name in texts):
        raise _reject("fields of the wrong type")
    if fields["in_reply_to"] is not None and not isinstance(fields["in_reply_to"], str):
        raise _reject("in_reply_to of the wrong type")
    return fields


def _decode64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _reject(f"{what} is not base64") from None


def open_envelope(
    data: bytes, keyring: Keyring, *, kind: Kind, now: float,
    in_reply_to: str | None = None,
    max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> Opened:
    """Verify envelope bytes and return the payload; any failure is ``InvalidEnvelope``.

    Checks: the form; the kind; a key of ``keyring`` not retired at ``now``; the signature;
    issued no later than ``now + clock_skew_s``; not expired at ``now``; valid for at most
    ``max_lifetime_s``; for a reply, that it answers the request ``in_reply_to``.
    Replays of a nonce are the receiver's to track (``Opened.nonce``, ``expires_at``).
    """
    fields = _parse(data)
    if fields["kind"] != kind:
        raise _reject(f"kind {fields['kind']!r}, expected {kind!r}")
    entry = keyring.valid_key(fields["key_id"], now)
    if entry is None:
        raise _reject(f"key {fields['key_id']!r} is unknown or retired")
    signed = {name: value for name, value in fields.items() if name != "signature"}
    try:
        entry.public_key.verify(_decode64(fields["signature"], "signature"), _DOMAIN + canonical_json(signed))
    except InvalidSignature:
        raise _reject(f"bad signature for key {fields['key_id']!r} ({entry.owner})") from None
    issued, expires = float(fields["issued_at"]), float(fields["expires_at"])
    if issued > now + clock_skew_s:
        raise _reject(f"issued in the future ({issued} > {now} + {clock_skew_s})")
    if now > expires:
        raise _reject(f"expired at {expires} (now {now})")
    if not 0 < expires - issued <= max_lifetime_s:
        raise _reject(f"validity of {expires - issued} s is outside (0, {max_lifetime_s}]")
    if in_reply_to is not None and fields["in_reply_to"] != in_reply_to:
        raise _reject("answers another request")
    return Opened(
        payload=_decode64(fields["payload"], "payload"), owner=entry.owner, key_id=entry.key_id,
        nonce=fields["nonce"], issued_at=issued, expires_at=expires,
        digest=hashlib.sha256(data).hexdigest(),
    )
