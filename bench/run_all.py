"""Every benchmark, one after the other, then the tables of docs/benchmarks.md.

    .venv/bin/python bench/run_all.py --quick    # make bench: minutes
    .venv/bin/python bench/run_all.py            # make bench-full: the issue's sizes (about 1.5 h)
    .venv/bin/python bench/run_all.py --only paper_scale,fedavg_ps

Each benchmark runs in its own Python process (a fresh JVM and clean state), so one that
fails is reported and the others still run; the exit code is 1 if any failed. They run
one at a time: on a small machine, two benchmarks at once would slow each other down.
The paper-scale run's output folder is kept under ``--scratch`` for the FedAvg benchmark,
which fits its models to that run's pooled rows, then removed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"
ORDER = ("transport_overhead", "paper_scale", "fedavg_ps", "cohort_engines", "scaling")


def command(name: str, quick: bool, scratch: Path) -> list[str]:
    """The command line of one benchmark."""
    argv = [sys.executable, str(BENCH / f"{name}.py")]
    if quick:
        argv.append("--quick")
    if name == "paper_scale":
        argv += ["--out", str(scratch / "paper_scale")]
    if name == "fedavg_ps":
        argv += ["--study-out", str(scratch / "paper_scale")]
    return argv


def main() -> None:
    """Run the benchmarks, render the document, print a summary line per benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick versions (minutes)")
    parser.add_argument("--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--scratch", type=Path, default=None, help="working folder (default: a temp dir, removed)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ORDER))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}. Fix: choose from {', '.join(ORDER)}.")
    if "fedavg_ps" in chosen and "paper_scale" not in chosen and args.scratch is None:
        raise SystemExit("fedavg_ps fits to the paper-scale run's rows. Fix: include paper_scale, or pass "
                         "--scratch DIR holding an earlier run's paper_scale/ folder.")
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="fedrwe-bench-"))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, tuple[int, float]] = {}
    try:
        for name in (n for n in ORDER if n in chosen):
            print(f"\n=== {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
            started = time.perf_counter()
            code = subprocess.run(command(name, args.quick, scratch), cwd=REPO_ROOT, check=False).returncode
            outcome[name] = (code, time.perf_counter() - started)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    subprocess.run([sys.executable, str(BENCH / "render_docs.py")], cwd=REPO_ROOT, check=True)
    print("\nbenchmark            exit   wall s")
    for name, (code, seconds) in outcome.items():
        print(f"{name:<20}{code:>5}{seconds:>9.0f}")
    if any(code for code, _ in outcome.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
