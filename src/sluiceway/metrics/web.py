"""A web view of a running flow: its graph with live numbers, as a :data:`~sluiceway.Monitor`.

::

    import sluiceway as sw
    from sluiceway.metrics.web import WebView

    sw.run(flow, monitor=WebView(8080))   # open http://127.0.0.1:8080/

``GET /`` is one static page (inline SVG, CSS and JavaScript, no build step, nothing
fetched from elsewhere) that draws the dataflow graph -- operators as nodes grouped by
fused stage, channels as edges with their fill -- and polls ``GET /api/flow`` about once a
second.  Each node is coloured by its backpressure ratio, from green (never waits for
room downstream) to red (always waits).

Nothing here runs per record.  The view samples :meth:`FlowHandle.metrics()
<sluiceway.FlowHandle.metrics>` every ``interval`` seconds of the flow's clock and derives
rates from the last two samples (:meth:`FlowSnapshot.rates_since
<sluiceway.FlowSnapshot.rates_since>`); a request reads the counters of that moment.  The
HTTP server runs on the flow's event loop (asyncio streams, standard library only) and is
closed, with every open connection, when the flow ends.

The pure parts are :func:`flow_graph` (a flow's static layout) and :func:`flow_state`
(the ``/api/flow`` document for a snapshot):

>>> import sluiceway as sw
>>> flow = sw.Flow("tiny")
>>> nums = flow.source(sw.sources.Iterable([1, 2]), name="nums")
>>> nums.buffer(8, name="buf").sink(sw.sinks.Collect(), name="out")
>>> graph = flow_graph(flow)
>>> [(n.name, n.stage, n.column, n.row) for n in graph.nodes]
[('nums', 0, 0, 0), ('buf', 1, 1, 0), ('out', 1, 2, 0)]
>>> [(e.source, e.target, e.channel) for e in graph.edges]
[('nums', 'buf', 'buf.in'), ('buf', 'out', None)]
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

from sluiceway.connectors.push import HttpIngest
from sluiceway.metrics.http import PLAIN, HttpMonitor, PostResponse, Response
from sluiceway.metrics.registry import FlowSnapshot
from sluiceway.metrics.web_graph import (
    FlowGraph,
    GraphEdge,
    GraphNode,
    GraphStage,
    flow_graph,
    layout,
)
from sluiceway.metrics.web_state import (
    EdgeState,
    FlowState,
    LoadState,
    NodeState,
    StageState,
    flow_state,
)
from sluiceway.plan import topology
from sluiceway.runtime.handle import FlowHandle

__all__ = [
    "EdgeState",
    "FlowGraph",
    "FlowState",
    "GraphEdge",
    "GraphNode",
    "GraphStage",
    "LoadState",
    "NodeState",
    "StageState",
    "WebView",
    "flow_graph",
    "flow_state",
]

log = logging.getLogger("sluiceway.metrics")

_PAGE = "web.html"


# -- the server -----------------------------------------------------------------------------

_INGEST = "/api/ingest/"
_STATE = "/api/state/"
_UNKNOWN_BODY = 64 * 1024  # read before answering 404 to a POST for no known source


def _state_answer(handle: FlowHandle, operator: str, query: str) -> Response:
    """``GET /api/state/<operator>?key=...[&at=...]``: :meth:`FlowHandle.query` as JSON.

    ``key`` is matched as the string given, and when the operator holds nothing for that
    string and it is valid JSON (``42``, ``"a b"``, ``true``), as that JSON value."""
    params = parse_qs(query, keep_blank_values=True)
    if "key" not in params:
        return _plain(HTTPStatus.BAD_REQUEST, "give the key: /api/state/<operator>?key=...")
    raw = params["key"][0]
    at: float | None = None
    if "at" in params:
        try:
            at = float(params["at"][0])
        except ValueError:
            bad = params["at"][0]
            return _plain(
                HTTPStatus.BAD_REQUEST, f"at= must be a time in epoch seconds, got {bad!r}"
            )
        if not math.isfinite(at):
            return _plain(HTTPStatus.BAD_REQUEST, f"at= must be a finite time, got {at!r}")
    try:
        answer = handle.query(operator, raw, at=at)
        if not answer.found:
            try:
                typed = json.loads(raw)
            except ValueError:
                typed = raw
            if typed != raw and isinstance(typed, str | int | float | bool):
                again = handle.query(operator, typed, at=at)
                if again.found:
                    answer = again
    except ValueError as exc:
        return _plain(HTTPStatus.NOT_FOUND, str(exc))
    body = json.dumps(answer.to_json(), default=repr, allow_nan=False).encode()
    return HTTPStatus.OK, "application/json", body


def _plain(status: HTTPStatus, message: str) -> Response:
    return status, PLAIN, f"{message}\n".encode()


def _json(
    status: HTTPStatus, document: object, headers: dict[str, str] | None = None
) -> PostResponse:
    return status, "application/json", json.dumps(document).encode() + b"\n", headers or {}


def page() -> bytes:
    """The web view's page (``GET /``): one HTML file with inline CSS and JavaScript."""
    return (
        importlib.resources.files(__package__ or "sluiceway.metrics").joinpath(_PAGE).read_bytes()
    )


