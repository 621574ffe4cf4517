"""The ServerApp side of ``bench/transport_overhead.py``: timed exchanges, Prefect off and on.

``run_exchange_bench(transport, run_config)`` is a ServerApp entrypoint (run config
``entrypoint = "flows.bench_exchange:run_exchange_bench"``). For each payload size it
sends ``bench-exchanges`` exchanges to every SuperNode twice through
``FlowerTransport.exchange`` (the path the study rounds take):

- ``off``: a plain loop, no Prefect at all;
- ``on``: each exchange is one run of a Prefect ``@task`` (``cache_policy=NONE``, as
  ``flows.rounds.exchange_round``) inside a ``@flow``, one flow run per block.

The two alternate in blocks of ``bench-block`` exchanges (which goes first alternates
too), so machine noise hits both alike. Every exchange's wall seconds, as the caller
sees them, go to ``<out-dir>/exchange_bench.json``. The payload is a JSON request
padded to the size asked (0: the bare request); the echo site service sends it back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from coordinator.flower_server import FlowerTransport
from flows.ping import required_out_dir

RESULT_FILE = "exchange_bench.json"
DEFAULT_EXCHANGES = 20
DEFAULT_BLOCK = 5
DEFAULT_TIMEOUT_S = 60.0


def bench_payload(round_name: str, size: int) -> bytes:
    """A JSON request of about ``size`` bytes (the bare request when ``size`` is 0)."""
    bare = {"kind": "bench", "round": round_name}
    if size <= 0:
        return json.dumps(bare).encode("utf-8")
    pad = max(size - len(json.dumps({**bare, "pad": ""})), 0)
    return json.dumps({**bare, "pad": "x" * pad}).encode("utf-8")


def timed_exchange(transport: FlowerTransport, round_name: str, size: int, timeout_s: float) -> dict[str, Any]:
    """One exchange with every online SuperNode; its transport seconds and bytes."""
    payload = bench_payload(round_name, size)
    transport.exchange(round_name, dict.fromkeys(transport.node_ids(), payload), timeout_s)
    stats = transport.exchanges[-1]
    return {
        "transport_seconds": stats["seconds"],
        "bytes_sent": stats["bytes_sent"],
        "bytes_received": stats["bytes_received"],
    }


@task(name="bench-exchange", cache_policy=NONE)
def exchange_task(transport: FlowerTransport, round_name: str, size: int, timeout_s: float) -> dict[str, Any]:
    """``timed_exchange`` as one Prefect task run."""
    return timed_exchange(transport, round_name, size, timeout_s)


def _block_off(transport: FlowerTransport, names: list[str], size: int, timeout_s: float) -> list[dict[str, Any]]:
    records = []
    for name in names:
        started = time.perf_counter()
        stats = timed_exchange(transport, name, size, timeout_s)
        records.append({"round": name, "seconds": time.perf_counter() - started, **stats})
    return records


@flow(name="fedrwe-bench-exchange", validate_parameters=False)
def _block_on(transport: FlowerTransport, names: list[str], size: int, timeout_s: float) -> list[dict[str, Any]]:
    records = []
    for name in names:
        started = time.perf_counter()
        stats = exchange_task.with_options(task_run_name=name)(transport, name, size, timeout_s)
        records.append({"round": name, "seconds": time.perf_counter() - started, **stats})
    return records


def exchange_blocks(
    transport: FlowerTransport, size: int, exchanges: int, block: int, timeout_s: float
) -> dict[str, Any]:
    """``exchanges`` timed exchanges each with Prefect off and on, interleaved in blocks."""
    records: list[dict[str, Any]] = []
    flow_seconds: list[float] = []
    done = {"off": 0, "on": 0}
    index = 0
    while min(done.values()) < exchanges:
        order = ("off", "on") if index % 2 == 0 else ("on", "off")
        for mode in order:
            count = min(block, exchanges - done[mode])
            names = [f"{size}b-{mode}-{done[mode] + i + 1}" for i in range(count)]
            started = time.perf_counter()
            if mode == "off":
                got = _block_off(transport, names, size, timeout_s)
            else:
                got = _block_on(transport, names, size, timeout_s)
                flow_seconds.append(time.perf_counter() - started)
            records += [{"mode": mode, "block": index, "payload_bytes": size, **r} for r in got]
            done[mode] += count
        index += 1
    on_total = sum(r["seconds"] for r in records if r["mode"] == "on")
    return {"records": records, "flow_run_seconds": flow_seconds,
            "flow_start_and_end_seconds": sum(flow_seconds) - on_total}


def run_exchange_bench(transport: FlowerTransport, run_config: dict[str, Any]) -> dict[str, Any]:
    """ServerApp entrypoint: run the interleaved blocks for every payload size in the run config.

    Run config: ``out-dir`` (required), ``bench-sizes`` (comma-separated bytes, e.g.
    ``"0,10000"``), ``bench-exchanges`` (per size and mode; a ``bench-exchanges-sized``
    applies to the non-zero sizes), ``bench-block``, ``bench-timeout-s``.

    Raises:
        TransportError: run config ``out-dir`` is empty, or an exchange got no reply.
    """
    out_dir = required_out_dir(run_config, "flows.bench_exchange", "exchange_bench.json")
    sizes = [int(s) for s in str(run_config.get("bench-sizes", "0")).split(",") if s.strip()]
    exchanges = int(run_config.get("bench-exchanges", DEFAULT_EXCHANGES))
    sized = int(run_config.get("bench-exchanges-sized", exchanges))
    block = int(run_config.get("bench-block", DEFAULT_BLOCK))
    timeout_s = float(run_config.get("bench-timeout-s", DEFAULT_TIMEOUT_S))
    result: dict[str, Any] = {"nodes": transport.node_ids(), "sizes": {}}
    for size in sizes:
        count = exchanges if size == 0 else sized
        result["sizes"][str(size)] = exchange_blocks(transport, size, count, block, timeout_s)
    path = Path(out_dir) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
