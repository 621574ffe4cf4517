"""How a round's bytes sit inside a Flower message, and the error reply of the transport.

``RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY: <bytes>})})``. Only the standard
library is imported here: every Flower message starts a fresh ClientApp process that
imports this module.
"""

import json

RECORD_NAME = "fedrwe"
PAYLOAD_KEY = "payload"
REPLY_SCHEMA_VERSION = 1  # equals shared.protocol.messages.MESSAGE_SCHEMA_VERSION (tested)


def error_reply(site_id: str, error: str) -> bytes:
    """A RoundReply with status "unavailable", for failures outside the site agent (transport):
    the coordinator retries the round, then leaves the site out."""
    body = {"schema_version": REPLY_SCHEMA_VERSION, "status": "unavailable", "site_id": site_id, "error": error}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
