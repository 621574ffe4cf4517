"""An in-process transport for unit tests of study logic: node i is SiteAgent i, no Flower.

Real Spark and real Delta sit behind it; only the wire is skipped. The integration test
(tests/test_simulation_e2e.py) runs the same study over real Flower processes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from site_agent.agent import SiteAgent


class InProcessTransport:
    """Same interface as ``coordinator.flower_server.FlowerTransport``."""

    def __init__(self, agents: list[SiteAgent]) -> None:
        self._agents = dict(enumerate(agents, start=101))
        self.exchanges: list[dict[str, Any]] = []

    def node_ids(self) -> list[int]:
        return sorted(self._agents)

    def exchange(self, round_name: str, payloads: Mapping[int, bytes], timeout_s: float) -> dict[int, bytes]:
        started = time.perf_counter()
        replies = {node: self._agents[node].handle(payload) for node, payload in payloads.items()}
        self.exchanges.append({
            "round": round_name, "nodes": sorted(replies),
            "seconds": time.perf_counter() - started,
            "bytes_sent": sum(map(len, payloads.values())),
            "bytes_received": sum(map(len, replies.values())),
            "stale_discarded": 0,
        })
        return replies
