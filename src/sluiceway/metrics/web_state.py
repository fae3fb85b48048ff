"""The web view's ``/api/flow`` document: the live numbers of a flow snapshot on its static
graph (:func:`flow_state`), as typed dicts."""

from __future__ import annotations

import math
from typing import TypedDict

from sluiceway.metrics.registry import (
    CheckpointSnapshot,
    FlowSnapshot,
    LoadSnapshot,
    OperatorSnapshot,
    Rates,
)
from sluiceway.metrics.web_graph import FlowGraph

__all__ = [
    "CheckpointState",
    "EdgeState",
    "FlowState",
    "LoadState",
    "NodeState",
    "StageState",
    "flow_state",
]

_ZEROS = (0, 0, 0, 0, 0, 0)  # records in/out, errors, retries, dead letters, dropped


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
    >>> from sluiceway.metrics.web import flow_graph
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
