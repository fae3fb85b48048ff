"""The logical dataflow and its fluent builder.

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
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import sys
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sluiceway.agg import Aggregator, Apply, Reduce
from sluiceway.core.channel import Overflow
from sluiceway.core.contract import Sink, Source
from sluiceway.errors import FlowDefinitionError
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.flowcontrol.limiters import KeyedLimiter, Limiter
from sluiceway.joins.asof import AsOfJoinSpec, TemporalJoinSpec
from sluiceway.joins.base import JoinSpec
from sluiceway.joins.interval import IntervalJoinSpec
from sluiceway.joins.latest import LatestJoinSpec
from sluiceway.joins.lookup import LookupJoinSpec
from sluiceway.joins.window import WindowJoinSpec
from sluiceway.operators.async_io import AsyncMapSpec
from sluiceway.operators.base import OpSpec
from sluiceway.operators.batching import BatchSpec
from sluiceway.operators.event_time import MergeSpec, WithTimestampsSpec
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.keyed_state import KeyedProcessSpec, StatefulMapSpec, process_factory
from sluiceway.operators.rate_limit import RateLimitSpec
from sluiceway.operators.stateless import (
    BranchSpec,
    BufferSpec,
    FilterSpec,
    FlatMapSpec,
    InspectSpec,
    KeyBySpec,
    LateOutputSpec,
    MapSpec,
    PortSpec,
)
from sluiceway.policies import DeadLetter, ErrorPolicy, Fail, Retry, check_policy
from sluiceway.state import TTL, KeyedProcessFunction, as_ttl
from sluiceway.time.durations import non_negative_seconds, positive_seconds, seconds_of
from sluiceway.watermarks import BoundedOutOfOrderness, Monotonic, WatermarkStrategy
from sluiceway.windows.assigners import Session, Sliding, Tumbling
from sluiceway.windows.operator import Aggregation, WindowSpec

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


def _user_location() -> str:
    """``file:line`` of the first frame outside the builder (where the user called us)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:  # pragma: no cover - always a caller
        return "<unknown>"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


def _fn_label(fn: object) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    name = "lambda" if name == "<lambda>" else name
    return re.sub(r"\W+", "_", name).strip("_") or "fn"


def _class_label(obj: object) -> str:
    """``JsonLinesSource`` -> ``JsonLines``: the class name without a Source/Sink suffix."""
    name = type(obj).__name__
    return re.sub(r"(Source|Sink)$", "", name) or name


def _reject_source(node: Node) -> Node:
    """The source node a rejecting rate limit hands records back to: ``node`` itself, or
    the source behind a ``key_by`` that cannot drop records (its policy is ``Fail``)."""
    at = node
    if isinstance(at.spec, KeyBySpec) and isinstance(at.spec.on_error, Fail) and at.inputs:
        at = at.inputs[0]
    if not isinstance(at.spec, SourceSpec):
        raise FlowDefinitionError(
            f"rate_limit(when_limited='reject') must follow its broker source directly (or "
            f"through key_by), so each rejected record can be handed back; it follows "
            f"{node.describe()}"
        )
    return at


def _check_callable(fn: object, method: str) -> None:
    if not callable(fn):
        raise TypeError(f"{method}() expects a callable, got {type(fn).__name__} {fn!r}")


def _check_breaker(breaker: object, when_open: str, policy: ErrorPolicy, method: str) -> None:
    if breaker is not None and not isinstance(breaker, CircuitBreaker):
        raise TypeError(f"{method}(breaker=...) expects sw.CircuitBreaker, got {breaker!r}")
    if when_open not in ("wait", "dead_letter"):
        raise ValueError(
            f"{method}(when_open=...) must be 'wait' or 'dead_letter', got {when_open!r}"
        )
    final = policy.then if isinstance(policy, Retry) else policy
    if breaker is not None and when_open == "dead_letter" and not isinstance(final, DeadLetter):
        raise FlowDefinitionError(
            f"{method}(when_open='dead_letter') needs on_error=sw.DeadLetter(sink) "
            "(or a Retry that ends in one): the records must go somewhere"
        )


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value!r}")
    return value


