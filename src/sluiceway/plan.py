"""From the logical graph to the physical plan: fuse operators into stages, place channels.

An operator starts a new stage when it is a *boundary* -- a source, a fan-in (``merge``),
a user ``buffer``, or anything that needs a processing-time timer (a timed ``batch``).
Every other operator joins the stage of its single input and runs there as a nested call
over the micro-batch; fan-out stays inside the stage.  A channel hop is paid only where it
buys something.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluiceway.core.channel import Overflow
from sluiceway.flow import Flow, Node
from sluiceway.operators.io import SourceSpec

__all__ = ["ChannelPlan", "PhysicalPlan", "StagePlan", "plan"]


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
