"""Seconds per Flower exchange, and what Prefect adds to each round.

A real local network (``flows.localnet.LocalNetwork``: ``flower-superlink``, one
``flower-supernode`` per site and a Prefect server, all on 127.0.0.1) with 3 echo site
services (``tests/echo_site_service.py``, no Spark) runs the ServerApp entrypoint
``flows.bench_exchange:run_exchange_bench``. It times exchanges with every site through
``FlowerTransport.exchange`` (the study rounds' path), with Prefect off (a plain loop)
and on (each exchange one ``@task`` run inside a ``@flow``), interleaved in blocks.
Payloads: the bare request, then requests the size of a study round (the echo service
sends the same size back). The network runs with TLS + SuperNode authentication (as
studies do); a second one with ``insecure=True`` repeats the bare exchanges.

    .venv/bin/python bench/transport_overhead.py --quick    # 10 bare exchanges per mode, ~5 min
    .venv/bin/python bench/transport_overhead.py            # 30 bare exchanges per mode, ~12 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine, stopwatch, table, write_result  # noqa: E402
from flows.localnet import LocalNetwork, SiteSpec  # noqa: E402

ECHO_SERVICE = REPO_ROOT / "tests" / "echo_site_service.py"
ENTRYPOINT = "flows.bench_exchange:run_exchange_bench"
RESULT_FILE = "exchange_bench.json"
SITES = 3
ROUND_SIZES = (10_000, 300_000)  # about a Newton round's request; the adjusted round's replies
PARAMS = {
    "quick": {"exchanges": 10, "exchanges_sized": 3, "exchanges_insecure": 5, "block": 5},
    "full": {"exchanges": 30, "exchanges_sized": 6, "exchanges_insecure": 15, "block": 5},
}


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Count, median, 10th and 90th percentile and mean of a list of seconds."""
    values = np.asarray(seconds, dtype=float)
    if values.size == 0:
        return {"n": 0, "median": float("nan"), "p10": float("nan"), "p90": float("nan"), "mean": float("nan")}
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"n": int(values.size), "median": float(median), "p10": float(p10), "p90": float(p90),
            "mean": float(values.mean())}


def overhead(off: Sequence[float], on: Sequence[float]) -> dict[str, float]:
    """Prefect's cost per round: median(on) - median(off), and median(on) / median(off)."""
    m_off, m_on = float(np.median(off)), float(np.median(on))
    return {"median_off": m_off, "median_on": m_on, "difference": m_on - m_off, "ratio": m_on / m_off}


def echo_sites(n: int) -> list[SiteSpec]:
    """N stand-in site services that echo each request (no Spark)."""
    argv = [sys.executable, str(ECHO_SERVICE), "--site-id", "{site_id}", "--port", "{port}"]
    return [SiteSpec(f"site_{i:02d}", argv) for i in range(1, n + 1)]


