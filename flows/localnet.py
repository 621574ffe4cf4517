"""The simulated federation on 127.0.0.1: real processes, always cleaned up.

``LocalNetwork`` is a context manager that starts, and on leaving (normally, on an
exception, on Ctrl-C or SIGTERM) always stops:

1. a Prefect server (``prefect server start``) with its own ``PREFECT_HOME`` under the
   run dir, unless ``prefect_api_url`` points at a running one;
2. one ``flower-superlink`` (no runtime dependency installation) with TLS and SuperNode
   authentication: ``fedrwe pki init`` material is made in ``<run_dir>/pki`` (fresh at
   every start), the SuperLink serves HTTPS with ``pki/superlink.pem`` and accepts only
   SuperNodes whose public key was registered (``flwr supernode register``) before they
   connect; ``insecure=True`` turns both off, for debugging only;
3. per site: the site service (an argv the caller gives) and one ``flower-supernode``
   whose ``--node-config`` carries ``site-id`` and ``service-url``, trusting only the
   run's CA (``--root-certificates``) and signing in with its own key.

Every process logs to ``<run_dir>/logs/<name>.log``; each start-up time is kept in
``startup_seconds``. Stopping kills whole process trees: the SuperLink starts its
``flower-superexec`` in a session of its own, so killing process groups alone would
leave it running.

``LocalNetwork.submit_run`` submits the Flower app (see ``flows.flower_runs``) with a run config,
follows it to the end and raises ``TransportError`` with the ServerApp's log tail if
the run failed (``flwr run`` itself exits 0 even then).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

import httpx
import psutil

from shared.errors import TransportError
from shared.pki import NetworkPki, init_network

if TYPE_CHECKING:
    from flows.flower_runs import FlowerRun

HOST = "127.0.0.1"
SUPEREXEC_POLL_INTERVAL_S = "0.05"
STOP_GRACE_S = 5.0
_CLAIM_FLOOR = 20000  # free_port picks from here up to the ephemeral range
SUPERNODE_READY = re.compile(r"SuperNode ID: (\d+)")  # logged once registered
RunConfig = Mapping[str, bool | int | float | str]

# Quiet, offline Flower and Prefect: no telemetry, no update check, no analytics.
BASE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class SiteSpec:
    """One simulated site: its service argv and (optionally) fixed ports.

    In ``service_argv`` the tokens ``{port}`` and ``{site_id}`` are replaced by the
    service's port and the site id, e.g.
    ``[sys.executable, "tests/echo_site_service.py", "--site-id", "{site_id}",
    "--port", "{port}"]``. A service that reads its port from its own config needs
    ``service_port`` set to that port.
    """

    site_id: str
    service_argv: Sequence[str]
    service_port: int | None = None
    supernode_port: int | None = None


@dataclass
class ManagedProcess:
    """A process this network started, its log and its start-up time."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    ready_seconds: float | None = None


# ---------------------------------------------------------------- ports and logs


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it assigns itself (bind to port 0, outgoing connections)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    return 32768, 60999  # Linux's default


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now, outside the ephemeral range.

    A port is claimed here and bound later, after other processes have started: with ten
    sites, ten Spark JVMs start in between, and each binds several ports the kernel picks
    from its ephemeral range (driver, block manager, py4j), as does every outgoing
    connection. A claimed port from that range was then sometimes taken before its
    SuperNode bound it ("address already in use", seen with 10 sites on 2 cores). Ports
    the kernel never hands out by itself are taken only by explicit binds.
    """
    low, _ = ephemeral_ports()
    if low > _CLAIM_FLOOR + 1000:
        pick = random.SystemRandom()
        for _ in range(200):
            port = pick.randrange(_CLAIM_FLOOR, low)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below the range
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Return whether a server could listen on ``127.0.0.1:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def port_owner(port: int) -> str:
    """Describe the process listening on ``port``, if it can be found."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    break
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:120]})"
    return "another process"


