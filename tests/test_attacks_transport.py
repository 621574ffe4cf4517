"""Attacks on the transport: joining the federation or talking to the SuperLink unauthorised.

Every attack runs against real processes on 127.0.0.1: a ``LocalNetwork`` with TLS and
SuperNode authentication on (its default), two echo sites, and real ``flower-supernode``
/ ``flwr`` / ``flower-superlink`` processes as the attacker. Each test asserts what the
SuperLink did (its log, its node list), not only that the attacker's process failed, and
each refusal test has a control that succeeds with the right credential, so a test fails
if the refusal had some other cause.

Attacks tried (each must be refused):
  1. a SuperNode with a key the operator never registered joins;
  2. a SuperNode with no key at all joins;
  3. a SuperNode without TLS (plain HTTP) joins;
  3b. a SuperNode that trusts another CA (e.g. a man in the middle's) connects;
  4. a client (flwr CLI) trusting no CA or another CA talks to the Control API;
  5. a client trusting no CA talks plain HTTP to the Control API;
  6. a SuperLink presents a certificate from the right CA but for another host;
  7. a SuperNode joins that wrong-host SuperLink (its key would be sent to an impostor);
and the study rounds reach only the registered sites (8), end to end over TLS.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography.hazmat.primitives import serialization

from flows.flower_runs import write_cli_config
from flows.localnet import (
    HOST,
    LocalNetwork,
    SiteSpec,
    base_env,
    executable,
    free_port,
    stop_trees,
    superlink_security_argv,
)
from shared.pki import NetworkPki, SiteKeyFiles, init_network, issue_server_cert, write_site_key

ECHO_SERVICE = Path(__file__).with_name("echo_site_service.py")
N_SITES = 2
JOIN_WAIT_S = 45.0  # how long an attacker's SuperNode may try before we call it refused


@dataclass
class Federation:
    """The secure network under attack and the attacker's material."""

    net: LocalNetwork
    root: Path
    intruder: SiteKeyFiles  # a well-formed key nobody registered
    rogue_pki: NetworkPki  # another CA, with a certificate for the right host


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("attacks")
    sites = [
        SiteSpec(f"site_0{i}", [sys.executable, str(ECHO_SERVICE), "--site-id", "{site_id}", "--port", "{port}"])
        for i in range(1, N_SITES + 1)
    ]
    intruder = write_site_key(root / "intruder", "intruder")
    rogue = init_network(root / "rogue", host=HOST)
    with LocalNetwork(root / "run", sites, prefect_api_url=prefect_api_url) as net:
        yield Federation(net, root, intruder, rogue)


# ---------------------------------------------------------------- attacker's tools


