"""From the logical graph to the physical plan: fuse operators into stages, place channels.

An operator starts a new stage when it is a *boundary* -- a source, a fan-in (``merge``),
a user ``buffer``, or anything that needs a processing-time timer (a timed ``batch``).
Every other operator joins the stage of its single input and runs there as a nested call
over the micro-batch; fan-out stays inside the stage.  A channel hop is paid only where it
buys something.

The plan also publishes the flow's graph as plain data (:func:`topology`, a
:class:`~sluiceway.core.topology.Topology`): the web view and ``sluiceway graph`` read
that, not the operators' specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluiceway.core.channel import Overflow
from sluiceway.core.contract import Sink, Source
from sluiceway.core.topology import (
    Role,
    Topology,
    TopologyChannel,
    TopologyEdge,
    TopologyNode,
    TopologyStage,
)
from sluiceway.flow import Flow, Node
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.stateless import LateOutputSpec, PortSpec

__all__ = ["ChannelPlan", "PhysicalPlan", "StagePlan", "plan", "topology"]


@dataclass(eq=False)
class ChannelPlan:
    """A bounded channel in front of a boundary operator, one writer per input."""

    name: str
    target: Node
    capacity: int
    overflow: Overflow
    writers: list[Node]
    block_timeout: float | None = None


@dataclass(eq=False)
class StagePlan:
    """Operators that run in one task; ``head`` is a source or is fed by ``channel``."""

    index: int
    head: Node
    nodes: list[Node] = field(default_factory=list)
    channel: ChannelPlan | None = None

    @property
    def source(self) -> SourceSpec | None:
        spec = self.head.spec
        return spec if isinstance(spec, SourceSpec) else None


@dataclass(eq=False)
class PhysicalPlan:
    """Stages and the channels between them."""

    flow: Flow
    stages: list[StagePlan]
    channels: list[ChannelPlan]
    stage_of: dict[int, int]

    def describe(self) -> str:
        """A readable listing of stages, the operators fused into each, and channels."""
        lines = [f"flow {self.flow.name!r}: {len(self.stages)} stage(s)"]
        for st in self.stages:
            feed = "" if st.channel is None else f"  <- channel {st.channel.name!r}"
            ops = " -> ".join(n.name for n in st.nodes)
            lines.append(f"  stage {st.index}: {ops}{feed}")
        for ch in self.channels:
            writers = ", ".join(w.name for w in ch.writers)
            wait = "" if ch.block_timeout is None else f" after {ch.block_timeout:g}s"
            lines.append(
                f"  channel {ch.name!r}: {writers} => {ch.target.name} "
                f"(capacity {ch.capacity}, {ch.overflow.value}{wait})"
            )
        return "\n".join(lines)

    def topology(self) -> Topology:
        """The flow's graph as plain data, for views (:mod:`sluiceway.core.topology`)."""
        depth: dict[int, int] = {}
        for node in self.flow.topological_order():
            depth[node.id] = 1 + max((depth[i.id] for i in node.inputs), default=-1)
        channel_of = {id(ch.target): ch for ch in self.channels}
        nodes: list[TopologyNode] = []
        edges: list[TopologyEdge] = []
        for st in self.stages:
            for node in st.nodes:
                port = _port(node)
                nodes.append(
                    TopologyNode(
                        node.id,
                        node.name,
                        node.kind,
                        _role(node),
                        port,
                        st.index,
                        node is st.head,
                        depth[node.id],
                        tuple(i.id for i in node.inputs),
                        _connector(node),
                    )
                )
                channel = channel_of.get(id(node))
                edges.extend(
                    TopologyEdge(i.id, node.id, None if channel is None else channel.name, port)
                    for i in node.inputs
                )
        return Topology(
            self.flow.name,
            tuple(nodes),
            tuple(edges),
            tuple(
                TopologyStage(
                    st.index,
                    tuple(n.id for n in st.nodes),
                    None if st.channel is None else st.channel.name,
                )
                for st in self.stages
            ),
            tuple(
                TopologyChannel(
                    ch.name,
                    ch.target.id,
                    ch.capacity,
                    ch.overflow,
                    tuple(w.id for w in ch.writers),
                    ch.block_timeout,
                )
                for ch in self.channels
            ),
        )


def _role(node: Node) -> Role:
    if isinstance(node.spec, SourceSpec):
        return "source"
    if isinstance(node.spec, SinkSpec):
        return "sink"
    return "operator"


def _port(node: Node) -> str | None:
    """The label of the edge into a side-output node, or None for an ordinary edge."""
    spec = node.spec
    if isinstance(spec, LateOutputSpec):
        return "late"
    if isinstance(spec, PortSpec):
        return "true" if spec.port == 0 else "false"
    return None


def _connector(node: Node) -> Source | Sink | None:
    spec = node.spec
    if isinstance(spec, SourceSpec):
        return spec.source
    if isinstance(spec, SinkSpec):
        return spec.sink
    return None


def topology(flow: Flow) -> Topology:
    """Validate ``flow`` and describe its graph as plain data (see :meth:`PhysicalPlan.topology`).

    >>> import sluiceway as sw
    >>> flow = sw.Flow("tiny")
    >>> flow.source(sw.sources.Iterable([1]), name="nums").sink(sw.sinks.Collect(), name="out")
    >>> [(n.name, n.role, n.stage, n.depth) for n in topology(flow).nodes]
    [('nums', 'source', 0, 0), ('out', 'sink', 0, 1)]
    """
    return plan(flow).topology()


def plan(flow: Flow) -> PhysicalPlan:
    """Validate ``flow`` and compute its stages and channels."""
    flow.validate()
    stages: list[StagePlan] = []
    channels: list[ChannelPlan] = []
    stage_of: dict[int, int] = {}
    for node in flow.topological_order():
        spec = node.spec
        if isinstance(spec, SourceSpec) or spec.boundary:
            st = StagePlan(len(stages), node)
            if not isinstance(spec, SourceSpec):
                cap = spec.channel_capacity or flow.channel_capacity
                st.channel = ChannelPlan(
                    f"{node.name}.in",
                    node,
                    cap,
                    spec.channel_overflow,
                    list(node.inputs),
                    spec.channel_block_timeout,
                )
                channels.append(st.channel)
            stages.append(st)
        else:
            (parent,) = node.inputs
            st = stages[stage_of[parent.id]]
        st.nodes.append(node)
        stage_of[node.id] = st.index
    return PhysicalPlan(flow, stages, channels, stage_of)