def claim_port(requested: int | None, who: str, option: str, taken: set[int]) -> int:
    """Return ``requested`` if it is free (else raise), or a free port if it is None."""
    if requested is None:
        port = free_port()
        while port in taken:
            port = free_port()
    elif requested in taken or not port_is_free(requested):
        owner = "this network" if requested in taken else port_owner(requested)
        raise TransportError(
            f"port {requested} on {HOST}, wanted by {who}, is already in use by {owner}. "
            f"Fix: choose another port with the `{option}` option, or stop the other process."
        )
    else:
        port = requested
    taken.add(port)
    return port


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file (or a note that it is missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path} ---\n{tail}"


def executable(name: str) -> str:
    """Return the path of a console script from this Python's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise TransportError(
            f"`{name}` is not installed next to {sys.executable} nor on PATH. "
            "Fix: install fedrwe's dependencies (`pip install -e .`) in this environment."
        )
    return found


def base_env() -> dict[str, str]:
    """This process's environment, quiet and offline, with this venv's bin on PATH.

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    bare name, so they must be found on PATH even when the venv is not activated.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, **BASE_ENV, "PATH": f"{bin_dir}{os.pathsep}{path}"}


Probe = Callable[[], str | None]


def _http_probe(client: httpx.Client, url: str) -> Probe:
    """Return a probe that finds "ok" once ``GET url`` answers 200."""

    def probe() -> str | None:
        with contextlib.suppress(httpx.HTTPError):
            if client.get(url).status_code == 200:
                return "ok"
        return None

    probe.__doc__ = f"GET {url} never answered 200"
    return probe


def _log_probe(path: Path, pattern: re.Pattern[str], after: int = 0) -> Probe:
    """Return a probe that finds the first group of ``pattern`` once it is logged (at or
    beyond byte ``after`` of the log: a restarted process appends to its old log)."""

    def probe() -> str | None:
        with contextlib.suppress(OSError), path.open("rb") as log:
            log.seek(after)
            if match := pattern.search(log.read().decode("utf-8", errors="replace")):
                return match.group(1)
        return None

    probe.__doc__ = f"{path.name} never logged {pattern.pattern!r}"
    return probe


