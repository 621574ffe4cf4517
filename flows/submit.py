"""Submitting a study as a Flower run, and turning a failed run into its one clear reason.

The study flow (in the ServerApp) writes ``error.txt`` next to the results when the
study itself fails (a site refused, a fit did not converge, a bad protocol); a Flower
failure without it is a transport problem and keeps the transport's message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.flower_runs import FlowerRun, RunConfig, submit_run, write_cli_config
from shared.errors import FedRWEError, SettingsError, TransportError
from shared.protocol.model import load_protocol


def study_run_config(protocol: Path, out: Path, **extra: object) -> dict[str, Any]:
    """The run config of a study: the protocol text (validated here first) and the output dir."""
    load_protocol(protocol)  # fail fast, before any process is involved
    return {"protocol-yaml": protocol.read_text(encoding="utf-8"), "out-dir": str(out.resolve()), **extra}


def run_and_explain(submit: Callable[[RunConfig], FlowerRun], run_config: RunConfig, out: Path, logs: Path) -> FlowerRun:
    """Run ``submit``; if the study failed, raise its own reason rather than a log dump."""
    failure = out / "error.txt"
    failure.unlink(missing_ok=True)
    try:
        return submit(run_config)
    except TransportError as error:
        if failure.exists():
            reason = failure.read_text(encoding="utf-8").strip()
            raise FedRWEError(f"the study failed: {reason} (logs: {logs})") from error
        raise


def run_study_on_superlink(
    protocol: Path, superlink: str, out: Path, min_sites: int, prefect_api_url: str | None,
    keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``fedrwe study run``: submit to a running SuperLink, follow, return results.json.

    The ServerApp runs next to the SuperLink, so ``out`` and the ``keys`` paths
    (``signing-key``, ``site-keyring``) are paths on that machine.
    """
    if not prefect_api_url:
        raise SettingsError(
            "a study run reports to a Prefect server and none was given. Fix: start one "
            "(`prefect server start --host 127.0.0.1`) and pass --prefect-api-url "
            "http://127.0.0.1:4200/api (or set PREFECT_API_URL)."
        )
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr_home"
    write_cli_config(flwr_home, superlink)
    config = study_run_config(
        protocol, out, **{"prefect-api-url": prefect_api_url, "min-nodes": min_sites, **(keys or {})}
    )

    def submit(run_config: RunConfig) -> FlowerRun:
        return submit_run(run_config, flwr_home=flwr_home, run_dir=run_dir)

    run_and_explain(submit, config, out, run_dir / "logs")
    results = out.resolve() / "results.json"
    if not results.exists():
        raise TransportError(
            f"the study completed but {results} is not on this machine: the ServerApp writes it "
            f"next to the SuperLink. Fix: read it there, or run `fedrwe study run` on that host."
        )
    return dict(json.loads(results.read_text(encoding="utf-8")))
