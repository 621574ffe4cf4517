"""The site's envelope gate: every request is verified before anything parses it; every
reply leaves signed. It wraps the ``SiteAgent`` the way a Flower mod wraps a ClientApp.

Replays. A request's nonce is remembered until the request expires (so the set stays
bounded by the longest validity the site accepts, ``max_lifetime_s``):

- the SAME envelope bytes again (a retried round, or an attacker replaying a captured
  request before it expires) get the SAME signed reply back, computed once: idempotence,
  and harmless, since those reply bytes were already on the wire and are bound to that
  request (``in_reply_to``);
- another envelope with a nonce already seen is refused;
- an expired request (e.g. one of an earlier run) is refused by its expiry.

The nonce memory lives in the service process; after a restart a replay inside the
request's validity would be answered again from the same data - the same aggregates,
nothing new released.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto import Keyring, load_keyring, load_private_key, open_envelope, seal
from shared.errors import ENVELOPE_REJECTED, InvalidEnvelope, SettingsError
from shared.protocol.messages import RoundReply
from site_agent.agent import SiteAgent
from site_agent.settings import EnvelopeSettings, SiteSettings

log = logging.getLogger("fedrwe.site")


@dataclass(frozen=True)
class _Seen:
    expires_at: float
    digest: str
    reply: bytes


@dataclass(frozen=True)
class SiteKeys:
    """What the gate needs from the site's settings, loaded (and checked) before Spark starts."""

    keyring: Keyring
    key: Ed25519PrivateKey
    settings: EnvelopeSettings


def load_site_keys(settings: SiteSettings) -> SiteKeys:
    """The site's coordinator keyring and signing key; without them the service must not run."""
    if settings.envelopes is None:
        raise SettingsError(
            f"site {settings.site_id!r}: the site settings have no [envelopes] section, so this "
            f"site could not tell its coordinator's requests from anyone else's. Fix: add "
            f"[envelopes] with `coordinator_keyring` (the coordinator's public keys) and "
            f"`site_key` (this site's private key, made by `fedrwe keys new`)."
        )
    keys = settings.envelopes
    return SiteKeys(load_keyring(keys.coordinator_keyring), load_private_key(keys.site_key), keys)


class EnvelopeGate:
    """Verify, de-duplicate, answer (through the agent) and sign."""

    def __init__(self, agent: SiteAgent, keys: SiteKeys, clock: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self.site_id = agent.site_id
        self._keyring = keys.keyring
        self._key = keys.key
        self._settings = keys.settings
        self._clock = clock
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def handle(self, data: bytes) -> bytes:
        """Answer one request envelope with a signed reply envelope; never raises."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            now = self._clock()
            self._forget_expired(now)
            try:
                opened = open_envelope(
                    data, self._keyring, kind="request", now=now,
                    max_lifetime_s=self._settings.max_lifetime_s, clock_skew_s=self._settings.clock_skew_s,
                )
                seen = self._seen.get(opened.nonce)
                if seen is not None and seen.digest != digest:
                    raise InvalidEnvelope(detail=f"nonce {opened.nonce} already used by another request")
            except InvalidEnvelope as error:
                return self._rejected(digest, error, now)
            if seen is not None:  # the same signed request again: the same signed reply
                self.agent.record(request_sha256=digest, decision="replayed envelope")
                return seen.reply
            reply = self._seal(self.agent.handle(opened.payload), digest, now)
            self._seen[opened.nonce] = _Seen(opened.expires_at, digest, reply)
            return reply

    def _forget_expired(self, now: float) -> None:
        """Drop nonces whose requests have expired: those are refused by their expiry anyway."""
        for nonce in [n for n, seen in self._seen.items() if seen.expires_at < now]:
            del self._seen[nonce]

    def _rejected(self, digest: str, error: InvalidEnvelope, now: float) -> bytes:
        """Log which check failed (here only), audit it, and answer the opaque refusal."""
        log.warning("site %s: request %s rejected: %s", self.site_id, digest[:12], error.detail)
        self.agent.record(request_sha256=digest, decision="envelope rejected", reason=error.detail)
        reply = RoundReply(status="refused", site_id=self.site_id, error=f"site {self.site_id!r}: {ENVELOPE_REJECTED}")
        return self._seal(reply.to_bytes(), digest, now)

    def _seal(self, payload: bytes, request_digest: str, now: float) -> bytes:
        return seal(
            payload, self._key, kind="reply", lifetime_s=self._settings.reply_lifetime_s, now=now,
            in_reply_to=request_digest,
        )
