"""A stand-in site service for transport tests: echoes each round request.

It speaks the same two endpoints as the real site service (``site_agent.service``):

- ``GET /v1/health`` answers 200 once the service is ready;
- ``POST /v1/round`` takes the round request (JSON bytes) and answers
  ``{"status": "ok", "site_id": ..., "echo": <request JSON>}``.

Run it as ``python tests/echo_site_service.py --site-id site_01 --port 8101``. It binds
127.0.0.1 only and stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


def make_handler(site_id: str) -> type[BaseHTTPRequestHandler]:
    """Return a request handler class that answers as site ``site_id``."""

    class EchoHandler(BaseHTTPRequestHandler):
        """Answer ``GET /v1/health`` and ``POST /v1/round``."""

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/health":
                self._reply(200, {"status": "ok", "site_id": site_id})
            else:
                self._reply(404, {"status": "error", "error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/v1/round":
                self._reply(404, {"status": "error", "error": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            try:
                request = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                self._reply(400, {"status": "error", "site_id": site_id, "error": str(err)})
                return
            self._reply(200, {"status": "ok", "site_id": site_id, "echo": request})

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"[echo {site_id}] {format % args}\n")

    return EchoHandler


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-id", required=True, help="the site this service answers as")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    args = parser.parse_args(argv)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.site_id))

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"echo site service {args.site_id} on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
