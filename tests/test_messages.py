"""Round messages: canonical bytes, schema versions, and the transport's error replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.flower_server import _error_payload
from coordinator.plan import StudyPlan
from flows.rounds import decode_replies
from shared.errors import SiteError
from shared.protocol.messages import MESSAGE_SCHEMA_VERSION, RoundReply, decode_reply
from shared.protocol.model import load_protocol
from shared.protocol.wire import REPLY_SCHEMA_VERSION
from site_agent.flower_client import error_payload

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"


def test_wire_and_message_schema_versions_agree() -> None:
    assert REPLY_SCHEMA_VERSION == MESSAGE_SCHEMA_VERSION


def test_floats_survive_the_round_trip_exactly() -> None:
    reply = RoundReply(status="ok", site_id="a", results={"x": 0.1 + 0.2, "y": [1e-300, -2.5e17]})
    assert decode_reply(reply.to_bytes()) == reply


@pytest.mark.parametrize(
    ("payload", "site", "reason"),
    [
        (error_payload("site_02", "service at http://127.0.0.1:9 unreachable"), "site_02", "unreachable"),
        (_error_payload(7, "Flower error 1 from SuperNode 7"), "node-7", "Flower error"),
    ],
)
def test_transport_error_replies_become_site_errors_with_their_reason(payload: bytes, site: str, reason: str) -> None:
    plan = StudyPlan(load_protocol(PROTOCOL))
    with pytest.raises(SiteError, match=rf"site '{site}' failed: .*{reason}"):
        plan.absorb(decode_replies({7: payload}))
