"""Transport tests: the byte transport, the ClientApp forwarder and the local network.

The fast tests use a fake Grid and an in-process echo service. The integration test
starts a real Prefect server, a SuperLink, three SuperNodes and three echo site
services on 127.0.0.1, runs the ``fedrwe-ping`` flow through them and checks that
nothing is left running afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import psutil
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from coordinator.flower_server import (
    PAYLOAD_KEY,
    RECORD_NAME,
    FlowerTransport,
    load_entrypoint,
    pack,
)
from flows.flower_runs import stage_app
from flows.localnet import LocalNetwork, SiteSpec, claim_port
from shared.errors import NoReply, TransportError
from site_agent import flower_client

ECHO_SERVICE = Path(__file__).with_name("echo_site_service.py")


def _load_echo_module() -> ModuleType:
    """Import tests/echo_site_service.py by path (tests/ need not be a package)."""
    spec = importlib.util.spec_from_file_location("echo_site_service", ECHO_SERVICE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_handler = _load_echo_module().make_handler
N_SITES = 3


# ---------------------------------------------------------------- fakes


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Be a ServerApp task: flwr 1.42 reads TaskIdentity when building a Message."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeClock:
    """A clock that advances only when the transport sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGrid:
    """Records pushes; answers pulls from a queue the test fills."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)
        self.pushed: list[Message] = []
        self.queued: list[Message] = []
        self.fail_push_for: set[int] = set()

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{len(self.pushed)}"
            msg.metadata.__dict__["_message_id"] = mid  # as HttpGrid.push_messages does
            self.pushed.append(msg)
            ids.append("" if msg.metadata.dst_node_id in self.fail_push_for else mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        del message_ids  # a fake that returns whatever is queued, stale or not
        out, self.queued = self.queued, []
        return out

    def reply(self, msg: Message, payload: bytes) -> None:
        self.queued.append(Message(pack(payload), reply_to=msg))


def make_transport(grid: FakeGrid) -> tuple[FlowerTransport, FakeClock]:
    clock = FakeClock()
    return FlowerTransport(grid, poll_interval_s=0.05, clock=clock, sleep=clock.sleep), clock


# ---------------------------------------------------------------- FlowerTransport


def test_exchange_returns_replies_keyed_by_node_and_records_sizes() -> None:
    grid = FakeGrid([7, 3])
    transport, _ = make_transport(grid)

    def answer_on_first_pull(message_ids: Iterable[str]) -> list[Message]:
        for msg in grid.pushed:
            node = msg.metadata.dst_node_id
            grid.reply(msg, f"reply-{node}".encode())
        return FakeGrid.pull_messages(grid, message_ids)

    grid.pull_messages = answer_on_first_pull  # type: ignore[method-assign]
    replies = transport.exchange("r1", {7: b"abc", 3: b"de"}, timeout_s=5.0)

    assert replies == {7: b"reply-7", 3: b"reply-3"}
    assert transport.node_ids() == [3, 7]
    assert [m.metadata.group_id for m in grid.pushed] == ["r1", "r1"]
    assert [m.metadata.message_type for m in grid.pushed] == ["query", "query"]
    (stats,) = transport.exchanges
    assert stats["bytes_sent"] == 5
    assert stats["bytes_received"] == 14
    assert stats["round"] == "r1"
    assert stats["stale_discarded"] == 0


def test_retried_round_discards_replies_to_the_earlier_push() -> None:
    grid = FakeGrid([1, 2])
    transport, _ = make_transport(grid)
    with pytest.raises(TransportError):
        transport.exchange("round-a", {1: b"x", 2: b"x"}, timeout_s=0.2)
    first_push = list(grid.pushed)

    def answer(message_ids: Iterable[str]) -> list[Message]:
        # Late replies to the first push arrive first, then the real ones, one duplicate.
        for msg in first_push:
            grid.reply(msg, b"stale")
        for msg in grid.pushed[2:]:
            grid.reply(msg, b"fresh")
        grid.reply(grid.pushed[2], b"duplicate")
        return FakeGrid.pull_messages(grid, message_ids)

    grid.pull_messages = answer  # type: ignore[method-assign]
    replies = transport.exchange("round-a", {1: b"x", 2: b"x"}, timeout_s=5.0)

    assert replies == {1: b"fresh", 2: b"fresh"}
    assert transport.exchanges[-1]["stale_discarded"] == 3


def test_timeout_names_missing_nodes_round_and_timeout() -> None:
    grid = FakeGrid([11, 12, 13])
    transport, clock = make_transport(grid)

    def only_node_12(message_ids: Iterable[str]) -> list[Message]:
        if not grid.queued and clock.now == 0.0:
            grid.reply(grid.pushed[1], b"ok")
        return FakeGrid.pull_messages(grid, message_ids)

    grid.pull_messages = only_node_12  # type: ignore[method-assign]
    with pytest.raises(NoReply) as err:
        transport.exchange("propensity-3", dict.fromkeys([11, 12, 13], b"q"), timeout_s=2.5)

    text = str(err.value)
    assert "[11, 13]" in text
    assert "'propensity-3'" in text
    assert "2.5 s" in text
    # the replies that came travel with the error, and the exchange is on record as partial
    assert err.value.replies == {12: b"ok"}
    assert err.value.missing == [11, 13]
    assert [e["missing"] for e in transport.exchanges] == [[11, 13]]


def test_refused_push_names_the_node() -> None:
    grid = FakeGrid([1, 2])
    grid.fail_push_for = {2}
    transport, _ = make_transport(grid)
    with pytest.raises(TransportError, match=r"SuperNode\(s\) \[2\]"):
        transport.exchange("r", {1: b"a", 2: b"b"}, timeout_s=1.0)


def test_flower_error_reply_becomes_a_json_error_payload() -> None:
    grid = FakeGrid([5])
    transport, _ = make_transport(grid)

    def crash(message_ids: Iterable[str]) -> list[Message]:
        grid.queued.append(
            Message(Error(code=0, reason="ClientApp crashed"), reply_to=grid.pushed[0])
        )
        return FakeGrid.pull_messages(grid, message_ids)

    grid.pull_messages = crash  # type: ignore[method-assign]
    reply = json.loads(transport.exchange("r", {5: b"q"}, timeout_s=1.0)[5])
    assert reply["status"] == "unavailable"
    assert reply["site_id"] == "node-5"
    assert "ClientApp crashed" in reply["error"]


def test_wait_for_nodes_times_out_with_the_count() -> None:
    transport, _ = make_transport(FakeGrid([1]))
    assert transport.wait_for_nodes(1, timeout_s=1.0) == [1]
    with pytest.raises(TransportError, match="only 1 of 3 SuperNodes"):
        transport.wait_for_nodes(3, timeout_s=1.0)


def test_transport_is_stored_by_prefect_as_a_placeholder_not_its_grid() -> None:
    """Prefect JSON-encodes flow parameters; the Grid (and its token) must not leak."""
    from flows.ping import ping_flow

    transport, _ = make_transport(FakeGrid([1]))
    stored = ping_flow.serialize_parameters({"transport": transport})
    assert stored["transport"] == "<FlowerTransport>"


def test_load_entrypoint_explains_a_bad_name() -> None:
    assert callable(load_entrypoint("flows.ping:run_ping"))
    with pytest.raises(TransportError, match="module:function"):
        load_entrypoint("flows.ping")
    with pytest.raises(TransportError, match="cannot be loaded"):
        load_entrypoint("flows.nope:run")


# ---------------------------------------------------------------- ClientApp


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler("site_x"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _instruction(payload: bytes) -> Message:
    msg = Message(pack(payload), dst_node_id=9, message_type="query", group_id="g")
    msg.metadata.__dict__["_message_id"] = "instruction-1"
    return msg


def _context(node_config: dict[str, str | float]) -> Context:
    return Context(run_id=1, node_id=9, node_config=node_config, state=RecordDict(), run_config={})


def _reply_payload(reply: Message) -> dict[str, object]:
    raw = reply.content.config_records[RECORD_NAME][PAYLOAD_KEY]
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


def test_client_forwards_bytes_to_the_site_service(echo_url: str) -> None:
    ctx = _context({"site-id": "site_x", "service-url": echo_url})
    reply = flower_client.query(_instruction(b'{"kind": "ping"}'), ctx)
    assert reply.metadata.reply_to_message_id == "instruction-1"
    assert _reply_payload(reply) == {"status": "ok", "site_id": "site_x", "echo": {"kind": "ping"}}


def test_client_replies_with_an_error_when_the_service_is_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ctx = _context({"site-id": "site_y", "service-url": dead, "service-timeout-s": 2.0})
    payload = _reply_payload(flower_client.query(_instruction(b"{}"), ctx))
    assert payload["status"] == "unavailable"
    assert payload["site_id"] == "site_y"
    assert f"{dead}/v1/round" in str(payload["error"])
    assert "Fix:" in str(payload["error"])


def test_client_replies_with_an_error_on_non_200(echo_url: str) -> None:
    ctx = _context({"site-id": "site_x", "service-url": echo_url})
    payload = _reply_payload(flower_client.query(_instruction(b"not json"), ctx))
    assert payload["status"] == "unavailable"
    assert "HTTP 400" in str(payload["error"])


def test_client_replies_with_an_error_on_a_malformed_message() -> None:
    msg = Message(
        RecordDict({"other": ConfigRecord({"x": 1})}), dst_node_id=9, message_type="query"
    )
    msg.metadata.__dict__["_message_id"] = "m"
    ctx = _context({"site-id": "site_x", "service-url": "http://127.0.0.1:1"})
    payload = _reply_payload(flower_client.query(msg, ctx))
    assert payload["status"] == "unavailable"
    assert RECORD_NAME in str(payload["error"])


# ---------------------------------------------------------------- localnet helpers


def test_busy_port_is_refused_with_its_number_and_the_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TransportError) as err:
            claim_port(port, "flower-superlink", "superlink_port", set())
    assert f"port {port}" in str(err.value)
    assert "flower-superlink" in str(err.value)
    assert "superlink_port" in str(err.value)


def test_stage_app_declares_extra_run_config_keys(tmp_path: Path) -> None:
    from flows.flower_runs import DEFAULT_APP_DIR

    staged = stage_app(DEFAULT_APP_DIR, {"out-dir": "/x", "ping-timeout-s": 5.0}, tmp_path / "a")
    config = tomllib.loads((staged / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["config"]["ping-timeout-s"] == 5.0
    assert config["config"]["out-dir"] == ""  # declared keys keep their defaults
    assert config["components"]["serverapp"] == "fedrwe_app.server_app:app"


# ---------------------------------------------------------------- integration


def _alive(pids: set[int]) -> list[str]:
    left = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            continue
    return left


def _prefect_runs(api_url: str) -> tuple[list[object], list[object]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            flows = FlowFilter(name=FlowFilterName(any_=["fedrwe-ping"]))
            flow_runs = client.read_flow_runs(flow_filter=flows)
            ids = FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in flow_runs]))
            task_runs = client.read_task_runs(flow_run_filter=ids)
    return list(flow_runs), list(task_runs)


@pytest.mark.integration
def test_ping_through_a_real_local_federation(tmp_path: Path) -> None:
    sites = [
        SiteSpec(
            f"site_0{i}",
            [sys.executable, str(ECHO_SERVICE), "--site-id", "{site_id}", "--port", "{port}"],
        )
        for i in range(1, N_SITES + 1)
    ]
    out_dir = tmp_path / "out"
    with LocalNetwork(tmp_path / "run", sites) as net:
        pids = net.pids()
        run = net.submit_run(
            {"entrypoint": "flows.ping:run_ping", "out-dir": str(out_dir), "ping-timeout-s": 60.0}
        )
        rss = net.rss_bytes()

        # A port this network holds is refused, naming the port and its owner.
        with pytest.raises(TransportError) as busy:
            LocalNetwork(tmp_path / "other", sites, superlink_port=net.superlink_port).start()
        assert f"port {net.superlink_port}" in str(busy.value)
        assert "flower-superlink" in str(busy.value)

        deadline = time.monotonic() + 20.0
        flow_runs, task_runs = _prefect_runs(net.prefect_api_url)
        while len(task_runs) < 2 and time.monotonic() < deadline:  # recorded from events
            time.sleep(0.5)
            flow_runs, task_runs = _prefect_runs(net.prefect_api_url)
        startup = dict(net.startup_seconds)
        node_ids = dict(net.node_ids)

    assert _alive(pids) == []

    ping = json.loads((out_dir / "ping.json").read_text())
    assert sorted(ping["nodes"]) == sorted(node_ids.values())
    assert [r["round"] for r in ping["rounds"]] == ["ping-1", "ping-2"]
    for rnd in ping["rounds"]:
        assert len(rnd["replies"]) == N_SITES
        site_of = {int(node): reply["site_id"] for node, reply in rnd["replies"].items()}
        assert site_of == {node: site for site, node in node_ids.items()}
        for reply in rnd["replies"].values():
            assert reply["status"] == "ok"
            assert reply["echo"] == {"kind": "ping", "round": rnd["round"]}

    assert run.status == "finished:completed"
    assert len(flow_runs) == 1
    assert flow_runs[0].state_type.value == "COMPLETED"  # type: ignore[attr-defined]
    assert len(task_runs) == 2
    assert {t.state_type.value for t in task_runs} == {"COMPLETED"}  # type: ignore[attr-defined]

    metrics = {
        "startup_seconds": startup,
        "exchange_seconds": [r["seconds"] for r in ping["rounds"]],
        "run_seconds": run.seconds,
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
    }
    (tmp_path / "transport_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
