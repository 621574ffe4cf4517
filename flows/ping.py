"""A real health check of the federation: two ping rounds through every site.

``run_ping(transport, run_config)`` is a ServerApp entrypoint (run config
``entrypoint = "flows.ping:run_ping"``). It runs the Prefect flow ``fedrwe-ping``:
each round is one task run that sends ``{"kind": "ping", "round": ...}`` to every
SuperNode and collects the answers of the site services behind them. The replies and
per-round timings go to ``<run_config["out-dir"]>/ping.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from coordinator.flower_server import FlowerTransport
from shared.errors import TransportError

PING_ROUNDS = ("ping-1", "ping-2")
DEFAULT_ROUND_TIMEOUT_S = 60.0


@task(name="ping-round", cache_policy=NONE, retries=1, retry_delay_seconds=1)
def ping_round(transport: FlowerTransport, round_name: str, timeout_s: float) -> dict[str, Any]:
    """Send one ping to every online SuperNode; return the decoded replies and timing."""
    nodes = transport.node_ids()
    request = {"kind": "ping", "round": round_name}
    payload = json.dumps(request).encode("utf-8")
    replies = transport.exchange(round_name, dict.fromkeys(nodes, payload), timeout_s)
    stats = transport.exchanges[-1]
    return {
        "round": round_name,
        "seconds": stats["seconds"],
        "bytes_sent": stats["bytes_sent"],
        "bytes_received": stats["bytes_received"],
        "stale_discarded": stats["stale_discarded"],
        "replies": {str(node): _decode(node, raw) for node, raw in sorted(replies.items())},
    }


def _decode(node: int, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "error", "site_id": f"node-{node}", "error": f"not JSON: {raw[:80]!r}"}


@flow(name="fedrwe-ping", validate_parameters=False)
def ping_flow(transport: FlowerTransport, out_dir: str, timeout_s: float) -> dict[str, Any]:
    """Ping every site twice and write ``ping.json`` to ``out_dir``."""
    rounds = [
        ping_round.with_options(timeout_seconds=timeout_s + 30.0)(transport, name, timeout_s)
        for name in PING_ROUNDS
    ]
    result = {"nodes": transport.node_ids(), "rounds": rounds}
    path = Path(out_dir) / "ping.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def required_out_dir(run_config: dict[str, Any], entrypoint: str, writes: str) -> str:
    """The run config's ``out-dir``; a ``TransportError`` naming ``entrypoint`` and the fix if empty."""
    out_dir = str(run_config.get("out-dir", ""))
    if not out_dir:
        raise TransportError(
            f"{entrypoint} needs run config `out-dir` (where {writes} goes). "
            "Fix: pass --run-config \"out-dir='/path/to/out'\"."
        )
    return out_dir


def run_ping(transport: FlowerTransport, run_config: dict[str, Any]) -> dict[str, Any]:
    """ServerApp entrypoint: run the ``fedrwe-ping`` flow with settings from the run config.

    Raises:
        TransportError: run config ``out-dir`` is empty, or a round failed after retries.
    """
    out_dir = required_out_dir(run_config, "flows.ping", "ping.json")
    timeout_s = float(run_config.get("ping-timeout-s", DEFAULT_ROUND_TIMEOUT_S))
    return ping_flow(transport, out_dir, timeout_s)
