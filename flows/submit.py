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

from coordinator.journal import JOURNAL_DIR, unfinished_run
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


def transport_root_certificates(root_certificates: Path | None, insecure: bool) -> Path | None:
    """The CA the ``flwr`` CLI checks the SuperLink against, or None for plain HTTP.

    One of the two must be asked for: a study never falls back to plain HTTP silently.
    """
    if insecure and root_certificates is not None:
        raise SettingsError(
            "--insecure and --root-certificates were both given. Fix: drop --insecure; the "
            "CA certificate is what makes the connection to the SuperLink trustworthy."
        )
    if insecure:
        return None
    if root_certificates is None:
        raise SettingsError(
            "no CA certificate for the SuperLink's TLS was given. Fix: pass --root-certificates "
            "ca.pem (the federation's CA, from `fedrwe pki init`), or --insecure for a SuperLink "
            "started with --insecure (debugging only)."
        )
    if not root_certificates.is_file():
        raise SettingsError(
            f"--root-certificates {root_certificates}: no such file. Fix: point it at the "
            "federation's ca.pem (from the network operator's `fedrwe pki init`)."
        )
    return root_certificates


def run_study_on_superlink(
    protocol: Path,
    superlink: str,
    out: Path,
    min_sites: int,
    prefect_api_url: str | None,
    keys: dict[str, str] | None = None,
    *,
    root_certificates: Path | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """``fedrwe study run``: submit to a running SuperLink, follow, return results.json.

    The ServerApp runs next to the SuperLink, so ``out`` and the ``keys`` paths
    (``signing-key``, ``site-keyring``) are paths on that machine. The connection is TLS
    checked against ``root_certificates`` unless ``insecure``.
    """
    if not prefect_api_url:
        raise SettingsError(
            "a study run reports to a Prefect server and none was given. Fix: start one "
            "(`prefect server start --host 127.0.0.1`) and pass --prefect-api-url "
            "http://127.0.0.1:4200/api (or set PREFECT_API_URL)."
        )
    config = study_run_config(
        protocol, out, **{"prefect-api-url": prefect_api_url, "min-nodes": min_sites, **(keys or {})}
    )
    return submit_and_read(config, superlink, out, transport_root_certificates(root_certificates, insecure))


def submit_and_read(config: dict[str, Any], superlink: str, out: Path, ca: Path | None) -> dict[str, Any]:
    """Submit ``config`` to the SuperLink (TLS checked against ``ca``), follow the run, and
    return the results.json it wrote in ``out`` (the study's own reason if it failed)."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr_home"
    write_cli_config(flwr_home, superlink, root_certificates=ca)

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


def resume_run_config(study_id: str, out: Path) -> dict[str, Any]:
    """The run config of the interrupted run of ``study_id`` in ``out``, set to resume.

    The protocol text, keys and options are the ones the run was submitted with (kept in
    its journal), so the resumed run asks the very same questions.

    Raises:
        SettingsError: ``out`` holds no run, another study's run, or a finished one.
    """
    unfinished_run(out, study_id)
    stored = out / JOURNAL_DIR / "run_config.json"
    if not stored.exists():
        raise SettingsError(
            f"the run in {out} was started without its run config in the journal ({stored} is missing), "
            f"so it cannot be resubmitted. Fix: start the study again with `fedrwe study run`."
        )
    config = json.loads(stored.read_text(encoding="utf-8"))
    return {**config, "resume": "true"}


def resume_study_on_superlink(
    study_id: str,
    superlink: str,
    out: Path,
    prefect_api_url: str | None,
    *,
    root_certificates: Path | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """``fedrwe study resume``: continue the interrupted run in ``out`` on the SuperLink."""
    config = resume_run_config(study_id, out.resolve())
    if prefect_api_url:
        config["prefect-api-url"] = prefect_api_url
    return submit_and_read(config, superlink, out, transport_root_certificates(root_certificates, insecure))
