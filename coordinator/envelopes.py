"""The coordinator's envelopes: requests leave signed with its key, replies are verified
against its keyring of site keys before anything decodes them.

A reply must be signed by a key its keyring lists for the site the reply names, and must
answer the very request sent (``in_reply_to`` = SHA-256 of the request envelope): a
captured reply from another round or run is refused. The one exception is an UNSIGNED
error reply made by the transport itself (a ClientApp that could not reach its site
service): it is let through as an error, never with results, so the study fails with the
transport's reason; an attacker able to forge one could as well have dropped the reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto import (
    Keyring,
    is_envelope,
    key_id,
    load_keyring,
    load_private_key,
    open_envelope,
    seal,
)
from shared.errors import InvalidEnvelope, ProtocolError
from shared.protocol.messages import decode_reply

log = logging.getLogger("fedrwe.coordinator")


class CoordinatorEnvelopes:
    """Seal requests, open replies.

    Attributes:
        key_id: the id of the key that signs requests.
        verified: site id -> id of the key that signed its last verified reply.

    ``__slots__``: Prefect never encodes the private key when the object is a task input.
    """

    __slots__ = ("_clock", "_key", "_keyring", "key_id", "verified")

    def __init__(self, key: Ed25519PrivateKey, site_keyring: Keyring, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._keyring = site_keyring
        self._clock = clock
        self.key_id = key_id(key.public_key())
        self.verified: dict[str, str] = {}

    @classmethod
    def load(cls, signing_key: Path, site_keyring: Path) -> CoordinatorEnvelopes:
        """Read the coordinator's private key and its keyring of site keys."""
        return cls(load_private_key(signing_key), load_keyring(site_keyring))

    def seal(self, payload: bytes, lifetime_s: float) -> bytes:
        """A signed request envelope valid for ``lifetime_s`` from now."""
        return seal(payload, self._key, kind="request", lifetime_s=lifetime_s, now=self._clock())

    def open(self, raw: Mapping[int, bytes], sent: bytes) -> dict[int, bytes]:
        """Each node's verified reply payload to the request envelope ``sent``.

        Raises:
            InvalidEnvelope: a reply fails verification (opaque; the reason is logged here).
        """
        request_digest = hashlib.sha256(sent).hexdigest()
        opened: dict[int, bytes] = {}
        for node, data in raw.items():
            try:
                opened[node] = self._open_one(data, request_digest)
            except InvalidEnvelope as error:
                log.warning("reply from node-%d rejected: %s", node, error.detail)
                raise InvalidEnvelope(error.detail, where=f"reply from SuperNode {node}") from None
        return opened

    def _open_one(self, data: bytes, request_digest: str) -> bytes:
        if not is_envelope(data):
            if _unsigned_transport_error(data):
                return data
            raise InvalidEnvelope(detail="unsigned reply with results")
        envelope = open_envelope(data, self._keyring, kind="reply", now=self._clock(), in_reply_to=request_digest)
        try:
            site_id = decode_reply(envelope.payload).site_id
        except ProtocolError:
            return envelope.payload  # signed but unreadable: decode_replies names the node
        if site_id != envelope.owner:
            raise InvalidEnvelope(detail=f"reply names site {site_id!r} but is signed by {envelope.owner!r}")
        self.verified[site_id] = envelope.key_id
        return envelope.payload


def _unsigned_transport_error(data: bytes) -> bool:
    """Whether ``data`` is an error reply made by the transport: status unavailable, no results."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(body, dict) and body.get("status") == "unavailable" and not body.get("results")