class Flow:
    """A dataflow under construction: sources, operators, sinks.

    Args:
        name: the flow's name (in errors, metrics and logs).
        channel_capacity: records held by an implicit channel (before a ``merge`` or a
            timed ``batch``); ``buffer(capacity=...)`` sets its own.
    """

    def __init__(self, name: str, *, channel_capacity: int = _DEFAULT_CAPACITY) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Flow name must be a non-empty string, got {name!r}")
        self.name = name
        self.channel_capacity = _positive_int(channel_capacity, "channel_capacity")
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._ids = itertools.count()
        self._sinks: dict[int, Node] = {}
        self._sources: dict[int, Node] = {}

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, {len(self.nodes)} operators)"

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
        prior = self._sources.get(id(source))
        if prior is not None:
            raise FlowDefinitionError(
                f"this {source.describe()} source object is already used by {prior.describe()}; "
                "create one source object per flow.source() call"
            )
        node = self._add(
            SourceSpec(source, on_error),
            [],
            name,
            f"source_{_class_label(source)}",
            timestamped=bool(source.event_time),
        )
        self._sources[id(source)] = node
        return Stream(self, node)

    # -- internals used by Stream ----------------------------------------------------

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
            next(self._ids), name, spec, inputs, _user_location(), keyed, timestamped=timestamped
        )
        for i in inputs:
            i.consumers.append(node)
        self.nodes.append(node)
        self._names.add(name)
        return node

    def _add_sink(
        self,
        sink: object,
        inputs: list[Node],
        name: str | None,
        policy: object,
        breaker: CircuitBreaker | None = None,
        when_open: str = "wait",
    ) -> None:
        if not isinstance(sink, Sink):
            raise TypeError(
                f"sink() expects a sluiceway Sink (e.g. sw.sinks.Collect()), "
                f"got {type(sink).__name__} {sink!r}"
            )
        prior = self._sinks.get(id(sink))
        if prior is not None:
            raise FlowDefinitionError(
                f"this {sink.describe()} sink object is already used by {prior.describe()}; "
                "a sink receives one stream -- merge the streams first, or use two sinks"
            )
        on_error = check_policy(policy, "sink()")
        _check_breaker(breaker, when_open, on_error, "sink")
        spec = SinkSpec(sink, on_error, breaker, when_open)
        node = self._add(spec, inputs, name, f"sink_{_class_label(sink)}")
        self._sinks[id(sink)] = node

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
        k = self.node.keyed if keyed is None else keyed
        ts = self.node.timestamped if timestamped is None else timestamped
        return self.flow._add(spec, [self.node], name, default, keyed=k, timestamped=ts)

    def _fn_op(
        self, spec_cls: type[Any], method: str, fn: object, name: str | None, on_error: object
    ) -> Node:
        _check_callable(fn, method)
        policy = check_policy(on_error, f"{method}()")
        return self._derive(spec_cls(fn, policy), name, f"{method}_{_fn_label(fn)}")

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
        return self._wrap(self._fn_op(MapSpec, "map", fn, name, on_error))  # type: ignore[no-any-return]

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
        return self._wrap(self._fn_op(FilterSpec, "filter", predicate, name, on_error))  # type: ignore[no-any-return]

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
        return self._wrap(self._fn_op(FlatMapSpec, "flat_map", fn, name, on_error))  # type: ignore[no-any-return]

    def inspect(
        self, fn: Callable[[T], object], *, name: str | None = None, on_error: ErrorPolicy = Fail()
    ) -> Stream[T]:
        """Call ``fn`` on every record for its side effect; records pass unchanged."""
        return self._wrap(self._fn_op(InspectSpec, "inspect", fn, name, on_error))  # type: ignore[no-any-return]

    def key_by(
        self, fn: Callable[[T], K], *, name: str | None = None, on_error: ErrorPolicy = Fail()
    ) -> KeyedStream[K, T]:
        """Attach the key ``fn(record)`` to every record, for keyed (stateful) operators.

        The key travels beside the record (values are unchanged) and survives ``map``,
        ``filter``, ``flat_map``, ``inspect`` and ``buffer``.
        """
        _check_callable(fn, "key_by")
        policy = check_policy(on_error, "key_by()")
        node = self._derive(KeyBySpec(fn, policy), name, f"key_by_{_fn_label(fn)}", keyed=True)
        return KeyedStream(self.flow, node)

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
        streams = [self, *others]
        if len({id(s.node) for s in streams}) != len(streams):
            raise FlowDefinitionError("merge(): the same stream is given twice")
        keyed = {s.node.keyed for s in streams}
        if len(keyed) > 1:
            raise FlowDefinitionError(
                "merge(): inputs must be all keyed or all unkeyed; call key_by() after the merge"
            )
        timed = {s.node.timestamped for s in streams}
        if len(timed) > 1:
            untimed = next(s for s in streams if not s.node.timestamped)
            raise FlowDefinitionError(
                f"merge(): the stream from {untimed.node.describe()} has no event time while "
                "others do; call with_timestamps() on it before merging"
            )
        cap = None if capacity is None else _positive_int(capacity, "merge capacity")
        event_time = timed.pop()
        node = self.flow._add(
            MergeSpec(cap, len(streams), event_time, cap or self.flow.channel_capacity),
            [s.node for s in streams],
            name,
            "merge",
            keyed=keyed.pop(),
            timestamped=event_time,
        )
        return self._wrap(node)  # type: ignore[no-any-return]

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
        node = self._fn_op(BranchSpec, "branch", predicate, name, on_error)
        ports = [
            self.flow._add(
                PortSpec(i),
                [node],
                None,
                f"{node.name}_{label}",
                keyed=node.keyed,
                timestamped=node.timestamped,
            )
            for i, label in enumerate(("true", "false"))
        ]
        yes, no = ports
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
        size = _positive_int(max_size, "batch max_size")
        delay = None if max_delay is None else positive_seconds(max_delay, "batch max_delay")
        node = self._derive(BatchSpec(size, delay), name, "batch", keyed=False)
        return Stream(self.flow, node)

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
        cap = _positive_int(capacity, "buffer capacity")
        if not isinstance(overflow, Overflow):
            raise TypeError(
                f"buffer overflow must be an sw.Overflow (BLOCK, DROP_NEWEST, DROP_OLDEST, "
                f"FAIL), got {overflow!r}"
            )
        wait = None
        if block_timeout is not None:
            if overflow not in (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST):
                raise FlowDefinitionError(
                    f"buffer(block_timeout=...) waits and then drops: it needs "
                    f"Overflow.DROP_NEWEST or DROP_OLDEST, not {overflow.name}"
                )
            wait = non_negative_seconds(block_timeout, "buffer block_timeout")
        spec = BufferSpec(cap, overflow, wait)
        return self._wrap(self._derive(spec, name, "buffer"))  # type: ignore[no-any-return]

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
        _check_callable(fn, "map_async")
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an async callable object
        ):
            raise TypeError(
                f"map_async() expects an async function (async def), got {fn!r}; "
                "use map() for a plain function"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int | Adaptive):
            raise TypeError(
                "map_async(concurrency=...) must be an int or sw.Adaptive(...), "
                f"got {concurrency!r}"
            )
        if isinstance(concurrency, int) and concurrency < 1:
            raise ValueError(f"map_async(concurrency=...) must be >= 1, got {concurrency!r}")
        policy = check_policy(on_error, "map_async()")
        _check_breaker(breaker, when_open, policy, "map_async")
        spec = AsyncMapSpec(
            fn,
            concurrency=concurrency,
            ordered=bool(ordered),
            timeout=None if timeout is None else positive_seconds(timeout, "map_async timeout"),
            breaker=breaker,
            when_open=when_open,
            on_error=policy,
        )
        return self._wrap(self._derive(spec, name, f"map_async_{_fn_label(fn)}"))  # type: ignore[no-any-return]

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
        that can redeliver (NATS JetStream, RabbitMQ) directly, or
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
        if when_limited not in ("wait", "reject"):
            raise ValueError(
                f"rate_limit(): when_limited must be 'wait' or 'reject', got {when_limited!r}"
            )
        if when_limited == "reject":
            return self._rejecting_rate_limit(limiter, name, retry_after)
        if isinstance(limiter, KeyedLimiter):
            if not self.node.keyed:
                raise FlowDefinitionError(
                    f"rate_limit(): a KeyedLimiter needs a keyed stream; the stream from "
                    f"{self.node.describe()} has no keys: call key_by() first"
                )
            keyed = True
        elif isinstance(limiter, Limiter):
            keyed = False
        elif inspect.iscoroutinefunction(getattr(limiter, "try_acquire", None)) and (
            inspect.iscoroutinefunction(getattr(limiter, "acquire", None))
        ):  # a remote limiter, e.g. sluiceway.flowcontrol.redis.RedisLimiter
            node = self._derive(
                RateLimitSpec(limiter, keyed=False, remote=True),
                name,
                f"rate_limit_{type(limiter).__name__}",
            )
            return self._wrap(node)
        else:
            raise TypeError(
                "rate_limit() expects a limiter from sw.flowcontrol (TokenBucket, LeakyBucket, "
                "FixedWindow, SlidingWindowLog, SlidingWindowCounter, KeyedLimiter, or a "
                f"RedisLimiter), got {limiter!r}"
            )
        label = type(limiter).__name__
        node = self._derive(RateLimitSpec(limiter, keyed=keyed), name, f"rate_limit_{label}")
        return self._wrap(node)  # type: ignore[no-any-return]

    def _rejecting_rate_limit(
        self, limiter: object, name: str | None, retry_after: float | timedelta
    ) -> Stream[T]:
        delay = positive_seconds(retry_after, "rate_limit() retry_after")
        keyed = isinstance(limiter, KeyedLimiter)
        if not keyed and not isinstance(limiter, Limiter):
            raise TypeError(
                "rate_limit(when_limited='reject') needs a local limiter from sw.flowcontrol "
                f"(TokenBucket, ..., KeyedLimiter), got {limiter!r}"
            )
        source_node = _reject_source(self.node)
        assert isinstance(source_node.spec, SourceSpec)
        source = source_node.spec.source
        if not source.can_redeliver:
            raise FlowDefinitionError(
                f"rate_limit(when_limited='reject'): source {source_node.describe()} "
                f"({source.describe()}) cannot hand records back to a broker for later; "
                "reject works after NATS JetStream and RabbitMQ sources -- use "
                "when_limited='wait' (the source is paused by backpressure) instead"
            )
        if keyed and not self.node.keyed:
            raise FlowDefinitionError(
                f"rate_limit(): a KeyedLimiter needs a keyed stream; the stream from "
                f"{self.node.describe()} has no keys: call key_by() first"
            )
        spec = RateLimitSpec(limiter, keyed=keyed, source=source, retry_after=delay)
        node = self._derive(spec, name, f"rate_limit_{type(limiter).__name__}")
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
        _check_callable(fn, "with_timestamps")
        if watermarks is not None and max_out_of_orderness is not None:
            raise TypeError("with_timestamps(): give max_out_of_orderness or watermarks, not both")
        if watermarks is None:
            watermarks = BoundedOutOfOrderness(max_out_of_orderness or 0.0)
        elif not isinstance(watermarks, BoundedOutOfOrderness | Monotonic):
            raise TypeError(
                "with_timestamps(watermarks=...) expects sw.watermarks.BoundedOutOfOrderness(...) "
                f"or sw.watermarks.Monotonic(), got {watermarks!r}"
            )
        bound = round(watermarks.bound * 1_000_000)
        idle = None if idle_timeout is None else positive_seconds(idle_timeout, "idle_timeout")
        adv = (
            None
            if advance_when_idle is None
            else positive_seconds(advance_when_idle, "advance_when_idle")
        )
        policy = check_policy(on_error, "with_timestamps()")
        spec = WithTimestampsSpec(
            fn, bound, idle_timeout=idle, advance_when_idle=adv, on_error=policy
        )
        node = self._derive(spec, name, f"with_timestamps_{_fn_label(fn)}", timestamped=True)
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
        if not isinstance(assigner, Tumbling | Sliding | Session):
            raise TypeError(
                "window() expects sw.windows.Tumbling(...), Sliding(...) or Session(...), "
                f"got {assigner!r}"
            )
        if time not in ("event", "processing"):
            raise ValueError(f"window(time=...) must be 'event' or 'processing', got {time!r}")
        if time == "event" and not self.node.timestamped:
            raise FlowDefinitionError(
                f"window(): the stream from {self.node.describe()} has no event time; call "
                ".with_timestamps(fn, max_out_of_orderness) before it, or use "
                "window(..., time='processing')"
            )
        lateness = non_negative_seconds(allowed_lateness, "allowed_lateness")
        early = None if early_every is None else positive_seconds(early_every, "early_every")
        return WindowedStream(
            self, assigner, round(lateness * 1_000_000), early, time == "processing"
        )

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
        self.flow._add_sink(sink, [self.node], name, on_error, breaker, when_open)


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
    ) -> KeyedStream[K, U]:
        """``fn(state, value) -> (state, output)`` with a state per key.

        ``state`` is None for a key seen first (or whose state expired); returning None as
        the new state deletes the key's state.  Each output leaves with the record's key
        (and event time).  ``ttl=`` drops state not written for that long (counted from the
        last write, i.e. the key's last record that returned a state; reads do not count):
        seconds of processing time, or ``sw.state.TTL(seconds, time="event")``.  A
        record that fails (``on_error``) leaves its key's state as it was.  The state is
        in checkpoints.  See docs/state.md.

        >>> import sluiceway as sw
        >>> def total(acc, x):
        ...     acc = (acc or 0) + x
        ...     return acc, acc
        >>> sw.testing.run_collect(
        ...     lambda s: s.key_by(lambda x: x % 2).stateful_map(total), [1, 2, 3, 4])
        [1, 2, 4, 6]
        """
        _check_callable(fn, "stateful_map")
        policy = check_policy(on_error, "stateful_map()")
        t = as_ttl(ttl, "stateful_map(ttl=...)")
        timestamped = self.node.timestamped
        if t is not None and t.time == "event" and not timestamped:
            raise FlowDefinitionError(
                f"stateful_map(ttl=TTL(..., time='event')): the stream from "
                f"{self.node.describe()} has no event time; call .with_timestamps(...) "
                "before it, or use a processing-time TTL"
            )
        spec = StatefulMapSpec(fn, ttl=t, on_error=policy, timestamped=timestamped)
        node = self._derive(spec, name, f"stateful_map_{_fn_label(fn)}")
        return KeyedStream(self.flow, node)

    def process(
        self,
        fn: KeyedProcessFunction | type | Callable[[Any, T], None],
        *,
        name: str | None = None,
        on_error: ErrorPolicy = Fail(),
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
        state, timers and output as they were.  See docs/state.md.

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
        factory, has_timer = process_factory(fn)
        policy = check_policy(on_error, "process()")
        spec = KeyedProcessSpec(
            factory,
            on_error=policy,
            timestamped=self.node.timestamped,
            processing_timers=has_timer,
        )
        return KeyedStream(self.flow, self._derive(spec, name, f"process_{_fn_label(fn)}"))

    # -- joins (docs/joins.md) ---------------------------------------------------------

    def _join(
        self,
        other: object,
        spec: JoinSpec,
        method: str,
        name: str | None,
        *,
        event_time: bool = True,
    ) -> Node:
        """Add the two-input join ``spec`` of this stream (input 0) and ``other`` (1)."""
        if not isinstance(other, Stream):
            raise TypeError(
                f"{method}() expects a keyed stream to join with, got {type(other).__name__} "
                f"{other!r}"
            )
        if other.flow is not self.flow:
            raise FlowDefinitionError(
                f"{method}(): {other!r} belongs to flow {other.flow.name!r}, not {self.flow.name!r}"
            )
        if other.node is self.node:
            raise FlowDefinitionError(f"{method}(): a stream cannot be joined with itself")
        for side, s in (("left", self), ("right", other)):
            if not s.node.keyed:
                raise FlowDefinitionError(
                    f"{method}(): the {side} input, the stream from {s.node.describe()}, has "
                    "no keys; call .key_by(fn) on it first (both inputs are joined by key)"
                )
            if event_time and not s.node.timestamped:
                raise FlowDefinitionError(
                    f"{method}(): the {side} input, the stream from {s.node.describe()}, has "
                    "no event time; call .with_timestamps(fn, max_out_of_orderness) on it first"
                )
        return self.flow._add(
            spec,
            [self.node, other.node],
            name,
            f"{method}_{other.node.name}",
            keyed=True,
            timestamped=event_time or self.node.timestamped,
        )

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
        if not isinstance(assigner, Tumbling | Sliding | Session):
            raise TypeError(
                "window_join() expects sw.windows.Tumbling(...), Sliding(...) or "
                f"Session(...), got {assigner!r}"
            )
        if how not in ("inner", "left", "full"):
            raise ValueError(f"window_join(how=...) must be 'inner', 'left' or 'full', got {how!r}")
        lateness = _ticks_of(allowed_lateness, "window_join(allowed_lateness=...)")
        spec = WindowJoinSpec(assigner, how, lateness)
        return JoinedStream(self.flow, self._join(other, spec, "window_join", name))

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
        if how not in ("inner", "left"):
            raise ValueError(f"interval_join(how=...) must be 'inner' or 'left', got {how!r}")
        lo = _ticks_of(lower, "interval_join(lower=...)", signed=True)
        hi = _ticks_of(upper, "interval_join(upper=...)", signed=True)
        if lo > hi:
            raise ValueError(f"interval_join(): lower ({lower!r}) must be <= upper ({upper!r})")
        lateness = _ticks_of(allowed_lateness, "interval_join(allowed_lateness=...)")
        spec = IntervalJoinSpec(lo, hi, how, lateness)
        return JoinedStream(self.flow, self._join(other, spec, "interval_join", name))

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
        if how not in ("inner", "left"):
            raise ValueError(f"asof_join(how=...) must be 'inner' or 'left', got {how!r}")
        tol = None if tolerance is None else _ticks_of(tolerance, "asof_join(tolerance=...)")
        lateness = _ticks_of(allowed_lateness, "asof_join(allowed_lateness=...)")
        spec = AsOfJoinSpec(how, lateness, tolerance=tol)
        return JoinedStream(self.flow, self._join(other, spec, "asof_join", name))

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
        if how not in ("inner", "left"):
            raise ValueError(f"temporal_join(how=...) must be 'inner' or 'left', got {how!r}")
        if is_delete is not None:
            _check_callable(is_delete, "temporal_join(is_delete=...)")
        if time == "processing":
            if allowed_lateness:
                raise TypeError(
                    "temporal_join(time='processing') does not wait for watermarks: "
                    "allowed_lateness has no meaning there"
                )
            spec: JoinSpec = LatestJoinSpec(how, is_delete)
            node = self._join(table, spec, "temporal_join", name, event_time=False)
            return KeyedStream(self.flow, node)
        if time != "event":
            raise ValueError(
                f"temporal_join(time=...) must be 'event' or 'processing', got {time!r}"
            )
        lateness = _ticks_of(allowed_lateness, "temporal_join(allowed_lateness=...)")
        spec = TemporalJoinSpec(how, lateness, tolerance=None, is_delete=is_delete)
        return JoinedStream(self.flow, self._join(table, spec, "temporal_join", name))

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
        if not inspect.iscoroutinefunction(fetch) and not inspect.iscoroutinefunction(
            getattr(fetch, "__call__", None)  # noqa: B004 - an async callable object
        ):
            raise TypeError(
                f"lookup_join() expects an async function fetch(key) (async def), got {fetch!r}"
            )
        if how not in ("inner", "left"):
            raise ValueError(f"lookup_join(how=...) must be 'inner' or 'left', got {how!r}")
        size = _positive_int(cache_size, "lookup_join cache_size")
        ttl_s = None if ttl is None else positive_seconds(ttl, "lookup_join ttl")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int | Adaptive):
            raise TypeError(
                "lookup_join(concurrency=...) must be an int or sw.Adaptive(...), "
                f"got {concurrency!r}"
            )
        if isinstance(concurrency, int):
            _positive_int(concurrency, "lookup_join concurrency")
        policy = check_policy(on_error, "lookup_join()")
        _check_breaker(breaker, when_open, policy, "lookup_join")
        spec = LookupJoinSpec(
            fetch,
            cache_size=size,
            ttl=ttl_s,
            concurrency=concurrency,
            ordered=True,
            timeout=None if timeout is None else positive_seconds(timeout, "lookup_join timeout"),
            breaker=breaker,
            when_open=when_open,
            on_error=policy,
        )
        node = self._derive(spec, name, f"lookup_join_{_fn_label(fetch)}")
        if how == "inner":
            node = self.flow._add(
                FilterSpec(_has_row, Fail()),
                [node],
                None,
                f"{node.name}_found",
                keyed=True,
                timestamped=node.timestamped,
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
        if agg and named:
            raise TypeError("aggregate(): give one aggregator, or named ones, not both")
        if len(agg) > 1:
            raise TypeError(
                "aggregate(): several aggregators need names, e.g. aggregate(n=sw.agg.count(), "
                "total=sw.agg.sum(f))"
            )
        if not agg and not named:
            raise TypeError("aggregate() needs an aggregator, e.g. aggregate(sw.agg.count())")
        if agg:
            return self._build(Aggregation(agg, None), name, "aggregate")
        return self._build(Aggregation(list(named.values()), list(named)), name, "aggregate")

    def reduce(
        self, fn: Callable[[Any, Any], Any], *, name: str | None = None
    ) -> WindowResultStream:
        """Combine a window's records pairwise with ``fn(a, b)``; value: the reduction."""
        return self._build(Aggregation([Reduce(fn)], None), name, f"reduce_{_fn_label(fn)}")

    def apply(
        self, fn: Callable[[list[Any]], Any], *, name: str | None = None
    ) -> WindowResultStream:
        """``fn(records)`` over all of a window's records (held in memory until it fires)."""
        return self._build(Aggregation([Apply(fn)], None), name, f"apply_{_fn_label(fn)}")

    def _build(self, aggregation: Aggregation, name: str | None, what: str) -> WindowResultStream:
        spec = WindowSpec(
            self._assigner,
            aggregation,
            lateness=self._lateness,
            early_every=self._early,
            processing_time=self._processing,
        )
        label = type(self._assigner).__name__.lower()
        node = self._stream._derive(spec, name, f"window_{label}_{what}", timestamped=True)
        return WindowResultStream(self._stream.flow, node)


class WindowResultStream(KeyedStream[Any, Any]):
    """The results of a window operator; :meth:`late` is its side output of late records."""

    def __init__(self, flow: Flow, node: Node) -> None:
        super().__init__(flow, node)
        self._late: Stream[Any] | None = None

    def late(self) -> Stream[Any]:
        """The records that arrived after their window closed, as ``sw.LateRecord``."""
        if self._late is None:
            self._late = _late_port(self)
        return self._late


def _late_port(stream: KeyedStream[Any, Any]) -> Stream[Any]:
    """The late-record side output of a window or join operator (its last child)."""
    spec = stream.node.spec
    assert isinstance(spec, WindowSpec | JoinSpec)
    spec.late_output = True
    port = stream.flow._add(
        LateOutputSpec(1),
        [stream.node],
        None,
        f"{stream.node.name}_late",
        keyed=stream.node.keyed,
        timestamped=True,
    )
    return Stream(stream.flow, port)


class JoinedStream(KeyedStream[Any, Any]):
    """The results of a join; :meth:`late` is its side output of late input records."""

    def __init__(self, flow: Flow, node: Node) -> None:
        super().__init__(flow, node)
        self._late: Stream[Any] | None = None

    def late(self) -> Stream[Any]:
        """The input records that arrived too late to join, as ``sw.joins.LateJoinRecord``."""
        if self._late is None:
            self._late = _late_port(self)
        return self._late


def _has_row(pair: tuple[Any, Any]) -> bool:
    return pair[1] is not None


def _ticks_of(value: object, what: str, *, signed: bool = False) -> int:
    """A duration (seconds or timedelta) in integer microseconds; negative only if
    ``signed``."""
    s = seconds_of(value, what)
    if not math.isfinite(s) or (s < 0 and not signed):
        rule = "finite" if signed else "finite and >= 0 seconds"
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return round(s * 1_000_000)
