"""Helpers for testing flows: run on a virtual clock, collect the output.

Users import these in their own tests; sluiceway's tests use them too.

>>> import sluiceway as sw
>>> sw.testing.run_collect(lambda s: s.map(lambda x: x + 1), [1, 2, 3])
[2, 3, 4]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from sluiceway.connectors.base import Sink, SinkContext, Source, SourceContext
from sluiceway.connectors.memory import Collect
from sluiceway.connectors.memory import Iterable as IterableSource
from sluiceway.flow import Flow, Stream
from sluiceway.runtime.checkpointing import Checkpoints
from sluiceway.runtime.executor import RunResult
from sluiceway.runtime.handle import run_async
from sluiceway.runtime.messages import Batch
from sluiceway.time import Clock, VirtualClock

__all__ = ["ScriptedSource", "TimedCollect", "VirtualClock", "run_collect", "run_flow"]


class TimedCollect(Sink):
    """A sink that keeps ``(clock instant, record)``: when each record came out.

    For tests of timing: timeouts, early window results, processing-time windows.

    >>> flow = Flow("timed")
    >>> out = TimedCollect()
    >>> flow.source(ScriptedSource([(0.0, [1]), (5.0, [2])])).sink(out)
    >>> _ = run_flow(flow)
    >>> out.items, out.values
    ([(0.0, 1), (5.0, 2)], [1, 2])
    """

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self.clock: Clock | None = None

    async def open(self, ctx: SinkContext) -> None:
        self.clock = ctx.clock

    async def write(self, batch: Batch) -> None:
        assert self.clock is not None, "TimedCollect.write() before open()"
        now = self.clock.monotonic()
        self.items.extend((now, v) for v in batch.values)

    @property
    def values(self) -> list[Any]:
        """The records, without their instants."""
        return [v for _, v in self.items]


class ScriptedSource(Source):
    """A source that hands out given records at given instants of the flow's clock.

    ``script`` is a list of ``(at, records)``: the records become available at clock time
    ``at`` (split into several batches if the runtime asks for fewer); after the last
    entry the source ends.  On a :class:`VirtualClock` this reproduces arrival patterns
    exactly -- bursts, gaps, trickles -- for tests of timeouts and batching.

    >>> flow = Flow("scripted")
    >>> out: Collect[int] = Collect()
    >>> flow.source(ScriptedSource([(0.0, [1, 2]), (5.0, [3])])).batch(10, 1.0).sink(out)
    >>> _ = run_flow(flow)
    >>> out.items
    [[1, 2], [3]]
    """

    def __init__(self, script: Iterable[tuple[float, Iterable[Any]]]) -> None:
        self._script = [(float(at), list(records)) for at, records in script]
        self._clock: Clock | None = None

    async def open(self, ctx: SourceContext) -> None:
        self._clock = ctx.clock

    async def next_batch(self, max_records: int) -> Batch | None:
        assert self._clock is not None, "open() first"
        if not self._script:
            return None
        at, records = self._script[0]
        await self._clock.sleep_until(at)
        out, rest = records[:max_records], records[max_records:]
        if rest:
            self._script[0] = (at, rest)
        else:
            self._script.pop(0)
        return Batch(out)


def run_flow(
    flow: Flow,
    *,
    clock: Clock | None = None,
    max_batch_size: int = 1024,
    seed: int | None = 0,
    checkpoints: Checkpoints | None = None,
) -> RunResult:
    """Run ``flow`` to completion on a virtual clock (default) in a fresh event loop."""
    return asyncio.run(
        run_async(
            flow,
            clock=clock or VirtualClock(),
            max_batch_size=max_batch_size,
            seed=seed,
            checkpoints=checkpoints,
        )
    )


def run_collect(
    build: Callable[[Stream[Any]], Stream[Any]],
    items: Iterable[Any] | AsyncIterable[Any] | Source,
    *,
    clock: Clock | None = None,
    max_batch_size: int = 1024,
) -> list[Any]:
    """Feed ``items`` through ``build(stream)`` on a virtual clock; return what came out."""
    flow = Flow("test")
    source = items if isinstance(items, Source) else IterableSource(items)
    out: Collect[Any] = Collect()
    build(flow.source(source)).sink(out)
    run_flow(flow, clock=clock, max_batch_size=max_batch_size)
    return out.items
