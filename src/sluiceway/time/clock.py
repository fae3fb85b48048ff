"""The injected clock: the only place in sluiceway that reads or sleeps on real time.

Everything that waits (batch timeouts, retry backoff, rate-paced sources, polling a
growing file) asks a :class:`Clock`.  :class:`SystemClock` is the real one.
:class:`VirtualClock` moves only when a test says so (:meth:`VirtualClock.advance`) or,
with ``autojump=True`` (the default), jumps straight to the next timer as soon as every
task is blocked, so a flow that "waits" ten minutes finishes in milliseconds:

>>> import asyncio
>>> clock = VirtualClock()
>>> async def nap() -> float:
...     await clock.sleep(600)
...     return clock.monotonic()
>>> asyncio.run(nap())
600.0

Two notions of time are offered: :meth:`Clock.monotonic` for durations and deadlines,
and :meth:`Clock.time` for wall-clock timestamps (seconds since the epoch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import math
import sys
import threading
import time as _time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")

__all__ = ["Clock", "SystemClock", "TimerHandle", "VirtualClock", "yield_now"]

#: The interpreter's switch interval while sluiceway work runs in a thread (see
#: :class:`_PromptThreads`): 0.2 ms instead of CPython's 5 ms.
PROMPT_SWITCH_INTERVAL = 0.0002
#: While sluiceway work runs in a thread, the event loop lets a waiting thread have the
#: interpreter lock at a yield point at most this often (seconds of the loop's time):
#: each costs the loop ~0.1 ms (see :meth:`_PromptThreads.hand_over`).
HAND_OVER_EVERY = 0.002


class _PromptThreads:
    """Lowers the interpreter's switch interval while work runs in threads, so that a
    busy event loop does not starve them.

    CPython hands the interpreter lock to a waiting thread only when the holder has not
    let go of it for a whole switch interval (5 ms).  A busy event loop lets go at every
    turn (its ``select``) and takes it straight back, so a thread that needs the lock
    many times -- each SQLite statement, each librdkafka call, each hash of a few kB
    gives it up and takes it again -- only gets it when it wins a race, which it mostly
    loses: measured, a 10 MB checkpoint whose write takes 0.1 s took 15 s to get written
    while 2,000,000-key state was being updated (CK-2M in ``benchmarks/RESULTS.md``).
    With the interval at :data:`PROMPT_SWITCH_INTERVAL`, a turn of the loop longer than
    it gives way: the write took 0.1 s again.  The interval is lowered while at least
    one call of :meth:`Clock.run_in_thread` is under way, and put back when the last
    one ends -- unless something else changed it meanwhile, or it was lower already.
    Nothing changes when no thread waits for the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: float | None = None  # the interval to put back, if we lowered it
        self._handed = 0.0  # time.monotonic() of the last hand_over

    def hand_over(self) -> None:
        """At a yield point of the event loop, while work runs in threads: let a thread
        waiting for the interpreter lock take it -- at most once per
        :data:`HAND_OVER_EVERY` of the loop's time.

        The lowered switch interval alone is not enough: CPython asks the holder to let
        go only when a whole interval passed without the lock changing hands, and a busy
        loop whose turns are shorter than that lets it go at each turn (its ``select``)
        and takes it straight back before the waiting thread wakes up.  Measured: 300
        SQLite statements in a thread did not finish in 30 s beside a loop of 0.13 ms
        turns, whatever the interval.  A ``time.sleep(0)`` lets the lock go long enough
        (it costs the loop ~0.1 ms here) for the thread to take it: 0.07 s."""
        if self._users:
            now = _time.monotonic()
            if now - self._handed >= HAND_OVER_EVERY:
                self._handed = now
                _time.sleep(0)  # (the lock is let go meanwhile)

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                current = sys.getswitchinterval()
                if current > PROMPT_SWITCH_INTERVAL:
                    sys.setswitchinterval(PROMPT_SWITCH_INTERVAL)
                    self._saved = current
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._saved is not None:
                # (getswitchinterval rounds to microseconds: compare with that)
                if abs(sys.getswitchinterval() - PROMPT_SWITCH_INTERVAL) < 1e-6:
                    sys.setswitchinterval(self._saved)
                self._saved = None


_prompt_threads = _PromptThreads()


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a worker thread, the switch interval lowered meanwhile."""
    _prompt_threads.enter()
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        _prompt_threads.exit()


class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled before it runs."""

    def cancel(self) -> None: ...


