"""Repartitioning through Kafka: a keyed flow on several workers whose input topic is not
keyed by the flow's key (Kafka Streams' repartition topics).

A worker runs a keyed flow as one task per Kafka partition (:mod:`.tasks`), so each key
must arrive in one partition.  When a ``key_by(fn)`` does not promise that
(``partitioned=True``), the flow is split there into **sub-topologies** (stages):

* **stage 0**: everything before the ``key_by``, the ``key_by`` itself, and an internal
  sink writing every record to the **repartition topic** with ``fn(record)`` as its
  message key (murmur2, as Kafka's Java clients): every record of a key lands in one
  partition;
* **stage 1**: an internal source reading that topic, ``key_by(fn, partitioned=True)``
  and the rest of the flow.  A second unpartitioned ``key_by`` further down splits
  stage 1 the same way (stage 2 reads a second topic), and so on.

Each stage runs as tasks of its own -- stage 0's are ``p<p>`` (``tasks/p<p>``,
transactional ids ``<id>-p<p>``) as for a flow without repartitioning, stage ``n``'s
are ``s<n>-p<p>`` (``tasks/s<n>-p<p>``, ``<id>-s<n>-p<p>``) -- each stage with a
membership consumer of its own in the flow's consumer group (subscribed to the stage's
input topic: the group assigns the source topic's partitions and the repartition
topic's, each to one worker).

* **Topic**: ``<group>-<flow>-<key_by name>-repartition`` (characters Kafka does not
  allow become ``_``), created by the workers at start (idempotently; a topic that
  exists with another partition count is an error), with ``key_by(fn, partitions=N)``
  partitions, else the source topic's, and Kafka Streams' configs for repartition
  topics (:data:`TOPIC_CONFIG`: never deleted by time, 50 MB segments).  A topic that
  exists already is left as it is.
* **Purge**: a stage-``n`` task whose checkpoint is durable (and, exactly-once, its
  transaction committed) will never read its partition of the repartition topic below
  the offsets of the durable checkpoint before it again (should the latest turn out
  torn, the store falls back to that one), and no other task reads that partition: the
  worker's :class:`Purger` deletes those records (``deleteRecords``, as Kafka Streams'
  ``TaskManager.maybePurgeCommittedRecords``), at most every ``purge_interval``
  seconds (:class:`~.tasks.TaskSpec`), one request in flight at a time; a failure is
  logged and counted, and the next purge asks again.
* **Exactly-once**: stage 0's internal sink is transactional when every sink of the flow
  is (the stage-0 task's input offsets commit in the same transaction), and stage 1
  reads ``read_committed``: each record crosses once.  Otherwise at-least-once.  Its
  transactional ids are ``sluiceway.<topic>-p<p>``: of the topic, hence of the group.
* **Records** travel as parts of the checkpoint codec (:mod:`sluiceway.checkpoint.codec`):
  signed with the checkpoint key and bound to the flow and topic, so a stage never
  unpickles bytes it cannot authenticate; a message that does not verify is bad input.
  The record's event time travels inside (microseconds; the Kafka timestamp, in
  milliseconds, is set too, for people reading the topic).
* **Watermarks**: at each checkpoint a stage-0 task writes a *marker* (a message with
  the header ``sluiceway-marker``) to every partition of the repartition topic, carrying
  its upstream partition, the watermark that reached its sink, and whether its source is
  idle.  A stage-1 task's watermark is the minimum over the latest markers of all
  upstream partitions (idle ones left out, as a source in one process leaves out its
  idle partitions), so an event-time window after the repartition closes as it would in
  one process.  Markers are never handed to user code.

See docs/scaling.md ("Repartitioning through Kafka").
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import confluent_kafka as ck

from sluiceway.checkpoint.codec import decode as decode_part
from sluiceway.checkpoint.codec import encode, part_context, verify
from sluiceway.checkpoint.keys import KeyRing, load_keys
from sluiceway.connectors.kafka import (
    _SECURITY_KEYS,
    CONTROL,
    KafkaError,
    KafkaSink,
    KafkaSource,
    _untp,
)
from sluiceway.core.contract import SinkContext, SourceContext
from sluiceway.core.messages import Batch, Watermark
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow import Flow, Node
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.stateless import KeyBySpec
from sluiceway.runtime.executor import RunResult
from sluiceway.scaleout.tasks import (
    RestoreTimes,
    StageInput,
    TaskManager,
    TaskSpec,
    TaskStatus,
    kafka_sources,
    task_name,
)
from sluiceway.time import Clock, SystemClock

__all__ = [
    "MARKER_HEADER",
    "TOPIC_CONFIG",
    "PurgeStats",
    "Purger",
    "RepartitionSink",
    "RepartitionSource",
    "Stage",
    "StagedTasks",
    "partition_key",
    "repartition_topic",
    "stages",
]

log = logging.getLogger("sluiceway")

MARKER_HEADER = "sluiceway-marker"
"""The header that flags a watermark marker in a repartition topic."""

TOPIC_CONFIG: Mapping[str, str] = {
    "cleanup.policy": "delete",
    "retention.ms": "-1",
    "segment.bytes": str(50 * 1024 * 1024),
}
"""The configs a repartition topic is created with (Kafka Streams' for its repartition
topics): records are never deleted by time -- a retention shorter than a stopped flow's
pause would delete records stage 1 has not read -- but by the :class:`Purger` once read;
segments of 50 MB, so that the purged ones are freed (a segment's disk space is released
once every record of it is below the topic's start offset)."""

_INF = math.inf
# Consumer options of the flow's source that the internal source does not take over: it
# reads the repartition topic from its start, and only what stage 0 committed.
_FIXED_CONSUMER = ("auto.offset.reset", "isolation.level")
_TOPIC_CHARS = re.compile(r"[^a-zA-Z0-9._-]")


def repartition_topic(group: str, flow: str, key_by: str) -> str:
    """The internal topic of ``key_by`` of ``flow`` in consumer group ``group``, named as
    Kafka Streams names its repartition topics (``<application.id>-<name>-repartition``).

    >>> repartition_topic("spend", "per user", "by_user")
    'spend-per_user-by_user-repartition'
    """
    name = f"{group}-{flow}-{key_by}-repartition"
    return _TOPIC_CHARS.sub("_", name)[:249]


def partition_key(key: Any) -> bytes:
    """The message key of a record of key ``key`` in a repartition topic: equal keys give
    equal bytes in every process (so they land in one partition).

    >>> partition_key("u1"), partition_key(7), partition_key(7.0), partition_key(("a", 1))
    (b'"u1"', b'7', b'7', b'["a",1]')

    Raises:
        TypeError: a key that is not a str, bytes, number, bool, None or a tuple/list of
            those (its bytes would not be the same in every process).
    """
    return json.dumps(_plain(key), separators=(",", ":"), ensure_ascii=False).encode()


def _plain(key: Any) -> Any:
    if key is None or isinstance(key, str | int):
        return int(key) if isinstance(key, bool) else key
    if isinstance(key, float):
        return int(key) if key.is_integer() else key  # 7.0 == 7: one key, one partition
    if isinstance(key, bytes):
        return {"b": key.hex()}
    if isinstance(key, tuple | list):
        return [_plain(k) for k in key]
    raise TypeError(
        f"key {key!r} ({type(key).__name__}) cannot be written to a repartition topic: a "
        "key must be a str, bytes, number, bool, None or a tuple of those, so that every "
        "worker sends it to the same partition; key_by a tuple of its fields instead"
    )


# -- the internal connectors ----------------------------------------------------------


def _record_context(flow: str, topic: str) -> bytes:
    return part_context(flow, topic, "repartition record")


def _marker_context(flow: str, topic: str) -> bytes:
    return part_context(flow, topic, "repartition marker")


class RepartitionSink(KafkaSink):
    """Stage 0's end: every record to the repartition topic, keyed by its key, as a signed
    part; watermark markers at each checkpoint (see the module docstring).

    Args:
        source: the flow's (first) Kafka source: bootstrap servers and security.
        topic: the repartition topic.
        flow: the flow's name (records are bound to it and to the topic).
        keys: the checkpoint keys that sign the records (None: only the shape of the
            split is wanted, for checks; such a sink cannot be opened).
        exactly_once: write in the stage-0 task's transactions.
    """

    def __init__(
        self,
        source: KafkaSource,
        topic: str,
        flow: str,
        keys: KeyRing | None,
        *,
        exactly_once: bool,
    ) -> None:
        args = source._init_args
        super().__init__(
            source.bootstrap_servers,
            topic,
            value="bytes",
            exactly_once=exactly_once,
            # Not the default sluiceway.<flow>.<sink>: the same flow in another group (a
            # second deployment on the cluster) would fence this one's transactions.
            transactional_id=f"sluiceway.{topic}",
            config={k: v for k, v in source._user_config.items() if k.startswith(_SECURITY_KEYS)},
            tls=args["tls"],
            sasl=args["sasl"],
        )
        self._args = (source, topic, flow, keys, exactly_once)
        self._flow = flow
        self._ring = keys
        self._records = _record_context(flow, topic)
        self._markers = _marker_context(flow, topic)
        self.partitions = 0
        """The repartition topic's partition count (set by the workers at start)."""
        self.upstream: int | None = None
        """The partition of the stage-0 task this copy belongs to (``for_task``)."""
        self._wm = -_INF  # the watermark that reached this sink, in-band
        self._sent: tuple[float, bool] | None = None  # the last marker's (watermark, idle)

    def describe(self) -> str:
        return f"Kafka({self._topic}, repartition)"

    def _fresh(self) -> RepartitionSink:
        out = RepartitionSink(*self._args[:4], exactly_once=self._args[4])
        out.partitions = self.partitions
        return out

    def for_task(self, partition: int, *, stage: int = 0) -> KafkaSink:
        out = super().for_task(partition, stage=stage)
        assert isinstance(out, RepartitionSink)
        out.upstream = partition
        return out

    async def open(self, ctx: SinkContext) -> None:
        if self._ring is None:
            raise KafkaError(
                f"sink {ctx.name!r} ({self.describe()}): no checkpoint key to sign with"
            )
        await super().open(ctx)

    def _message(self, batch: Batch, i: int, v: Any) -> tuple[bytes | str, dict[str, Any]]:
        assert batch.keys is not None, "a repartition sink follows its key_by"
        assert self._ring is not None
        stamps = batch.timestamps
        stamp = None if stamps is None else stamps[i]
        kwargs: dict[str, Any] = {"key": partition_key(batch.keys[i])}
        if stamp is not None:
            kwargs["timestamp"] = stamp // 1000
        return encode((stamp, v), self._ring.current, self._records), kwargs

    def on_watermark(self, message: Watermark) -> None:
        """A watermark reached this sink (in-band: every record before it is written)."""
        if not message.idle and message.time > self._wm:
            self._wm = message.time

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """Write a marker to every partition when the watermark or idleness changed, in
        the checkpoint's transaction (exactly-once) or before its flush."""
        if self._producer is not None and self.upstream is not None and self.partitions:
            ctx = self._ctx
            idle = ctx is not None and all(
                s.idle() for s in ctx.sources if isinstance(s, KafkaSource)
            )
            mark = (self._wm, idle)
            if mark != self._sent and (self._wm > -_INF or idle):
                if self.exactly_once and not self._in_txn:
                    self._begin()
                assert self._ring is not None
                payload = encode(
                    {"from": self.upstream, "wm": self._wm, "idle": idle},
                    self._ring.current,
                    self._markers,
                )
                for p in range(self.partitions):
                    self._producer.produce(
                        self._topic, payload, partition=p, headers=[(MARKER_HEADER, b"1")]
                    )
                self._sent = mark
        return await super().pre_commit(checkpoint_id)

    def restore(self, state: Any) -> None:
        super().restore(state)
        self._sent = None  # a restarted task says where it is again


class RepartitionSource(KafkaSource):
    """Stage ``n``'s start: the records of the repartition topic (verified, then decoded),
    with the event time they had upstream and a watermark from the markers.

    Args:
        source: the flow's (first) Kafka source: servers, group, security, timeouts.
        topic: the repartition topic.
        flow: the flow's name.
        keys: the checkpoint keys the records are signed with (None: as for the sink).
        event_time: the records carry event time (the stream before the ``key_by`` did).
    """

    _records_advance_watermark = False

    def __init__(
        self,
        source: KafkaSource,
        topic: str,
        flow: str,
        keys: KeyRing | None,
        *,
        event_time: bool,
    ) -> None:
        a = source._init_args
        config = dict(a["config"] or {})
        for fixed in _FIXED_CONSUMER:  # earliest, read_committed: every record, once
            config.pop(fixed, None)
        if "group.instance.id" in config:  # one static member per stage and worker
            config["group.instance.id"] = f"{config['group.instance.id']}-{topic}"
        super().__init__(
            source.bootstrap_servers,
            topic,
            source.group,
            value="bytes",
            timestamp="record" if event_time else None,
            idle_timeout=None,  # an idle upstream says so in its markers
            stop_after_idle=a["stop_after_idle"],
            poll_timeout=a["poll_timeout"],
            revoke_timeout=a["revoke_timeout"],
            config=config,
            tls=a["tls"],
            sasl=a["sasl"],
        )
        self._args = (source, topic, flow, keys, event_time)
        self._ring = keys
        self._records = _record_context(flow, topic)
        self._markers = _marker_context(flow, topic)
        self.upstreams = 0
        """How many partitions the upstream stage has (set by the workers at start): a
        partition's watermark waits for a marker of each."""
        self.purger: Purger | None = None
        """The worker's :class:`Purger` (set by the workers at start): told the offsets
        of every durable checkpoint but the latest.  None: the records stay."""
        self._purgeable: dict[tuple[str, int], int] = {}  # the last durable checkpoint's
        self._marks: dict[tuple[str, int], dict[int, tuple[float, bool]]] = {}

    def describe(self) -> str:
        return f"Kafka({self._topics[0]}, repartition, group={self._group})"

    def _fresh(self) -> RepartitionSource:
        out = RepartitionSource(*self._args[:4], event_time=self._args[4])
        out.upstreams = self.upstreams
        out.purger = self.purger
        return out

    async def open(self, ctx: SourceContext) -> None:
        if self._ring is None:
            raise KafkaError(f"source {ctx.name!r} ({self.describe()}): no checkpoint key")
        await super().open(ctx)

    def _open(self, m: Any, context: bytes, what: str) -> Any:
        raw = m.value()
        verdict = verify(raw or b"", self._ring, context)
        if not verdict.ok:
            raise ValueError(
                f"not a {what} of flow {self._args[2]!r}'s repartition topic: "
                f"{verdict.reason} (is another flow or a stranger writing to "
                f"{self._topics[0]!r}? do the workers share one checkpoint key?)"
            )
        return decode_part(raw)

    def _decode(self, m: Any) -> tuple[Any, int]:
        headers = m.headers()
        if headers and any(k == MARKER_HEADER for k, _ in headers):
            mark = self._open(m, self._markers, "watermark marker")
            self._on_marker((m.topic(), m.partition()), mark)
            return CONTROL, 0
        stamp, value = self._open(m, self._records, "record")
        return value, (stamp or 0)

    def _on_marker(self, tp: tuple[str, int], mark: dict[str, Any]) -> None:
        marks = self._marks.setdefault(tp, {})
        marks[int(mark["from"])] = (float(mark["wm"]), bool(mark["idle"]))
        part = self._parts.get(tp)
        if part is None or len(marks) < self.upstreams:
            return  # an upstream partition has not said where it is yet
        active = [wm for wm, idle in marks.values() if not idle]
        if active and min(active) > part.max_ts:
            part.max_ts = min(active)

    def position(self) -> dict[str, Any]:
        out = super().position()
        out["markers"] = {
            f"{t}:{p}": {str(u): [wm, idle] for u, (wm, idle) in marks.items()}
            for (t, p), marks in self._marks.items()
        }
        return out

    def restore(self, position: Any) -> None:
        super().restore(position)
        self._purgeable = self._offsets_of(position)  # the checkpoint restored is durable
        markers = position.get("markers") or {}
        self._marks = {}
        for name, marks in markers.items():
            t, _, p = str(name).rpartition(":")
            self._marks[(t, int(p))] = {
                int(u): (float(wm), bool(idle)) for u, (wm, idle) in marks.items()
            }

    def _offsets_of(self, position: Any) -> dict[tuple[str, int], int]:
        """The offsets of ``position`` in this task's partition(s) of the topic."""
        offsets = position.get("offsets") if isinstance(position, Mapping) else None
        topic, out = self._topics[0], {}
        for name, off in (offsets or {}).items():
            t, p = _untp(name)
            if t == topic and (self._pinned is None or p == self._pinned):
                out[(t, p)] = int(off)
        return out

    async def commit(self, position: Any) -> None:
        """A checkpoint holding ``position`` is durable (and with exactly-once sinks its
        transaction committed: the runtime commits sources after sinks): commit the
        offsets as any Kafka source, and offer the worker's :class:`Purger` those of the
        durable checkpoint *before* this one -- this task resumes from that one or a
        later one (from it when this one turns out torn: the store falls back to the
        previous checkpoint that verifies), and no other task reads its partition, so
        the records below them are read for good."""
        await super().commit(position)
        purger, ctx = self.purger, self._ctx
        if purger is None or ctx is None or not ctx.checkpointing:
            return  # without checkpoints, nothing says where a restart resumes
        offsets = self._offsets_of(position)
        before, self._purgeable = self._purgeable, {**self._purgeable, **offsets}
        if before:
            purger.durable(before, ctx.clock.monotonic())

    async def close(self) -> None:
        await super().close()
        self._marks = {}  # the restored markers were this run's
        self._purgeable = {}


# -- the purge ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeStats:
    """What a :class:`Purger` did so far.

    Attributes:
        requests: delete-records requests sent.
        purged: partitions whose records were deleted up to an offset (one per partition
            and request that succeeded).
        failures: partitions a request failed for (each logged as a warning).
        last_error: the last failure's message (None: none yet).
        offsets: per ``(topic, partition)``, the offset below which its records were
            last deleted.
    """

    requests: int = 0
    purged: int = 0
    failures: int = 0
    last_error: str | None = None
    offsets: Mapping[tuple[str, int], int] = dataclasses.field(default_factory=dict)


def _purge_interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"purge_interval must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"purge_interval must be a number of seconds >= 0, got {value!r}")
    return float(value)


class Purger:
    """Deletes the records of the repartition topics that the stage-``n`` tasks of one
    worker have checkpointed (Kafka Streams' ``maybePurgeCommittedRecords``).

    A task's :class:`RepartitionSource` calls :meth:`durable` once its checkpoint is
    durable -- stored, and with exactly-once sinks its transaction committed -- with the
    offsets the checkpoint before it resumes from: records below them are never read
    again (the partition's next owner restores one of the two, or a later one).  When the interval
    since the last request has passed and no request is in flight, every offset offered
    since and not deleted yet goes out in one ``deleteRecords`` request: asynchronous
    (the admin client's own thread does the work; the event loop never waits for it), its
    failures logged and counted, never failing the flow -- a failed partition is asked
    again at the next purge, with its latest offset.

    Args:
        admin: a ``confluent_kafka.admin.AdminClient`` of the cluster.
        interval: the least seconds between two requests (0: at every checkpoint).
        flow: the flow's name (for messages).
        timeout: seconds one request may take.

    Raises:
        TypeError: an interval that is not a number.
        ValueError: a negative or non-finite interval.

    The schedule is a function of the ``now`` the caller passes (the task's clock); here
    with an admin client that answers at once (a real one answers from its thread):

    >>> from concurrent.futures import Future
    >>> class Answering:
    ...     def delete_records(self, tps, **timeouts):
    ...         answers = {tp: Future() for tp in tps}
    ...         for f in answers.values():
    ...             f.set_result(None)
    ...         return answers
    >>> p = Purger(Answering(), 30.0, "f")
    >>> p.durable({("t", 0): 10}, now=0.0)  # sent
    >>> p.durable({("t", 0): 20}, now=12.0)  # kept for the next purge
    >>> p.statistics().offsets, p.due(29.9), p.due(30.0)
    ({('t', 0): 10}, False, True)
    >>> p.durable({("t", 1): 5}, now=30.0)
    >>> p.statistics().offsets, p.statistics().requests
    ({('t', 0): 20, ('t', 1): 5}, 2)
    """

    def __init__(self, admin: Any, interval: float, flow: str, *, timeout: float = 30.0) -> None:
        self._admin = admin
        self.interval = _purge_interval(interval)
        self._flow = flow
        self._timeout = timeout
        self._next = -_INF  # the clock's time from which the next request may go
        self._lock = threading.Lock()  # the admin client's thread completes requests
        self._wanted: dict[tuple[str, int], int] = {}  # offered: durable below these
        self._done: dict[tuple[str, int], int] = {}  # deleted below these
        self._in_flight = 0
        self._requests = self._purged = self._failures = 0
        self._last_error: str | None = None

    def due(self, now: float) -> bool:
        """May a request go at ``now``: the interval since the last one has passed, and
        that one is answered?"""
        with self._lock:
            return self._due(now)

    def _due(self, now: float) -> bool:  # (the lock held)
        return self._in_flight == 0 and now >= self._next

    def durable(self, offsets: Mapping[tuple[str, int], int], now: float) -> None:
        """A task's checkpoint is durable: below ``offsets`` its repartition partitions'
        records are read for good.  Sends a request when one is :meth:`due`."""
        with self._lock:
            for tp, off in offsets.items():
                if off > self._wanted.get(tp, -1):
                    self._wanted[tp] = off
            if not self._due(now):
                return
            todo = {tp: off for tp, off in self._wanted.items() if off > self._done.get(tp, 0)}
            if not todo:
                return
            self._next = now + self.interval
            self._requests += 1
            self._in_flight = len(todo)
        self._send(todo)

    def _send(self, todo: dict[tuple[str, int], int]) -> None:
        tps = [ck.TopicPartition(t, p, off) for (t, p), off in sorted(todo.items())]
        try:
            futures = self._admin.delete_records(
                tps, request_timeout=self._timeout, operation_timeout=self._timeout
            )
        except (ck.KafkaException, ValueError, TypeError) as exc:
            with self._lock:
                self._in_flight = 0
            for tp in todo:
                self._failed(tp, exc)
            return
        for tp, future in futures.items():
            key = (tp.topic, tp.partition)
            future.add_done_callback(lambda f, key=key: self._answered(key, todo[key], f))

    def _answered(self, tp: tuple[str, int], offset: int, future: Any) -> None:
        """A partition's answer (in the admin client's thread, or at once)."""
        exc = future.exception()
        with self._lock:
            self._in_flight -= 1
            if exc is None:
                self._purged += 1
                self._done[tp] = max(self._done.get(tp, 0), offset)
        if exc is None:
            log.debug("flow %r: %s[%d] purged below offset %d", self._flow, *tp, offset)
        else:
            self._failed(tp, exc)

    def _failed(self, tp: tuple[str, int], exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._failures += 1
            self._last_error = message
        log.warning(
            "flow %r: deleting the read records of repartition topic %s[%d] failed: %s "
            "(nothing is lost: they are deleted at the next purge)",
            self._flow,
            *tp,
            message,
        )

    def statistics(self) -> PurgeStats:
        """What this purger did so far."""
        with self._lock:
            return PurgeStats(
                self._requests,
                self._purged,
                self._failures,
                self._last_error,
                dict(self._done),
            )


# -- the split ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage:
    """One sub-topology of a flow that repartitions.

    Attributes:
        index: 0 for the one reading the flow's sources, ``n`` for the one after the
            ``n``-th repartition.
        flow: its flow (stage 0 ends in a :class:`RepartitionSink`, stage ``n`` starts
            with a :class:`RepartitionSource`).
        topic: the repartition topic this stage writes (None: the last stage).
        partitions: that topic's partition count, if ``key_by(partitions=N)`` chose it.
    """

    index: int
    flow: Flow
    topic: str | None = None
    partitions: int | None = None


def _unpartitioned(flow: Flow) -> list[Node]:
    return [
        n
        for n in flow.topological_order()
        if isinstance(n.spec, KeyBySpec) and not n.spec.partitioned
    ]


def _rebuilt(flow: Flow, nodes: list[Node]) -> Flow:
    out = copy.copy(flow)
    out.nodes = nodes
    out._names = {n.name for n in nodes}
    out._sources = {id(n.spec.source): n for n in nodes if isinstance(n.spec, SourceSpec)}
    out._sinks = {id(n.spec.sink): n for n in nodes if isinstance(n.spec, SinkSpec)}
    return out


def _twin(node: Node, inputs: list[Node], spec: Any = None) -> Node:
    twin = Node(
        node.id,
        node.name,
        node.spec if spec is None else spec,
        inputs,
        node.where,
        node.keyed,
        timestamped=node.timestamped,
    )
    for i in inputs:
        i.consumers.append(twin)
    return twin


def _fresh_name(flow: Flow, base: str) -> str:
    names = {n.name for n in flow.nodes}
    name, n = base, 2
    while name in names:
        name, n = f"{base}_{n}", n + 1
    return name


def stages(flow: Flow, keys: KeyRing | None = None) -> list[Stage]:
    """The sub-topologies of ``flow`` on several workers: one (the flow itself) when
    every ``key_by`` is ``partitioned``, else split at each one that is not.

    Raises:
        FlowDefinitionError: a source that is not Kafka, or an unpartitioned ``key_by``
            whose downstream operators also read a stream from before it (a join of a
            repartitioned stream with one that is not: repartition both).
    """
    cuts = _unpartitioned(flow)
    if not cuts:
        return [Stage(0, flow)]
    sources = kafka_sources(flow)
    first = sources[0][1]
    out: list[Stage] = []
    current = flow
    index = 0
    while True:
        cuts = _unpartitioned(current)
        if not cuts:
            out.append(Stage(index, current))
            return out
        cut = cuts[0]
        assert isinstance(cut.spec, KeyBySpec)
        down: set[int] = set()
        todo = [cut]
        while todo:
            n = todo.pop()
            if id(n) not in down:
                down.add(id(n))
                todo.extend(n.consumers)
        for n in current.topological_order():
            if id(n) in down and n is not cut and any(id(i) not in down for i in n.inputs):
                raise FlowDefinitionError(
                    f"{n.describe()} reads the stream of {cut.describe()}, which a flow "
                    "on several workers repartitions through Kafka, together with a "
                    "stream that is not repartitioned: its keys would be in different "
                    "partitions. key_by every input of it the same way (each is "
                    "repartitioned), or say partitioned=True where the topic is keyed "
                    "by the key"
                )
        topic = repartition_topic(first.group, flow.name, cut.name)
        ids = max(n.id for n in current.nodes) + 1
        # stage: everything outside ``down``, the key_by, and the internal sink
        twins: dict[int, Node] = {}
        for n in current.topological_order():
            if id(n) not in down or n is cut:
                twins[id(n)] = _twin(n, [twins[id(i)] for i in n.inputs])
        exactly_once = all(
            isinstance(n.spec.sink, KafkaSink) and n.spec.sink.exactly_once
            for n in flow.nodes
            if isinstance(n.spec, SinkSpec)
        )
        sink = RepartitionSink(first, topic, flow.name, keys, exactly_once=exactly_once)
        sink_node = Node(
            ids,
            _fresh_name(current, f"{cut.name}_repartition"),
            SinkSpec(sink),
            [twins[id(cut)]],
            cut.where,
            True,
            timestamped=cut.timestamped,
        )
        twins[id(cut)].consumers.append(sink_node)
        kept = [twins[id(n)] for n in current.nodes if id(n) in twins]
        out.append(Stage(index, _rebuilt(current, [*kept, sink_node]), topic, cut.spec.partitions))
        # the next stage: the internal source, the key_by (partitioned now), the rest
        source = RepartitionSource(first, topic, flow.name, keys, event_time=cut.timestamped)
        source_node = Node(
            ids + 1,
            _fresh_name(current, f"{cut.name}_repartitioned"),
            SourceSpec(source),
            [],
            cut.where,
            False,
            timestamped=cut.timestamped,
        )
        nxt: dict[int, Node] = {}
        for n in current.topological_order():
            if id(n) not in down:
                continue
            if n is cut:
                spec = dataclasses.replace(cut.spec, partitioned=True, partitions=None)
                nxt[id(n)] = _twin(n, [source_node], spec)
            else:
                nxt[id(n)] = _twin(n, [nxt[id(i)] for i in n.inputs])
        current = _rebuilt(
            current, [source_node, *(nxt[id(n)] for n in current.nodes if id(n) in nxt)]
        )
        index += 1


# -- the workers -------------------------------------------------------------------------


_READY_EVERY = 0.2  # seconds between two looks at a topic that is still being created


def _create(admin: Any, topic: str, partitions: int, timeout: float) -> None:
    """Create ``topic`` with :data:`TOPIC_CONFIG` (blocking); one that exists already is
    fine, and left as it is."""
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # noqa: PLC0415

    futures = admin.create_topics(
        [NewTopic(topic, partitions, -1, config=dict(TOPIC_CONFIG))],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    try:
        futures[topic].result(timeout=timeout)
    except ck.KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not (
            isinstance(err, ck.KafkaError) and err.code() == ck.KafkaError.TOPIC_ALREADY_EXISTS
        ):
            raise KafkaError(f"cannot create the repartition topic {topic!r}: {exc}") from exc


def _count(admin: Any, topic: str, timeout: float) -> int | None:
    """``topic``'s partition count, None while it is not ready (blocking)."""
    try:
        meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    except ck.KafkaException as exc:
        raise KafkaError(f"cannot read the metadata of topic {topic!r}: {exc}") from exc
    if meta is None or meta.error is not None or not meta.partitions:
        return None  # being created (by this worker or another): not in the metadata yet
    return len(meta.partitions)


def _admin(plan: Sequence[Stage]) -> Any:
    """An admin client of the cluster of ``plan``'s first source, with its security."""
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415 - only here

    first = kafka_sources(plan[0].flow)[0][1]
    security = {k: v for k, v in first.client_config().items() if k.startswith(_SECURITY_KEYS)}
    return AdminClient({"bootstrap.servers": first.bootstrap_servers, **security})


async def ensure_topics(
    plan: Sequence[Stage], clock: Clock, *, within: float = 30.0, admin: Any = None
) -> None:
    """Create the repartition topics of ``plan`` with :data:`TOPIC_CONFIG` (idempotent:
    a topic another worker created meanwhile is fine, and one that exists is left as it
    is), wait until the cluster's metadata has them (at most ``within`` seconds each), and
    tell each stage's internal connectors the partition counts: the topic's, and the
    upstream stage's input.  ``admin``: the admin client to use (default: a new one).

    Raises:
        FlowDefinitionError: a repartition topic that exists with another partition count
            than the one chosen, or a missing input topic.
        KafkaError: the cluster did not answer, refused to create the topic, or did not
            show it within ``within`` seconds.
    """
    from sluiceway.scaleout.tasks import check_partitions  # noqa: PLC0415

    first = kafka_sources(plan[0].flow)[0][1]
    if admin is None:
        admin = await clock.run_in_thread(_admin, plan)
    upstream = await clock.run_in_thread(lambda: check_partitions(plan[0].flow, timeout=within))
    for stage, after in itertools.pairwise(plan):
        assert stage.topic is not None
        want = stage.partitions or upstream
        await clock.run_in_thread(_create, admin, stage.topic, want, within)
        deadline = clock.monotonic() + within
        while (have := await clock.run_in_thread(_count, admin, stage.topic, within)) is None:
            now = clock.monotonic()
            if now >= deadline:
                raise KafkaError(
                    f"the repartition topic {stage.topic!r} was created, and "
                    f"{first.bootstrap_servers!r} did not show it within {within:g}s"
                )
            await clock.sleep(min(_READY_EVERY, deadline - now))
        if have != want:
            raise FlowDefinitionError(
                f"the repartition topic {stage.topic!r} exists with {have} partitions, and "
                f"flow {stage.flow.name!r} repartitions into {want} "
                + ("(key_by(partitions=...))" if stage.partitions else "(the source topic's)")
                + ": delete the topic (its records are in flight between the stages: only "
                "when no worker runs and stage 1 has read it all), or choose its count with "
                f"key_by(..., partitions={have})"
            )
        for node in stage.flow.nodes:
            if isinstance(node.spec, SinkSpec) and isinstance(node.spec.sink, RepartitionSink):
                node.spec.sink.partitions = want
        for node in after.flow.nodes:
            if isinstance(node.spec, SourceSpec) and isinstance(
                node.spec.source, RepartitionSource
            ):
                node.spec.source.upstreams = upstream
        upstream = want


class StagedTasks:
    """A worker of a flow that repartitions: one :class:`~.tasks.TaskManager` per stage,
    each with its own membership in the flow's group, run together.

    Args:
        flow: the flow (sources Kafka, of one group).
        spec: checkpoints and limits of every task.
        clock: the clock of every task.
        on_task: called with ``(event, task name)`` (``p3``, ``s1-p3``).
        keys: the checkpoint keys that sign the records between the stages (default:
            the checkpoint directory's, as its checkpoints load them).

    :meth:`run` creates the repartition topics, then runs every stage's tasks until a
    stop (each stage stops at a checkpoint), until every stage ended, or until one
    fails (the others then stop at a checkpoint, and its error is raised).

    Its monitoring surface is its managers' merged (a
    :class:`~sluiceway.scaleout.tasks.TaskWorker`, as one manager is): :meth:`status`
    lists the tasks of every stage, :attr:`events` and :attr:`restores` count them all.

    While the tasks run, its :attr:`purger` deletes the records its stage-``n`` tasks have
    checkpointed, at most every ``spec.purge_interval`` seconds.

    Raises:
        FlowDefinitionError: no checkpoint key.
        ValueError: a negative ``spec.purge_interval``.
    """

    def __init__(
        self,
        flow: Flow,
        spec: TaskSpec,
        *,
        clock: Clock | None = None,
        on_task: Callable[[str, str], None] | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        ring = keys if keys is not None else load_keys(checkpoint_dir=spec.checkpoint_dir)
        if ring is None:
            raise FlowDefinitionError(
                f"flow {flow.name!r} repartitions through Kafka, and its records are signed "
                'with the checkpoint key: configure one (docs/checkpoints.md, "Security")'
            )
        self.flow = flow
        self.clock = clock or SystemClock()
        self.plan = stages(flow, ring)
        self.purge_interval = _purge_interval(spec.purge_interval)
        self.purger: Purger | None = None
        """Deletes what the stage-``n`` tasks have read (made by :meth:`run`)."""
        self.managers = [
            TaskManager(
                stage.flow,
                spec,
                clock=self.clock,
                stage=stage.index,
                on_task=None if on_task is None else _named(on_task, stage.index),
            )
            for stage in self.plan
        ]

    @property
    def events(self) -> Counter[str]:
        """The task events of every stage on this worker so far."""
        return sum((m.events for m in self.managers), Counter())

    @property
    def restores(self) -> RestoreTimes:
        """The restore times of every stage's tasks on this worker."""
        return RestoreTimes.merged([m.restores for m in self.managers])

    def status(self) -> list[TaskStatus]:
        """Every task of every stage this worker owns or runs (``p3``, then ``s1-p3``)."""
        return [t for m in self.managers for t in m.status()]

    def stage_inputs(self) -> list[StageInput]:
        """Every stage: stage 0 reads the flow's topic, stage ``n`` a repartition topic."""
        return [i for m in self.managers for i in m.stage_inputs()]

    def request_stop(self) -> None:
        for m in self.managers:
            m.request_stop()

    def force_stop(self) -> None:
        for m in self.managers:
            m.force_stop()

    async def run(self) -> dict[str, RunResult]:
        """Run every stage's tasks; the results of the tasks this worker ran, by task name.

        Raises:
            FlowDefinitionError: a repartition topic with another partition count, topics
                not co-partitioned, or missing.
            KafkaError: a membership consumer failed, or the cluster did not answer.
            SluicewayError: a task failed (its own error).
        """
        admin = await self.clock.run_in_thread(_admin, self.plan)
        await ensure_topics(self.plan, self.clock, admin=admin)
        self.purger = Purger(admin, self.purge_interval, self.flow.name)
        for stage in self.plan[1:]:
            for node in stage.flow.nodes:
                spec = node.spec
                if isinstance(spec, SourceSpec) and isinstance(spec.source, RepartitionSource):
                    spec.source.purger = self.purger

        async def one(m: TaskManager) -> dict[int, RunResult]:
            try:
                return await m.run()
            except BaseException:
                self.request_stop()
                raise

        done = await asyncio.gather(*(one(m) for m in self.managers), return_exceptions=True)
        failed = [r for r in done if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        out: dict[str, RunResult] = {}
        for m, results in zip(self.managers, done, strict=True):
            assert not isinstance(results, BaseException)
            out.update({task_name(p, m.stage): r for p, r in results.items()})
        return out


def _named(on_task: Callable[[str, str], None], stage: int) -> Callable[[str, int], None]:
    return lambda event, p: on_task(event, task_name(p, stage))
