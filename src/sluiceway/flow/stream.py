"""The logical dataflow and its fluent builder: :class:`Flow`, :class:`Stream`,
:class:`KeyedStream` and the streams of window and join results.

Building a flow runs nothing: :class:`Flow` records operators and edges, checks each
argument as it is given (so a mistake is reported at the line that made it), and
:meth:`Flow.validate` checks the whole graph before a run.

>>> import sluiceway as sw
>>> flow = sw.Flow("doubling")
>>> out = sw.sinks.Collect()
>>> flow.source(sw.sources.Iterable([1, 2, 3])).map(lambda x: x * 2).sink(out)
>>> _ = sw.run(flow)
>>> out.items
[2, 4, 6]

Every stream method returns a new stream; a stream may feed several consumers (fan-out),
and :meth:`Stream.merge` joins streams (fan-in).  Operators are named after their kind and
function (``map_enrich``), or by ``name=``; names appear in errors and metrics.

**Where an operator goes.**  This module is what users see: each method here is the
operator's signature, its documentation and one call into the module of its family,
which checks the arguments and adds the node(s) to the graph (:mod:`.graph`):

=====================  ===========================================================
``flow/stateless.py``  ``map``, ``filter``, ``flat_map``, ``inspect``, ``key_by``,
                       ``branch``, ``merge``
``flow/control.py``    ``batch``, ``buffer``, ``map_async``, ``rate_limit``
``flow/windows.py``    ``with_timestamps``, ``window`` and its aggregations, ``late``
``flow/keyed.py``      ``stateful_map``, ``process``
``flow/joins.py``      ``window_join``, ``interval_join``, ``asof_join``,
                       ``temporal_join``, ``lookup_join``
``flow/io.py``         ``Flow.source``, ``sink``
=====================  ===========================================================

A new operator is a builder function in its family's module (or a new family module,
placed in ``tests/test_layers.py``'s ``plan`` layer with the rest of ``sluiceway.flow``)
and a method here, on :class:`Stream` (any stream) or :class:`KeyedStream` (needs keys).
The family modules import :mod:`.graph` and :mod:`.args`, never this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterable
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sluiceway.agg import Aggregator, Apply, Reduce
from sluiceway.core.channel import Overflow
from sluiceway.core.contract import Sink, Source
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow import control, io, joins, keyed, stateless, windows
from sluiceway.flow.args import fn_label
from sluiceway.flow.graph import Graph, Node, derive
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.flowcontrol.limiters import KeyedLimiter, Limiter
from sluiceway.operators.base import OpSpec
from sluiceway.operators.stateless import FilterSpec, FlatMapSpec, InspectSpec, MapSpec
from sluiceway.policies import DeadLetter, ErrorPolicy, Fail
from sluiceway.state import TTL, InMemory, KeyedProcessFunction, OnDisk
from sluiceway.watermarks import WatermarkStrategy
from sluiceway.windows.assigners import Session, Sliding, Tumbling
from sluiceway.windows.operator import Aggregation

__all__ = [
    "Flow",
    "JoinedStream",
    "KeyedStream",
    "Node",
    "Stream",
    "WindowResultStream",
    "WindowedStream",
]

T = TypeVar("T")
U = TypeVar("U")
K = TypeVar("K", bound=Hashable)


class Flow(Graph):
    """A dataflow under construction: sources, operators, sinks.

    Args:
        name: the flow's name (in errors, metrics and logs).
        channel_capacity: records held by an implicit channel (before a ``merge`` or a
            timed ``batch``); ``buffer(capacity=...)`` sets its own.
        state: where keyed state (``stateful_map``, ``process``) is kept unless the
            operator says otherwise: ``sw.state.InMemory()`` (the default) or
            ``sw.state.OnDisk(path=..., cache_keys=...)`` (docs/state.md, "Backends").
    """

    def source(
        self, source: Source, *, name: str | None = None, on_error: Fail | DeadLetter = Fail()
    ) -> Stream[Any]:
        """Add a source; returns its stream.

        Args:
            source: a :class:`~sluiceway.core.contract.Source`, e.g.
                ``sw.sources.Iterable(records)``.
            name: the operator name (default ``source_<Class>``).
            on_error: for malformed input: ``Fail()`` (stop, naming file and line) or
                ``DeadLetter(sink)``.
        """
        return Stream(self, io.add_source(self, source, name, on_error))


class Stream(Generic[T]):
    """A stream of records of type ``T``, built by :class:`Flow` and its operators."""

    def __init__(self, flow: Flow, node: Node) -> None:
        self.flow = flow
        self.node = node

    def __repr__(self) -> str:
        return f"<{type(self).__name__} from {self.node.describe()}>"

    def _derive(
        self,
        spec: OpSpec,
        name: str | None,
        default: str,
        *,
        keyed: bool | None = None,
        timestamped: bool | None = None,
    ) -> Node:
        return derive(self, spec, name, default, keyed=keyed, timestamped=timestamped)

    def _wrap(self, node: Node) -> Any:
        return Stream(self.flow, node)

    def map(
        self, fn: Callable[[T], U], *, name: str | None = None, on_error: ErrorPolicy = Fail()
    ) -> Stream[U]:
        """Apply ``fn`` to every record.

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(lambda s: s.map(str.upper), ["a", "b"])
        ['A', 'B']
        """
        return self._wrap(stateless.fn_op(self, MapSpec, "map", fn, name, on_error))  # type: ignore[no-any-return]

    def filter(
        self,
        predicate: Callable[[T], object],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> Stream[T]:
        """Keep the records for which ``predicate`` is truthy.

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(lambda s: s.filter(lambda x: x % 2), [1, 2, 3])
        [1, 3]
        """
        node = stateless.fn_op(self, FilterSpec, "filter", predicate, name, on_error)
        return self._wrap(node)  # type: ignore[no-any-return]

    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> Stream[U]:
        """Replace every record by the records of the iterable ``fn`` returns.

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(lambda s: s.flat_map(str.split), ["a b", "c"])
        ['a', 'b', 'c']
        """
        node = stateless.fn_op(self, FlatMapSpec, "flat_map", fn, name, on_error)
        return self._wrap(node)  # type: ignore[no-any-return]

    def inspect(
        self, fn: Callable[[T], object], *, name: str | None = None, on_error: ErrorPolicy = Fail()
    ) -> Stream[T]:
        """Call ``fn`` on every record for its side effect; records pass unchanged."""
        node = stateless.fn_op(self, InspectSpec, "inspect", fn, name, on_error)
        return self._wrap(node)  # type: ignore[no-any-return]

    def key_by(
        self,
        fn: Callable[[T], K],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
        partitioned: bool = False,
        partitions: int | None = None,
    ) -> KeyedStream[K, T]:
        """Attach the key ``fn(record)`` to every record, for keyed (stateful) operators.

        The key travels beside the record (values are unchanged) and survives ``map``,
        ``filter``, ``flat_map``, ``inspect`` and ``buffer``.

        ``partitioned=True`` says that the input is already partitioned by this key:
        every record of a key comes from one partition of the Kafka topic (it was
        written with this key as its message key, or one that maps to it one to one).
        A keyed flow on several workers keeps each partition's state in the worker that
        owns the partition; without this promise it **repartitions through Kafka**: the
        records go through an internal topic keyed by ``fn(record)`` of ``partitions``
        partitions (None: the source topic's count), read back by the same consumer
        group (``docs/scaling.md``).  One process does not care about either.
        """
        return KeyedStream(
            self.flow, stateless.key_by(self, fn, name, on_error, partitioned, partitions)
        )

    def merge(
        self, *others: Stream[Any], name: str | None = None, capacity: int | None = None
    ) -> Stream[Any]:
        """Join this stream with ``others`` (fan-in) through one bounded channel.

        Records from each input keep their order; inputs interleave as they arrive.
        """
        if not others:
            raise TypeError("merge() needs at least one other stream to merge with")
        for o in others:
            if not isinstance(o, Stream):
                raise TypeError(f"merge() expects streams, got {type(o).__name__} {o!r}")
            if o.flow is not self.flow:
                raise FlowDefinitionError(
                    f"merge(): {o!r} belongs to flow {o.flow.name!r}, not {self.flow.name!r}"
                )
        return self._wrap(stateless.merge(self, others, name, capacity))  # type: ignore[no-any-return]

    def branch(
        self,
        predicate: Callable[[T], object],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> tuple[Stream[T], Stream[T]]:
        """Split into ``(matching, rest)`` by ``predicate``, evaluated once per record.

        >>> import sluiceway as sw
        >>> flow = sw.Flow("split")
        >>> evens, odds = flow.source(sw.sources.Iterable(range(5))).branch(lambda x: x % 2 == 0)
        >>> a, b = sw.sinks.Collect(), sw.sinks.Collect()
        >>> evens.sink(a); odds.sink(b)
        >>> _ = sw.run(flow)
        >>> a.items, b.items
        ([0, 2, 4], [1, 3])
        """
        yes, no = stateless.branch(self, predicate, name, on_error)
        return self._wrap(yes), self._wrap(no)

    def batch(
        self,
        max_size: int,
        max_delay: float | timedelta | None = None,
        *,
        name: str | None = None,
    ) -> Stream[list[T]]:
        """Group records into lists of up to ``max_size``; with ``max_delay``, a list is
        also emitted once its first record has waited that long (on the flow's clock).
        Whatever is left is flushed at end of input and on graceful shutdown.

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(lambda s: s.batch(2), [1, 2, 3, 4, 5])
        [[1, 2], [3, 4], [5]]
        """
        return Stream(self.flow, control.batch(self, max_size, max_delay, name))

    def buffer(
        self,
        capacity: int,
        overflow: Overflow = Overflow.BLOCK,
        *,
        block_timeout: float | timedelta | None = None,
        name: str | None = None,
    ) -> Stream[T]:
        """Put a bounded channel of ``capacity`` records here, with an overflow policy.

        The operators after it run in their own stage, so a burst upstream is absorbed
        (``BLOCK``), shed (``DROP_NEWEST``/``DROP_OLDEST``, counted) or refused (``FAIL``).
        With a dropping policy, ``block_timeout`` (seconds) first waits that long for room
        and drops only what still does not fit: Go's ``select`` with ``time.After``.
        """
        node = control.buffer(self, capacity, overflow, block_timeout, name)
        return self._wrap(node)  # type: ignore[no-any-return]

    def map_async(
        self,
        fn: Callable[[T], Awaitable[U]],
        *,
        concurrency: int | Adaptive = 16,
        ordered: bool = True,
        timeout: float | timedelta | None = None,
        breaker: CircuitBreaker | None = None,
        when_open: str = "wait",
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> Stream[U]:
        """Call the async function ``fn`` for every record, up to ``concurrency`` at once.

        When ``concurrency`` calls are in flight the operator stops taking input
        (backpressure).  Results leave in input order unless ``ordered=False``.  Each call
        may take ``timeout`` seconds; a failure or timeout goes to ``on_error``.
        ``concurrency=sw.Adaptive(...)`` adapts the limit to measured latency;
        ``breaker=sw.CircuitBreaker(...)`` pauses calls while the service fails
        (``when_open="wait"``) or dead-letters records meanwhile (``"dead_letter"``).
        See docs/flow-control.md.

        >>> import sluiceway as sw
        >>> async def double(x):
        ...     return 2 * x
        >>> sw.testing.run_collect(lambda s: s.map_async(double, concurrency=4), [1, 2, 3])
        [2, 4, 6]
        """
        node = control.map_async(
            self,
            fn,
            concurrency=concurrency,
            ordered=ordered,
            timeout=timeout,
            breaker=breaker,
            when_open=when_open,
            name=name,
            on_error=on_error,
        )
        return self._wrap(node)  # type: ignore[no-any-return]

    def map_in_processes(
        self,
        fn: Callable[[T], U],
        *,
        workers: int | None = None,
        max_in_flight: int | None = None,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> Stream[U]:
        """Apply ``fn`` to every record in a pool of ``workers`` processes: for CPU-heavy
        code, past the GIL.

        Each micro-batch is cut into at most ``workers`` pieces, each sent as one pickle;
        results leave in input order, and barriers and watermarks wait for the pieces
        before them.  At most ``max_in_flight`` pieces (default ``2 * workers``) are out
        at once; then the operator stops taking input (backpressure).  ``fn`` must be a
        function defined at the top level of a module (workers import it by name; a
        lambda is refused here); records and results must be picklable.  A record ``fn``
        fails on goes to ``on_error`` with the worker's traceback.  Worth it when ``fn``
        costs well over the pickling of its record (tens of microseconds or more); see
        docs/scaling.md.

        Args:
            workers: processes in the pool (default: the cores this process may use).
            max_in_flight: pieces sent and not yet passed on (default ``2 * workers``).

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(lambda s: s.map_in_processes(abs, workers=2), [-1, 2])
        [1, 2]
        """
        node = control.map_in_processes(
            self,
            fn,
            workers=workers,
            max_in_flight=max_in_flight,
            name=name,
            on_error=on_error,
        )
        return self._wrap(node)  # type: ignore[no-any-return]

    def rate_limit(
        self,
        limiter: Limiter | KeyedLimiter[Any],
        *,
        name: str | None = None,
        when_limited: Literal["wait", "reject"] = "wait",
        retry_after: float | timedelta = 1.0,
    ) -> Stream[T]:
        """Let records through no faster than ``limiter`` allows (shaping, not dropping).

        ``limiter`` is one of ``sw.flowcontrol.TokenBucket``, ``LeakyBucket``,
        ``FixedWindow``, ``SlidingWindowLog``, ``SlidingWindowCounter``, a
        ``KeyedLimiter`` (a rate per key, on a keyed stream), or a ``RedisLimiter`` (a
        limit shared by processes: a round trip per record).  The operator waits on the
        flow's clock; its waiting holds the source back by backpressure.  See
        docs/flow-control.md.

        ``when_limited="reject"``: a record the limiter does not admit now is handed back
        to its broker, to be delivered again after ``retry_after`` seconds, instead of
        being waited for (the records after it go on).  It must follow a broker source
        that can redeliver (NATS JetStream, RabbitMQ, Redis Streams) directly, or
        through ``key_by`` for a ``KeyedLimiter``; order is not kept for rejected
        records.

        >>> import sluiceway as sw
        >>> limit = sw.flowcontrol.TokenBucket(rate=10, burst=1)
        >>> flow = sw.Flow("paced")
        >>> out = sw.testing.TimedCollect()
        >>> flow.source(sw.sources.Iterable(range(3))).rate_limit(limit).sink(out)
        >>> _ = sw.testing.run_flow(flow)
        >>> [round(t, 3) for t, _ in out.items]
        [0.0, 0.1, 0.2]
        """
        node = control.rate_limit(self, limiter, name, when_limited, retry_after)
        return self._wrap(node)  # type: ignore[no-any-return]

    def with_timestamps(
        self,
        fn: Callable[[T], float | datetime],
        max_out_of_orderness: float | timedelta | None = None,
        *,
        watermarks: WatermarkStrategy | None = None,
        idle_timeout: float | timedelta | None = None,
        advance_when_idle: float | timedelta | None = None,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> Stream[T]:
        """Give every record an event time, ``fn(record)``, and the stream watermarks.

        ``fn`` returns epoch seconds or an aware ``datetime``.  The watermark is the
        largest event time so far minus ``max_out_of_orderness`` (default 0: the
        monotonic strategy); ``watermarks=`` names a strategy instead.  See
        docs/windows.md for ``idle_timeout`` and ``advance_when_idle``.

        >>> import sluiceway as sw
        >>> sw.testing.run_collect(
        ...     lambda s: s.with_timestamps(lambda e: e[0], 1.0)
        ...     .window(sw.windows.Tumbling(10)).aggregate(sw.agg.count())
        ...     .map(lambda r: (r.start, r.value)),
        ...     [(1.0,), (12.0,), (5.0,)])
        [(0.0, 1), (10.0, 1)]
        """
        node = windows.with_timestamps(
            self,
            fn,
            max_out_of_orderness,
            watermarks=watermarks,
            idle_timeout=idle_timeout,
            advance_when_idle=advance_when_idle,
            name=name,
            on_error=on_error,
        )
        return self._wrap(node)  # type: ignore[no-any-return]

    def window(
        self,
        assigner: Tumbling | Sliding | Session,
        *,
        allowed_lateness: float | timedelta = 0.0,
        early_every: float | timedelta | None = None,
        time: str = "event",
    ) -> WindowedStream:
        """Group records into windows (per key on a keyed stream); then aggregate.

        ``assigner`` is ``sw.windows.Tumbling``, ``Sliding`` or ``Session``.  Windows are
        half-open, ``[start, end)``, and fire when the watermark reaches ``end``; see
        docs/windows.md for lateness, early firing and processing time.
        """
        lateness, early, processing = windows.window_args(
            self, assigner, allowed_lateness, early_every, time
        )
        return WindowedStream(self, assigner, lateness, early, processing)

    def sink(
        self,
        sink: Sink,
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
        breaker: CircuitBreaker | None = None,
        when_open: str = "wait",
    ) -> None:
        """Send this stream to ``sink``.  A sink object receives exactly one stream.

        ``breaker=sw.CircuitBreaker(...)``: while the sink keeps failing, stop writing --
        hold records back (``when_open="wait"``: backpressure) or dead-letter them
        (``"dead_letter"``, with ``on_error=sw.DeadLetter(...)``).
        """
        io.add_sink(self, sink, name, on_error, breaker, when_open)


class KeyedStream(Stream[T], Generic[K, T]):
    """A stream whose records carry a key (see :meth:`Stream.key_by`).

    Keys survive ``map``, ``filter``, ``flat_map``, ``inspect`` and ``buffer``; keyed
    windows and state (later chapters of the docs) build on this.
    """

    def _wrap(self, node: Node) -> Any:
        return KeyedStream(self.flow, node) if node.keyed else Stream(self.flow, node)

    def stateful_map(
        self,
        fn: Callable[[Any, T], tuple[Any, U]],
        *,
        name: str | None = None,
        ttl: float | timedelta | TTL | None = None,
        on_error: ErrorPolicy = Fail(),
        state: InMemory | OnDisk | None = None,
    ) -> KeyedStream[K, U]:
        """``fn(state, value) -> (state, output)`` with a state per key.

        ``state`` is None for a key seen first (or whose state expired); returning None as
        the new state deletes the key's state.  Each output leaves with the record's key
        (and event time).  ``ttl=`` drops state not written for that long (counted from the
        last write, i.e. the key's last record that returned a state; reads do not count):
        seconds of processing time, or ``sw.state.TTL(seconds, time="event")``.  A
        record that fails (``on_error``) leaves its key's state as it was.  The state is
        in checkpoints.  ``state=sw.state.OnDisk(...)`` keeps it on disk behind a
        bounded cache (default: the flow's ``state=``, in memory).  See docs/state.md.

        >>> import sluiceway as sw
        >>> def total(acc, x):
        ...     acc = (acc or 0) + x
        ...     return acc, acc
        >>> sw.testing.run_collect(
        ...     lambda s: s.key_by(lambda x: x % 2).stateful_map(total), [1, 2, 3, 4])
        [1, 2, 4, 6]
        """
        return KeyedStream(self.flow, keyed.stateful_map(self, fn, name, ttl, on_error, state))

    def process(
        self,
        fn: KeyedProcessFunction | type | Callable[[Any, T], None],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
        state: InMemory | OnDisk | None = None,
    ) -> KeyedStream[K, Any]:
        """A keyed process function: state, timers and any number of outputs per record.

        ``fn`` has ``process(ctx, value)`` and, if it sets timers, ``on_timer(ctx,
        time)``; a class is instantiated once per run; a plain function ``fn(ctx, value)``
        is a ``process`` without timers.  ``ctx`` (a ``sw.state.ProcessContext``) has the
        ``key``, ``timestamp``, ``watermark``, ``emit(value)``, ``value(name, ttl=...)``,
        ``map(name, ttl=...)`` and ``timers``.  A state's ``ttl`` counts from its last
        ``set``/``put``, not from reads.  An event-time timer at ``t`` fires once the
        watermark has passed ``t`` (after the records at ``t``), and ``on_timer`` gets
        ``t`` exactly as registered.  A failed record or timer (``on_error``) leaves
        state, timers and output as they were.  ``state=sw.state.OnDisk(...)`` keeps
        the state on disk behind a bounded cache (default: the flow's ``state=``, in
        memory).  See docs/state.md.

        >>> import sluiceway as sw
        >>> class FirstOfEach:
        ...     def process(self, ctx, value):
        ...         seen = ctx.value("seen")
        ...         if not seen.get():
        ...             seen.set(True)
        ...             ctx.emit((ctx.key, value))
        >>> sw.testing.run_collect(
        ...     lambda s: s.key_by(len).process(FirstOfEach), ["a", "bb", "c", "dd", "eee"])
        [(1, 'a'), (2, 'bb'), (3, 'eee')]
        """
        return KeyedStream(self.flow, keyed.process(self, fn, name, on_error, state))

    # -- joins (docs/joins.md) ---------------------------------------------------------

    def window_join(
        self,
        other: KeyedStream[Any, Any],
        assigner: Tumbling | Sliding | Session,
        *,
        how: Literal["inner", "left", "full"] = "inner",
        allowed_lateness: float | timedelta = 0.0,
        name: str | None = None,
    ) -> JoinedStream:
        """Pair the records of this stream and ``other`` with the same key in the same window.

        Results are ``(left, right)`` tuples (``None`` for the missing side of an outer
        join: ``how="left"`` or ``"full"``), keyed, with the window's last instant as
        event time; a window's results leave when the watermark of *both* inputs reaches
        ``end + allowed_lateness``.  Late records go to ``.late()``.  See docs/joins.md.

        >>> import sluiceway as sw
        >>> flow = sw.Flow("wj")
        >>> def side(items):
        ...     s = flow.source(sw.sources.Iterable(items)).with_timestamps(lambda r: r[1])
        ...     return s.key_by(lambda r: r[0])
        >>> out = sw.sinks.Collect()
        >>> side([("a", 1), ("b", 2)]).window_join(
        ...     side([("a", 3), ("a", 12)]), sw.windows.Tumbling(10), how="left").sink(out)
        >>> _ = sw.run(flow)
        >>> out.items
        [(('a', 1), ('a', 3)), (('b', 2), None)]
        """
        spec = joins.window_join_spec(assigner, how, allowed_lateness)
        node = joins.join(self, _joinable(other, "window_join"), spec, "window_join", name)
        return JoinedStream(self.flow, node)

    def interval_join(
        self,
        other: KeyedStream[Any, Any],
        *,
        lower: float | timedelta,
        upper: float | timedelta,
        how: Literal["inner", "left"] = "inner",
        allowed_lateness: float | timedelta = 0.0,
        name: str | None = None,
    ) -> JoinedStream:
        """Pair each record ``a`` of this stream with the records ``b`` of ``other`` with
        the same key and ``a.time + lower <= b.time <= a.time + upper``.

        Results are ``(left, right)`` tuples, keyed, with the later of the two times as
        event time, sent as soon as both records are there; ``how="left"`` also sends
        ``(left, None)`` for a left record without partner once the watermark of both
        inputs passes ``a.time + upper + allowed_lateness``.  See docs/joins.md.

        >>> import sluiceway as sw
        >>> flow = sw.Flow("ij")
        >>> def side(items):
        ...     s = flow.source(sw.sources.Iterable(items)).with_timestamps(lambda r: r[1])
        ...     return s.key_by(lambda r: r[0])
        >>> out = sw.sinks.Collect()
        >>> side([("a", 10), ("b", 10)]).interval_join(
        ...     side([("a", 9), ("a", 13), ("b", 20)]), lower=-1, upper=2, how="left"
        ... ).sink(out)
        >>> _ = sw.run(flow)
        >>> sorted(out.items, key=str)
        [(('a', 10), ('a', 9)), (('b', 10), None)]
        """
        spec = joins.interval_join_spec(lower, upper, how, allowed_lateness)
        node = joins.join(self, _joinable(other, "interval_join"), spec, "interval_join", name)
        return JoinedStream(self.flow, node)

    def asof_join(
        self,
        other: KeyedStream[Any, Any],
        *,
        tolerance: float | timedelta | None = None,
        how: Literal["inner", "left"] = "left",
        allowed_lateness: float | timedelta = 0.0,
        name: str | None = None,
    ) -> JoinedStream:
        """Join each record of this stream with the latest record of ``other`` with the
        same key at or before its time (at most ``tolerance`` older, if given).

        Results are ``(left, right)`` tuples -- ``(left, None)`` without a match unless
        ``how="inner"`` -- keyed, with the left record's time.  A left record is answered
        once the watermark of both inputs passes its time (plus ``allowed_lateness``), so
        the answer does not depend on arrival order.  See docs/joins.md.

        >>> import sluiceway as sw
        >>> flow = sw.Flow("asof")
        >>> def side(items):
        ...     s = flow.source(sw.sources.Iterable(items)).with_timestamps(lambda r: r[1])
        ...     return s.key_by(lambda r: r[0])
        >>> out = sw.sinks.Collect()
        >>> trades = side([("x", 5), ("x", 9), ("y", 9)])
        >>> quotes = side([("x", 4, 100.0), ("x", 8, 101.5)])
        >>> trades.asof_join(quotes, tolerance=3).sink(out)
        >>> _ = sw.run(flow)
        >>> out.items
        [(('x', 5), ('x', 4, 100.0)), (('x', 9), ('x', 8, 101.5)), (('y', 9), None)]
        """
        spec = joins.asof_join_spec(tolerance, how, allowed_lateness)
        node = joins.join(self, _joinable(other, "asof_join"), spec, "asof_join", name)
        return JoinedStream(self.flow, node)

    def temporal_join(
        self,
        table: KeyedStream[Any, Any],
        *,
        is_delete: Callable[[Any], object] | None = None,
        how: Literal["inner", "left"] = "inner",
        time: Literal["event", "processing"] = "event",
        allowed_lateness: float | timedelta = 0.0,
        name: str | None = None,
    ) -> KeyedStream[Any, Any]:
        """Join each record of this stream with its key's row in ``table``, a changelog
        (each record an upsert of its key's row, or a deletion where ``is_delete(record)``).

        ``time="event"``: the row valid at the left record's time, answered once the
        watermark of both inputs passes that time (plus ``allowed_lateness``); returns a
        :class:`JoinedStream` (late records in ``.late()``).  ``time="processing"``: the
        key's latest row when the record arrives (no event time needed, no waiting).
        Results are ``(left, row)`` tuples -- ``(left, None)`` without a row with
        ``how="left"`` -- keyed, with the left record's time.  See docs/joins.md.

        >>> import sluiceway as sw
        >>> flow = sw.Flow("rates")
        >>> def side(items):
        ...     s = flow.source(sw.sources.Iterable(items)).with_timestamps(lambda r: r[1])
        ...     return s.key_by(lambda r: r[0])
        >>> out = sw.sinks.Collect()
        >>> orders = side([("EUR", 3, 10.0), ("EUR", 7, 20.0), ("GBP", 7, 5.0)])
        >>> rates = side([("EUR", 1, 1.10), ("EUR", 5, 1.12), ("GBP", 2, 1.3), ("GBP", 6, None)])
        >>> orders.temporal_join(rates, is_delete=lambda r: r[2] is None, how="left").sink(out)
        >>> _ = sw.run(flow)
        >>> for pair in out.items:
        ...     print(pair)
        (('EUR', 3, 10.0), ('EUR', 1, 1.1))
        (('EUR', 7, 20.0), ('EUR', 5, 1.12))
        (('GBP', 7, 5.0), None)
        """
        spec = joins.temporal_join_spec(is_delete, how, time, allowed_lateness)
        event_time = time != "processing"
        node = joins.join(
            self,
            _joinable(table, "temporal_join"),
            spec,
            "temporal_join",
            name,
            event_time=event_time,
        )
        return JoinedStream(self.flow, node) if event_time else KeyedStream(self.flow, node)

    def lookup_join(
        self,
        fetch: Callable[[K], Awaitable[Any]],
        *,
        how: Literal["inner", "left"] = "left",
        cache_size: int = 10_000,
        ttl: float | timedelta | None = 60.0,
        concurrency: int | Adaptive = 16,
        timeout: float | timedelta | None = None,
        breaker: CircuitBreaker | None = None,
        when_open: str = "wait",
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> KeyedStream[K, tuple[T, Any]]:
        """Enrich each record with ``await fetch(key)``, its key's row in an external
        system (None: no row), through a cache of ``cache_size`` rows, each kept ``ttl``
        seconds *since it was written* (None: until evicted).

        Results are ``(record, row)`` tuples in input order; ``how="inner"`` drops the
        records without a row.  ``concurrency``, ``timeout``, ``breaker``, ``when_open``
        and ``on_error`` (e.g. ``sw.Retry(3)``) are those of :meth:`map_async`.  See
        docs/joins.md.

        >>> import sluiceway as sw
        >>> async def customer(key):
        ...     return {"c1": "Ada", "c2": "Grace"}.get(key)
        >>> sw.testing.run_collect(
        ...     lambda s: s.key_by(lambda o: o[0]).lookup_join(customer),
        ...     [("c1", 10), ("c3", 5), ("c1", 7)])
        [(('c1', 10), 'Ada'), (('c3', 5), None), (('c1', 7), 'Ada')]
        """
        node = joins.lookup_join(
            self,
            fetch,
            how=how,
            cache_size=cache_size,
            ttl=ttl,
            concurrency=concurrency,
            timeout=timeout,
            breaker=breaker,
            when_open=when_open,
            name=name,
            on_error=on_error,
        )
        return KeyedStream(self.flow, node)


class WindowedStream:
    """A stream grouped into windows, waiting for its aggregation.

    Call :meth:`aggregate`, :meth:`reduce` or :meth:`apply`; each returns the stream of
    :class:`~sluiceway.windows.WindowResult`.
    """

    def __init__(
        self,
        stream: Stream[Any],
        assigner: Tumbling | Sliding | Session,
        lateness: int,
        early_every: float | None,
        processing_time: bool,
    ) -> None:
        self._stream = stream
        self._assigner = assigner
        self._lateness = lateness
        self._early = early_every
        self._processing = processing_time

    def __repr__(self) -> str:
        return f"<WindowedStream {self._assigner!r} over {self._stream.node.describe()}>"

    def aggregate(
        self, *agg: Aggregator[Any, Any], name: str | None = None, **named: Aggregator[Any, Any]
    ) -> WindowResultStream:
        """``aggregate(sw.agg.count())`` (value: the count) or ``aggregate(n=sw.agg.count(),
        total=sw.agg.sum(f))`` (value: a dict of the named results)."""
        return self._build(windows.aggregation(agg, named), name, "aggregate")

    def reduce(
        self, fn: Callable[[Any, Any], Any], *, name: str | None = None
    ) -> WindowResultStream:
        """Combine a window's records pairwise with ``fn(a, b)``; value: the reduction."""
        return self._build(Aggregation([Reduce(fn)], None), name, f"reduce_{fn_label(fn)}")

    def apply(
        self, fn: Callable[[list[Any]], Any], *, name: str | None = None
    ) -> WindowResultStream:
        """``fn(records)`` over all of a window's records (held in memory until it fires)."""
        return self._build(Aggregation([Apply(fn)], None), name, f"apply_{fn_label(fn)}")

    def _build(self, aggregation: Aggregation, name: str | None, what: str) -> WindowResultStream:
        node = windows.window(
            self._stream,
            self._assigner,
            aggregation,
            lateness=self._lateness,
            early_every=self._early,
            processing_time=self._processing,
            name=name,
            what=what,
        )
        return WindowResultStream(self._stream.flow, node)


class WindowResultStream(KeyedStream[Any, Any]):
    """The results of a window operator; :meth:`late` is its side output of late records."""

    def __init__(self, flow: Flow, node: Node) -> None:
        super().__init__(flow, node)
        self._late: Stream[Any] | None = None

    def late(self) -> Stream[Any]:
        """The records that arrived after their window closed, as ``sw.LateRecord``."""
        if self._late is None:
            self._late = Stream(self.flow, windows.late_port(self))
        return self._late


class JoinedStream(KeyedStream[Any, Any]):
    """The results of a join; :meth:`late` is its side output of late input records."""

    def __init__(self, flow: Flow, node: Node) -> None:
        super().__init__(flow, node)
        self._late: Stream[Any] | None = None

    def late(self) -> Stream[Any]:
        """The input records that arrived too late to join, as ``sw.joins.LateJoinRecord``."""
        if self._late is None:
            self._late = Stream(self.flow, windows.late_port(self))
        return self._late


def _joinable(other: object, method: str) -> Stream[Any]:
    """``other`` as the second input of a join: a stream (the join checks the rest)."""
    if not isinstance(other, Stream):
        raise TypeError(
            f"{method}() expects a keyed stream to join with, got {type(other).__name__} {other!r}"
        )
    return other