class Clock(ABC):
    """Reads time and schedules wake-ups.  Injected into everything that waits."""

    @abstractmethod
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations and deadlines)."""

    @abstractmethod
    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch (for timestamps shown to users)."""

    @abstractmethod
    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` in the running event loop once ``monotonic() >= when``."""

    async def sleep_until(self, when: float) -> None:
        """Suspend the calling task until ``monotonic() >= when``."""
        if when <= self.monotonic():
            # Still yield, so a loop of zero-length sleeps cannot starve other tasks.
            await yield_now()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle = self.call_at(when, lambda: _resolve(fut))
        try:
            await fut
        finally:
            handle.cancel()

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` (negative means zero)."""
        await self.sleep_until(self.monotonic() + max(0.0, seconds))

    async def wait_until(self, fut: asyncio.Future[None], deadline: float | None) -> bool:
        """Wait for ``fut`` or ``deadline``, whichever comes first.

        Returns True if ``fut`` completed.  ``fut`` is not cancelled on timeout, so the
        caller keeps ownership of it.
        """
        if deadline is None:
            await fut
            return True
        if fut.done():
            return True
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle = self.call_at(deadline, lambda: _resolve(wake))
        fut.add_done_callback(lambda _f: _resolve(wake))
        try:
            await wake
        finally:
            handle.cancel()
        return fut.done()

    async def run_in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking ``fn(*args)`` in a worker thread (e.g. writing a checkpoint).

        A virtual clock holds still meanwhile: work in a thread is invisible to the event
        loop, and time must not jump past it.  The interpreter's switch interval is
        lowered meanwhile, so that a busy event loop does not starve the thread (see
        :class:`_PromptThreads`)."""
        return await _in_thread(fn, *args)

    async def wait_outside(self, fut: concurrent.futures.Future[_T]) -> _T:
        """The result of work running outside the event loop (e.g. in a process pool).

        As with :meth:`run_in_thread`, a virtual clock holds still meanwhile.  Cancelling
        the wait cancels ``fut`` if it has not started."""
        return await asyncio.wrap_future(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def yield_now() -> None:
    """Let other tasks run (the runtime calls this between a source's batches) -- and,
    while work runs in a thread, that thread have the interpreter lock for a moment
    (:meth:`_PromptThreads.hand_over`)."""
    _prompt_threads.hand_over()
    await asyncio.sleep(0)


class SystemClock(Clock):
    """The real clock: ``time.monotonic`` for deadlines, ``time.time`` for timestamps."""

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        loop = asyncio.get_running_loop()
        # The default loop's time() is time.monotonic(); convert in case it is not.
        return loop.call_at(loop.time() + (when - _time.monotonic()), callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock(Clock):
    """A clock that moves only when told to, or when every task is waiting on it.

    Args:
        start: the initial value of :meth:`monotonic`.
        epoch: the wall-clock time (:meth:`time`) that corresponds to ``start``.
        autojump: when True, as soon as the event loop has nothing runnable the clock
            jumps to the earliest pending timer.  With False, only :meth:`advance`
            moves time.

    Timers that fall due at the same instant run in the order they were scheduled, so
    runs on a virtual clock are deterministic.

    >>> clock = VirtualClock(start=10.0, epoch=1_000.0, autojump=False)
    >>> clock.advance(2.5)
    >>> clock.monotonic(), clock.time()
    (12.5, 1002.5)
    """

    def __init__(
        self, *, start: float = 0.0, epoch: float = 1_700_000_000.0, autojump: bool = True
    ) -> None:
        for name, value in (("start", start), ("epoch", epoch)):
            if not math.isfinite(value):
                raise ValueError(f"VirtualClock {name} must be a finite number, got {value!r}")
        self._now = float(start)
        self._epoch_offset = float(epoch) - float(start)
        self._autojump = autojump
        self._timers: list[tuple[float, int, _VirtualTimer]] = []
        self._seq = itertools.count()
        self._driver_loop: asyncio.AbstractEventLoop | None = None
        self._idle_checks = 0
        self._busy = 0  # threads running for the flow (run_in_thread): no jumping
        self.jumps: list[float] = []
        """Every instant the clock jumped to on its own (autojump), for tests to assert."""

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._epoch_offset

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        if when <= self._now:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:  # already due: run at the next turn of the loop, as asyncio would
                return loop.call_soon(callback)
        timer = _VirtualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        if self._autojump:
            self._ensure_driver()
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every timer that falls due.

        Timers run in time order, each with the clock set to its own instant.
        """
        if not seconds >= 0:  # also rejects NaN
            raise ValueError(
                f"advance() needs a duration >= 0 seconds, got {seconds!r}"
                + (" (a clock cannot move backwards)" if seconds < 0 else "")
            )
        self._run_until(self._now + seconds)

    def next_deadline(self) -> float | None:
        """The instant of the earliest pending timer, or None when there is none."""
        self._drop_cancelled()
        return self._timers[0][0] if self._timers else None

    def _drop_cancelled(self) -> None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)

    def _run_until(self, target: float) -> None:
        while True:
            self._drop_cancelled()
            if not self._timers or self._timers[0][0] > target:
                break
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            timer.callback()
        self._now = max(self._now, target)

    # -- autojump: a callback (not a task) that checks whether the loop is idle -------

    def _ensure_driver(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._driver_loop is loop:
            return
        self._driver_loop = loop
        self._idle_checks = 0
        loop.call_soon(self._check_idle)

    async def run_in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        self._busy += 1
        try:
            return await _in_thread(fn, *args)
        finally:
            self._busy -= 1
            if self._autojump and self._timers:
                self._ensure_driver()

    async def wait_outside(self, fut: concurrent.futures.Future[_T]) -> _T:
        self._busy += 1
        try:
            return await asyncio.wrap_future(fut)
        finally:
            self._busy -= 1
            if self._autojump and self._timers:
                self._ensure_driver()

    def _check_idle(self) -> None:
        loop = self._driver_loop
        assert loop is not None
        nxt = self.next_deadline()
        if nxt is None or self._busy:  # stop driving until a timer or the thread is done
            self._driver_loop = None
            return
        ready = getattr(loop, "_ready", None)
        if ready is not None:
            # Other virtual clocks' idle checks are not work: ignoring them lets several
            # virtual clocks share one loop without keeping each other "busy" forever.
            # A copy first: a worker thread (another clock's run_in_thread finishing)
            # may append to the queue while Python code iterates it; the copy is one C
            # call, under the GIL.
            idle = all(_is_idle_check(h) for h in tuple(ready))
        else:  # an event loop without the private ready queue: settle for many hops
            self._idle_checks += 1
            idle = self._idle_checks >= 64
        if idle:
            self._idle_checks = 0
            self.jumps.append(nxt)
            self._run_until(nxt)
        if loop.is_closed():
            self._driver_loop = None
            return
        loop.call_soon(self._check_idle)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r}, autojump={self._autojump!r})"


def _is_idle_check(handle: object) -> bool:
    callback = getattr(handle, "_callback", None)
    return getattr(callback, "__func__", None) is VirtualClock._check_idle
