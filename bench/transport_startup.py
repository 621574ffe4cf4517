"""What TLS + SuperNode authentication add to the local network's start-up, side by side.

One Prefect server is started first and shared, so that its ~30 s start does not hide
the difference. Then, alternating, a network with ``insecure=True`` and one with the
default (TLS, ``--enable-supernode-auth``, keys registered before the SuperNodes start)
are started with N echo sites and stopped again; the table reports the median of each
start-up step.

    .venv/bin/python bench/transport_startup.py                 # 3 sites, 2 repeats
    .venv/bin/python bench/transport_startup.py --sites 5 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from flows.localnet import LocalNetwork, SiteSpec

ECHO_SERVICE = Path(__file__).resolve().parents[1] / "tests" / "echo_site_service.py"
STEPS = ("pki", "superlink", "register-supernodes", "supernodes (slowest)", "total")


def echo_sites(n: int) -> list[SiteSpec]:
    """N stand-in site services (no Spark), so only the transport's start is measured."""
    argv = [sys.executable, str(ECHO_SERVICE), "--site-id", "{site_id}", "--port", "{port}"]
    return [SiteSpec(f"site_{i:02d}", argv) for i in range(1, n + 1)]


def one_start(root: Path, sites: list[SiteSpec], prefect: str, insecure: bool) -> dict[str, float]:
    """Start and stop one network; return its start-up seconds per step."""
    with LocalNetwork(root, sites, prefect_api_url=prefect, insecure=insecure) as net:
        times = dict(net.startup_seconds)
    times["supernodes (slowest)"] = max(v for k, v in times.items() if k.endswith("-supernode"))
    return times


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="fedrwe-bench-") as tmp:
        root = Path(tmp)
        with LocalNetwork(root / "prefect", [], insecure=True) as shared:
            for r in range(args.repeats):
                for insecure in (True, False) if r % 2 == 0 else (False, True):
                    name = f"{'insecure' if insecure else 'secure'}-{r}"
                    runs[insecure].append(
                        one_start(root / name, echo_sites(args.sites), shared.prefect_api_url, insecure)
                    )
    print(f"start-up seconds, median of {args.repeats}, {args.sites} echo sites, shared Prefect")
    print(f"{'step':<24}{'insecure':>10}{'TLS+auth':>10}{'extra':>8}")
    for step in STEPS:
        plain = statistics.median(t.get(step, 0.0) for t in runs[True])
        secure = statistics.median(t.get(step, 0.0) for t in runs[False])
        print(f"{step:<24}{plain:>10.2f}{secure:>10.2f}{secure - plain:>+8.2f}")


if __name__ == "__main__":
    main()
