"""Helpers for testing flows: run on a virtual clock, collect the output.

Users import these in their own tests; sluiceway's tests use them too.

>>> import sluiceway as sw
>>> sw.testing.run_collect(lambda s: s.map(lambda x: x + 1), [1, 2, 3])
[2, 3, 4]
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import FrameType, TracebackType
from typing import Any, Self

from sluiceway.connectors.memory import Collect
from sluiceway.connectors.memory import Iterable as IterableSource
from sluiceway.core.contract import Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.flow import Flow, Stream
from sluiceway.flowcontrol.load import LoadPolicy
from sluiceway.runtime.checkpointing import Checkpoints
from sluiceway.runtime.executor import RunResult
from sluiceway.runtime.handle import FlowHandle, run_async, start
from sluiceway.time import Clock, SystemClock, TimerHandle, VirtualClock

__all__ = [
    "ScriptedSource",
    "StallError",
    "TimedCollect",
    "VirtualClock",
    "Watchdog",
    "run_collect",
    "run_flow",
    "run_watched",
]


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
        self._given = [(float(at), list(records)) for at, records in script]
        self._script: list[tuple[float, list[Any]]] = []
        self._clock: Clock | None = None

    async def open(self, ctx: SourceContext) -> None:
        self._clock = ctx.clock
        self._script = list(self._given)  # every run plays the whole script

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


# -- the real clock: a watchdog --------------------------------------------------------


class StallError(AssertionError):
    """The event loop stopped turning for too long, or a stop was not honoured in time.

    Raised by :class:`Watchdog` (and so by :func:`run_watched`).  A virtual clock cannot
    show these failures: it only moves when the loop is idle, so a task that never
    yields simply freezes virtual time.  Only the real clock shows them.
    """


class Watchdog:
    """Fails a test whose event loop stops turning, or that outlives a deadline.

    Use it around code that runs on the :class:`~sluiceway.time.SystemClock`, inside the
    running loop (in the main thread; POSIX)::

        async with Watchdog(max_stall=1.0) as dog:
            handle = sw.start(flow)
            ...
            dog.expect_end_within(3.0, "the stop")  # from now on, 3 s at most
            await handle.stop()

    A callback on the loop beats every 50 ms; a thread checks the beat.  When the loop
    has not turned for ``max_stall`` seconds (a task that never awaits: 100 % CPU, no
    timer, no signal handler runs), or the deadline passed, the thread interrupts the
    main thread with a signal whose handler raises :class:`StallError` in whatever code
    is running there -- so even a livelocked coroutine ends, with a clear error instead
    of a hung test.  The error is raised again when the block exits.

    Args:
        max_stall: the longest the loop may go without turning, in seconds.
    """

    _BEAT = 0.05

    def __init__(self, *, max_stall: float = 1.0) -> None:
        if not max_stall > 0:
            raise ValueError(f"Watchdog max_stall must be > 0 seconds, got {max_stall!r}")
        self.max_stall = max_stall
        self.failure: StallError | None = None
        self._clock = SystemClock()
        self._beat = 0.0
        self._deadline: tuple[float, str] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: TimerHandle | None = None
        self._old_handler: Any = None
        self._main = threading.main_thread().ident

    def expect_end_within(self, seconds: float, what: str = "the watched block") -> None:
        """Fail unless the block ends within ``seconds`` from now."""
        self._deadline = (self._clock.monotonic() + seconds, f"{what} took over {seconds:g}s")

    async def __aenter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Watchdog needs the main thread (it interrupts it by a signal)")
        self._old_handler = signal.signal(signal.SIGUSR2, self._on_signal)
        self._beat = self._clock.monotonic()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="sluiceway watchdog", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()
        if self.failure is not None:
            raise self.failure from exc

    def _stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._timer is not None:
            self._timer.cancel()
        signal.signal(signal.SIGUSR2, self._old_handler)

    def _tick(self) -> None:
        self._beat = self._clock.monotonic()
        if not self._done.is_set():
            self._timer = self._clock.call_at(self._beat + self._BEAT, self._tick)

    def _watch(self) -> None:
        while not self._done.wait(self._BEAT):
            now = self._clock.monotonic()
            why = None
            if now - self._beat > self.max_stall:
                why = f"the event loop did not turn for {now - self._beat:.1f}s"
            elif self._deadline is not None and now > self._deadline[0]:
                why = self._deadline[1]
            if why is not None:
                if self.failure is None:
                    self.failure = StallError(why)
                # Again every beat, until the main thread is out of whatever holds it.
                signal.pthread_kill(self._main, signal.SIGUSR2)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.failure is not None and not self._done.is_set():
            raise self.failure


def run_watched(
    flow: Flow,
    *,
    run_for: float = 0.5,
    grace_period: float = 1.0,
    max_stall: float = 1.0,
    during: Callable[[FlowHandle], Awaitable[None]] | None = None,
    max_batch_size: int = 1024,
    checkpoints: Checkpoints | None = None,
    load: LoadPolicy | None = None,
) -> RunResult:
    """Run ``flow`` on the real clock under a :class:`Watchdog`, then stop it.

    The flow runs for ``run_for`` seconds (or until it ends by itself, or until
    ``during(handle)`` returns, if given), then a graceful stop is requested; it must end
    within ``grace_period + max_stall`` seconds.  Meanwhile the event loop must never
    stop turning for more than ``max_stall`` seconds.

    Returns the run's result; raises its error (e.g. ``FlowCancelledError`` when the
    grace period ran out), or :class:`StallError`.

    >>> flow = Flow("paced")
    >>> out: Collect[int] = Collect()
    >>> flow.source(IterableSource(range(3))).map(lambda x: x * 2).sink(out)
    >>> run_watched(flow).stopped, out.items
    (False, [0, 2, 4])
    """

    async def main() -> RunResult:
        clock = SystemClock()
        async with Watchdog(max_stall=max_stall) as dog:
            handle = start(
                flow,
                clock=clock,
                grace_period=grace_period,
                max_batch_size=max_batch_size,
                seed=0,
                checkpoints=checkpoints,
                load=load,
            )
            waiter = asyncio.ensure_future(handle.wait())
            if during is not None:
                await during(handle)
            else:
                ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                waiter.add_done_callback(lambda _: _resolve(ended))
                await clock.wait_until(ended, clock.monotonic() + run_for)
            dog.expect_end_within(grace_period + max_stall, "the stop")
            handle.request_stop()
            return await waiter

    return asyncio.run(main())


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
