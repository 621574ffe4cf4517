"""Pairwise-masked secure sums (the Bonawitz et al. masking, without dropout recovery).

Each site has a fresh X25519 key pair per study run and learns the others' public keys
from the coordinator. For one task of one round, every pair of sites derives a shared
seed (X25519, then HKDF-SHA256 with the run, round, task and both site ids as ``info``)
and expands it with ChaCha20 into a mask vector modulo 2**128. Site ``i`` adds the mask
it shares with every site ``j`` whose id sorts after its own and subtracts the others,
so the masks cancel in the sum over all sites and nothing else: one site's masked vector
is uniformly distributed whatever its values, as long as one other site keeps its key.

Every masked vector ends with two self-check entries: a 1 (the sum counts the sites) and
a checksum ``sum_j r_j x_j mod 2**128`` with public odd weights ``r_j`` derived from the
round. A sum with a missing, repeated or altered entry fails one of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import ProtocolError, SecureAggregationError
from shared.privacy.fixed_point import MODULUS, add, decode, encode, signed
from shared.protocol.messages import canonical_json

WORD_BYTES = 16  # one entry modulo 2**128
CHECK_ENTRIES = 2  # the count of sites and the checksum, after the values
MIN_SITES = 2  # a "sum" over one site would be that site's values
_ZERO_NONCE = bytes(16)  # every seed is used for one vector only, so a fixed nonce is safe


@dataclass(frozen=True)
class MaskContext:
    """What makes a mask one-time: the run, the round and the task it hides."""

    run_id: str
    round_name: str
    task: str

    def label(self) -> bytes:
        return f"fedrwe secure sum v1|{self.run_id}|{self.round_name}|{self.task}".encode()


def new_private_key() -> X25519PrivateKey:
    """A fresh key pair for one study run (kept in the site's memory only)."""
    return X25519PrivateKey.generate()


def public_key_text(private_key: X25519PrivateKey) -> str:
    """The public half as base64 of its 32 raw bytes (what the summary round releases)."""
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_key(text: str, site_id: str) -> X25519PublicKey:
    """A peer's public key from its text; a malformed key names the site."""
    try:
        raw = base64.b64decode(text, validate=True)
        return X25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ProtocolError(
            f"the secure-aggregation public key of site {site_id!r} is not 32 bytes of base64 "
            f"X25519 key. Fix: rerun the study so every site announces a fresh key."
        ) from None


def announcement_bytes(run_id: str, comparison: str | None, site_id: str, public_key: str) -> bytes:
    """What a site signs with its identity key: its X25519 key, bound to the run and to itself."""
    return canonical_json({
        "purpose": "fedrwe secure aggregation key", "run_id": run_id, "comparison": comparison,
        "site_id": site_id, "public_key": public_key,
    })


def _keystream(key: bytes, words: int) -> list[int]:
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(words * WORD_BYTES))
    return [int.from_bytes(stream[i : i + WORD_BYTES], "big") for i in range(0, len(stream), WORD_BYTES)]


def pair_mask(
    private_key: X25519PrivateKey, peer_key: X25519PublicKey, context: MaskContext,
    own_id: str, peer_id: str, length: int,
) -> list[int]:
    """The mask two sites share for ``context`` (the same at both ends)."""
    try:
        shared = private_key.exchange(peer_key)
    except ValueError:  # a low-order point: the "peer" would know the secret
        raise ProtocolError(
            f"the secure-aggregation public key of site {peer_id!r} is a degenerate X25519 point. "
            f"Fix: rerun the study so every site announces a fresh key."
        ) from None
    first, second = sorted((own_id, peer_id))
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None,
        info=context.label() + f"|{first}|{second}".encode(),
    ).derive(shared)
    return _keystream(seed, length)


def check_weights(context: MaskContext, length: int) -> list[int]:
    """Public odd weights of the checksum (odd: any change of one entry changes the checksum)."""
    key = hashlib.sha256(b"fedrwe secure sum check|" + context.label()).digest()
    return [weight | 1 for weight in _keystream(key, length)]


def _checksum(entries: Sequence[int], context: MaskContext) -> int:
    return sum(w * e for w, e in zip(check_weights(context, len(entries)), entries, strict=True)) % MODULUS


def masked_vector(
    values: Sequence[float], own_id: str, private_key: X25519PrivateKey,
    peers: Mapping[str, str], context: MaskContext,
) -> list[int]:
    """``values`` encoded, with the self-check entries, plus this site's pairwise masks."""
    entries = [*encode(values, f"{context.task} values"), 1]
    entries.append(_checksum(entries, context))
    for peer_id, text in sorted(peers.items()):
        if peer_id == own_id:
            continue
        mask = pair_mask(private_key, load_public_key(text, peer_id), context, own_id, peer_id, len(entries))
        sign = 1 if own_id < peer_id else -1
        entries = [(e + sign * m) % MODULUS for e, m in zip(entries, mask, strict=True)]
    return entries


def unmasked_sum(vectors: Sequence[Sequence[int]], context: MaskContext) -> list[float]:
    """The sum of every site's values from their masked vectors, after the self-checks."""
    total = add(vectors)
    *entries, checksum = total
    sites = signed(entries[-1])
    if sites != len(vectors) or _checksum(entries, context) != checksum:
        raise SecureAggregationError(
            f"the masked sum of {context.task!r} in round {context.round_name!r} failed its self-check "
            f"(it counts {sites} sites for {len(vectors)} replies, checksum "
            f"{'ok' if _checksum(entries, context) == checksum else 'wrong'}): a reply was altered, "
            f"repeated or masked for another set of sites. Fix: rerun the study (new keys)."
        )
    return decode(entries[:-1])


def pack(entries: Sequence[int]) -> str:
    """Masked entries as base64 of 16-byte big-endian words (what travels)."""
    return base64.b64encode(b"".join(e.to_bytes(WORD_BYTES, "big") for e in entries)).decode()


def unpack(text: str, length: int, site_id: str) -> list[int]:
    """Masked entries from :func:`pack`'s text; the wrong length names the site."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != length * WORD_BYTES:
        raise SecureAggregationError(
            f"site {site_id!r} sent a masked vector of {len(raw)} bytes, not the {length * WORD_BYTES} "
            f"its layout needs. Fix: run the same fedrwe version at every site."
        )
    return [int.from_bytes(raw[i : i + WORD_BYTES], "big") for i in range(0, len(raw), WORD_BYTES)]
