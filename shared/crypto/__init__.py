"""Signed envelopes between the coordinator and the sites (Ed25519, ``cryptography``).

    key = generate_key(); save_private_key(key, path)       # once, per party
    keyring = Keyring(); keyring.add("coordinator", key.public_key())
    data = seal(payload, key, kind="request", lifetime_s=600, now=time.time())
    opened = open_envelope(data, keyring, kind="request", now=time.time())

Every verification failure raises one opaque ``InvalidEnvelope`` ("envelope rejected");
the reason is kept on the exception (``detail``) for the receiver's own log only.
"""

from shared.crypto.envelope import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_LIFETIME_S,
    Opened,
    is_envelope,
    open_envelope,
    seal,
)
from shared.crypto.keys import (
    Keyring,
    KeyringEntry,
    generate_key,
    key_id,
    load_keyring,
    load_private_key,
    save_private_key,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW_S",
    "DEFAULT_MAX_LIFETIME_S",
    "Keyring",
    "KeyringEntry",
    "Opened",
    "generate_key",
    "is_envelope",
    "key_id",
    "load_keyring",
    "load_private_key",
    "open_envelope",
    "save_private_key",
    "seal",
]
