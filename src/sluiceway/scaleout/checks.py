"""Which flows can run on several workers, checked before any worker starts.

A flow runs on N workers when each record reaches exactly one of them and no state has
to be shared between them.  Today that means (see docs/scaling.md):

* every source **splits its records between the processes reading it**: a Kafka
  consumer group (the broker assigns each partition to one worker) or a RabbitMQ queue
  (competing consumers).  A file, an in-memory iterable or a generator is read whole by
  every worker: each record would be processed N times.  A source of your own that
  splits work says so with a ``shares_work = True`` attribute;
* **no keyed state**: windows, joins, ``process`` and ``stateful_map`` keep state per
  key, and each worker would hold a share of it that does not move with the partitions
  when the group rebalances (a window would be counted in two halves, silently).  State
  per source partition that moves with it is the next step of the scale-out work;
* **no shared checkpoint directory**: N workers writing one checkpoint store would
  overwrite each other's positions, and a partition's offsets would not follow it to its
  next owner.

Violations raise :class:`~sluiceway.errors.FlowDefinitionError` naming the operator and
the fix -- a flow is never split silently.
"""

from __future__ import annotations

from sluiceway.core.contract import Source
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow import Flow
from sluiceway.joins.base import JoinSpec
from sluiceway.operators.io import SourceSpec
from sluiceway.operators.keyed_state import KeyedProcessSpec
from sluiceway.windows.operator import WindowSpec

__all__ = ["check_scalable", "shares_work"]

_KEYED_STATE = (WindowSpec, JoinSpec, KeyedProcessSpec)


def shares_work(source: Source) -> bool:
    """Do several processes reading ``source`` split its records between them?

    A ``shares_work`` attribute on the source decides; otherwise Kafka (a consumer
    group) and RabbitMQ (a queue's competing consumers) do, and every other source is
    read whole by each process.
    """
    declared = getattr(source, "shares_work", None)
    if isinstance(declared, bool):
        return declared
    module = type(source).__module__
    name = type(source).__name__
    return (module, name) in {
        ("sluiceway.connectors.kafka", "KafkaSource"),
        ("sluiceway.connectors.rabbitmq", "RabbitMQSource"),
    }


def check_scalable(flow: Flow, workers: int, *, checkpoint_dir: bool) -> None:
    """Refuse a flow that ``workers`` processes cannot run correctly together.

    Raises:
        FlowDefinitionError: a source every worker would read whole, an operator with
            keyed state, or a checkpoint directory the workers would share; the message
            names the operator and the fix.
    """
    if workers <= 1:
        return
    for node in flow.nodes:
        spec = node.spec
        if isinstance(spec, SourceSpec) and not shares_work(spec.source):
            raise FlowDefinitionError(
                f"source {node.name!r} ({spec.source.describe()}) would be read whole "
                f"by every worker: each record would be processed {workers} times. Read from a "
                "broker that splits records between the processes reading it (a Kafka topic "
                "in a consumer group, a RabbitMQ queue), or run one worker; a source of your "
                "own that splits them can say so with shares_work = True"
            )
    for node in flow.nodes:
        if isinstance(node.spec, _KEYED_STATE):
            raise FlowDefinitionError(
                f"operator {node.describe()} keeps keyed state, and each worker would "
                "hold a share of it that does not move with its partitions when the group "
                "rebalances (a key's window or state split between workers). Run it as one "
                "worker for now, or split the job: a stateless flow on several workers "
                "writing to a topic partitioned by the key, read by one keyed worker "
                "(docs/scaling.md)"
            )
    if checkpoint_dir:
        raise FlowDefinitionError(
            f"{workers} workers would share one checkpoint directory and overwrite each "
            "other's positions. Leave out --checkpoint-dir: a Kafka source then commits its "
            "offsets to the consumer group once the sinks wrote the records (at-least-once, "
            "and partitions move between workers with their offsets); checkpoints per "
            "partition for several workers are not built yet (docs/scaling.md)"
        )