def _cmdline(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return list(process.cmdline())
    return []


def _load_prctl() -> Callable[..., int] | None:
    """Look up prctl(2) in the parent, so the forked child only has to call it."""
    try:
        prctl: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the starting thread dies (Linux only).

    A backstop for when this process is SIGKILLed and cannot run ``stop()``.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ---------------------------------------------------------------- stopping


def stop_trees(roots: Sequence[psutil.Process], grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM every root, its process group and all descendants; SIGKILL stragglers.

    Returns a description of each process that had to be killed.
    """
    procs: dict[int, psutil.Process] = {}
    groups: set[int] = set()
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs[root.pid] = root
            groups.add(os.getpgid(root.pid))
            for child in root.children(recursive=True):
                procs[child.pid] = child
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    killed: list[str] = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            killed.append(f"pid {proc.pid} ({proc.name()})")
            proc.kill()
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    return killed


# ---------------------------------------------------------------- the network


class LocalNetwork:
    """A Prefect server, a SuperLink and per-site service + SuperNode on 127.0.0.1.

    Use as ``with LocalNetwork(run_dir, sites) as net: net.submit_run({...})``.

    Args:
        run_dir: logs (``logs/<name>.log``), FLWR_HOMEs and the staged app go here.
        sites: the sites to simulate, one service and one SuperNode each.
        prefect_api_url: use this running Prefect server instead of starting one.
        prefect_port, superlink_port: fixed ports (default: free ones).
        prefect_home: the started server's PREFECT_HOME (default ``run_dir/prefect_home``);
            reuse one to keep flow-run history and skip the ~5 s database set-up.
        start_timeout_s: how long each process may take to become ready.
        insecure: no TLS and no SuperNode authentication (debugging only; off by default).
        pki: use these keys instead of making fresh ones in ``run_dir/pki``; its
            ``sites`` must hold a key pair for every site.

    After start: ``prefect_api_url``, ``superlink_address``, ``node_ids`` (site id ->
    Flower node id), ``startup_seconds`` (process name -> seconds, plus ``total``).
    """

    def __init__(
        self,
        run_dir: Path,
        sites: Sequence[SiteSpec],
        *,
        prefect_api_url: str | None = None,
        prefect_port: int | None = None,
        prefect_home: Path | None = None,
        superlink_port: int | None = None,
        start_timeout_s: float = 90.0,
        insecure: bool = False,
        pki: NetworkPki | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.prefect_home = Path(prefect_home or self.run_dir / "prefect_home").resolve()
        self.sites = list(sites)
        self.prefect_api_url = prefect_api_url or ""
        self._ports_requested = (prefect_port, superlink_port)
        self.start_timeout_s = start_timeout_s
        self.processes: dict[str, ManagedProcess] = {}
        self.startup_seconds: dict[str, float] = {}
        self.node_ids: dict[str, int] = {}
        self.superlink_port = 0
        self._logs: list[IO[bytes]] = []
        self._old_sigterm: Any = None
        self._stopped = True
        self.killed_on_stop: list[str] = []  # processes that ignored SIGTERM for STOP_GRACE_S
        self.stop_seconds = 0.0
        self.insecure = insecure
        self.pki = None if insecure else pki
        self.registered_node_ids: dict[str, int] = {}  # site id -> node id given at registration
        self.site_ports: dict[str, tuple[int, int]] = {}  # site id -> (service port, SuperNode port)

    # -- context manager
    def __enter__(self) -> LocalNetwork:
        """Start everything (see ``start``)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every process, whatever happened inside the block."""
        self.stop()

    @property
    def cli_flwr_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` CLI: its config names this SuperLink (and its CA)."""
        return self.run_dir / "flwr_home" / "cli"

    @property
    def superlink_address(self) -> str:
        """``host:port`` of the SuperLink's HTTP API (Fleet, Control and Runtime)."""
        return f"{HOST}:{self.superlink_port}"

    # -- start
    def start(self) -> None:
        """Start the Prefect server, the SuperLink and every site; wait until ready.

        Every port is checked before anything starts. If any start fails (or Ctrl-C /
        SIGTERM arrives) what was started is stopped and the error re-raised.
        """
        ports = self._claim_ports()
        self._stopped = False
        self._install_signal_handlers()
        try:
            self._start_all(*ports)
        except BaseException:
            self.stop()
            raise

    def _claim_ports(self) -> tuple[int, list[tuple[int, int]]]:
        """Return the Prefect port (0: none needed) and each site's two ports."""
        taken: set[int] = set()
        prefect_port, superlink_port = self._ports_requested
        if not self.prefect_api_url:
            prefect_port = claim_port(prefect_port, "the Prefect server", "prefect_port", taken)
        self.superlink_port = claim_port(
            superlink_port, "flower-superlink", "superlink_port", taken
        )
        site_ports = [
            (
                claim_port(s.service_port, f"site service {s.site_id}", "service_port", taken),
                claim_port(
                    s.supernode_port, f"flower-supernode {s.site_id}", "supernode_port", taken
                ),
            )
            for s in self.sites
        ]
        return int(prefect_port or 0), site_ports

    def _start_all(self, prefect_port: int, site_ports: list[tuple[int, int]]) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.site_ports = {site.site_id: ports for site, ports in zip(self.sites, site_ports, strict=True)}
        t0 = time.monotonic()
        if self.prefect_api_url:
            _check_external_prefect(self.prefect_api_url)
        else:
            self._start_prefect(prefect_port)
        if not self.insecure and self.pki is None:
            t_pki = time.monotonic()
            self.pki = make_run_pki(self.run_dir / "pki", self.sites)
            self.startup_seconds["pki"] = time.monotonic() - t_pki
        self._start_superlink()
        self._write_cli_config()
        for site, (service_port, _) in zip(self.sites, site_ports, strict=True):
            self._start_service(site, service_port)
        with httpx.Client(timeout=1.0, verify=self._verify()) as client:  # one SSL context
            probes = {"superlink": _http_probe(client, f"{self._superlink_url}/health")}
            if not self.insecure:  # keys are registered before any SuperNode connects
                self._wait_ready(probes)
                self._register_sites()
                probes = {}
            for site, (service_port, supernode_port) in zip(self.sites, site_ports, strict=True):
                self._start_supernode(site, service_port, supernode_port)
            if "prefect-server" in self.processes:
                probes["prefect-server"] = _http_probe(client, f"{self.prefect_api_url}/health")
            for site, (service_port, _) in zip(self.sites, site_ports, strict=True):
                probes[f"{site.site_id}-service"] = _http_probe(
                    client, f"http://{HOST}:{service_port}/v1/health"
                )
                probes[f"{site.site_id}-supernode"] = _log_probe(
                    self.processes[f"{site.site_id}-supernode"].log_path, SUPERNODE_READY
                )
            found = self._wait_ready(probes)
        self.node_ids = {s.site_id: int(found[f"{s.site_id}-supernode"]) for s in self.sites}
        self.startup_seconds["total"] = time.monotonic() - t0

    def _env(self, **extra: str) -> dict[str, str]:
        env = {**base_env(), **extra}
        if self.prefect_api_url:
            env["PREFECT_API_URL"] = self.prefect_api_url
            env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
        return env

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        self._logs.append(log_file)
        log_file.write(f"$ {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,  # Ctrl-C reaches only us; stop() then ends them
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            raise TransportError(f"cannot start {name} ({argv[0]}): {err}") from err
        self.processes[name] = ManagedProcess(name, popen, log_path, time.monotonic())

    def _start_prefect(self, port: int) -> None:
        home = self.prefect_home
        home.mkdir(parents=True, exist_ok=True)
        argv = [executable("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        argv += ["--analytics-off"]
        env = {k: v for k, v in self._env(PREFECT_HOME=str(home)).items() if k != "PREFECT_API_URL"}
        self._spawn("prefect-server", argv, env)
        self.prefect_api_url = f"http://{HOST}:{port}/api"

    def _start_superlink(self) -> None:
        home = self.run_dir / "flwr_home" / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        argv = [executable("flower-superlink"), *superlink_security_argv(self.pki)]
        argv += ["--disable-runtime-dependency-installation"]
        argv += ["--host", HOST, "--port", str(self.superlink_port)]
        env = self._env(
            FLWR_HOME=str(home), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=SUPEREXEC_POLL_INTERVAL_S
        )
        self._spawn("superlink", argv, env)

    def _start_service(self, site: SiteSpec, service_port: int) -> None:
        argv = [
            a.replace("{port}", str(service_port)).replace("{site_id}", site.site_id)
            for a in site.service_argv
        ]
        self._spawn(f"{site.site_id}-service", argv, self._env())

    def _start_supernode(self, site: SiteSpec, service_port: int, supernode_port: int) -> None:
        home = self.run_dir / "flwr_home" / site.site_id
        home.mkdir(parents=True, exist_ok=True)
        node_config = f"site-id='{site.site_id}' service-url='http://{HOST}:{service_port}'"
        sn_argv = [executable("flower-supernode"), *supernode_security_argv(self.pki, site.site_id)]
        sn_argv += ["--superlink", self.superlink_address, "--host", HOST]
        sn_argv += ["--port", str(supernode_port), "--node-config", node_config]
        env = self._env(
            FLWR_HOME=str(home), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=SUPEREXEC_POLL_INTERVAL_S
        )
        self._spawn(f"{site.site_id}-supernode", sn_argv, env)

    def _write_cli_config(self) -> None:
        from flows.flower_runs import write_cli_config

        ca = None if self.pki is None else self.pki.ca_cert
        write_cli_config(self.cli_flwr_home, self.superlink_address, root_certificates=ca)

    # -- transport security
    @property
    def _superlink_url(self) -> str:
        scheme = "http" if self.pki is None else "https"
        return f"{scheme}://{self.superlink_address}"

    def _verify(self) -> ssl.SSLContext | bool:
        """The probes' TLS check: trust the run's CA only (plain HTTP ignores it)."""
        if self.pki is None:
            return True
        return ssl.create_default_context(cafile=str(self.pki.ca_cert))

    def _register_sites(self) -> None:
        """Register every site's public key with the SuperLink, all at once.

        With ``--enable-supernode-auth`` a SuperNode whose key is not registered is
        refused at activation (and exits), so this must finish before they start.
        """
        if self.pki is None:
            return
        t0 = time.monotonic()
        keys = {s.site_id: self.pki.sites[s.site_id].public_key for s in self.sites}
        self.registered_node_ids = register_supernodes(self.cli_flwr_home, keys, self.start_timeout_s)
        self.startup_seconds["register-supernodes"] = time.monotonic() - t0

    # -- readiness
    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        code = proc.popen.poll()
        if code is not None:
            raise TransportError(
                f"{name} exited with code {code} during start-up.\n{log_tail(proc.log_path)}"
            )

    def _wait_ready(self, probes: Mapping[str, Probe]) -> dict[str, str]:
        """Probe every process until each is ready; record its start-up time.

        Returns what each probe found (a SuperNode's probe finds its node id).
        """
        found: dict[str, str] = {}
        while len(found) < len(probes):
            for name, probe in probes.items():
                if name in found:
                    continue
                self._check_alive(name)
                proc = self.processes[name]
                if (value := probe()) is not None:
                    found[name] = value
                    proc.ready_seconds = time.monotonic() - proc.started_at
                    self.startup_seconds[name] = proc.ready_seconds
                elif time.monotonic() - proc.started_at > self.start_timeout_s:
                    raise TransportError(
                        f"{name} was not ready within {self.start_timeout_s:g} s "
                        f"({probe.__doc__}). Fix: read its log below, or raise "
                        f"start_timeout_s on a slow machine.\n{log_tail(proc.log_path)}"
                    )
            time.sleep(0.1)
        return found

    # -- inspection
    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each started process, summed over its process tree."""
        out: dict[str, int] = {}
        for name, proc in self.processes.items():
            total = 0
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.popen.pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            out[name] = total
        return out

    def pids(self) -> set[int]:
        """Pids of every started process and all their descendants right now."""
        found: set[int] = set()
        for proc in self.processes.values():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.popen.pid)
                found |= {root.pid, *(c.pid for c in root.children(recursive=True))}
        return found

    # -- runs
    def submit_run(self, run_config: RunConfig, *, timeout_s: float = 6 * 3600.0) -> FlowerRun:
        """Submit the fedrwe Flower app with ``run_config`` and follow it to the end.

        ``prefect-api-url`` defaults to this network's Prefect server and ``min-nodes``
        to the number of sites. Raises ``TransportError`` if the run failed.
        """
        from flows.flower_runs import submit_run

        config: dict[str, bool | int | float | str] = {
            "prefect-api-url": self.prefect_api_url,
            "min-nodes": len(self.sites),
            **run_config,
        }
        return submit_run(
            config, flwr_home=self.run_dir / "flwr_home" / "cli", run_dir=self.run_dir,
            timeout_s=timeout_s,
        )

    # -- fault injection: real signals to real processes (tests and operator drills)
    def signal_process(self, name: str, sig: int) -> None:
        """Send ``sig`` to a started process and everything in its process group (a site
        service's Spark JVM too), e.g. ``signal_process("site_02-service", SIGKILL)``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.processes[name].popen.pid, sig)

    def serverapp_pids(self) -> list[int]:
        """Pids of the ServerApp processes (the coordinator of each running study)."""
        with contextlib.suppress(psutil.Error):
            link = psutil.Process(self.processes["superlink"].popen.pid)
            return sorted(p.pid for p in link.children(recursive=True)
                          if any("flwr-serverapp" in part for part in _cmdline(p)))
        return []

    def restart(self, site_id: str, part: str) -> None:
        """Start a site's ``service`` or ``supernode`` again (after it was killed); wait until ready."""
        site = next(s for s in self.sites if s.site_id == site_id)
        service_port, supernode_port = self.site_ports[site_id]
        name = f"{site_id}-{part}"
        with contextlib.suppress(ProcessLookupError):
            self.processes[name].popen.wait(timeout=30)  # reap the killed one
        log_end = self.processes[name].log_path.stat().st_size
        if part == "service":
            self._start_service(site, service_port)
        else:
            self._start_supernode(site, service_port, supernode_port)
        with httpx.Client(timeout=1.0) as client:
            probe = (_http_probe(client, f"http://{HOST}:{service_port}/v1/health") if part == "service"
                     else _log_probe(self.processes[name].log_path, SUPERNODE_READY, after=log_end))
            self._wait_ready({name: probe})

    # -- stop
    def stop(self) -> None:
        """Stop every started process and its descendants; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        roots = []
        for proc in reversed(list(self.processes.values())):
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(proc.popen.pid))
        t0 = time.monotonic()
        with _signals_deferred():  # a second Ctrl-C must not cut the clean-up short
            self.killed_on_stop = stop_trees(roots)
        self.stop_seconds = time.monotonic() - t0
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=STOP_GRACE_S)
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()
        self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)

    def _restore_signal_handlers(self) -> None:
        atexit.unregister(self.stop)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def make_run_pki(folder: Path, sites: Sequence[SiteSpec]) -> NetworkPki:
    """Fresh transport keys for a simulated run (replacing the last run's, on purpose)."""
    return init_network(folder, host=HOST, sites=[s.site_id for s in sites], force=True)


def superlink_security_argv(pki: NetworkPki | None) -> list[str]:
    """``flower-superlink`` flags: TLS with the run's certificate and SuperNode auth."""
    if pki is None:
        return ["--insecure"]
    return [
        "--ssl-ca-certfile", str(pki.ca_cert),
        "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key),
        "--enable-supernode-auth",
    ]


def supernode_security_argv(pki: NetworkPki | None, site_id: str) -> list[str]:
    """``flower-supernode`` flags: trust only the CA; sign in with the site's own key."""
    if pki is None:
        return ["--insecure"]
    if site_id not in pki.sites:
        raise TransportError(
            f"site {site_id!r} has no SuperNode key in {pki.out}. Fix: make one "
            f"(`fedrwe pki site-key --site {site_id}`) or leave pki unset for fresh keys."
        )
    return [
        "--root-certificates", str(pki.ca_cert),
        "--auth-supernode-private-key", str(pki.sites[site_id].private_key),
    ]


def register_supernodes(
    flwr_home: Path, public_keys: Mapping[str, Path], timeout_s: float
) -> dict[str, int]:
    """``flwr supernode register`` each public key (in parallel); return site -> node id."""
    env = {**base_env(), "FLWR_HOME": str(flwr_home)}
    procs = {
        site_id: subprocess.Popen(
            [executable("flwr"), "supernode", "register", str(key), "--format", "json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for site_id, key in public_keys.items()
    }
    node_ids: dict[str, int] = {}
    for site_id, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        answer = re.search(r'"node-id":\s*(\d+)', out or "")
        if answer is None:
            raise TransportError(
                f"the SuperLink did not register site {site_id!r}'s key {public_keys[site_id]}: "
                f"{(out or '').strip()[-800:]}. Fix: check the key file (an OpenSSH EC public "
                "key from `fedrwe pki site-key`) and that the SuperLink runs with TLS."
            )
        node_ids[site_id] = int(answer.group(1))
    return node_ids


def _check_external_prefect(api_url: str) -> None:
    """Fail unless the Prefect server the caller named answers ``/health``."""
    try:
        ok = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise TransportError(
            f"no Prefect server answers at {api_url} (GET /health). Fix: start it "
            "(`prefect server start --host 127.0.0.1`) or leave prefect_api_url unset so "
            "the local network starts its own."
        )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM inside the block (main thread only), then restore them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into an exception so ``with LocalNetwork(...)`` cleans up."""
    raise SystemExit(128 + signum)
