"""Builders of the I/O family: where records enter a flow (``Flow.source``) and leave it
(``Stream.sink``).  A source or sink object belongs to one operator of one flow."""

from __future__ import annotations

from collections.abc import Iterable

from sluiceway.core.contract import Sink, Source
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import check_breaker, class_label
from sluiceway.flow.graph import At, Graph, Node
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.policies import DeadLetter, Fail, check_policy


def add_source(graph: Graph, source: object, name: str | None, on_error: object) -> Node:
    """The source node of ``flow.source(source, ...)``."""
    if not isinstance(source, Source):
        hint = ""
        if isinstance(source, Iterable):
            hint = "; wrap it: flow.source(sw.sources.Iterable(...))"
        raise TypeError(
            f"Flow.source() expects a sluiceway Source, got {type(source).__name__}{hint}"
        )
    if not isinstance(on_error, Fail | DeadLetter):
        raise TypeError(
            f"Flow.source(on_error=...) must be sw.Fail() or sw.DeadLetter(sink) "
            f"(a malformed record cannot be retried), got {on_error!r}"
        )
    prior = graph._sources.get(id(source))
    if prior is not None:
        raise FlowDefinitionError(
            f"this {source.describe()} source object is already used by {prior.describe()}; "
            "create one source object per flow.source() call"
        )
    node = graph._add(
        SourceSpec(source, on_error),
        [],
        name,
        f"source_{class_label(source)}",
        timestamped=bool(source.event_time),
    )
    graph._sources[id(source)] = node
    return node


def add_sink(
    at: At,
    sink: object,
    name: str | None,
    policy: object,
    breaker: CircuitBreaker | None = None,
    when_open: str = "wait",
) -> None:
    """The sink node of ``stream.sink(sink, ...)``."""
    graph = at.flow
    if not isinstance(sink, Sink):
        raise TypeError(
            f"sink() expects a sluiceway Sink (e.g. sw.sinks.Collect()), "
            f"got {type(sink).__name__} {sink!r}"
        )
    prior = graph._sinks.get(id(sink))
    if prior is not None:
        raise FlowDefinitionError(
            f"this {sink.describe()} sink object is already used by {prior.describe()}; "
            "a sink receives one stream -- merge the streams first, or use two sinks"
        )
    on_error = check_policy(policy, "sink()")
    check_breaker(breaker, when_open, on_error, "sink")
    spec = SinkSpec(sink, on_error, breaker, when_open)
    node = graph._add(spec, [at.node], name, f"sink_{class_label(sink)}")
    graph._sinks[id(sink)] = node
