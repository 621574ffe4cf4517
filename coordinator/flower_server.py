"""The coordinator's Flower side: a byte transport over the Grid and the ServerApp.

``FlowerTransport`` sends one payload per SuperNode and collects the replies with its
own push/pull loop (``grid.push_messages`` then ``grid.pull_messages`` every
``poll_interval_s``), which is faster than ``grid.send_and_receive`` (that one sleeps
3 s between pulls). Replies to an earlier push of the same round (a retried Prefect
task) are discarded by matching ``reply_to_message_id`` against this push's ids.

The ServerApp's ``main`` reads the run config, points Prefect at the coordinator's
Prefect server, waits until enough SuperNodes are online and hands
``(transport, run_config)`` to the study entrypoint (``module:function``).

Message layout (both directions), shared with ``site_agent.flower_client``:
``RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY: <bytes>})})``, message type
``"query"``, ``group_id`` = the round name.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import httpx
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from shared.errors import NoReply, TransportError
from shared.protocol.wire import PAYLOAD_KEY, RECORD_NAME, error_reply

DEFAULT_ENTRYPOINT = "flows.study:run_study"
DEFAULT_POLL_INTERVAL_S = 0.05
DEFAULT_NODE_WAIT_S = 60.0

log = logging.getLogger("flwr")  # Flower's handler puts it in the ServerApp log


class GridLike(Protocol):
    """The part of ``flwr.serverapp.Grid`` the transport uses (a fake one in tests)."""

    def get_node_ids(self) -> Iterable[int]:
        """Return the ids of the SuperNodes online for this run."""
        ...

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages; return their ids in order (``None`` where a push failed)."""
        ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies available so far to the given message ids."""
        ...


def pack(payload: bytes) -> RecordDict:
    """Wrap ``payload`` in the message layout both sides agree on."""
    return RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY: payload})})


def unpack(reply: Message, node_id: int) -> bytes:
    """Return a reply's payload; a Flower-level error becomes a JSON error payload.

    A ClientApp that crashed or a reply whose objects were lost arrives as a Flower
    ``Error``; it is turned into the same ``{"status": "error", ...}`` layout the
    ClientApp uses, so callers handle every failed site one way.
    """
    if reply.has_error():
        err = reply.error
        return _error_payload(
            node_id,
            f"Flower error {err.code} from SuperNode {node_id}: {err.reason}. Fix: read "
            "that SuperNode's log (the ClientApp runs there) and restart it if it crashed.",
        )
    record = reply.content.config_records.get(RECORD_NAME)
    value = None if record is None else record.get(PAYLOAD_KEY)
    if not isinstance(value, bytes):
        return _error_payload(
            node_id,
            f"reply from SuperNode {node_id} has no bytes at {RECORD_NAME!r}/{PAYLOAD_KEY!r}. "
            "Fix: install the same fedrwe version at the site and at the coordinator.",
        )
    return value


def _error_payload(node_id: int, error: str) -> bytes:
    return error_reply(f"node-{node_id}", error)


class FlowerTransport:
    """Exchange one payload per SuperNode per round over a Flower ``Grid``.

    Attributes:
        exchanges: one dict per completed ``exchange``: ``round``, ``nodes``,
            ``seconds``, ``bytes_sent``, ``bytes_received``, ``bytes_by_node`` (node id ->
            [sent, received]), ``stale_discarded``.

    ``__slots__`` is deliberate: Prefect stores flow parameters it can JSON-encode, and
    without slots it would encode ``vars()`` down to the Grid's executor token. With
    slots the transport is stored as the placeholder ``"<FlowerTransport>"``.
    """

    __slots__ = ("_clock", "_grid", "_poll_interval_s", "_sleep", "exchanges")

    def __init__(
        self,
        grid: GridLike,
        *,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._grid = grid
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep
        self.exchanges: list[dict[str, Any]] = []

    def node_ids(self) -> list[int]:
        """Return the ids of the SuperNodes online for this run, sorted."""
        return sorted(int(n) for n in self._grid.get_node_ids())

    def wait_for_nodes(self, min_nodes: int, timeout_s: float) -> list[int]:
        """Block until at least ``min_nodes`` SuperNodes are online; return their ids.

        Raises:
            TransportError: fewer than ``min_nodes`` were online after ``timeout_s``.
        """
        deadline = self._clock() + timeout_s
        nodes = self.node_ids()
        while len(nodes) < min_nodes:
            if self._clock() >= deadline:
                raise TransportError(
                    f"only {len(nodes)} of {min_nodes} SuperNodes connected to the SuperLink "
                    f"within {timeout_s:g} s (online: {nodes}). Fix: start the missing "
                    "sites' `flower-supernode` (check their logs for connection errors), "
                    "or lower run config `min-nodes`."
                )
            self._sleep(max(self._poll_interval_s, 0.2))
            nodes = self.node_ids()
        return nodes

    def exchange(
        self, round_name: str, payloads: Mapping[int, bytes], timeout_s: float
    ) -> dict[int, bytes]:
        """Send ``payloads[node]`` to each node and return each node's reply bytes.

        Raises:
            TransportError: a message could not be pushed.
            NoReply: not every node replied within ``timeout_s`` (names the missing nodes,
                the round, the timeout; carries the replies that came).
        """
        start = self._clock()
        node_of = self._push(round_name, payloads, timeout_s)
        replies: dict[int, bytes] = {}
        stale = 0
        deadline = start + timeout_s
        while True:
            pending = [mid for mid, node in node_of.items() if node not in replies]
            if not pending:
                break
            for reply in self._grid.pull_messages(pending):
                node = node_of.get(reply.metadata.reply_to_message_id)
                if node is None or node in replies:
                    stale += 1  # a reply to an earlier push (retried round) or a duplicate
                    continue
                replies[node] = unpack(reply, node)
            if len(replies) == len(node_of):
                break
            if self._clock() >= deadline:
                missing = sorted(set(node_of.values()) - set(replies))
                self._record(round_name, node_of, payloads, replies, start, stale, missing)
                raise NoReply(
                    f"round {round_name!r}: no reply from SuperNode(s) {missing} within "
                    f"{timeout_s:g} s ({len(replies)} of {len(node_of)} replied). Fix: check "
                    "those sites' SuperNode and site-service logs, or raise the round's "
                    "timeout if their computation is legitimately slow.",
                    replies, missing,
                )
            self._sleep(self._poll_interval_s)
        self._record(round_name, node_of, payloads, replies, start, stale, [])
        return replies

    def _record(
        self, round_name: str, node_of: Mapping[str, int], payloads: Mapping[int, bytes],
        replies: Mapping[int, bytes], start: float, stale: int, missing: list[int],
    ) -> None:
        self.exchanges.append(
            {
                "round": round_name,
                "nodes": len(node_of),
                "seconds": self._clock() - start,
                "bytes_sent": sum(len(p) for p in payloads.values()),
                "bytes_received": sum(len(r) for r in replies.values()),
                "bytes_by_node": {
                    node: [len(payloads[node]), len(replies[node]) if node in replies else 0] for node in sorted(payloads)
                },
                "stale_discarded": stale,
                "missing": missing,
            }
        )

    def _push(
        self, round_name: str, payloads: Mapping[int, bytes], timeout_s: float
    ) -> dict[str, int]:
        """Push one message per node; return ``{message_id: node_id}``."""
        nodes = list(payloads)
        messages = [
            Message(
                pack(payloads[node]),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id=round_name,
                ttl=max(float(timeout_s), 1.0),
            )
            for node in nodes
        ]
        ids = list(self._grid.push_messages(messages))
        failed = [node for node, mid in zip(nodes, ids, strict=False) if not mid]
        if failed or len(ids) != len(nodes):
            raise TransportError(
                f"round {round_name!r}: the SuperLink did not accept the messages for "
                f"SuperNode(s) {failed or nodes}. Fix: check that those nodes are still "
                "online (`flwr supernode ls`) and the SuperLink's log for the reason."
            )
        return {str(mid): node for node, mid in zip(nodes, ids, strict=True)}


def load_entrypoint(spec: str) -> Callable[[FlowerTransport, dict[str, Any]], object]:
    """Import ``module:function`` and return the function.

    Raises:
        TransportError: the spec is malformed or names nothing importable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TransportError(
            f"run config `entrypoint` = {spec!r} is not of the form 'module:function'. "
            f"Fix: pass e.g. entrypoint='{DEFAULT_ENTRYPOINT}'."
        )
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise TransportError(
            f"run config `entrypoint` = {spec!r} cannot be loaded ({err}). Fix: install "
            "fedrwe in the SuperLink's environment (`pip install -e .`) or correct the name."
        ) from err
    if not callable(func):
        raise TransportError(f"run config `entrypoint` = {spec!r} is not callable.")
    return func  # type: ignore[no-any-return]


