"""The long-lived site service: one process per site, owning Spark, answering on loopback.

Endpoints (HTTP/1.1, bound to the site's ``host``, 127.0.0.1 by default):
  ``GET /v1/health``  200 with the site id once Spark is up;
  ``POST /v1/round``  body = request bytes, response = reply bytes (always 200: errors are
  replies, so the coordinator learns the site's reason).

The Flower ClientApp forwards each message here; it never starts Spark itself. Every
request passes the envelope gate (``site_agent.envelopes``): verified against the site's
coordinator keyring before anything parses it, answered with a signed reply. The service
does not start without the site's keys (``[envelopes]`` in its settings).

    python -m site_agent.service --config site.toml
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Protocol

from shared.errors import FedRWEError, TransportError
from shared.protocol.messages import MAX_MESSAGE_BYTES, RoundReply
from site_agent.agent import SiteAgent
from site_agent.envelopes import EnvelopeGate, load_site_keys
from site_agent.settings import SiteSettings, load_site_settings

log = logging.getLogger("fedrwe.site")
_MAX_BODY = MAX_MESSAGE_BYTES


class Answerer(Protocol):
    """What the HTTP handler forwards to: the envelope gate (or a test double)."""

    site_id: str

    def handle(self, data: bytes) -> bytes:
        """Bytes in, bytes out; never raises."""
        ...


def _handler_for(agent: Answerer) -> type[BaseHTTPRequestHandler]:
    class RoundHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/v1/health":
                self._send(404, b'{"error":"unknown path"}', "application/json")
                return
            body = json.dumps({"site_id": agent.site_id, "ready": True}).encode()
            self._send(200, body, "application/json")

        def do_POST(self) -> None:
            if self.path != "/v1/round":
                self._send(404, b'{"error":"unknown path"}', "application/json")
                return
            header = self.headers.get("Content-Length", "0")
            length = int(header) if header.isdigit() else 0
            if not 0 < length <= _MAX_BODY:
                self.close_connection = True  # the body is not read
                refused = RoundReply(status="error", site_id=agent.site_id, error=_body_refused(agent.site_id, header))
                self._send(413, refused.to_bytes(), "application/json")
                return
            self._send(200, agent.handle(self.rfile.read(length)), "application/octet-stream")

        def log_message(self, format: str, *args: object) -> None:
            log.debug("site %s http: " + format, agent.site_id, *args)

    return RoundHandler


def _body_refused(site_id: str, content_length: str) -> str:
    return (
        f"site {site_id!r}: the round request's Content-Length {content_length!r} is not between 1 "
        f"and {_MAX_BODY:,} bytes, so the site did not read it. Fix: send one round request as the "
        f"body (fedrwe's SuperNode forwarder does), within the limit."
    )


def _port_in_use(settings: SiteSettings) -> TransportError:
    return TransportError(
        f"site {settings.site_id!r}: port {settings.port} on {settings.host} is already in "
        f"use. Fix: stop the process holding it (`ss -ltnp | grep {settings.port}`) or set "
        f"another `port` in the site settings."
    )


def check_port_free(settings: SiteSettings) -> None:
    """Fail at once, before Spark starts, when the service's port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        try:
            probe.bind((settings.host, settings.port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_in_use(settings) from None
            raise


def bind(settings: SiteSettings, agent: Answerer) -> ThreadingHTTPServer:
    """Bind the service's port; a port in use is a clear error, not a traceback."""
    try:
        return ThreadingHTTPServer((settings.host, settings.port), _handler_for(agent))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise _port_in_use(settings) from None
        raise


def serve(settings: SiteSettings) -> None:
    """Start Spark, bind, and serve until SIGTERM/SIGINT; always stop Spark."""
    check_port_free(settings)
    keys = load_site_keys(settings)  # missing or broken keys fail before Spark starts
    agent = SiteAgent(settings)
    for problem in agent.missing_tables():
        log.warning("%s", problem)  # studies will fail with this message until it is fixed
    if settings.approval.mode == "auto":
        log.warning("site %s: approval mode 'auto': every protocol runs unreviewed (simulation only)", settings.site_id)
    try:
        server = bind(settings, EnvelopeGate(agent, keys))
    except BaseException:
        agent.close()
        raise

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; let Spark shut down
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info("site %s serving on http://%s:%d", settings.site_id, settings.host, settings.port)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.service", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the site's settings (TOML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        serve(load_site_settings(args.config))
    except FedRWEError as error:
        print(f"fedrwe site: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
