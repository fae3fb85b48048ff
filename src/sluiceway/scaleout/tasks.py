"""Keyed flows -- and stateless exactly-once ones -- on several workers: one **task** per
source partition, moving with it.

A task is the flow itself -- the same operators, the same plan and executor, the same
checkpoints and exactly-once protocol as one process -- restricted to partition ``p`` of
every Kafka topic the flow reads (co-partitioned topics: partition ``p`` of each holds
the same keys).  Everything keyed (windows, joins, ``process``/``stateful_map``, timers,
watermarks) is then per partition without any change to the operators, and a partition
moves between workers by stopping its task on one and starting it on the other:

* **Own connectors**: :func:`task_flow` copies the flow with fresh, unopened connectors
  made by each one's ``for_task(p)``: a Kafka source reading partition ``p`` by manual
  assignment (no group membership), an exactly-once Kafka sink with the transactional id
  ``<id>-p<p>`` -- stable per partition, so the next owner's ``init_transactions``
  fences a zombie and aborts what it left open.  A sink that cannot be copied per task
  (a file, a list in memory) is refused.
* **Own checkpoints**: ``<checkpoint-dir>/tasks/p<p>``, in a directory every worker
  reaches (one machine, or a shared volume): the next owner restores from it.  A
  stateless flow whose sinks are all exactly-once Kafka sinks
  (:func:`~sluiceway.scaleout.kinds.exactly_once_kafka`) has nothing to restore but its
  input offsets, and those commit in the transaction of its output: its tasks run
  without a checkpoint directory (``TaskSpec(None)``), each run checkpointing into a
  private store of its own that is deleted when it ends, and starting from the offsets
  the group committed -- in the previous owner's last committed transaction.
* **Membership**: one consumer per worker (:class:`TaskManager`) is the member of the
  flow's consumer group.  It subscribes to the flow's first topic (its partitions name
  the tasks; the others are co-partitioned), never hands out a record (what it is given
  stays paused), and turns the group's decisions into task starts and stops:

  - *assigned* ``p``: start task ``p`` (after the previous run of ``p`` here, if one is
    still stopping): it restores ``tasks/p<p>`` and goes on from there;
  - *revoked* ``p`` (another worker joined, or this one leaves): stop task ``p``
    gracefully -- a final checkpoint, its transaction committed, its offsets committed --
    before the revoke callback returns, so the next owner starts exactly there; past
    ``revoke_timeout`` the task is cancelled (the next owner goes back to its last
    checkpoint, nothing is lost or doubled with a transactional sink);
  - *lost* ``p`` (this worker's session expired: someone else owns ``p`` already):
    cancel the task, commit nothing.

* **Offsets**: a transactional sink commits a task's offsets to the flow's group in its
  transactions (Kafka accepts a transactional offset commit from a consumer that is not
  a member).  Kafka refuses a plain offset commit from a non-member of a group with
  members (``UNKNOWN_MEMBER_ID``), so without one a task hands its offsets to the
  membership consumer, which commits them (lag metrics and KEDA keep working; the
  positions that count are the checkpoint's).

See docs/scaling.md ("Keyed flows on several workers").
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import confluent_kafka as ck

from sluiceway.checkpoint.store import CheckpointConflictError, sub_location
from sluiceway.connectors.kafka import _SECURITY_KEYS, KafkaError, KafkaSource
from sluiceway.core.contract import Sink, Source
from sluiceway.errors import FlowCancelledError, FlowDefinitionError
from sluiceway.flow import Flow, Node
from sluiceway.metrics.registry import FlowSnapshot
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.policies import DeadLetter, Retry
from sluiceway.runtime.checkpointing import Checkpoints
from sluiceway.runtime.executor import RunResult
from sluiceway.runtime.handle import FlowHandle, start
from sluiceway.scaleout.kinds import all_transactional, exactly_once_kafka, keyed_state
from sluiceway.time import Clock, SystemClock

__all__ = [
    "RESTORE_BUCKETS",
    "RestoreTimes",
    "StageInput",
    "TaskManager",
    "TaskSpec",
    "TaskStatus",
    "TaskWorker",
    "check_partitions",
    "kafka_sources",
    "task_dir",
    "task_flow",
    "task_name",
]

log = logging.getLogger("sluiceway")

_POLL = 0.2  # seconds one poll of the membership consumer waits (rebalances come in it)
_RESTART_POLLS = 2  # polls after a fencing before the task starts again (if owned)
_FATAL = (
    ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
    ck.KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ck.KafkaError.GROUP_AUTHORIZATION_FAILED,
)


def task_name(partition: int, stage: int = 0) -> str:
    """A task's name: ``p<partition>``, or ``s<stage>-p<partition>`` for sub-topology
    ``stage`` > 0 of a flow that repartitions (:mod:`sluiceway.scaleout.repartition`)."""
    return f"s{stage}-p{partition}" if stage else f"p{partition}"


def task_dir(checkpoint_dir: str | os.PathLike[str], partition: int, stage: int = 0) -> str:
    """Where task ``partition`` (of sub-topology ``stage``) keeps its checkpoints:
    ``<checkpoint_dir>/tasks/p<p>`` (``tasks/s<stage>-p<p>``); in a PostgreSQL store (a
    ``postgresql://`` URL), the schema ``<schema>/tasks/p<p>`` (``.../s<stage>-p<p>``)."""
    return sub_location(checkpoint_dir, "tasks", task_name(partition, stage))


# -- the flow of one task -----------------------------------------------------------


def kafka_sources(flow: Flow) -> list[tuple[Node, KafkaSource]]:
    """The flow's sources, each a Kafka source of one group on one cluster.

    Raises:
        FlowDefinitionError: a source that is not Kafka (its records would not be split
            by partition, so its keys' state could not move), or sources of different
            groups or clusters (the tasks of one flow belong to one group).
    """
    found: list[tuple[Node, KafkaSource]] = []
    for node in flow.nodes:
        spec = node.spec
        if not isinstance(spec, SourceSpec):
            continue
        if not isinstance(spec.source, KafkaSource):
            raise FlowDefinitionError(
                f"source {node.describe()} ({spec.source.describe()}) is not a Kafka topic: "
                "a keyed flow runs on several workers as one task per Kafka partition, and "
                "the state of a key moves with its partition. Read the input from Kafka "
                "(e.g. a stateless flow that copies it into a topic keyed by the key), or "
                "run the keyed flow as one process"
            )
        found.append((node, spec.source))
    if not found:
        raise FlowDefinitionError(f"flow {flow.name!r} has no source")
    first = found[0][1]
    for node, src in found[1:]:
        if (src.group, src.bootstrap_servers) != (first.group, first.bootstrap_servers):
            raise FlowDefinitionError(
                f"source {node.describe()} reads in group {src.group!r} of "
                f"{src.bootstrap_servers!r}, source {found[0][0].describe()} in group "
                f"{first.group!r} of {first.bootstrap_servers!r}: the tasks of a keyed flow on "
                "several workers belong to one consumer group; give every source the same "
                "group and bootstrap servers"
            )
    return found


def _copy(obj: Any, partition: int, what: str, stage: int = 0) -> Any:
    """``obj.for_task(partition)``, or the error naming why the flow cannot run as tasks."""
    for_task = getattr(obj, "for_task", None)
    if for_task is None:
        raise FlowDefinitionError(
            f"{what} ({obj.describe()}) cannot be copied for each partition's task: a keyed "
            "flow on several workers runs one copy of the flow per Kafka partition, each "
            "with its own connectors, and this one would be shared by all of them (a file "
            "or a list written by every task at once). Write the results to Kafka "
            "(sw.sinks.Kafka, exactly_once=True for exactly-once output across moves), or "
            "run the flow as one process"
        )
    try:
        return for_task(partition, stage=stage) if stage else for_task(partition)
    except ValueError as exc:  # e.g. a topic pattern: say which operator, as a definition error
        raise FlowDefinitionError(f"{what}: {exc}") from exc


def _policy(policy: Any, partition: int, where: str, made: dict[int, Any], stage: int) -> Any:
    """An error policy whose dead-letter sink is this task's own copy."""
    if isinstance(policy, DeadLetter):
        sink = made.get(id(policy.sink))
        if sink is None:
            sink = made[id(policy.sink)] = _copy(
                policy.sink, partition, f"dead-letter sink of {where}", stage
            )
        return DeadLetter(sink)
    if isinstance(policy, Retry) and isinstance(policy.then, DeadLetter):
        return dataclasses.replace(policy, then=_policy(policy.then, partition, where, made, stage))
    return policy


def task_flow(flow: Flow, partition: int, *, stage: int = 0) -> Flow:
    """The flow of task ``partition``: the same operators, with fresh copies of every
    source and sink (and dead-letter sink) made by their ``for_task(partition)``
    (``for_task(partition, stage=stage)`` in sub-topology ``stage`` > 0).

    Raises:
        FlowDefinitionError: a source that is not Kafka, or a sink that cannot be copied
            per task; the message names it and the fix.
    """
    kafka_sources(flow)
    made: dict[int, Any] = {}  # id(original connector) -> this task's copy
    nodes: dict[int, Node] = {}
    for node in flow.topological_order():
        spec = copy.copy(node.spec)
        if isinstance(spec, SourceSpec):
            src: Source = made.get(id(spec.source)) or _copy(
                spec.source, partition, f"source {node.describe()}", stage
            )
            made[id(spec.source)] = src
            object.__setattr__(spec, "source", src)
        elif isinstance(spec, SinkSpec):
            sink: Sink = made.get(id(spec.sink)) or _copy(
                spec.sink, partition, f"sink {node.describe()}", stage
            )
            made[id(spec.sink)] = sink
            object.__setattr__(spec, "sink", sink)
        policy = getattr(spec, "on_error", None)
        if policy is not None:
            object.__setattr__(
                spec, "on_error", _policy(policy, partition, node.describe(), made, stage)
            )
        names: list[str] = (
            [f.name for f in dataclasses.fields(spec)] if dataclasses.is_dataclass(spec) else []
        )
        for name in names:
            value = getattr(spec, name, None)
            if isinstance(value, Source) and id(value) in made:  # rate_limit(reject)'s source
                object.__setattr__(spec, name, made[id(value)])
        twin = Node(
            node.id,
            node.name,
            spec,
            [nodes[i.id] for i in node.inputs],
            node.where,
            node.keyed,
            timestamped=node.timestamped,
        )
        for i in twin.inputs:
            i.consumers.append(twin)
        nodes[node.id] = twin
    out = copy.copy(flow)
    out.nodes = [nodes[n.id] for n in flow.nodes]
    out._sources = {id(n.spec.source): n for n in out.nodes if isinstance(n.spec, SourceSpec)}
    out._sinks = {id(n.spec.sink): n for n in out.nodes if isinstance(n.spec, SinkSpec)}
    return out


def check_partitions(flow: Flow, *, timeout: float = 30.0) -> int:
    """The partition count the flow's topics share, read from the cluster's metadata.

    Raises:
        FlowDefinitionError: topics with different partition counts (not co-partitioned:
            partition ``p`` of one would not hold the keys of partition ``p`` of the
            other), or a topic that does not exist.
        KafkaError: the cluster did not answer.
    """
    sources = kafka_sources(flow)
    first = sources[0][1]
    topics = sorted({t for _, s in sources for t in s.topics})
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415 - only here

    security = {k: v for k, v in first.client_config().items() if k.startswith(_SECURITY_KEYS)}
    admin = AdminClient({"bootstrap.servers": first.bootstrap_servers, **security})
    try:
        meta = admin.list_topics(timeout=timeout)
    except ck.KafkaException as exc:
        raise KafkaError(
            f"cannot read the partition counts of {topics} from {first.bootstrap_servers!r}: {exc}"
        ) from exc
    counts: dict[str, int] = {}
    for t in topics:
        tm = meta.topics.get(t)
        if tm is None or tm.error is not None or not tm.partitions:
            raise FlowDefinitionError(
                f"topic {t!r} (read by flow {flow.name!r}) does not exist on "
                f"{first.bootstrap_servers!r}: create it before starting the workers (its "
                "partition count is the number of tasks)"
            )
        counts[t] = len(tm.partitions)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{t!r}: {n}" for t, n in counts.items())
        raise FlowDefinitionError(
            f"the topics of flow {flow.name!r} are not co-partitioned ({listed} partitions): "
            "a task reads partition p of every topic, which must hold the same keys. "
            "Give them the same partition count (and the same key partitioner), or "
            "repartition one into a topic with the other's count"
        )
    return next(iter(counts.values()))


# -- the task manager ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """How every task of a worker runs.

    Attributes:
        checkpoint_dir: the checkpoint directory shared by the workers; task ``p`` keeps
            its checkpoints in ``<checkpoint_dir>/tasks/p<p>``.  None, for a stateless
            flow whose sinks are all exactly-once Kafka sinks only: each run of a task
            checkpoints into a private temporary store, deleted when it ends, and starts
            from the offsets its group committed (in the output's transactions).
        checkpoint_interval: seconds between two checkpoints of a task.
        grace_period: seconds a task's stop may take before it is cancelled.
        max_batch_size: the most records a task's source is asked for at once.
        revoke_timeout: seconds the revoke callback waits for the tasks of the revoked
            partitions to stop at a checkpoint (then they are cancelled and their next
            owner goes back to their last checkpoint).  None: the flow's Kafka source's,
            and for a flow whose sinks are all transactional at most the checkpoint
            interval (at least 2 s): a task that cannot stop within an interval is
            behind, and redoing an interval costs less than its next owner waiting.
        purge_interval: for a flow that repartitions through Kafka, the least seconds
            between two deletions of the records of the repartition topics that the
            worker's tasks have checkpointed (Kafka Streams'
            ``repartition.purge.interval.ms``; :mod:`sluiceway.scaleout.repartition`).
    """

    checkpoint_dir: str | None
    checkpoint_interval: float = 5.0
    grace_period: float = 10.0
    max_batch_size: int = 1024
    revoke_timeout: float | None = None
    purge_interval: float = 30.0


_MIN_HANDOVER = 2.0
"""The shortest graceful stop a revoked task of a transactional flow gets (seconds)."""


RESTORE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the buckets of the restore-time histogram."""


@dataclass(slots=True)
class RestoreTimes:
    """The restore times of a worker's tasks so far: seconds from a task's start to its
    flow running (its checkpoint restored, its connectors opened -- an exactly-once
    sink's ``init_transactions``, which fences the previous owner -- and, on a fresh
    start, the first checkpoint taken).

    >>> r = RestoreTimes()
    >>> r.observe("p3", 0.3); r.observe("s1-p1", 7.0)
    >>> r.count, round(r.total, 1), r.last["p3"], r.buckets[:4]
    (2, 7.3, 0.3, [0, 0, 1, 1])
    >>> RestoreTimes.merged([r, r]).count
    4
    """

    count: int = 0
    total: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(RESTORE_BUCKETS))
    """Cumulative: ``buckets[i]`` restores took at most ``RESTORE_BUCKETS[i]`` seconds."""
    last: dict[str, float] = field(default_factory=dict)
    """The last restore time of each task (by name: ``p3``, ``s1-p3``) this worker ran."""

    def observe(self, task: str, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.last[task] = seconds
        for i, bound in enumerate(RESTORE_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    @classmethod
    def merged(cls, times: list[RestoreTimes]) -> RestoreTimes:
        """The restores of several task managers as one worker's (a copy)."""
        out = cls()
        for t in times:
            out.count += t.count
            out.total += t.total
            out.buckets = [a + b for a, b in zip(out.buckets, t.buckets, strict=True)]
            out.last.update(t.last)
        return out


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """One task of a worker: its partition owned and/or its task here.

    Attributes:
        partition: the partition (the task is ``p<partition>``, ``s<stage>-p<partition>``
            in sub-topology ``stage`` > 0: :attr:`task`).
        owned: the group assigned it to this worker (False: its task is still stopping
            after a revoke).
        state: ``starting`` (owned, its task not started yet: the previous run here is
            still stopping), ``restoring`` (its flow restores the checkpoint and opens
            its connectors), ``running``, or ``stopping``.
        restore_seconds: the restore time of this run (None while restoring).
        snapshot: the task's metrics (None without a task).
        started_at: the clock's monotonic time the task started (None without a task).
        stage: the sub-topology of a flow that repartitions through Kafka (0: the one
            reading the flow's sources, the only one without repartitioning).
        topic: the topic whose partition this is: the flow's (first) input topic in
            stage 0, the repartition topic stage ``stage`` reads after it.
    """

    partition: int
    owned: bool
    state: str
    restore_seconds: float | None = None
    snapshot: FlowSnapshot | None = None
    started_at: float | None = None
    stage: int = 0
    topic: str = ""

    @property
    def task(self) -> str:
        """The task's name: ``p3``, or ``s1-p3`` (:func:`task_name`)."""
        return task_name(self.partition, self.stage)


@dataclass(frozen=True, slots=True)
class StageInput:
    """A sub-topology of a worker's flow, as its monitoring shows it.

    Attributes:
        stage: 0, or ``n`` after the ``n``-th repartition.
        topic: the topic whose partitions name its tasks (the one its membership
            consumer subscribes to).
        flow: the flow each of its tasks runs (its operators: the graph of a task).
    """

    stage: int
    topic: str
    flow: Flow


class TaskWorker(Protocol):
    """What the metrics, the web view and the live view of a worker of a keyed flow read
    (:mod:`.metrics`, :mod:`.web`, :mod:`.live`): a :class:`TaskManager`, or a
    :class:`~.repartition.StagedTasks` (one manager per sub-topology, merged)."""

    @property
    def flow(self) -> Flow:
        """The flow as its user wrote it (its name labels everything)."""
        ...

    @property
    def clock(self) -> Clock: ...

    @property
    def events(self) -> Counter[str]:
        """Task events on this worker so far (``started``, ``stopped``, ...)."""
        ...

    @property
    def restores(self) -> RestoreTimes:
        """The restore times of the tasks started on this worker."""
        ...

    def status(self) -> list[TaskStatus]:
        """Every task this worker owns or runs, by stage, then partition."""
        ...

    def stage_inputs(self) -> list[StageInput]:
        """Every sub-topology of the flow, by stage."""
        ...


@dataclass(eq=False)
class _Task:
    partition: int
    started_at: float = 0.0  # the clock's monotonic time at the task's start
    restore_seconds: float | None = None
    handle: FlowHandle | None = None
    private: str | None = None  # its own checkpoint store, deleted at its end (no dir)
    runner: asyncio.Task[None] | None = None
    ending: str | None = None  # "stop" (graceful) or "cancel" (lost), set by us
    result: RunResult | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Handover:
    """A rebalance callback waiting, in the membership thread, for the event loop."""

    partitions: list[int]
    done: threading.Event = field(default_factory=threading.Event)


class TaskManager:
    """Runs a keyed flow (or a stateless exactly-once one) as one task per owned
    partition, on one worker.

    Args:
        flow: the flow (its sources all Kafka, of one group; its sinks copyable).
        spec: checkpoints and limits of the tasks.
        clock: the clock of the tasks and of every deadline here.
        on_task: called with ``(event, partition)`` for ``"started"``, ``"stopped"``,
            ``"cancelled"``, ``"ended"`` (for messages and tests).
        stage: the sub-topology of a flow that repartitions through Kafka whose tasks
            this manager runs (:mod:`sluiceway.scaleout.repartition`): its tasks are
            ``s<stage>-p<p>``, checkpointed in ``tasks/s<stage>-p<p>``; 0 (the default)
            keeps ``p<p>`` and ``tasks/p<p>``.

    :meth:`run` joins the group and runs until :meth:`request_stop` (the tasks stop at a
    final checkpoint, the worker leaves the group), until every task it ran ended by
    itself (their input ended), or until a task fails (the others stop at a checkpoint,
    and the task's error is raised).
    """

    def __init__(
        self,
        flow: Flow,
        spec: TaskSpec,
        *,
        clock: Clock | None = None,
        on_task: Callable[[str, int], None] | None = None,
        stage: int = 0,
    ) -> None:
        sources = kafka_sources(flow)
        # every sink can be copied: refuse now, not at the first task
        task_flow(flow, 0, stage=stage)
        if spec.checkpoint_dir is None and (keyed_state(flow) or not exactly_once_kafka(flow)):
            why = (
                "keeps keyed state"
                if keyed_state(flow)
                else "writes to a sink that is not an exactly-once Kafka sink"
            )
            raise FlowDefinitionError(
                f"flow {flow.name!r} {why}: its tasks need a checkpoint directory every "
                "worker reaches (TaskSpec(checkpoint_dir)); only a stateless flow whose "
                "sinks are all exactly-once Kafka sinks goes on from the offsets its "
                "transactions committed"
            )
        self.stage = stage
        self.flow = flow
        self.spec = spec
        self.clock = clock or SystemClock()
        self._on_task = on_task
        first = sources[0][1]
        self._source = first
        self._lead = sorted(t for _, s in sources for t in s.topics)[0]
        self.topic = self._lead
        """The topic whose partitions name the tasks (the membership subscribes to it)."""
        revoke = spec.revoke_timeout
        self.revoke_timeout = first._revoke_timeout if revoke is None else revoke
        if revoke is None and all_transactional(flow):
            # A revoked task stops at a checkpoint, whose barrier queues behind what the
            # task already fetched: a flow that is behind (a backlog, CPU-heavy records)
            # takes many seconds to drain it while the next owner waits idle.  With every
            # sink transactional, cancelling is safe -- the open transaction is aborted,
            # the next owner restores the last checkpoint and redoes at most an interval
            # -- so a stop that takes longer than an interval is not worth waiting for.
            self.revoke_timeout = min(
                self.revoke_timeout, max(_MIN_HANDOVER, spec.checkpoint_interval)
            )
        self.tasks: dict[int, _Task] = {}
        self.owned: set[int] = set()
        self.ran = 0  # tasks started so far
        self.events: Counter[str] = Counter()  # on_task events so far ("started", ...)
        self.restores = RestoreTimes()
        self.results: dict[int, RunResult] = {}
        self._consumer: ck.Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = False
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._to_commit: dict[tuple[str, int], int] = {}
        self._starting: set[int] = set()
        self._ended: set[int] = set()  # partitions whose last task ended by itself
        self._polling: asyncio.Future[None] | None = None
        self._polls = 0  # polls of the membership consumer so far
        # fenced partitions: the poll count after which their task starts again if owned
        self._restarts: dict[int, int] = {}
        self._private_root: str | None = None  # the tasks' private stores (no checkpoint dir)

    # -- membership (librdkafka calls these inside a poll, in its thread) ------------

    def _consumer_config(self) -> dict[str, Any]:
        src = self._source
        return {
            "bootstrap.servers": src.bootstrap_servers,
            "group.id": src.group,
            "client.id": f"sluiceway.{self.flow.name}.membership"
            + (f"-s{self.stage}" if self.stage else ""),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
            # Not stable-only: the tasks' open transactions must not hold the
            # membership's own offset lookups back.
            "isolation.level": "read_uncommitted",
            "queued.max.messages.kbytes": 64,
            "logger": logging.getLogger("sluiceway.kafka"),
            **src.client_config(),
        }

    def _hand(self, what: str, tps: list[ck.TopicPartition]) -> _Handover:
        """Hand ``tps`` to the event loop (``what``: assign, revoke, lose)."""
        h = _Handover(sorted({tp.partition for tp in tps}))
        loop = self._loop
        if loop is None or not h.partitions:
            h.done.set()
            return h
        try:
            loop.call_soon_threadsafe(self._on_loop, what, h)
        except RuntimeError:  # the loop is closed: nothing runs any more
            h.done.set()
        return h

    def _assigned(self, consumer: ck.Consumer, tps: list[ck.TopicPartition]) -> None:
        consumer.incremental_assign(tps)
        if tps:
            consumer.pause(tps)  # the tasks read the records, never the membership
        self._hand("assign", tps)

    def _revoked(self, consumer: ck.Consumer, tps: list[ck.TopicPartition]) -> None:
        h = self._hand("revoke", tps)
        h.done.wait()  # set by the event loop: stopped at a checkpoint, or cancelled
        self._commit_offsets(consumer, set(h.partitions))
        consumer.incremental_unassign(tps)

    def _lost(self, consumer: ck.Consumer, tps: list[ck.TopicPartition]) -> None:
        h = self._hand("lose", tps)
        h.done.wait()
        with self._lock:  # another member owns them: nothing of theirs is committed
            for tp in list(self._to_commit):
                if tp[1] in h.partitions:
                    del self._to_commit[tp]
        consumer.incremental_unassign(tps)

    def _commit_offsets(self, consumer: ck.Consumer, only: set[int] | None = None) -> None:
        """Commit what the tasks handed over (in the membership thread)."""
        with self._lock:
            picked = {
                tp: off for tp, off in self._to_commit.items() if only is None or tp[1] in only
            }
            for tp in picked:
                del self._to_commit[tp]
        if not picked:
            return
        offsets = [ck.TopicPartition(t, p, off) for (t, p), off in sorted(picked.items())]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except ck.KafkaException as exc:
            log.warning(
                "flow %r: committing the tasks' offsets %s failed: %s (their checkpoints "
                "hold the positions; only lag metrics lag)",
                self.flow.name,
                picked,
                exc,
            )

    def _commit_through(self, offsets: dict[tuple[str, int], int]) -> None:
        """A task's source: these offsets are durable (its checkpoint is stored)."""
        with self._lock:
            self._to_commit.update(offsets)

    def _poll(self) -> None:
        """One poll of the membership consumer (in a thread): heartbeats, rebalance
        callbacks, and the commit of the offsets the tasks handed over."""
        consumer = self._consumer
        assert consumer is not None
        msg = consumer.poll(_POLL)
        err = None if msg is None else msg.error()
        if err is not None and (err.fatal() or err.code() in _FATAL):
            raise KafkaError(f"flow {self.flow.name!r}: group membership: {err.str()}")
        self._commit_offsets(consumer)

    # -- in the event loop ---------------------------------------------------------

    def _on_loop(self, what: str, h: _Handover) -> None:
        if self._tg is None:  # the run is over: nothing left to start or stop
            h.done.set()
            return
        if what == "assign":
            self.owned.update(h.partitions)
            for p in h.partitions:
                self._tg.create_task(self._start(p), name=f"{self.flow.name}/start p{p}")
            h.done.set()
        else:
            self.owned.difference_update(h.partitions)
            graceful = what == "revoke"
            self._tg.create_task(
                self._stop_tasks(h, graceful=graceful), name=f"{self.flow.name}/{what}"
            )

    def _say(self, event: str, partition: int) -> None:
        log.info("flow %r: task %s %s", self.flow.name, task_name(partition, self.stage), event)
        self.events[event] += 1
        if self._on_task is not None:
            self._on_task(event, partition)

    async def _start(self, p: int) -> None:
        self._starting.add(p)
        try:
            before = self.tasks.get(p)
            if before is not None:  # the previous run of p here is still stopping
                await before.done.wait()
            if p not in self.owned or self._stop or self._failure is not None:
                return
            task = self._launch(p)
        except Exception as exc:  # noqa: BLE001 - the worker fails with it
            self._fail(exc)
            return
        finally:
            self._starting.discard(p)
        try:
            self._say("started", p)
            assert self._tg is not None
            self._tg.create_task(self._time_restore(task), name=f"{self.flow.name}/restore p{p}")
        except Exception as exc:  # noqa: BLE001 - the worker fails with it
            self._fail(exc)
        # Whatever failed above, the task runs: it is watched to its end, which is what
        # a stop of it waits for (an unwatched task's stop would wait forever).
        await self._watch(task)

    def _launch(self, p: int) -> _Task:
        """Start the task of ``p``: in :attr:`tasks` once its flow started, never before
        (a task there is one that :meth:`_watch` sees end)."""
        flow = task_flow(self.flow, p, stage=self.stage)
        for node in flow.nodes:
            if isinstance(node.spec, SourceSpec) and isinstance(node.spec.source, KafkaSource):
                node.spec.source.commit_through = self._commit_through
        spec = self.spec
        task = _Task(p, started_at=self.clock.monotonic())
        if spec.checkpoint_dir is None:
            # Nothing to restore: the run starts from the group's committed offsets, which
            # the previous owner's last committed transaction wrote with its output.  A
            # store kept from an earlier run here would hold older positions.
            if self._private_root is None:  # one per worker: what a crash leaves is in it
                self._private_root = tempfile.mkdtemp(prefix=f"sluiceway-{self.flow.name}-")
            task.private = tempfile.mkdtemp(
                prefix=f"{task_name(p, self.stage)}-", dir=self._private_root
            )
            location = task.private
        else:
            location = task_dir(spec.checkpoint_dir, p, self.stage)
        try:
            task.handle = start(
                flow,
                clock=self.clock,
                grace_period=spec.grace_period,
                max_batch_size=spec.max_batch_size,
                checkpoints=Checkpoints(location, interval=spec.checkpoint_interval),
            )
        except BaseException:
            _discard(task)
            raise
        self.tasks[p] = task
        self.ran += 1
        self._ended.discard(p)
        return task

    async def _time_restore(self, task: _Task) -> None:
        """Once the task's flow runs: record its restore time."""
        assert task.handle is not None
        running = await task.handle.wait_running()
        if running is not None:
            task.restore_seconds = max(0.0, running - task.started_at)
            self.restores.observe(task_name(task.partition, self.stage), task.restore_seconds)

    async def _watch(self, task: _Task) -> None:
        """Wait for task's end; a failure that we did not cause fails the worker."""
        assert task.handle is not None
        p = task.partition
        try:
            task.result = await task.handle.wait()
            self.results[p] = task.result
            if task.ending is None:
                self._ended.add(p)
            self._say("stopped" if task.ending else "ended", p)
        except FlowCancelledError as exc:
            if task.ending is None:
                self._fail(exc)
            self._say("cancelled", p)
        except Exception as exc:  # noqa: BLE001 - the worker fails with it
            if task.ending == "cancel":
                log.info(
                    "flow %r: task %s ended with %r after it was lost",
                    self.flow.name,
                    task_name(p, self.stage),
                    exc,
                )
            elif _fenced(exc):
                # Another worker's task of p initialised its transactional id: the group
                # gave p away while this worker was not looking (a pause longer than the
                # session).  Its output is aborted; the membership hears of the loss at
                # its next poll.  Not a failure of this worker.
                log.warning(
                    "flow %r: task %s was fenced by a newer owner of its partition: "
                    "closed, its open transaction aborted (%s)",
                    self.flow.name,
                    task_name(p, self.stage),
                    exc,
                )
                self._restarts[p] = self._polls + _RESTART_POLLS
            else:
                self._fail(exc)
            self._say("fenced" if _fenced(exc) and task.ending != "cancel" else "failed", p)
        finally:
            _discard(task)
            task.done.set()
            if self.tasks.get(p) is task:
                del self.tasks[p]

    def _restart_fenced(self) -> None:
        """After each poll: start again the fenced tasks whose partition this worker still
        owns :data:`_RESTART_POLLS` polls after the fencing (the membership hears of a
        loss in them).  Driven by the membership loop, so a restart still due when the
        loop ends (a stop, a failure) is dropped, never waited for: a waiter of its own
        would outlive the loop and hold the task group, and the worker, open forever."""
        due = [p for p, at in self._restarts.items() if at <= self._polls]
        for p in due:
            del self._restarts[p]
            if p in self.owned and p not in self.tasks and p not in self._starting:
                assert self._tg is not None
                self._tg.create_task(self._start(p), name=f"{self.flow.name}/start p{p}")

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc

    async def _stop_tasks(self, h: _Handover, *, graceful: bool) -> None:
        """Stop the tasks of ``h`` at a checkpoint (``graceful``, bounded by the revoke
        timeout, then cancelled) or cancel them; then let the callback go on."""
        try:
            tasks = [t for p in h.partitions if (t := self.tasks.get(p)) is not None]
            await self._stop_all(tasks, graceful=graceful, within=self.revoke_timeout)
        finally:
            h.done.set()

    async def _stop_all(self, tasks: list[_Task], *, graceful: bool, within: float) -> None:
        clock = self.clock
        for t in tasks:
            if t.handle is None:
                continue
            if graceful and t.ending is None:
                t.ending = "stop"
                t.handle.request_stop()
            else:
                t.ending = "cancel"
                t.handle.force_stop("its partition was lost" if not graceful else "stopped")
        if not tasks:
            return
        all_done = asyncio.ensure_future(asyncio.gather(*(t.done.wait() for t in tasks)))
        try:
            deadline = clock.monotonic() + within
            waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            all_done.add_done_callback(lambda _f: _resolve(waiting))
            if not await clock.wait_until(waiting, deadline):
                late = [t for t in tasks if not t.done.is_set()]
                log.warning(
                    "flow %r: task(s) %s did not stop at a checkpoint within %gs: cancelled "
                    "(their next owner goes back to their last checkpoint)",
                    self.flow.name,
                    ", ".join(f"p{t.partition}" for t in late),
                    within,
                )
                for t in late:
                    t.ending = "cancel"
                    assert t.handle is not None
                    t.handle.force_stop(f"not stopped at a checkpoint within {within:g}s")
                await all_done
        finally:
            if not all_done.done():
                all_done.cancel()

    def request_stop(self) -> None:
        """Stop every task at a final checkpoint, commit, and leave the group (safe from
        a signal handler)."""
        self._stop = True

    def force_stop(self) -> None:
        """Cancel every task now (a second signal)."""
        self._stop = True
        for t in list(self.tasks.values()):
            if t.handle is not None:
                t.ending = "cancel"
                t.handle.force_stop("forced stop")

    def status(self) -> list[TaskStatus]:
        """Every partition this worker owns or runs a task of, by partition."""
        out = []
        stage, topic = self.stage, self.topic
        for p in sorted(self.owned | set(self.tasks)):
            task = self.tasks.get(p)
            handle = None if task is None else task.handle
            if task is None or handle is None:
                out.append(TaskStatus(p, p in self.owned, "starting", stage=stage, topic=topic))
                continue
            if task.ending is not None or handle.stopping or p not in self.owned:
                state = "stopping"
            elif handle.running_since is None:
                state = "restoring"
            else:
                state = "running"
            out.append(
                TaskStatus(
                    p,
                    p in self.owned,
                    state,
                    task.restore_seconds,
                    handle.metrics(),
                    task.started_at,
                    stage=stage,
                    topic=topic,
                )
            )
        return out

    def stage_inputs(self) -> list[StageInput]:
        """This manager's sub-topology (:class:`TaskWorker`)."""
        return [StageInput(self.stage, self.topic, self.flow)]

    def snapshots(self) -> dict[int, FlowSnapshot]:
        """Every running task's metrics, by partition."""
        return {p: t.handle.metrics() for p, t in sorted(self.tasks.items()) if t.handle}

    def _finished(self) -> bool:
        """The last task of every partition this worker owns ended by itself (their
        input ended), and none runs or is about to start."""
        return (
            bool(self.owned) and not self.tasks and not self._starting and self.owned <= self._ended
        )

    async def run(self) -> dict[int, RunResult]:
        """Join the group and run the tasks of the partitions it assigns; the results of
        the tasks this worker ran, by partition (the last run of each).

        Raises:
            FlowDefinitionError: the topics are not co-partitioned, or do not exist.
            KafkaError: the membership consumer failed.
            SluicewayError: a task failed (its own error).
        """
        clock = self.clock
        await clock.run_in_thread(check_partitions, self.flow)
        self._loop = asyncio.get_running_loop()
        try:
            self._consumer = ck.Consumer(self._consumer_config())
            self._consumer.subscribe(
                [self._lead], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise KafkaError(f"flow {self.flow.name!r}: cannot join group: {exc}") from exc
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._membership()
                await self._leave()
        except BaseExceptionGroup as group:
            first = next(
                (e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)),
                group.exceptions[0],
            )
            raise first from first.__cause__
        finally:
            self._tg = None
            self._loop = None
            if self._polling is not None and not self._polling.done():
                await asyncio.wait([self._polling])  # never close beside a poll
            consumer, self._consumer = self._consumer, None
            if consumer is not None:  # a failure on the way: leave without committing
                await clock.run_in_thread(consumer.close)
            if self._private_root is not None and not self.tasks:
                shutil.rmtree(self._private_root, ignore_errors=True)  # a temporary directory
                self._private_root = None
        if self._failure is not None:
            raise self._failure
        return dict(self.results)

    async def _membership(self) -> None:
        """Poll until a stop, a failure, or every task ended by itself."""
        while not self._stop and self._failure is None and not self._finished():
            self._polling = asyncio.ensure_future(self.clock.run_in_thread(self._poll))
            try:
                await self._polling
            except KafkaError as exc:
                self._fail(exc)
            self._polls += 1
            self._restart_fenced()

    async def _leave(self) -> None:
        """Stop the tasks at a checkpoint (cancel them after a failure), commit, and
        leave the group: the partitions go to the other workers only now."""
        tasks = list(self.tasks.values())
        await self._stop_all(
            tasks, graceful=self._failure is None, within=self.spec.grace_period + 1.0
        )
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        self._loop = None  # the revoke callbacks of close() find nothing left to stop
        await self.clock.run_in_thread(self._close, consumer)
        self.owned.clear()  # out of the group: what it owned is the others' now

    def _close(self, consumer: ck.Consumer) -> None:
        if self._failure is None:
            self._commit_offsets(consumer)
        consumer.close()


_FENCING = (
    ck.KafkaError._FENCED,
    ck.KafkaError.PRODUCER_FENCED,
    ck.KafkaError.INVALID_PRODUCER_EPOCH,
)


def _fenced(exc: BaseException) -> bool:
    """Was this task superseded by a newer owner of its partition?  ``exc`` (or a cause
    of it) is Kafka fencing this producer's transactional id, or the shared checkpoint
    store refusing a checkpoint id the newer owner saved first (a zombie that had not
    written to Kafka since the takeover finds out there)."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, CheckpointConflictError):
            return True
        if isinstance(at, ck.KafkaException) and at.args:
            err = at.args[0]
            if isinstance(err, ck.KafkaError) and err.code() in _FENCING:
                return True
        at = at.__cause__ or at.__context__
    return False


def _discard(task: _Task) -> None:
    """Delete the private checkpoint store of a task's run that has ended."""
    if task.private is not None:
        shutil.rmtree(task.private, ignore_errors=True)  # a temporary directory
        task.private = None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