def this_checkout_first() -> None:
    """Put this checkout first on the started processes' PYTHONPATH, so the ServerApp imports
    ``flows.bench_exchange`` from here even when fedrwe is installed from another checkout."""
    paths = [str(REPO_ROOT), *[q for q in os.environ.get("PYTHONPATH", "").split(os.pathsep) if q]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def bench_run(root: Path, prefect_url: str, insecure: bool, run_config: dict[str, Any]) -> dict[str, Any]:
    """Start a network of echo sites, run the exchange benchmark on it, return its records."""
    out_dir = root / "out"
    with LocalNetwork(root / "net", echo_sites(SITES), prefect_api_url=prefect_url, insecure=insecure) as net:
        startup = dict(net.startup_seconds)
        run = net.submit_run({"entrypoint": ENTRYPOINT, "out-dir": str(out_dir), **run_config})
    found: dict[str, Any] = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
    found["startup_seconds"] = startup
    found["flower_run_seconds"] = run.seconds
    return found


def seconds_of(found: dict[str, Any], size: int, mode: str) -> list[float]:
    """Per-exchange wall seconds of one payload size and mode."""
    return [r["seconds"] for r in found["sizes"][str(size)]["records"] if r["mode"] == mode]


def task_overheads(found: dict[str, Any], size: int, mode: str) -> list[float]:
    """Per exchange: the caller's wall seconds minus the transport's own (Prefect's part when on)."""
    return [r["seconds"] - r["transport_seconds"] for r in found["sizes"][str(size)]["records"]
            if r["mode"] == mode]


def bytes_of(found: dict[str, Any], size: int) -> tuple[int, int]:
    """Bytes sent and received by one exchange of that payload size (the first one)."""
    first = found["sizes"][str(size)]["records"][0]
    return int(first["bytes_sent"]), int(first["bytes_received"])


def run(mode: str) -> Path:
    """Run the benchmark in ``quick`` or ``full`` mode; return the result file."""
    p = PARAMS[mode]
    this_checkout_first()
    started_machine = machine()
    timings: dict[str, float] = {}
    config = {"bench-exchanges": p["exchanges"], "bench-exchanges-sized": p["exchanges_sized"],
              "bench-block": p["block"]}
    with tempfile.TemporaryDirectory(prefix="fedrwe-bench-") as tmp:
        root = Path(tmp)
        with stopwatch(timings, "wall"), LocalNetwork(root / "prefect", [], insecure=True) as shared:
            url = shared.prefect_api_url
            with stopwatch(timings, "tls_auth_network"):
                secure = bench_run(root / "secure", url, False,
                                   {**config, "bench-sizes": ",".join(map(str, (0, *ROUND_SIZES)))})
            with stopwatch(timings, "insecure_network"):
                plain = bench_run(root / "insecure", url, True,
                                  {**config, "bench-exchanges": p["exchanges_insecure"], "bench-sizes": "0"})
    runs = {"TLS+auth": (secure, (0, *ROUND_SIZES)), "insecure": (plain, (0,))}

    per_exchange, prefect_rows, summaries = [], [], {}
    for security, (found, sizes) in runs.items():
        for size in sizes:
            sent, received = bytes_of(found, size)
            off, on = seconds_of(found, size, "off"), seconds_of(found, size, "on")
            for name, values in (("off", off), ("on", on)):
                s = summarize(values)
                summaries[f"{security}/{size}/{name}"] = s
                per_exchange.append([security, sent, received, f"Prefect {name}", s["n"],
                                     round(s["median"], 3), round(s["p10"], 3), round(s["p90"], 3)])
            o = overhead(off, on)
            paired = (float(np.median(task_overheads(found, size, "on")))
                      - float(np.median(task_overheads(found, size, "off"))))
            o["paired_task_overhead"] = paired
            summaries[f"{security}/{size}/overhead"] = o
            flows = found["sizes"][str(size)]
            per_flow = flows["flow_start_and_end_seconds"] / max(len(flows["flow_run_seconds"]), 1)
            prefect_rows.append([security, sent, round(o["median_off"], 3), round(o["median_on"], 3),
                                 round(o["difference"], 3), round(o["ratio"], 3), round(paired, 4),
                                 round(per_flow, 3)])
    secure_off = summaries["TLS+auth/0/off"]["median"]
    insecure_off = summaries["insecure/0/off"]["median"]
    tables = [
        table(f"Seconds per exchange with {SITES} echo sites (wall, as the caller sees it)",
              ["network", "bytes out (all sites)", "bytes back", "Prefect", "exchanges", "median s",
               "p10 s", "p90 s"], per_exchange,
              "real flower-superlink + flower-supernode processes on 127.0.0.1; each ClientApp forwards "
              "to an echo service; off and on alternate in blocks of "
              f"{p['block']}; load average at start {started_machine['load_average_1_5_15']}"),
        table("Prefect overhead per round (median on - median off)",
              ["network", "bytes out", "median off s", "median on s", "overhead s", "on / off",
               "task overhead s", "flow run start+end s"], prefect_rows,
              "on: each exchange is one @task run (cache_policy=NONE) inside a @flow, as the study's "
              "rounds. overhead = median(on) - median(off) over different exchanges (noise included); "
              "task overhead = median of (caller's seconds - transport's own seconds) on minus off, "
              "paired per exchange; the last column is the per-flow-run cost (first flow run includes "
              "Prefect's client start), paid once per study, not per round"),
        table("TLS + SuperNode authentication vs insecure (bare request, Prefect off)",
              ["network", "median s"],
              [["TLS+auth", round(secure_off, 3)], ["insecure", round(insecure_off, 3)],
               ["difference", round(secure_off - insecure_off, 3)]]),
    ]
    params = {**p, "sites": SITES, "round_sizes": list(ROUND_SIZES), "entrypoint": ENTRYPOINT,
              "wall_seconds": timings}
    data = {"summaries": summaries, "raw": {"TLS+auth": secure, "insecure": plain},
            "seconds_per_exchange_median": secure_off}
    print(f"wall {timings['wall']:.0f} s")
    return write_result("transport_overhead", mode, params, tables, data, started_machine)


def main(argv: list[str] | None = None) -> None:
    """Parse ``--quick`` and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer exchanges (a few minutes)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    run("quick" if args.quick else "full")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