def check_prefect_api(api_url: str, timeout_s: float = 10.0) -> None:
    """Fail loudly unless a Prefect server answers at ``api_url``.

    Raises:
        TransportError: names the URL and how to start or point at a server.
    """
    fix = (
        "Fix: start one with `prefect server start --host 127.0.0.1 --port 4200` and pass "
        "run config prefect-api-url='http://127.0.0.1:4200/api'."
    )
    if not api_url:
        raise TransportError(f"no Prefect API URL: run config `prefect-api-url` is empty. {fix}")
    try:
        response = httpx.get(api_url.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise TransportError(f"Prefect server at {api_url} is unreachable ({err}). {fix}") from err
    if response.status_code != 200:
        raise TransportError(
            f"Prefect server at {api_url} answered /health with HTTP {response.status_code}. {fix}"
        )


@contextmanager
def prefect_server(api_url: str) -> Iterator[None]:
    """Point Prefect at ``api_url`` for this process; never start a temporary server."""
    # Children (if any) inherit the environment; this process uses temporary_settings,
    # because Prefect read its settings when it was first imported.
    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        temporary_settings,
    )

    with temporary_settings(
        updates={PREFECT_API_URL: api_url, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}
    ):
        yield


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study entrypoint named in the run config over this Flower run."""
    logging.getLogger("flwr").propagate = False  # Flower logs once, not twice
    run_config: dict[str, Any] = dict(context.run_config)
    run_config.setdefault("flower-run-id", context.run_id)
    entry = load_entrypoint(str(run_config.get("entrypoint", DEFAULT_ENTRYPOINT)))
    api_url = str(run_config.get("prefect-api-url") or os.environ.get("PREFECT_API_URL", ""))
    check_prefect_api(api_url)

    transport = FlowerTransport(
        grid, poll_interval_s=float(run_config.get("poll-interval-s", DEFAULT_POLL_INTERVAL_S))
    )
    min_nodes = int(run_config.get("min-nodes", 1))
    if min_nodes > 0:
        nodes = transport.wait_for_nodes(
            min_nodes, float(run_config.get("node-wait-s", DEFAULT_NODE_WAIT_S))
        )
        log.info("fedrwe: %d SuperNodes online: %s", len(nodes), nodes)
    with prefect_server(api_url):
        entry(transport, run_config)
