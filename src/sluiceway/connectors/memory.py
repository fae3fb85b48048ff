"""In-memory and callable connectors: Iterable, Generator, Collect, Function, Stdout."""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from collections.abc import Iterable as IterableABC
from itertools import islice
from typing import Any, Generic, TextIO, TypeVar

from sluiceway.core.contract import PartialWriteError, Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.time import Clock

__all__ = ["Collect", "Function", "Generator", "Iterable", "Stdout"]

T = TypeVar("T")


class _IteratorPuller:
    """Pulls up to n records from a sync or async iterator."""

    def __init__(self, it: Iterator[Any] | AsyncIterator[Any]) -> None:
        self.sync = it if isinstance(it, Iterator) else None
        self.aio = None if self.sync is not None else it
        self.done = False

    async def take(self, n: int) -> list[Any]:
        if self.done:
            return []
        if self.sync is not None:
            out = list(islice(self.sync, n))
            if len(out) < n:
                self.done = True
            return out
        assert isinstance(self.aio, AsyncIterator)
        # An async iterator cannot say what is ready without awaiting it, so each await
        # yields one record: a lone record flows at once.
        try:
            return [await anext(self.aio)]
        except StopAsyncIteration:
            self.done = True
            return []


def _to_iterator(obj: object, what: str) -> Iterator[Any] | AsyncIterator[Any]:
    if isinstance(obj, AsyncIterable):
        return aiter(obj)
    if isinstance(obj, IterableABC):
        return iter(obj)
    raise TypeError(f"{what} expects an iterable or async iterable, got {type(obj).__name__}")


class Iterable(Source, Generic[T]):
    """Records from an iterable, a generator or an async iterable.

    The position is the count of records handed out, so a replayable iterable (a list)
    can resume from it once checkpoints are on.  An iterator or generator can be read
    only once: a flow with checkpoints refuses it at start (:attr:`resumable` is False),
    and running the flow a second time finds it exhausted.

    >>> import sluiceway as sw
    >>> sw.testing.run_collect(lambda s: s, sw.sources.Iterable("abc"))
    ['a', 'b', 'c']
    """

    def __init__(self, items: IterableABC[T] | AsyncIterable[T]) -> None:
        if not isinstance(items, IterableABC | AsyncIterable):
            raise TypeError(
                f"sources.Iterable expects an iterable or async iterable, got "
                f"{type(items).__name__} {items!r}"
            )
        self._items = items
        self._puller: _IteratorPuller | None = None
        self._count = 0
        self._skip = 0

    @property
    def resumable(self) -> bool:
        """False for a one-shot iterator or generator: it cannot be read again."""
        return not isinstance(self._items, Iterator | AsyncIterator)

    async def open(self, ctx: SourceContext) -> None:
        """Start reading from the beginning (or after the records of a restored position);
        a run never carries the count of an earlier run over."""
        skip, self._skip = self._skip, 0
        it = _to_iterator(self._items, "sources.Iterable")
        if skip:
            if it is self._items:
                raise ValueError(
                    f"sources.Iterable cannot resume from position {skip}: its "
                    f"{type(self._items).__name__} can be read only once; give it a list "
                    "or another re-iterable collection, or use sources.Generator with a "
                    "factory that makes the same sequence again"
                )
            await _skip(it, skip, "sources.Iterable")
        self._count = skip
        self._puller = _IteratorPuller(it)

    async def next_batch(self, max_records: int) -> Batch | None:
        assert self._puller is not None, "open() first"
        values = await self._puller.take(max_records)
        if not values:
            return None
        self._count += len(values)
        return Batch(values)

    def position(self) -> int:
        return self._count

    def restore(self, position: Any) -> None:
        self._skip = self._count = _check_count(position, "sources.Iterable")


def _check_count(position: Any, what: str) -> int:
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise ValueError(f"{what} resumes from a record count, got {position!r}")
    return position


async def _skip(it: Iterator[Any] | AsyncIterator[Any], n: int, what: str) -> None:
    """Skip the ``n`` records a checkpoint says were read; fewer means the input changed."""
    got = 0
    if isinstance(it, Iterator):
        got = sum(1 for _ in islice(it, n))
    else:
        async for _ in it:
            got += 1
            if got == n:
                break
    if got < n:
        raise ValueError(
            f"{what} cannot resume from position {n}: its input now has only {got} "
            "records (did the input change since the checkpoint?)"
        )


