"""shared/crypto: keys, keyrings, envelopes; every failure is one opaque InvalidEnvelope."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto import (
    Keyring,
    generate_key,
    is_envelope,
    key_id,
    load_keyring,
    load_private_key,
    open_envelope,
    save_private_key,
    seal,
)
from shared.errors import ENVELOPE_REJECTED, InvalidEnvelope, SettingsError

NOW = 1_800_000_000.0


@pytest.fixture
def signer() -> tuple[Ed25519PrivateKey, Keyring]:
    key = generate_key()
    keyring = Keyring()
    keyring.add("coordinator", key.public_key())
    return key, keyring


def test_a_sealed_payload_opens_with_its_signer_and_times() -> None:
    key = generate_key()
    keyring = Keyring()
    keyring.add("coordinator", key.public_key())
    data = seal(b'{"x":1}', key, kind="request", lifetime_s=60, now=NOW)
    opened = open_envelope(data, keyring, kind="request", now=NOW + 30)
    assert opened.payload == b'{"x":1}'
    assert (opened.owner, opened.key_id) == ("coordinator", key_id(key.public_key()))
    assert (opened.issued_at, opened.expires_at) == (NOW, NOW + 60)
    assert is_envelope(data)
    assert not is_envelope(b'{"x":1}')
    assert seal(b"x", key, kind="request", lifetime_s=60, now=NOW) != seal(b"x", key, kind="request", lifetime_s=60, now=NOW)


def _tamper(data: bytes, **changes: object) -> bytes:
    fields = json.loads(data)
    fields.update(changes)
    return json.dumps(fields).encode()


def _failures(key: Ed25519PrivateKey) -> dict[str, bytes]:
    good = seal(b"payload", key, kind="request", lifetime_s=60, now=NOW)
    other = generate_key()
    return {
        "garbage": b"\x00\xff not json",
        "missing field": json.dumps({k: v for k, v in json.loads(good).items() if k != "nonce"}).encode(),
        "payload changed": _tamper(good, payload=base64.b64encode(b"payloaD").decode()),
        "nonce changed": _tamper(good, nonce="0" * 32),
        "expiry extended": _tamper(good, expires_at=NOW + 10_000),
        "unknown key": seal(b"payload", other, kind="request", lifetime_s=60, now=NOW),
        "forged with a known key id": _tamper(
            seal(b"payload", other, kind="request", lifetime_s=60, now=NOW), key_id=key_id(key.public_key()),
        ),
        "a reply as a request": seal(b"payload", key, kind="reply", lifetime_s=60, now=NOW),
        "expired": seal(b"payload", key, kind="request", lifetime_s=60, now=NOW - 61),
        "from the future": seal(b"payload", key, kind="request", lifetime_s=60, now=NOW + 3600),
        "too long-lived": seal(b"payload", key, kind="request", lifetime_s=8 * 24 * 3600, now=NOW),
    }


def test_every_failure_is_the_same_opaque_error(signer: tuple[Ed25519PrivateKey, Keyring]) -> None:
    key, keyring = signer
    details = set()
    for name, data in _failures(key).items():
        with pytest.raises(InvalidEnvelope) as caught:
            open_envelope(data, keyring, kind="request", now=NOW)
        assert str(caught.value) == ENVELOPE_REJECTED, name
        details.add(caught.value.detail)
    assert len(details) >= 8  # the receiver's log still knows which check failed


def test_a_reply_must_answer_the_request_it_names(signer: tuple[Ed25519PrivateKey, Keyring]) -> None:
    key, keyring = signer
    reply = seal(b"r", key, kind="reply", lifetime_s=60, now=NOW, in_reply_to="a" * 64)
    assert open_envelope(reply, keyring, kind="reply", now=NOW, in_reply_to="a" * 64).payload == b"r"
    with pytest.raises(InvalidEnvelope):
        open_envelope(reply, keyring, kind="reply", now=NOW, in_reply_to="b" * 64)


def test_a_rotated_out_key_is_valid_until_its_retirement(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    keyring = Keyring()
    keyring.add("coordinator", old.public_key(), retires_at=NOW + 100)
    keyring.add("coordinator", new.public_key())
    keyring.save(tmp_path / "ring.json")
    loaded = load_keyring(tmp_path / "ring.json")
    by_old = seal(b"p", old, kind="request", lifetime_s=600, now=NOW)
    by_new = seal(b"p", new, kind="request", lifetime_s=600, now=NOW)
    assert open_envelope(by_old, loaded, kind="request", now=NOW + 99).payload == b"p"
    with pytest.raises(InvalidEnvelope):
        open_envelope(by_old, loaded, kind="request", now=NOW + 100)
    assert open_envelope(by_new, loaded, kind="request", now=NOW + 500).payload == b"p"


def test_keys_round_trip_and_stay_private(tmp_path: Path) -> None:
    key = generate_key()
    save_private_key(key, tmp_path / "k.pem")
    assert os.stat(tmp_path / "k.pem").st_mode & 0o077 == 0
    assert key_id(load_private_key(tmp_path / "k.pem").public_key()) == key_id(key.public_key())


def test_bad_key_files_are_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(SettingsError, match=r"bad\.pem.*Fix"):
        load_private_key(tmp_path / "bad.pem")
    with pytest.raises(SettingsError, match=r"missing\.pem"):
        load_private_key(tmp_path / "missing.pem")
    ring = Keyring()
    ring.add("site_01", generate_key().public_key())
    ring.save(tmp_path / "ring.json")
    data = json.loads((tmp_path / "ring.json").read_text())
    data["keys"][0]["key_id"] = "0" * 16
    (tmp_path / "ring.json").write_text(json.dumps(data))
    with pytest.raises(SettingsError, match=r"site_01.*key_id"):
        load_keyring(tmp_path / "ring.json")
    data["keys"][0].update(key_id=None, retires_at="2026-01-01T00:00")
    (tmp_path / "ring.json").write_text(json.dumps(data))
    with pytest.raises(SettingsError, match="zone"):
        load_keyring(tmp_path / "ring.json")
