"""Submitting a Flower run of the fedrwe app and following it to the end.

``flwr run`` exits 0 even when the SuperLink refuses a run or the run fails, so
:func:`submit_run` reads its JSON answer, streams the ServerApp's log to a file and asks
the Control API (``flwr ls``) for the final status, raising ``TransportError`` with the
ServerApp's log tail unless the run completed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from flows.localnet import base_env, executable, log_tail
from shared.errors import TransportError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_APP_DIR = REPO_ROOT / "deploy" / "flower_app"
CONNECTION_NAME = "fedrwe-local"
DEFAULT_RUN_TIMEOUT_S = 6 * 3600.0  # a whole study; each round has its own timeout
RunConfig = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class FlowerRun:
    """A finished Flower run: its id, final status and where its ServerApp log is."""

    run_id: int
    status: str
    details: str
    seconds: float
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)


def write_cli_config(
    flwr_home: Path,
    superlink_address: str,
    connection: str = CONNECTION_NAME,
    *,
    root_certificates: Path | None = None,
) -> None:
    """The ``flwr`` CLI's config naming one SuperLink connection.

    With ``root_certificates`` (the federation's ``ca.pem``) the CLI speaks TLS and
    accepts only a SuperLink certificate that CA signed for that address; without it
    the connection is plain HTTP, for a SuperLink started with ``--insecure``.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    link: dict[str, str | bool] = {"address": superlink_address}
    if root_certificates is None:
        link["insecure"] = True
    else:
        link["root-certificates"] = str(Path(root_certificates).resolve())
    config = {"superlink": {"default": connection, connection: link}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def _flwr(args: Sequence[str], flwr_home: Path, timeout_s: float) -> str:
    """Run a ``flwr`` CLI command against ``flwr_home``; return its stdout."""
    env = {**base_env(), "FLWR_HOME": str(flwr_home)}
    try:
        done = subprocess.run(
            [executable("flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise TransportError(f"`flwr {' '.join(args)}` did not finish in {timeout_s:g} s") from err
    return done.stdout


def _json_out(stdout: str, command: str) -> dict[str, Any]:
    start = stdout.find("{")
    try:
        return dict(json.loads(stdout[start:]))
    except (ValueError, TypeError) as err:
        raise TransportError(f"`{command}` printed no JSON: {stdout[-2000:]!r}") from err


def stage_app(app_dir: Path, run_config: RunConfig, dest: Path) -> Path:
    """Copy the Flower app to ``dest`` and declare every run-config key it lacks.

    The SuperLink rejects override keys that ``[tool.flwr.app.config]`` does not
    declare; declaring them (with the given value as default) lets callers pass any
    key without editing the app.
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(app_dir, dest, ignore=shutil.ignore_patterns("__pycache__", "*.fab"))
    pyproject = dest / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    declared = data["tool"]["flwr"]["app"].setdefault("config", {})
    for key, value in run_config.items():
        declared.setdefault(key, value)
    pyproject.write_text(tomli_w.dumps(data), encoding="utf-8")
    return dest


def submission_dir(run_dir: Path) -> Path:
    """A fresh folder for one submission's staged app and run config: ``run_dir/submissions/N``.

    Several runs may be submitted at once into one ``run_dir`` (one coordinator, several
    studies). With one shared ``flower_app`` folder and ``run_config.toml``, a second
    submission would delete and rewrite them while ``flwr run`` of the first still reads
    them, so the first run could fail, or silently run with the second's run config
    (its protocol and out dir). ``mkdir`` without ``exist_ok`` claims a number atomically.
    """
    parent = run_dir / "submissions"
    parent.mkdir(parents=True, exist_ok=True)
    number = len(list(parent.iterdir()))
    while True:
        candidate = parent / f"{number:04d}"
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            continue
        return candidate


def submit_run(
    run_config: RunConfig,
    *,
    flwr_home: Path,
    run_dir: Path,
    app_dir: Path = DEFAULT_APP_DIR,
    connection: str = CONNECTION_NAME,
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
) -> FlowerRun:
    """Submit a Flower run, stream its ServerApp log to a file, and check its status.

    ``flwr_home`` holds the CLI's ``config.toml`` naming the SuperLink ``connection``.
    Raises ``TransportError`` when the submission is refused, the run does not finish
    within ``timeout_s`` (the run is then stopped) or it finishes other than completed.
    Several threads may submit into one ``run_dir`` at once: each submission stages its
    app and run config in its own folder (see ``submission_dir``).
    """
    t0 = time.monotonic()
    staging = submission_dir(run_dir)
    staged = stage_app(app_dir, run_config, staging / "flower_app")
    overrides = staging / "run_config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
    args = ["run", str(staged), connection, "--run-config", str(overrides), "--format", "json"]
    started = _json_out(_flwr(args, flwr_home, 120.0), "flwr run")
    if not started.get("success"):
        raise TransportError(
            f"the SuperLink refused the run: {started.get('error-message', started)}. "
            "Fix: check that the SuperLink is running and the run config keys are valid."
        )
    run_id = int(started["run-id"])
    log_path = run_dir / "logs" / f"serverapp-{run_id}.log"
    info = _follow(run_id, flwr_home, connection, log_path, t0 + timeout_s)
    status = str(info.get("status", "unknown"))
    details = str(info.get("status-details", ""))
    run = FlowerRun(run_id, status, details, time.monotonic() - t0, log_path, info)
    if status != "finished:completed":
        raise TransportError(
            f"Flower run {run_id} ended as {status!r}: {details}\n{log_tail(log_path, 60)}"
        )
    return run


def _follow(
    run_id: int, flwr_home: Path, connection: str, log_path: Path, deadline: float
) -> dict[str, Any]:
    """Stream the run's log to ``log_path`` until it finishes; return ``flwr ls`` info."""
    env = {**base_env(), "FLWR_HOME": str(flwr_home)}
    argv = [executable("flwr"), "log", str(run_id), connection, "--stream"]
    with log_path.open("ab") as log_file:
        streamer = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            streamer.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            pass
        finally:  # also on Ctrl-C / SIGTERM: never leave the log streamer behind
            if streamer.poll() is None:
                streamer.kill()
                streamer.wait()
    while True:  # the stream ends when the run finishes; confirm with the Control API
        ls_args = ["ls", connection, "--run-id", str(run_id), "--format", "json"]
        runs = _json_out(_flwr(ls_args, flwr_home, 60.0), "flwr ls").get("runs") or [{}]
        info = dict(runs[0])
        if str(info.get("status", "")).startswith("finished"):
            return info
        if time.monotonic() > deadline:
            _flwr(["stop", str(run_id), connection], flwr_home, 60.0)
            raise TransportError(
                f"Flower run {run_id} did not finish before the deadline (status "
                f"{info.get('status')!r}); it was stopped.\n{log_tail(log_path, 60)}"
            )
        time.sleep(1.0)
