"""What kind of flow a worker runs, read from the flow alone (no Kafka import for flows
that do not use it): the operators that keep keyed state, every sink, and whether the
flow is Kafka to Kafka exactly once.

A worker runs a flow as one task per Kafka partition (:mod:`sluiceway.scaleout.tasks`)
when it keeps keyed state -- the state moves with its partition -- or when it is
stateless and :func:`exactly_once_kafka` -- the offsets commit with the output, so a
partition's next owner goes on exactly where the last committed transaction ended
(docs/architecture.md, "Exactly-once for stateless flows on workers").  Any other
stateless flow is a plain member of the consumer group.  Shared by
:mod:`~sluiceway.scaleout.checks` and :mod:`~sluiceway.scaleout.tasks`, which do not
import each other this way round.
"""

from __future__ import annotations

from sluiceway.flow import Flow
from sluiceway.joins.base import JoinSpec
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.keyed_state import KeyedProcessSpec
from sluiceway.policies import DeadLetter, Retry
from sluiceway.windows.operator import WindowSpec

__all__ = [
    "all_transactional",
    "every_sink",
    "exactly_once_kafka",
    "keyed_state",
    "runs_as_tasks",
]

_KEYED_STATE = (WindowSpec, JoinSpec, KeyedProcessSpec)


def keyed_state(flow: Flow) -> list[str]:
    """The operators of ``flow`` that keep keyed state (described for messages)."""
    return [node.describe() for node in flow.nodes if isinstance(node.spec, _KEYED_STATE)]


def every_sink(flow: Flow) -> list[object]:
    """Every sink of ``flow``, dead-letter sinks (of ``DeadLetter`` and ``Retry(then=
    DeadLetter)`` error policies) included."""
    sinks: list[object] = []
    for node in flow.nodes:
        spec = node.spec
        if isinstance(spec, SinkSpec):
            sinks.append(spec.sink)
        policy = getattr(spec, "on_error", None)
        if isinstance(policy, Retry):
            policy = policy.then
        if isinstance(policy, DeadLetter):
            sinks.append(policy.sink)
    return sinks


def all_transactional(flow: Flow) -> bool:
    """Does every sink of ``flow``, dead-letter sinks included, write in transactions
    (``exactly_once=True``), so that a task cancelled mid-interval leaves nothing a
    ``read_committed`` reader sees?"""
    sinks = every_sink(flow)
    return bool(sinks) and all(getattr(s, "exactly_once", False) is True for s in sinks)


def exactly_once_kafka(flow: Flow) -> bool:
    """Is ``flow`` Kafka to Kafka, exactly once: every source a Kafka source and every
    sink, dead-letter sinks included, a Kafka sink with ``exactly_once=True``?

    Such a flow without keyed state runs on several workers as one task per partition
    (:func:`runs_as_tasks`), like a keyed flow: a task's consumed offsets commit in the
    transaction of its output, and the next owner of the partition fences the previous
    one, so a crash neither loses nor doubles output.
    """
    if not all_transactional(flow):
        return False  # (no import of Kafka for flows that do not use it)
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415 - an extra

    sources = [n.spec.source for n in flow.nodes if isinstance(n.spec, SourceSpec)]
    return all(isinstance(s, KafkaSink) for s in every_sink(flow)) and all(
        isinstance(s, KafkaSource) for s in sources
    )


def runs_as_tasks(flow: Flow) -> bool:
    """Does a worker run ``flow`` as one task per Kafka partition
    (:mod:`sluiceway.scaleout.tasks`)?  A flow with keyed state does (its state moves
    with its partition), and so does a stateless one that is :func:`exactly_once_kafka`
    (exactly-once across moves); any other stateless flow is a plain member of the
    consumer group (at-least-once when a worker crashes)."""
    return bool(keyed_state(flow)) or exactly_once_kafka(flow)
