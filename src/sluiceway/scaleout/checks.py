"""Which flows can run on several workers, checked before any worker starts.

A flow runs on N workers when each record reaches exactly one of them and every key's
state is where its records are.  That means (see docs/scaling.md):

* every source **splits its records between the processes reading it**: a Kafka
  consumer group (the broker assigns each partition to one worker) or a RabbitMQ queue
  (competing consumers).  A file, an in-memory iterable or a generator is read whole by
  every worker: each record would be processed N times.  A source of your own that
  splits work says so with a ``shares_work = True`` attribute;
* a flow with **keyed state** (windows, joins, ``process``, ``stateful_map``) runs as one
  task per Kafka partition (:mod:`sluiceway.scaleout.tasks`), whose state moves with the
  partition through the task's checkpoints: it needs ``--checkpoint-dir`` (a directory
  every worker reaches, or a ``postgresql://`` store for workers on several machines),
  Kafka sources only (of one group), and sinks that can be copied per task (Kafka); a
  ``key_by`` without ``partitioned=True`` is repartitioned through Kafka
  (:mod:`sluiceway.scaleout.repartition`), which needs Kafka sources too;
* a stateless flow takes **no checkpoint directory**: N workers writing one checkpoint
  store would overwrite each other's positions (its Kafka source commits offsets to the
  group once the sinks wrote the records);
* a stateless flow whose sources are all Kafka and whose sinks (dead-letter sinks
  included) are all exactly-once Kafka sinks
  (:func:`~sluiceway.scaleout.kinds.exactly_once_kafka`) runs as tasks
  too, for exactly-once output across moves and crashes: each task's consumed offsets
  commit in the transaction that holds its output, so the group's committed offset is
  all a task needs to start from -- no checkpoint directory (refused: nothing in it
  would be needed, and a directory a worker does not share would restore stale
  positions).

Violations raise :class:`~sluiceway.errors.FlowDefinitionError` naming the operator and
the fix -- a flow is never split silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from sluiceway.checkpoint.store import CheckpointStore, is_url
from sluiceway.core.contract import Source
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow import Flow
from sluiceway.operators.io import SourceSpec
from sluiceway.operators.stateless import KeyBySpec
from sluiceway.scaleout.kinds import keyed_state, runs_as_tasks

__all__ = [
    "check_layout",
    "check_scalable",
    "check_tasks",
    "keyed_state",
    "runs_as_tasks",
    "shares_work",
]


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


def check_tasks(flow: Flow, *, checkpoint_dir: bool) -> None:
    """Refuse a flow that cannot run as one task per partition on several workers.

    Raises:
        FlowDefinitionError: for a keyed flow, no checkpoint directory (the state would
            not move with its partition), a source that is not Kafka, Kafka sources of
            several groups, a sink that cannot be copied per task, or a repartitioned
            stream read together with one that is not; for a stateless exactly-once flow
            (:func:`~sluiceway.scaleout.kinds.exactly_once_kafka`), a checkpoint
            directory, or topic patterns; the message names the fix.
    """
    keyed = keyed_state(flow)
    if not keyed:
        _check_stateless_tasks(flow, checkpoint_dir=checkpoint_dir)
        return
    if not checkpoint_dir:
        raise FlowDefinitionError(
            f"operator {keyed[0]} keeps keyed state, which moves between workers with its "
            "partition through the checkpoints of the partition's task: give "
            "--checkpoint-dir DIR, a directory every worker reaches (one machine, or a "
            "shared volume), or a PostgreSQL store for workers on several machines "
            "(--checkpoint-dir postgresql://user@host/db?schema=NAME). Without it each "
            "worker would keep a share of a key's state that stays behind when the "
            "partition moves (docs/scaling.md)"
        )
    from sluiceway.connectors.kafka import KafkaSource  # noqa: PLC0415 - needs confluent-kafka
    from sluiceway.scaleout.repartition import stages  # noqa: PLC0415
    from sluiceway.scaleout.tasks import task_flow  # noqa: PLC0415

    unkeyed = [n for n in flow.nodes if isinstance(n.spec, KeyBySpec) and not n.spec.partitioned]
    others = [
        (n, n.spec.source)
        for n in flow.nodes
        if isinstance(n.spec, SourceSpec) and not isinstance(n.spec.source, KafkaSource)
    ]
    if unkeyed and others:
        raise FlowDefinitionError(
            f"{unkeyed[0].describe()} keys records for operator {keyed[0]}, and on several "
            "workers each partition's state lives in the worker that owns the partition: "
            "the records must be repartitioned by the key, which goes through Kafka, and "
            f"source {others[0][0].describe()} ({others[0][1].describe()}) is not a "
            "Kafka topic. Copy the input into a Kafka topic first (a stateless flow with "
            "sw.sinks.Kafka(key=...): keyed by this key, then key_by(..., "
            "partitioned=True)), or run the keyed flow as one process (docs/scaling.md)"
        )
    for stage in stages(flow):
        task_flow(stage.flow, 0, stage=stage.index)


def _check_stateless_tasks(flow: Flow, *, checkpoint_dir: bool) -> None:
    """:func:`check_tasks` for a stateless flow that is
    :func:`~sluiceway.scaleout.kinds.exactly_once_kafka`."""
    if checkpoint_dir:
        raise FlowDefinitionError(
            f"flow {flow.name!r} has no keyed state and writes only to exactly-once Kafka "
            "sinks: on several workers each partition's task commits its consumed offsets "
            "in the transaction that holds its output, and the next owner of the "
            "partition starts from the offsets committed there. Leave out "
            "--checkpoint-dir: nothing in it would be needed, and a directory one worker "
            "does not share with the others would restore positions older than the "
            'group\'s (docs/scaling.md, "Exactly-once across moves")'
        )
    from sluiceway.scaleout.tasks import task_flow  # noqa: PLC0415 - needs confluent-kafka

    task_flow(flow, 0)  # a topic pattern is refused here, naming it


def check_layout(checkpoint_dir: str | os.PathLike[str], *, tasks: bool) -> None:
    """Refuse a checkpoint directory written the other way: by the flow run as one
    process (``DIR/checkpoints.db``) for a worker of a keyed flow (``tasks``), whose
    tasks keep theirs in ``DIR/tasks/p<N>``; or by workers for a flow run as one process.
    Either way the run would start without the state while the consumer group's offsets
    go on (or go back to an old checkpoint): keys would be counted from zero, silently.

    Raises:
        FlowDefinitionError: the directory holds the other layout; the message says how
            to go on.
    """
    if is_url(checkpoint_dir):
        _check_layout_in_postgres(str(checkpoint_dir), tasks=tasks)
        return
    root = Path(checkpoint_dir)
    single = root / CheckpointStore.FILENAME
    if tasks and single.exists():
        raise FlowDefinitionError(
            f"{root} holds the checkpoints of this flow run as one process ({single}); a "
            "worker of a keyed flow keeps them per partition in "
            f"{root / 'tasks'}/p<N> and would start without that state while the group's "
            "offsets go on. Keep running it as one process, or start over with another "
            "--checkpoint-dir (and a new consumer group, to read the input again). To be "
            "able to scale out later, run even a single process as a worker: "
            "SLUICEWAY_WORKER_ID=0 sluiceway run ... (docs/scaling.md)"
        )
    if not tasks and (root / "tasks").is_dir():
        raise FlowDefinitionError(
            f"{root} holds the per-partition checkpoints of workers ({root / 'tasks'}); "
            "run this flow as a worker to go on from them (SLUICEWAY_WORKER_ID=0 "
            "sluiceway run ..., or --workers N), or give another --checkpoint-dir "
            "(docs/scaling.md)"
        )


def _check_layout_in_postgres(url: str, *, tasks: bool) -> None:
    """:func:`check_layout` for a store in PostgreSQL: the flow run as one process keeps
    its checkpoints in the URL's schema, workers in the schemas ``<schema>/tasks/p<N>``."""
    from sluiceway.checkpoint.postgres import has_store, split_url, stores_under  # noqa: PLC0415

    _, schema, where = split_url(url)
    if tasks and has_store(url):
        raise FlowDefinitionError(
            f"{where} holds the checkpoints of this flow run as one process (schema "
            f"{schema!r}); a worker of a keyed flow keeps them per partition in the schemas "
            f"{schema + '/tasks/p<N>'!r} and would start without that state while the group's "
            "offsets go on. Keep running it as one process, or start over with another "
            "schema (and a new consumer group, to read the input again). To be able to scale "
            "out later, run even a single process as a worker: SLUICEWAY_WORKER_ID=0 "
            "sluiceway run ... (docs/scaling.md)"
        )
    if not tasks and (found := stores_under(url, "tasks")):
        raise FlowDefinitionError(
            f"{where} holds the per-partition checkpoints of workers (schemas "
            f"{', '.join(map(repr, found[:3]))}{', ...' if len(found) > 3 else ''}); run this "
            "flow as a worker to go on from them (SLUICEWAY_WORKER_ID=0 sluiceway run ..., "
            "or --workers N), or give another schema (docs/scaling.md)"
        )


def check_scalable(flow: Flow, workers: int, *, checkpoint_dir: bool) -> bool:
    """Refuse a flow that ``workers`` processes cannot run correctly together; True when
    it runs as one task per partition (:func:`runs_as_tasks`, :func:`check_tasks`).

    Raises:
        FlowDefinitionError: a source every worker would read whole, a flow that runs as
            tasks but cannot, or a stateless flow with a checkpoint directory the
            workers would share; the message names the operator and the fix.
    """
    if workers <= 1:
        return False
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
    if runs_as_tasks(flow):
        check_tasks(flow, checkpoint_dir=checkpoint_dir)
        return True
    if checkpoint_dir:
        raise FlowDefinitionError(
            f"{workers} workers of a flow without keyed state would share one checkpoint "
            "directory and overwrite each other's positions. Leave out --checkpoint-dir: a "
            "Kafka source then commits its offsets to the consumer group once the sinks "
            "wrote the records (at-least-once, and partitions move between workers with "
            "their offsets). Keyed flows use it per partition (docs/scaling.md)"
        )
    return False