class Generator(Source, Generic[T]):
    """Records from a generator function, optionally paced at a target rate.

    Args:
        factory: called once at open; returns an iterator or async iterator (a generator
            function, or e.g. ``lambda: (make(i) for i in itertools.count())``).
        rate: records per second on the flow's clock (None: as fast as pulled).  Paced
            batches hold the records that are due, so at low rates each record flows
            alone; if the flow falls more than a second behind, the schedule resets
            rather than bursting.
    """

    def __init__(
        self,
        factory: Callable[[], IterableABC[T] | AsyncIterable[T]],
        *,
        rate: float | None = None,
    ) -> None:
        if not callable(factory):
            raise TypeError(
                f"sources.Generator expects a callable returning an iterator "
                f"(e.g. a generator function), got {type(factory).__name__}"
            )
        if rate is not None and not (
            isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate < math.inf
        ):
            raise ValueError(
                f"sources.Generator rate must be a finite number > 0 records/s, got {rate!r}; "
                "leave it out (rate=None) to emit as fast as the flow pulls"
            )
        self._factory = factory
        self._rate = None if rate is None else float(rate)
        self._puller: _IteratorPuller | None = None
        self._clock: Clock | None = None
        self._start = 0.0
        self._emitted = 0
        self._count = 0
        self._skip = 0

    async def open(self, ctx: SourceContext) -> None:
        """Call the factory and start a fresh schedule; a run never carries the count or
        the pace of an earlier run over (only a restored position skips records)."""
        skip, self._skip = self._skip, 0
        made = self._factory()
        if inspect.isawaitable(made):
            made = await made
        it = _to_iterator(made, "sources.Generator factory()")
        if skip:
            await _skip(it, skip, "sources.Generator")
        self._puller = _IteratorPuller(it)
        self._clock = ctx.clock
        self._start = ctx.clock.monotonic()
        self._emitted = 0
        self._count = skip

    async def next_batch(self, max_records: int) -> Batch | None:
        assert self._puller is not None, "open() first"
        n = max_records
        if self._rate is not None:
            n = await self._due(max_records)
        values = await self._puller.take(n)
        if not values:
            return None
        self._emitted += len(values)
        self._count += len(values)
        return Batch(values)

    async def _due(self, max_records: int) -> int:
        assert self._clock is not None
        assert self._rate is not None
        clock, rate = self._clock, self._rate
        now = clock.monotonic()
        due = math.floor((now - self._start) * rate + 1e-9) - self._emitted
        if due > rate:  # more than a second behind: restart the schedule, do not burst
            self._start = now - 1.0 / rate
            self._emitted = 0
            due = 1
        if due <= 0:
            await clock.sleep_until(self._start + (self._emitted + 1) / rate)
            due = 1
        return min(due, max_records)

    def position(self) -> int:
        return self._count

    def restore(self, position: Any) -> None:
        """Resume after ``position`` records: the factory must make the same sequence
        again (records are skipped, not regenerated differently)."""
        self._skip = self._count = _check_count(position, "sources.Generator")


class Collect(Sink, Generic[T]):
    """Keeps every record in :attr:`items` (for tests, notebooks and small jobs).

    Unbounded by design: use it where the input is bounded.  :attr:`items` is yours: a
    second run of the flow adds to it (clear it in between to see one run's output).
    """

    def __init__(self) -> None:
        self.items: list[T] = []

    async def write(self, batch: Batch) -> None:
        self.items.extend(batch.values)

    def __repr__(self) -> str:
        return f"Collect({len(self.items)} items)"


def _default_format(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


class Stdout(Sink):
    """Prints one line per record (dicts and lists as JSON, others with ``str``).

    Args:
        formatter: turns a record into its line (default as above).
        stream: where to write (default ``sys.stdout`` at the time of writing).
    """

    def __init__(
        self, formatter: Callable[[Any], str] | None = None, *, stream: TextIO | None = None
    ) -> None:
        self._format = formatter or _default_format
        self._stream = stream

    async def write(self, batch: Batch) -> None:
        out = self._stream or sys.stdout
        fmt = self._format
        lines: list[str] = []
        for i, v in enumerate(batch.values):
            try:
                lines.append(fmt(v))
            except Exception as exc:
                out.write("".join(f"{line}\n" for line in lines))
                raise PartialWriteError(i, exc) from exc
        out.write("".join(f"{line}\n" for line in lines))
        out.flush()


class Function(Sink):
    """Calls ``fn`` for every record, or once per micro-batch with ``batched=True``.

    ``fn`` may be sync or async.  Per record, a failure is pinned to that record, so the
    error policy retries or dead-letters exactly it; per batch, the whole list is retried
    (at-least-once).

    >>> import sluiceway as sw
    >>> seen = []
    >>> flow = sw.Flow("fn")
    >>> flow.source(sw.sources.Iterable([1, 2])).sink(sw.sinks.Function(seen.append))
    >>> _ = sw.run(flow)
    >>> seen
    [1, 2]
    """

    def __init__(self, fn: Callable[[Any], Any], *, batched: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"sinks.Function expects a callable, got {type(fn).__name__} {fn!r}")
        self._fn = fn
        self._batched = batched
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects too
        )
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self._done = 0  # records of the write under way done (per record)

    async def open(self, ctx: SinkContext) -> None:
        pass

    async def write(self, batch: Batch) -> None:
        fn = self._fn
        if self._batched:
            r = fn(list(batch.values))
            if inspect.isawaitable(r):
                await r
            return
        self._done = 0
        if self._is_async:
            for i, v in enumerate(batch.values):
                try:
                    await fn(v)
                except Exception as exc:
                    raise PartialWriteError(i, exc) from exc
                self._done = i + 1
            return
        it = iter(batch.values)
        try:
            for v in it:
                r = fn(v)
                if inspect.isawaitable(r):
                    await r
                self._done += 1
        except Exception as exc:
            raise PartialWriteError(self._done, exc) from exc

    def progress(self) -> int | None:
        """Per record: how many of the batch being written are done (a batched write is
        all or nothing)."""
        return None if self._batched else self._done

    def describe(self) -> str:
        return f"Function({self.name})"
