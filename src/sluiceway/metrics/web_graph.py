"""The web view's static graph: a flow's operators laid out in columns and rows, grouped by
fused stage, from the topology the plan publishes (:func:`flow_graph`)."""

from __future__ import annotations

from dataclasses import dataclass

from sluiceway.core.topology import Topology
from sluiceway.flow import Flow
from sluiceway.plan import topology

__all__ = ["FlowGraph", "GraphEdge", "GraphNode", "GraphStage", "flow_graph", "layout"]

_MAX_COLUMNS = 8  # a wider graph wraps onto another band of rows, at a stage boundary


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
    return layout(topology(flow), max_columns)


def layout(topo: Topology, max_columns: int = _MAX_COLUMNS) -> FlowGraph:
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
