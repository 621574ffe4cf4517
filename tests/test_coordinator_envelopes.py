"""The coordinator's side of envelopes: its key settings, and unsigned runs against signing sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.keys import make_network_keys
from flows.rounds import request_lifetime_s, unsigned_only
from flows.study import coordinator_envelopes, envelope_provenance
from shared.crypto import load_private_key, seal
from shared.errors import SettingsError
from shared.protocol.messages import RoundReply


def test_both_key_settings_or_neither(tmp_path: Path) -> None:
    keys = make_network_keys(tmp_path, ["site_01"])
    assert coordinator_envelopes(None, None) is None
    assert envelope_provenance(None, {}) == {"signed": False}
    with pytest.raises(SettingsError, match="site-keyring"):
        coordinator_envelopes(str(keys.coordinator_key), None)
    envelopes = coordinator_envelopes(str(keys.coordinator_key), str(keys.site_keyring))
    assert envelopes is not None
    assert envelope_provenance(envelopes, {})["coordinator_key_id"] == envelopes.key_id
    with pytest.raises(SettingsError, match=r"keyring .*coordinator\.pem is not JSON"):  # a key is no keyring
        coordinator_envelopes(str(keys.coordinator_key), str(keys.coordinator_key))


def test_a_request_outlives_every_attempt_of_its_round() -> None:
    assert request_lifetime_s(3600.0) > 3 * 3600.0
    assert request_lifetime_s(3600.0) <= 24 * 3600.0  # within the sites' default max validity


def test_an_unsigned_run_against_signing_sites_names_the_fix(tmp_path: Path) -> None:
    keys = make_network_keys(tmp_path, ["site_01"])
    plain = RoundReply(status="error", site_id="site_01", error="x").to_bytes()
    assert unsigned_only({1: plain}) == {1: plain}
    signed = seal(plain, load_private_key(keys.site_key("site_01")), kind="reply", lifetime_s=60, now=0.0)
    with pytest.raises(SettingsError, match="--signing-key"):
        unsigned_only({1: plain, 2: signed})
