"""A plain description of a flow's graph: what the plan publishes and the views read.

:func:`sluiceway.plan.topology` (or :meth:`PhysicalPlan.topology
<sluiceway.plan.PhysicalPlan.topology>`) describes a flow as these frozen dataclasses:
its operators (name, kind, role, side-output port, stage, depth), the edges between
them, the fused stages and the channels in front of them.  The web view, the graph export
(``sluiceway graph``) and anything else that draws or lists a flow read this, never the
operators' specs, so an operator can change its spec without touching a view.

>>> node = TopologyNode(0, "nums", "source", "source", None, 0, True, 0, ())
>>> node.side_output, node.endpoint
(False, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sluiceway.core.channel import Overflow
from sluiceway.core.contract import Sink, Source

__all__ = [
    "Role",
    "Topology",
    "TopologyChannel",
    "TopologyEdge",
    "TopologyNode",
    "TopologyStage",
]

Role = Literal["source", "sink", "operator"]


@dataclass(frozen=True, slots=True)
class TopologyNode:
    """One operator.

    ``id`` is unique within the flow; ``kind`` names the operator (``"map"``,
    ``"window"``...); ``port`` labels a side output (``"true"``/``"false"`` after a
    branch, ``"late"`` after a window; None otherwise); ``stage`` is the fused stage it
    runs in and ``head`` whether it heads that stage (a source, or fed by a channel);
    ``depth`` is the longest path from a source; ``inputs`` are the ids of the operators
    feeding it, in input order.  ``connector`` is the source or sink object plugged in at
    a source or sink node.
    """

    id: int
    name: str
    kind: str
    role: Role
    port: str | None
    stage: int
    head: bool
    depth: int
    inputs: tuple[int, ...]
    connector: Source | Sink | None = None

    @property
    def side_output(self) -> bool:
        """True for a branch output or a window's late output."""
        return self.port is not None

    @property
    def endpoint(self) -> bool:
        """True for a source or a sink."""
        return self.role != "operator"


@dataclass(frozen=True, slots=True)
class TopologyEdge:
    """``source`` feeds ``target`` (node ids), through ``channel`` (None: a call inside a
    stage); ``port`` is the target's side-output label, if any."""

    source: int
    target: int
    channel: str | None
    port: str | None


@dataclass(frozen=True, slots=True)
class TopologyChannel:
    """The bounded channel in front of node ``target``, one writer per input."""

    name: str
    target: int
    capacity: int
    overflow: Overflow
    writers: tuple[int, ...]
    block_timeout: float | None = None

    def label(self) -> str:
        """``name (capacity N, policy)``, as the graph export writes it."""
        return f"{self.name} (capacity {self.capacity}, {self.overflow.value})"


@dataclass(frozen=True, slots=True)
class TopologyStage:
    """The operators fused into one stage (one task), in order, head first; ``channel``
    (a name) feeds it, None for a source's stage."""

    index: int
    nodes: tuple[int, ...]
    channel: str | None


@dataclass(frozen=True, slots=True)
class Topology:
    """A flow's graph: ``nodes`` in the plan's order (stage by stage), ``edges`` in the
    same order (each node's inputs in turn), ``stages`` and ``channels``."""

    flow: str
    nodes: tuple[TopologyNode, ...]
    edges: tuple[TopologyEdge, ...]
    stages: tuple[TopologyStage, ...]
    channels: tuple[TopologyChannel, ...]

    def node(self, node_id: int) -> TopologyNode:
        """The node with ``node_id`` (KeyError naming it when there is none)."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(f"flow {self.flow!r} has no node with id {node_id}")
