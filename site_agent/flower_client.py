"""The site's Flower ClientApp: a thin forwarder to the long-lived site service.

Flower starts a fresh ``flwr-clientapp`` process for every message, so nothing heavy
(Spark, caches, keys) may live here. Each message carries the round request as bytes;
this app POSTs them to the site service (``site_agent.service``) and sends back the
service's answer as bytes, unchanged.

Message layout (both directions): ``RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY:
<bytes>})})``. The SuperNode's ``--node-config`` carries:

- ``site-id``: the site's name, used in error replies;
- ``service-url``: where the site service listens, e.g. ``http://127.0.0.1:8101``;
- ``service-timeout-s`` (optional, default 3600, the coordinator's round timeout):
  how long the site may take to answer one round.

A failure to reach the service never raises: the reply is then the UTF-8 JSON
``{"status": "error", "site_id": ..., "error": "<what failed, the URL, the fix>"}``,
so the coordinator can name the site and the fix.
"""

from __future__ import annotations

import httpx
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from shared.protocol.wire import PAYLOAD_KEY, RECORD_NAME, error_reply

ROUND_PATH = "/v1/round"
DEFAULT_SERVICE_TIMEOUT_S = 3600.0

app = ClientApp()


def error_payload(site_id: str, error: str) -> bytes:
    """Return the error reply (UTF-8 JSON) for a round this site could not answer."""
    return error_reply(site_id, error)


def request_bytes(message: Message) -> bytes:
    """Return the round request carried by ``message``.

    Raises:
        ValueError: the message does not carry ``RECORD_NAME``/``PAYLOAD_KEY`` as bytes.
    """
    record = message.content.config_records.get(RECORD_NAME)
    value = None if record is None else record.get(PAYLOAD_KEY)
    if not isinstance(value, bytes):
        raise ValueError(
            f"message {message.metadata.message_id!r} (group {message.metadata.group_id!r}) "
            f"has no bytes at ConfigRecord {RECORD_NAME!r} key {PAYLOAD_KEY!r}; "
            "the coordinator and the site run different fedrwe versions. "
            "Fix: install the same fedrwe version on both sides."
        )
    return value


def forward(site_id: str, service_url: str, body: bytes, timeout_s: float) -> bytes:
    """POST ``body`` to the site service and return its answer, or an error payload."""
    url = service_url.rstrip("/") + ROUND_PATH
    fix_start = (
        f"Fix: check that the site service of {site_id!r} is running and listening at "
        f"{service_url} (its log, `GET {service_url.rstrip('/')}/v1/health`), or correct "
        "`service-url` in this SuperNode's --node-config."
    )
    try:
        response = httpx.post(
            url,
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )
    except httpx.TimeoutException as err:
        return error_payload(
            site_id,
            f"site service at {url} did not answer within {timeout_s:g} s "
            f"({type(err).__name__}). Fix: raise `service-timeout-s` in this SuperNode's "
            "--node-config, or check the site service's log for a stuck computation.",
        )
    except httpx.HTTPError as err:
        return error_payload(
            site_id,
            f"site service at {url} is unreachable ({type(err).__name__}: {err}). {fix_start}",
        )
    if response.status_code != 200:
        snippet = response.text[:500]
        return error_payload(
            site_id,
            f"site service at {url} answered HTTP {response.status_code}: {snippet!r}. "
            "Fix: read the site service's log for this round.",
        )
    return response.content


def reply_with(message: Message, payload: bytes) -> Message:
    """Return the reply to ``message`` carrying ``payload`` in the standard layout."""
    content = RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY: payload})})
    return Message(content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Forward one round request to the site service and reply with its answer."""
    site_id = str(context.node_config.get("site-id", f"node-{context.node_id}"))
    service_url = context.node_config.get("service-url")
    if not isinstance(service_url, str) or not service_url:
        return reply_with(
            message,
            error_payload(
                site_id,
                "this SuperNode has no `service-url` in its node config. Fix: start it with "
                "--node-config \"site-id='<site>' service-url='http://127.0.0.1:<port>'\".",
            ),
        )
    timeout_s = float(context.node_config.get("service-timeout-s", DEFAULT_SERVICE_TIMEOUT_S))
    try:
        body = request_bytes(message)
    except ValueError as err:
        return reply_with(message, error_payload(site_id, str(err)))
    return reply_with(message, forward(site_id, service_url, body, timeout_s))