def spki_pem(public_key_file: Path) -> str:
    """The PEM the SuperLink logs for a SuperNode's public key."""
    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def try_to_join(superlink: str, name: str, security: Sequence[str], logs: Path) -> tuple[int | None, str]:
    """Start a SuperNode as an attacker would; return its exit code (None: still trying) and log.

    It gets a few connection attempts; a SuperNode that is refused at activation exits
    at once, one that cannot complete TLS keeps retrying until ``JOIN_WAIT_S``.
    """
    home = logs / f"{name}_home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    argv = [executable("flower-supernode"), *security, "--superlink", superlink, "--host", HOST]
    argv += ["--port", str(free_port()), "--max-retries", "3", "--max-wait-time", "20"]
    argv += ["--node-config", f"site-id='{name}' service-url='http://{HOST}:9'"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, env={**base_env(), "FLWR_HOME": str(home)}, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    code: int | None
    try:
        code = proc.wait(timeout=JOIN_WAIT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_trees([psutil.Process(proc.pid)] if proc.poll() is None else [])
    return code, log_path.read_text(errors="replace")


def flwr_cli(flwr_home: Path, *args: str) -> dict[str, object]:
    """Run ``flwr <args> --format json`` with the given CLI config; return its JSON answer."""
    done = subprocess.run(
        [executable("flwr"), *args, "--format", "json"], env={**base_env(), "FLWR_HOME": str(flwr_home)},
        capture_output=True, text=True, timeout=120, check=False,
    )
    return dict(json.loads(done.stdout[done.stdout.find("{"):]))


def registered_nodes(net: LocalNetwork) -> set[int]:
    """The node ids the SuperLink knows (registered or online), asked with the right CA."""
    answer = flwr_cli(net.cli_flwr_home, "supernode", "list")
    assert answer["success"], answer
    nodes = answer["nodes"]
    assert isinstance(nodes, list)
    return {int(n["node-id"]) for n in nodes}


def superlink_log(net: LocalNetwork) -> str:
    return net.processes["superlink"].log_path.read_text(errors="replace")


# ---------------------------------------------------------------- joining


@pytest.mark.integration
def test_a_supernode_with_an_unregistered_key_is_refused(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    assert net.pki is not None
    security = ["--root-certificates", str(net.pki.ca_cert)]
    code, log = try_to_join(net.superlink_address, "intruder",
                            [*security, "--auth-supernode-private-key", str(federation.intruder.private_key)], tmp_path)
    assert code is not None, log  # it was told no and gave up
    assert code != 0, log
    assert "SuperNode ID" not in log
    assert "Failed to activate SuperNode" in log
    refusal = next(line for line in superlink_log(net).splitlines() if "No SuperNode found with the given public key" in line)
    assert spki_pem(federation.intruder.public_key).splitlines()[1] in refusal.replace("\\n", "\n")
    assert registered_nodes(net) == set(net.node_ids.values())


@pytest.mark.integration
def test_a_supernode_without_a_key_is_refused(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    assert net.pki is not None
    before = superlink_log(net).count("[ApiError:2001]")
    code, log = try_to_join(net.superlink_address, "keyless", ["--root-certificates", str(net.pki.ca_cert)], tmp_path)
    assert code is not None, log
    assert code != 0, log
    assert "SuperNode ID" not in log
    assert "All SuperNodes must be registered" in log
    assert superlink_log(net).count("[ApiError:2001]") == before + 1  # refused by the SuperLink
    assert registered_nodes(net) == set(net.node_ids.values())


@pytest.mark.integration
def test_a_plain_http_supernode_cannot_connect(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    fleet_calls = superlink_log(net).count("/v1/fleet/")
    code, log = try_to_join(net.superlink_address, "plain", ["--insecure"], tmp_path)
    assert code != 0, log  # still retrying or gave up
    assert "SuperNode ID" not in log
    assert "Connection attempt failed" in log
    assert superlink_log(net).count("/v1/fleet/") == fleet_calls  # never reached the Fleet API
    assert registered_nodes(net) == set(net.node_ids.values())


@pytest.mark.integration
def test_a_supernode_that_trusts_another_ca_does_not_connect(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    fleet_calls = superlink_log(net).count("/v1/fleet/")
    security = ["--root-certificates", str(federation.rogue_pki.ca_cert)]
    security += ["--auth-supernode-private-key", str(federation.intruder.private_key)]
    code, log = try_to_join(net.superlink_address, "rogue_ca", security, tmp_path)
    assert code != 0, log
    assert "SuperNode ID" not in log
    assert "CERTIFICATE_VERIFY_FAILED" in log  # stopped at TLS, before its key was even used
    assert superlink_log(net).count("/v1/fleet/") == fleet_calls


# ---------------------------------------------------------------- the Control API


@pytest.mark.integration
def test_a_client_without_the_federations_ca_cannot_use_the_control_api(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    system_trust, rogue_ca = tmp_path / "system", tmp_path / "rogue"
    write_cli_config(system_trust, net.superlink_address)
    config = (system_trust / "config.toml").read_text().replace("insecure = true\n", "")
    (system_trust / "config.toml").write_text(config)  # TLS with the system's trust store
    write_cli_config(rogue_ca, net.superlink_address, root_certificates=federation.rogue_pki.ca_cert)
    for flwr_home in (system_trust, rogue_ca):
        answer = flwr_cli(flwr_home, "supernode", "list")
        assert answer["success"] is False, (flwr_home, answer)
        assert "unavailable" in str(answer["error-message"])
    assert registered_nodes(net) == set(net.node_ids.values())  # control: the right CA works


@pytest.mark.integration
def test_plain_http_to_the_control_api_is_refused(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    write_cli_config(tmp_path, net.superlink_address)  # insecure = true: plain HTTP
    answer = flwr_cli(tmp_path, "supernode", "register", str(federation.intruder.public_key))
    assert answer["success"] is False, answer
    with pytest.raises(httpx.HTTPError):  # the port speaks only TLS
        httpx.get(f"http://{net.superlink_address}/health", timeout=5.0)
    assert registered_nodes(net) == set(net.node_ids.values())  # the intruder was not added


# ---------------------------------------------------------------- a certificate for another host


@pytest.fixture(scope="module")
def wrong_host_superlink(federation: Federation) -> Iterator[tuple[str, Path, NetworkPki]]:
    """A SuperLink on 127.0.0.1 whose certificate (from the federation's CA) names another host."""
    net = federation.net
    assert net.pki is not None
    folder = federation.root / "wrong_host"
    folder.mkdir()
    pki = NetworkPki(
        out=folder, ca_cert=net.pki.ca_cert, ca_key=net.pki.ca_key, server_cert=folder / "superlink.pem",
        server_key=folder / "superlink.key", host="superlink.other-hospital.example",
    )
    issue_server_cert(pki.ca_cert, pki.ca_key, [pki.host], pki.server_cert, pki.server_key)
    port = free_port()
    home = federation.root / "wrong_host_home"
    home.mkdir()
    log_path = federation.root / "wrong_host_superlink.log"
    argv = [executable("flower-superlink"), *superlink_security_argv(pki), "--disable-runtime-dependency-installation"]
    argv += ["--host", HOST, "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env={**base_env(), "FLWR_HOME": str(home)}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        lax = ssl.create_default_context(cafile=str(net.pki.ca_cert))
        lax.check_hostname = False  # the control: only the host name is wrong
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"https://{HOST}:{port}/health", verify=lax, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log_path.read_text())
            time.sleep(0.2)
        yield f"{HOST}:{port}", log_path, pki
    finally:
        stop_trees([psutil.Process(proc.pid)])


@pytest.mark.integration
def test_a_certificate_for_another_host_is_rejected(
    federation: Federation, wrong_host_superlink: tuple[str, Path, NetworkPki], tmp_path: Path
) -> None:
    address, _, _ = wrong_host_superlink
    net = federation.net
    assert net.pki is not None
    strict = ssl.create_default_context(cafile=str(net.pki.ca_cert))
    with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
        httpx.get(f"https://{address}/health", verify=strict, timeout=5.0)
    write_cli_config(tmp_path, address, root_certificates=net.pki.ca_cert)
    answer = flwr_cli(tmp_path, "supernode", "list")
    assert answer["success"] is False, answer


@pytest.mark.integration
def test_a_supernode_does_not_join_a_superlink_with_another_hosts_certificate(
    federation: Federation, wrong_host_superlink: tuple[str, Path, NetworkPki], tmp_path: Path
) -> None:
    address, log_path, _ = wrong_host_superlink
    net = federation.net
    assert net.pki is not None
    security = ["--root-certificates", str(net.pki.ca_cert)]
    security += ["--auth-supernode-private-key", str(net.pki.sites["site_01"].private_key)]
    code, log = try_to_join(address, "misled", security, tmp_path)
    assert code != 0, log
    assert "SuperNode ID" not in log
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in log
    assert "/v1/fleet/" not in log_path.read_text(errors="replace")  # no request got through TLS


# ---------------------------------------------------------------- the study path


@pytest.mark.integration
def test_rounds_reach_only_the_registered_sites_over_tls(federation: Federation, tmp_path: Path) -> None:
    net = federation.net
    assert net.pki is not None
    log = superlink_log(net)
    assert f"Uvicorn running on https://{net.superlink_address}" in log
    assert log.count("[Fleet.ActivateNode] Activated node_id=") == N_SITES
    assert net.registered_node_ids == net.node_ids  # each SuperNode is the key registered for its site
    run = net.submit_run({"entrypoint": "flows.ping:run_ping", "out-dir": str(tmp_path), "ping-timeout-s": 60.0})
    assert run.status == "finished:completed"
    ping = json.loads((tmp_path / "ping.json").read_text())
    assert sorted(ping["nodes"]) == sorted(net.node_ids.values())
    for rnd in ping["rounds"]:
        assert {reply["site_id"] for reply in rnd["replies"].values()} == set(net.node_ids)