class WebView(HttpMonitor):
    """A monitor that serves the web view of the flow it watches.

    Pass it as ``sw.run(flow, monitor=WebView(8080))``: the page is served at
    :attr:`url` while the flow runs, and the port is released when the flow ends.  One
    view serves one flow at a time (it may serve another afterwards).

    Args:
        port: TCP port to listen on (0: any free port; see :meth:`wait_serving`).
            Default 8080.
        host: address to bind.  Default ``127.0.0.1`` (this machine only); ``0.0.0.0``
            lets other machines look (the view is read-only, and has no authentication;
            but a flow with :class:`~sluiceway.sources.HttpIngest` sources takes records
            at ``POST /api/ingest/<source>`` from whoever can reach it).
        interval: seconds of the flow's clock between two samples; rates are measured
            over the last such interval.  Default 1.

    Raises:
        ValueError: ``port`` is not in 0..65535, or ``interval`` is not > 0.
        OSError: (when awaited) the address cannot be bound, e.g. the port is in use:
            ``cannot serve the web view on 127.0.0.1:8080: address already in use``.
    """

    what = "the web view"
    home = "/"
    one_per_flow = "create one WebView per flow"
    extra_headers = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

    def __init__(self, port: int = 8080, host: str = "127.0.0.1", *, interval: float = 1.0) -> None:
        super().__init__(port, host)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not 0 < interval < math.inf
        ):
            raise ValueError(
                f"WebView interval must be a finite number > 0 seconds, got {interval!r}"
            )
        self.interval = float(interval)
        self._previous: FlowSnapshot | None = None
        self._latest: FlowSnapshot | None = None
        self._started: float | None = None
        self._graph: FlowGraph | None = None
        self._html = b""
        self._ingest: dict[str, HttpIngest] = {}

    def _start(self, handle: FlowHandle) -> None:
        topo = topology(handle.flow)
        self._graph = layout(topo)
        self._ingest = {
            node.name: node.connector
            for node in topo.nodes
            if isinstance(node.connector, HttpIngest)
        }
        self._html = page()
        self._previous, self._latest = None, handle.metrics()
        self._started = self._latest.time

    async def _background(self, handle: FlowHandle) -> None:
        await self._sample(handle)

    async def _sample(self, handle: FlowHandle) -> None:
        """Every ``interval`` of the flow's clock: keep the last two snapshots, for rates."""
        clock = handle.clock
        assert self._latest is not None
        next_tick = self._latest.time + self.interval
        while True:
            await clock.sleep_until(next_tick)
            self._previous, self._latest = self._latest, handle.metrics()
            next_tick += self.interval
            if next_tick <= clock.monotonic():  # fell behind: skip, do not burst
                next_tick = clock.monotonic() + self.interval

    def _state(self, handle: FlowHandle, graph: FlowGraph) -> FlowState:
        previous, latest = self._previous, self._latest
        rates = None
        over = None
        if previous is not None and latest is not None and latest.time > previous.time:
            rates = latest.rates_since(previous)
            over = latest.time - previous.time
        return flow_state(
            graph,
            handle.metrics(),
            rates,
            rates_over=over,
            started=self._started,
            stopping=handle.stopping,
        )

    # -- POST /api/ingest/<source> ------------------------------------------------------

    def _ingest_source(self, path: str) -> tuple[str, HttpIngest | None] | None:
        if not path.startswith(_INGEST):
            return None
        name = unquote(path[len(_INGEST) :])
        return name, self._ingest.get(name)

    def _max_body(self, path: str) -> int | None:
        found = self._ingest_source(path)
        if found is None:
            return None
        source = found[1]
        return _UNKNOWN_BODY if source is None else source.max_body  # (unknown: a 404)

    def _post(
        self, handle: FlowHandle, path: str, headers: dict[str, str], body: bytes
    ) -> PostResponse:
        found = self._ingest_source(path)
        assert found is not None
        name, source = found
        if source is None:
            known = ", ".join(repr(n) for n in sorted(self._ingest)) or "none"
            message = f"no HttpIngest source named {name!r} in this flow (there are: {known})"
            return _json(HTTPStatus.NOT_FOUND, {"error": message})
        try:
            value = json.loads(body)
        except UnicodeDecodeError as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not UTF-8: {exc}"})
        except json.JSONDecodeError as exc:
            message = (
                f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            )
            return _json(HTTPStatus.BAD_REQUEST, {"error": message})
        if isinstance(value, list):
            records: list[object] = value
        elif isinstance(value, dict):
            records = [value]
        else:
            message = (
                f"send a JSON array of records, or one JSON object; got a JSON "
                f"{type(value).__name__}: {body[:80].decode(errors='replace')!r}"
            )
            return _json(HTTPStatus.BAD_REQUEST, {"error": message})
        if len(records) > source.capacity:
            message = (
                f"{len(records)} records in one request; {name!r} accepts at most "
                f"{source.capacity} at once (its capacity): split the request"
            )
            return _json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": message})
        if source.offer_all(records):
            return _json(HTTPStatus.ACCEPTED, {"accepted": len(records)})
        reason = source.refusal or "refused"
        if source.closed or handle.stopping:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": reason, "accepted": 0})
        retry_after = str(max(1, math.ceil(source.retry_after)))
        return _json(
            HTTPStatus.TOO_MANY_REQUESTS,
            {"error": reason, "accepted": 0, "retry_after": source.retry_after},
            {"Retry-After": retry_after},
        )

    def _route(
        self, handle: FlowHandle, path: str, headers: dict[str, str], query: str = ""
    ) -> Response:
        if path in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html; charset=utf-8", self._html
        if path.startswith(_STATE):
            return _state_answer(handle, unquote(path[len(_STATE) :]), query)
        if path != "/api/flow":
            return (
                HTTPStatus.NOT_FOUND,
                PLAIN,
                b"not found; the view is at /, its data at /api/flow, state at "
                b"/api/state/<operator>?key=...\n",
            )
        assert self._graph is not None
        body = json.dumps(self._state(handle, self._graph), allow_nan=False).encode()
        return HTTPStatus.OK, "application/json", body
