"""The logical graph a :class:`~sluiceway.flow.Flow` records: nodes, edges, names, checks.

:class:`Graph` is what the plan reads (``nodes``, ``topological_order()``, ``validate()``,
``channel_capacity``); :class:`~sluiceway.flow.Flow` is this graph with the builder's
entry point, ``source()``.  The builders of each operator family add their nodes through
:func:`derive` (one input: the stream they are called on) or :meth:`Graph._add`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import positive_int, user_location
from sluiceway.operators.base import OpSpec
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.rate_limit import RateLimitSpec
from sluiceway.state import InMemory, OnDisk, as_backend

__all__ = ["At", "Graph", "Node", "derive"]

_DEFAULT_CAPACITY = 1024


@dataclass(eq=False)
class Node:
    """One operator in the logical graph."""

    id: int
    name: str
    spec: OpSpec
    inputs: list[Node]
    where: str
    keyed: bool = False
    consumers: list[Node] = field(default_factory=list)
    timestamped: bool = False
    """Records carry event time (``with_timestamps`` upstream, or window results)."""

    @property
    def kind(self) -> str:
        return self.spec.kind

    def describe(self) -> str:
        return f"{self.name!r} ({self.kind}, defined at {self.where})"


class Graph:
    """Operators and edges, unique names, and the checks of the whole graph.

    Args:
        name: the flow's name (in errors, metrics and logs).
        channel_capacity: records held by an implicit channel (before a ``merge`` or a
            timed ``batch``); ``buffer(capacity=...)`` sets its own.
        state: where keyed state (``stateful_map``, ``process``) is kept unless the
            operator says otherwise: ``sw.state.InMemory()`` (the default) or
            ``sw.state.OnDisk(path=..., cache_keys=...)`` (docs/state.md, "Backends").
    """

    def __init__(
        self,
        name: str,
        *,
        channel_capacity: int = _DEFAULT_CAPACITY,
        state: InMemory | OnDisk | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Flow name must be a non-empty string, got {name!r}")
        self.name = name
        self.state = None if state is None else as_backend(state, "Flow(state=...)")
        self.channel_capacity = positive_int(channel_capacity, "channel_capacity")
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._ids = itertools.count()
        self._sinks: dict[int, Node] = {}
        self._sources: dict[int, Node] = {}

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, {len(self.nodes)} operators)"

    # -- internals used by the builders ----------------------------------------------

    def _add(
        self,
        spec: OpSpec,
        inputs: list[Node],
        name: str | None,
        default_name: str,
        *,
        keyed: bool = False,
        timestamped: bool = False,
    ) -> Node:
        if name is None:
            name = default_name
            n = 2
            while name in self._names:
                name = f"{default_name}_{n}"
                n += 1
        elif not isinstance(name, str) or not name:
            raise TypeError(f"operator name must be a non-empty string, got {name!r}")
        elif name in self._names:
            raise FlowDefinitionError(
                f"operator name {name!r} is already used in flow {self.name!r}; "
                "names must be unique"
            )
        node = Node(
            next(self._ids), name, spec, inputs, user_location(), keyed, timestamped=timestamped
        )
        for i in inputs:
            i.consumers.append(node)
        self.nodes.append(node)
        self._names.add(name)
        return node

    # -- validation ------------------------------------------------------------------

    def validate(self) -> None:
        """Check the whole graph; raises :class:`FlowDefinitionError` naming the problem.

        A flow must have a source and a sink, every stream must be consumed, and the graph
        must be acyclic.
        """
        if not any(isinstance(n.spec, SourceSpec) for n in self.nodes):
            raise FlowDefinitionError(f"flow {self.name!r} has no source: add flow.source(...)")
        if not any(isinstance(n.spec, SinkSpec) for n in self.nodes):
            raise FlowDefinitionError(
                f"flow {self.name!r} has no sink: its results would go nowhere; add .sink(...)"
            )
        for n in self.nodes:
            if not isinstance(n.spec, SinkSpec) and not n.consumers:
                raise FlowDefinitionError(
                    f"the stream from operator {n.describe()} in flow {self.name!r} is never "
                    "consumed: send it to a .sink(...) or remove it"
                )
            if isinstance(n.spec, RateLimitSpec) and n.spec.source is not None:
                at = n.inputs[0]
                while True:
                    if len(at.consumers) > 1:
                        raise FlowDefinitionError(
                            f"rate_limit(when_limited='reject') {n.name!r} in flow "
                            f"{self.name!r} hands records back to the broker, but the stream "
                            f"from {at.describe()} also goes elsewhere, where they would be "
                            "processed twice; rate-limit every branch, or use "
                            "when_limited='wait'"
                        )
                    if not at.inputs:
                        break
                    at = at.inputs[0]
        self.topological_order()

    def topological_order(self) -> list[Node]:
        """The nodes, every node after its inputs.  Raises on a cycle."""
        indegree = {id(n): len(n.inputs) for n in self.nodes}
        ready = [n for n in self.nodes if not n.inputs]
        order: list[Node] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for c in n.consumers:
                indegree[id(c)] -= 1
                if indegree[id(c)] == 0:
                    ready.append(c)
        if len(order) != len(self.nodes):
            stuck = [n.name for n in self.nodes if indegree[id(n)] > 0]
            raise FlowDefinitionError(
                f"flow {self.name!r} has a cycle through operators {', '.join(stuck)}"
            )
        return order


class At(Protocol):
    """What a family's builder needs of the stream it is called on: the flow's graph and
    the node the stream comes from (a :class:`~sluiceway.flow.Stream` is one)."""

    @property
    def flow(self) -> Graph: ...

    @property
    def node(self) -> Node: ...


def derive(
    at: At,
    spec: OpSpec,
    name: str | None,
    default: str,
    *,
    keyed: bool | None = None,
    timestamped: bool | None = None,
) -> Node:
    """Add the one-input operator ``spec`` after ``at``; keys and event time carry over
    unless ``keyed`` / ``timestamped`` say otherwise."""
    k = at.node.keyed if keyed is None else keyed
    ts = at.node.timestamped if timestamped is None else timestamped
    return at.flow._add(spec, [at.node], name, default, keyed=k, timestamped=ts)
