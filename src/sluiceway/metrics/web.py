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
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypedDict
from urllib.parse import parse_qs, unquote

from sluiceway.connectors.push import HttpIngest
from sluiceway.core.topology import Topology
from sluiceway.flow import Flow
from sluiceway.metrics.http import PLAIN, HttpMonitor, PostResponse, Response
from sluiceway.metrics.registry import (
    CheckpointSnapshot,
    FlowSnapshot,
    LoadSnapshot,
    OperatorSnapshot,
    Rates,
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

_MAX_COLUMNS = 8  # a wider graph wraps onto another band of rows, at a stage boundary
_PAGE = "web.html"
_ZEROS = (0, 0, 0, 0, 0, 0)  # records in/out, errors, retries, dead letters, dropped


# -- the static graph ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One operator, placed on a grid: ``column`` (left to right) and ``row``."""

    name: str
    kind: str
    stage: int
    column: int
    row: int
    head: bool
    """True for the operator that heads its stage (a source, or fed by a channel)."""


@dataclass(frozen=True, slots=True)
class GraphEdge:
    """``source`` feeds ``target``, through ``channel`` (None: a call inside a stage).

    ``port`` labels a side output: ``true``/``false`` after a branch, ``late`` after a
    window (None for an ordinary edge).
    """

    source: str
    target: str
    channel: str | None
    port: str | None


@dataclass(frozen=True, slots=True)
class GraphStage:
    """The operators fused into one stage (one task), in order; ``channel`` feeds it."""

    index: int
    operators: tuple[str, ...]
    channel: str | None
    writers: tuple[tuple[str, int], ...]
    """Per channel this stage writes into: ``(channel, how many of its writers are here)``."""


@dataclass(frozen=True, slots=True)
class FlowGraph:
    """A flow's operators, edges and stages, laid out on a grid (see :func:`flow_graph`)."""

    flow: str
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    stages: tuple[GraphStage, ...]
    columns: int
    rows: int
    channel_writers: dict[str, int]
    """How many writers each channel has."""


def flow_graph(flow: Flow, *, max_columns: int = _MAX_COLUMNS) -> FlowGraph:
    """The operators of ``flow`` as a layered grid, by topological depth.

    An operator's column is its depth (the longest path from a source).  Every stage
    takes a rectangle of rows of its own, so the boxes drawn around fused stages never
    overlap.  When a stage would reach past ``max_columns``, it starts a new band of
    rows below, back at column 0 (the edges into it wrap around).

    Raises:
        FlowDefinitionError: when the flow is not valid (as :func:`sluiceway.plan.plan`).
    """
    return _layout(topology(flow), max_columns)


def _layout(topo: Topology, max_columns: int = _MAX_COLUMNS) -> FlowGraph:
    """:func:`flow_graph` from the plan's description of the flow."""
    by_id = {n.id: n for n in topo.nodes}
    depth = {n.id: n.depth for n in topo.nodes}

    # Bands: a stage starts a new band when it would reach too far right.
    stages = sorted(topo.stages, key=lambda s: (min(depth[i] for i in s.nodes), s.index))
    origin = 0
    band_of: dict[int, int] = {}
    origins: list[int] = [0]
    for st in stages:
        lo = min(depth[i] for i in st.nodes)
        hi = max(depth[i] for i in st.nodes)
        if hi - origin >= max_columns and lo > origin:
            origin = lo
            origins.append(origin)
        band_of[st.index] = len(origins) - 1

    # Rows: within a band, each stage takes the rows below everything already placed in
    # the columns it spans (a skyline), one row per operator of its widest column.
    place: dict[int, tuple[int, int]] = {}
    top = 0
    columns = 0
    for band, band_origin in enumerate(origins):
        free: dict[int, int] = {}
        bottom = top
        for st in (s for s in stages if band_of[s.index] == band):
            cols: dict[int, list[int]] = {}
            for node_id in st.nodes:
                cols.setdefault(depth[node_id] - band_origin, []).append(node_id)
            start = max(free.get(c, top) for c in range(min(cols), max(cols) + 1))
            height = max(len(ns) for ns in cols.values())
            for c in range(min(cols), max(cols) + 1):
                free[c] = start + height
            for c, ns in cols.items():
                for i, node_id in enumerate(ns):
                    place[node_id] = (c, start + i)
                columns = max(columns, c + 1)
            bottom = max(bottom, start + height)
        top = bottom

    nodes = tuple(GraphNode(n.name, n.kind, n.stage, *place[n.id], head=n.head) for n in topo.nodes)
    edges = tuple(
        GraphEdge(by_id[e.source].name, by_id[e.target].name, e.channel, e.port) for e in topo.edges
    )
    graph_stages = []
    for st in topo.stages:
        here = set(st.nodes)
        writes = tuple(
            (ch.name, sum(1 for w in ch.writers if w in here))
            for ch in topo.channels
            if any(w in here for w in ch.writers)
        )
        graph_stages.append(
            GraphStage(st.index, tuple(by_id[i].name for i in st.nodes), st.channel, writes)
        )
    return FlowGraph(
        flow=topo.flow,
        nodes=nodes,
        edges=edges,
        stages=tuple(graph_stages),
        columns=columns,
        rows=top,
        channel_writers={ch.name: len(ch.writers) for ch in topo.channels},
    )


# -- the /api/flow document ---------------------------------------------------------------


class NodeState(TypedDict):
    """One operator in ``/api/flow``.  Rates and ratios are None until known."""

    name: str
    kind: str
    stage: int
    column: int
    row: int
    head: bool
    records_in: int
    records_out: int
    rate_in: float | None
    rate_out: float | None
    errors: int
    retries: int
    dead_letters: int
    dropped: int
    late: int
    backpressure: float | None
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    processing_p50: float | None
    processing_p95: float | None
    processing_p99: float | None
    watermark: float | None
    watermark_lag: float | None
    backlog: int | None
    circuit_state: str | None


class EdgeState(TypedDict):
    """One edge in ``/api/flow``; the channel fields are None for an edge inside a stage."""

    source: str
    target: str
    port: str | None
    channel: str | None
    fill: int | None
    capacity: int | None
    max_fill: int | None
    overflow: str | None
    dropped: int | None
    blocked_ratio: float | None


class StageState(TypedDict):
    """One fused stage in ``/api/flow``."""

    index: int
    operators: list[str]
    channel: str | None
    backpressure: float | None


class FlowState(TypedDict):
    """The ``/api/flow`` document."""

    flow: str
    time: float
    wall_time: float | None
    elapsed: float | None
    rates_over: float | None
    stopping: bool
    columns: int
    rows: int
    stages: list[StageState]
    nodes: list[NodeState]
    edges: list[EdgeState]
    load: LoadState | None
    checkpoints: CheckpointState | None


class CheckpointState(TypedDict):
    """The last checkpoint, for flows with checkpoints (``/api/flow``'s ``checkpoints``;
    the fields of :class:`~sluiceway.metrics.registry.CheckpointSnapshot`)."""

    completed: int
    last_id: int | None
    duration: float
    alignment: float
    write: float
    size: int
    written: int
    delta_bytes: int
    compactions: int
    operators: dict[str, dict[str, float | int | None]]
    """Per operator: ``bytes``, ``keys``, ``snapshot_seconds``."""


class LoadState(TypedDict):
    """The load signals and decisions, with a load policy (``/api/flow``'s ``load``)."""

    signals: dict[str, float | None]
    active: list[str]
    decisions: int
    fetch_cap: int | None
    rate: float | None
    shedding: str | None
    wants_more_instances: bool


def _finite(value: float) -> float | None:
    """``value``, or None for NaN and infinities (which JSON cannot carry)."""
    return value if math.isfinite(value) else None


def flow_state(
    graph: FlowGraph,
    now: FlowSnapshot,
    rates: Rates | None = None,
    *,
    rates_over: float | None = None,
    started: float | None = None,
    stopping: bool = False,
) -> FlowState:
    """The ``/api/flow`` document: ``graph`` with the counters of ``now``.

    Args:
        graph: the flow's layout (:func:`flow_graph`).
        now: the counters to show.
        rates: per-second rates (None: not known yet; rates and ratios are null).
        rates_over: the seconds ``rates`` were measured over.
        started: the clock time the flow started (for ``elapsed``; None: unknown).
        stopping: whether a stop has been requested.

    A stage's backpressure is the share of time it spent waiting for room in the
    channels it writes into (its writers' blocked time per second, 0 to 1); every
    operator fused into the stage shares it.  A stage that writes into no channel (it
    ends in sinks) has 0.

    >>> import sluiceway as sw
    >>> flow = sw.Flow("tiny")
    >>> flow.source(sw.sources.Iterable([1]), name="nums").sink(sw.sinks.Collect(), name="out")
    >>> result = sw.run(flow, clock=sw.VirtualClock())
    >>> state = flow_state(flow_graph(flow), result.metrics)
    >>> [(n["name"], n["records_in"], n["records_out"], n["rate_out"]) for n in state["nodes"]]
    [('nums', 1, 1, None), ('out', 1, 1, None)]
    """
    ops = {o.name: o for o in now.operators}
    channels = {c.name: c for c in now.channels}
    stage_bp: dict[int, float | None] = {}
    for st in graph.stages:
        if rates is None:
            stage_bp[st.index] = None
            continue
        share = 0.0
        for channel, writers in st.writers:
            blocked = rates.backpressure.get(channel, 0.0)
            share += blocked * writers / max(1, graph.channel_writers.get(channel, 1))
        stage_bp[st.index] = min(1.0, max(0.0, share))

    nodes: list[NodeState] = []
    for node in graph.nodes:
        op = ops.get(node.name) or OperatorSnapshot(node.name, node.kind, node.stage, *_ZEROS)
        lag = now.wall_time - op.watermark  # as FlowSnapshot.watermark_lag, without a lookup
        nodes.append(
            NodeState(
                name=node.name,
                kind=node.kind,
                stage=node.stage,
                column=node.column,
                row=node.row,
                head=node.head,
                records_in=op.records_in,
                records_out=op.records_out,
                rate_in=None if rates is None else rates.records_in.get(node.name),
                rate_out=None if rates is None else rates.records_out.get(node.name),
                errors=op.errors,
                retries=op.retries,
                dead_letters=op.dead_letters,
                dropped=op.dropped,
                late=op.late,
                backpressure=stage_bp.get(node.stage),
                latency_p50=_finite(op.latency_p50),
                latency_p95=_finite(op.latency_p95),
                latency_p99=_finite(op.latency_p99),
                processing_p50=_finite(op.processing_p50),
                processing_p95=_finite(op.processing_p95),
                processing_p99=_finite(op.processing_p99),
                watermark=_finite(op.watermark),
                watermark_lag=_finite(lag),
                backlog=op.backlog,
                circuit_state=op.circuit_state or None,
            )
        )

    edges: list[EdgeState] = []
    for edge in graph.edges:
        ch = channels.get(edge.channel) if edge.channel is not None else None
        ratio: float | None = None
        if ch is not None and rates is not None:
            ratio = rates.backpressure.get(ch.name)
        edges.append(
            EdgeState(
                source=edge.source,
                target=edge.target,
                port=edge.port,
                channel=edge.channel,
                fill=None if ch is None else ch.fill,
                capacity=None if ch is None else ch.capacity,
                max_fill=None if ch is None else ch.max_fill,
                overflow=None if ch is None else ch.overflow.value,
                dropped=None if ch is None else ch.records_dropped,
                blocked_ratio=ratio,
            )
        )
    stages = [
        StageState(
            index=st.index,
            operators=list(st.operators),
            channel=st.channel,
            backpressure=stage_bp[st.index],
        )
        for st in graph.stages
    ]
    return FlowState(
        flow=now.flow,
        time=now.time,
        wall_time=_finite(now.wall_time),
        elapsed=None if started is None else now.time - started,
        rates_over=rates_over,
        stopping=stopping,
        columns=graph.columns,
        rows=graph.rows,
        stages=stages,
        nodes=nodes,
        edges=edges,
        load=None if now.load is None else _load_state(now.load),
        checkpoints=None if now.checkpoints is None else _checkpoint_state(now.checkpoints),
    )


def _checkpoint_state(ck: CheckpointSnapshot) -> CheckpointState:
    return CheckpointState(
        completed=ck.completed,
        last_id=ck.last_id,
        duration=ck.last_duration,
        alignment=ck.last_alignment,
        write=ck.last_write,
        size=ck.last_size,
        written=ck.last_written,
        delta_bytes=ck.last_delta_bytes,
        compactions=ck.compactions,
        operators={
            op.name: {"bytes": op.bytes, "keys": op.keys, "snapshot_seconds": op.snapshot_seconds}
            for op in ck.operators
        },
    )


def _load_state(load: LoadSnapshot) -> LoadState:
    return LoadState(
        signals={k: _finite(v) for k, v in load.signals.items()},
        active=list(load.active),
        decisions=load.decisions,
        fetch_cap=load.fetch_cap,
        rate=load.rate,
        shedding=load.shedding,
        wants_more_instances=load.wants_more_instances,
    )


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
        self._graph = _layout(topo)
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
