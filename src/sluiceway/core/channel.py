"""Bounded channels between stages, counted in records, with an overflow policy per edge.

A channel has one reader and one or more writers (fan-in).  Its capacity counts records,
not batches: a batch larger than the free room is split, and under ``Overflow.BLOCK`` the
writer awaits room for the rest.  Control messages (watermarks, barriers) are queued in
order with the data but never dropped and never counted against the capacity.  When every
writer has closed and the queue is empty, :meth:`ChannelReader.receive` raises
:class:`~sluiceway.errors.EndOfStream`.

>>> import asyncio
>>> from sluiceway.time import VirtualClock
>>> async def demo() -> tuple[list[int], int]:
...     writers, reader = open_channel(
...         2, clock=VirtualClock(), name="demo", overflow=Overflow.DROP_OLDEST)
...     await writers[0].send(Batch([1, 2, 3]))     # 3 records, room for 2: 1 dropped
...     writers[0].close()
...     kept = reader.receive_nowait().values + reader.receive_nowait().values
...     return kept, reader.statistics().records_dropped
>>> asyncio.run(demo())
([2, 3], 1)

Dropping and failing apply only when the reader is behind: a batch larger than the free
room is queued in parts, the reader getting a turn between them, and only records that
still find the channel full after a turn in which the reader took nothing overflow.

A dropping channel may first wait: with ``block_timeout`` a writer whose records find the
reader behind waits up to that many seconds (on the clock) for room, queueing what fits
as room appears, and only then drops what is left -- soft backpressure that never blocks
for good (Go's ``select`` with ``time.After``).  The wait counts as blocked time.

Every writer measures the time it spent blocked; ``blocked_seconds`` per second of wall
time is the backpressure ratio shown to users.

Checkpoint barriers are *aligned* by the reader of a fan-in channel: once the barrier of
checkpoint ``n`` has come from one input, that input's later items are held back until the
barrier has come from every input that is still open; then the reader returns the barrier
once and serves the held items, in order.  Held records leave the shared capacity (so the
other inputs can still deliver their barrier: no deadlock) but count against their own
writer, which therefore blocks after ``capacity`` held records: memory stays bounded.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass

from sluiceway.core.messages import Barrier, Batch, Control
from sluiceway.errors import (
    BrokenResourceError,
    ChannelOverflowError,
    ClosedResourceError,
    EndOfStream,
)
from sluiceway.time import Clock, yield_now

__all__ = [
    "ChannelReader",
    "ChannelStatistics",
    "ChannelWriter",
    "Overflow",
    "TaggedControl",
    "open_channel",
]


class Overflow(enum.Enum):
    """What a full channel does with more records.

    ``BLOCK`` (default, lossless) makes the writer wait; ``DROP_NEWEST`` drops the
    incoming records; ``DROP_OLDEST`` drops the oldest queued records; ``FAIL`` stops
    the flow with :class:`~sluiceway.errors.ChannelOverflowError`.  Drops are counted.
    """

    BLOCK = "block"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class TaggedControl:
    """A control message as the reader sees it: which writer (input) sent it."""

    message: Control
    input_index: int


@dataclass(frozen=True, slots=True)
class _InputMark:
    """Queued before data from a different writer than the last: the reader tracks it."""

    input_index: int


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """A point-in-time view of one channel's counters."""

    name: str
    capacity: int
    overflow: Overflow
    fill: int
    max_fill: int
    records_sent: int
    """Records queued and not dropped since (``sent + dropped`` = every record offered)."""
    records_received: int
    records_dropped: int
    blocked_seconds: float
    writers_open: int


class _Channel:
    __slots__ = (
        "block_timeout",
        "blocked_seconds",
        "blocked_since",
        "broken",
        "capacity",
        "clock",
        "closed",
        "fill",
        "flow",
        "held",
        "last_input",
        "max_fill",
        "name",
        "overflow",
        "queue",
        "reader_waiter",
        "records_dropped",
        "records_received",
        "records_sent",
        "writer_waiters",
        "writers_open",
    )

    def __init__(
        self,
        capacity: int,
        overflow: Overflow,
        clock: Clock,
        name: str,
        flow: str,
        writers: int,
        block_timeout: float | None = None,
    ) -> None:
        self.block_timeout = block_timeout
        """Dropping policies: seconds a writer waits for room before it drops."""
        self.capacity = capacity
        self.overflow = overflow
        self.clock = clock
        self.name = name
        self.flow = flow
        self.queue: deque[Batch | TaggedControl | _InputMark] = deque()
        self.last_input = 0
        self.fill = 0
        self.max_fill = 0
        self.writers_open = writers
        self.closed = [False] * writers
        self.held = [0] * writers
        """Per input: records the reader holds back while aligning a barrier; they count
        against that input's own room, not against the shared ``fill``."""
        self.reader_waiter: asyncio.Future[None] | None = None
        self.writer_waiters: list[asyncio.Future[None]] = []
        self.records_sent = 0
        self.records_received = 0
        self.records_dropped = 0
        self.blocked_seconds = 0.0
        self.blocked_since: dict[int, float] = {}
        self.broken = False

    def wake_reader(self) -> None:
        w = self.reader_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def wake_writers(self) -> None:
        waiters, self.writer_waiters = self.writer_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def put(self, batch: Batch, index: int) -> None:
        if index != self.last_input:
            self.queue.append(_InputMark(index))
            self.last_input = index
        self.queue.append(batch)
        self.fill += len(batch)
        self.records_sent += len(batch)
        self.max_fill = max(self.max_fill, self.fill)
        self.wake_reader()

    def evict(self, n: int) -> None:
        """Queued records dropped: no longer sent (they will never be received)."""
        self.fill -= n
        self.records_sent -= n
        self.records_dropped += n

    def drop_oldest(self, excess: int) -> None:
        kept: deque[Batch | TaggedControl | _InputMark] = deque()
        for item in self.queue:
            if excess > 0 and isinstance(item, Batch):
                n = len(item)
                if n <= excess:
                    excess -= n
                    self.evict(n)
                    continue
                kept.append(item.slice(excess))
                self.evict(excess)
                excess = 0
            else:
                kept.append(item)
        self.queue = kept


class ChannelWriter:
    """The sending side of a channel, for one input of its reader.

    ``close()`` means end of stream from this writer; the reader sees the end once every
    writer has closed.
    """

    __slots__ = ("_ch", "_closed", "index", "unsent")

    def __init__(self, channel: _Channel, index: int) -> None:
        self._ch = channel
        self.index = index
        self._closed = False
        self.unsent = 0
        """Records of a blocked :meth:`send` not queued yet (for the inventory of a
        cancelled flow: the queued part is in the channel's ``fill``)."""

    @property
    def name(self) -> str:
        return self._ch.name

    @property
    def room(self) -> int:
        """Records that fit before the channel is full (0 when full)."""
        ch = self._ch
        return max(0, ch.capacity - ch.fill - ch.held[self.index])

    @property
    def capacity(self) -> int:
        return self._ch.capacity

    @property
    def overflow(self) -> Overflow:
        return self._ch.overflow

    async def wait_for_room(self, n: int) -> None:
        """Wait until at least ``min(n, capacity)`` records fit; the wait counts as blocked.

        A producer that can choose how much to produce (a source pulled on credit) calls
        this before producing, so that under sustained backpressure it hands over full
        batches instead of one record each time a single slot frees up.
        """
        ch = self._ch
        need = min(n, ch.capacity)
        while ch.capacity - ch.fill - ch.held[self.index] < need:
            await self._wait_writable()

    async def send(self, batch: Batch) -> None:
        """Queue a batch, applying the channel's overflow policy when it is full."""
        ch = self._ch
        if self._closed:
            raise ClosedResourceError(f"channel {ch.name!r}: send() after close()")
        if ch.broken:
            raise BrokenResourceError(f"channel {ch.name!r}: its reader has stopped")
        n = len(batch)
        if n == 0:
            return
        room = ch.capacity - ch.fill - ch.held[self.index]
        if n <= room:
            ch.put(batch, self.index)
            return
        policy = ch.overflow
        if policy is Overflow.BLOCK:
            await self._send_blocking(batch)
            return
        # Not room for all of it.  That alone does not mean the reader is behind: a batch
        # may be larger than the whole channel, or the reader may not have had its turn
        # since the last one.  Queue what fits and give it a turn, as long as it takes
        # something each time; only what still finds no room is the overflow.
        while True:
            if room > 0:
                ch.put(batch.slice(0, room), self.index)
                batch = batch.slice(room)
            taken = ch.records_received
            self.unsent = len(batch)
            await yield_now()
            self.unsent = 0
            if ch.broken:
                raise BrokenResourceError(f"channel {ch.name!r}: its reader has stopped")
            n = len(batch)
            room = ch.capacity - ch.fill - ch.held[self.index]
            if n <= room:
                ch.put(batch, self.index)
                return
            if ch.records_received == taken:
                break
        if ch.block_timeout is not None and ch.overflow is not Overflow.FAIL:
            batch, room = await self._wait_then(batch, ch.clock.monotonic() + ch.block_timeout)
            if not batch:
                return
        self._overflow(batch, room)

    async def _wait_then(self, batch: Batch, deadline: float) -> tuple[Batch, int]:
        """``block_timeout``: queue ``batch`` as room appears until ``deadline``; returns
        what is left (empty: all queued) and the room now."""
        ch = self._ch
        while True:
            room = ch.capacity - ch.fill - ch.held[self.index]
            if room > 0:
                ch.put(batch.slice(0, room), self.index)
                batch = batch.slice(room)
                if not batch:
                    return batch, 0
                room = 0  # full again
            if ch.clock.monotonic() >= deadline:
                return batch, max(0, room)
            self.unsent = len(batch)
            try:
                await self._wait_writable(deadline)
            finally:
                self.unsent = 0

    def _overflow(self, batch: Batch, room: int) -> None:
        """The reader is behind: apply the dropping or failing policy to ``batch``."""
        ch, n, policy = self._ch, len(batch), self._ch.overflow
        if policy is Overflow.DROP_NEWEST:
            if room > 0:
                ch.put(batch.slice(0, room), self.index)
            ch.records_dropped += n - max(room, 0)
        elif policy is Overflow.DROP_OLDEST:
            if n > ch.capacity:
                ch.records_dropped += n - ch.capacity
                batch = batch.slice(n - ch.capacity)
                n = ch.capacity
            ch.drop_oldest(ch.fill + n - ch.capacity)
            ch.put(batch, self.index)
        else:
            raise ChannelOverflowError(flow=ch.flow, edge=ch.name, capacity=ch.capacity, incoming=n)

    async def _send_blocking(self, batch: Batch) -> None:
        ch = self._ch
        while True:
            room = ch.capacity - ch.fill - ch.held[self.index]
            if room >= len(batch):
                ch.put(batch, self.index)
                return
            if room > 0:
                ch.put(batch.slice(0, room), self.index)
                batch = batch.slice(room)
            self.unsent = len(batch)
            await self._wait_writable()
            self.unsent = 0

    async def _wait_writable(self, deadline: float | None = None) -> None:
        """Wait until the reader takes something, or until ``deadline`` (on the clock);
        the wait is counted as blocked time."""
        ch = self._ch
        clock = ch.clock
        if ch.broken:
            raise BrokenResourceError(f"channel {ch.name!r}: its reader has stopped")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ch.writer_waiters.append(waiter)
        started = clock.monotonic()
        ch.blocked_since[self.index] = started
        try:
            if deadline is None:
                await waiter
            elif not await clock.wait_until(waiter, deadline):
                ch.writer_waiters.remove(waiter)  # timed out: do not pile up waiters
        finally:
            del ch.blocked_since[self.index]
            ch.blocked_seconds += clock.monotonic() - started
        if ch.broken:
            raise BrokenResourceError(f"channel {ch.name!r}: its reader has stopped")

    def send_control(self, message: Control) -> None:
        """Queue a control message; never blocks, never dropped."""
        ch = self._ch
        if self._closed:
            raise ClosedResourceError(f"channel {ch.name!r}: send_control() after close()")
        if ch.broken:
            raise BrokenResourceError(f"channel {ch.name!r}: its reader has stopped")
        ch.queue.append(TaggedControl(message, self.index))
        ch.wake_reader()

    def close(self) -> None:
        """End of stream from this writer.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ch.writers_open -= 1
        self._ch.closed[self.index] = True
        self._ch.wake_reader()


class ChannelReader:
    """The receiving side of a channel.

    ``input_index`` is the writer (input) that sent the batch received last; a fan-in
    operator that treats its inputs differently (combining watermarks) reads it.
    """

    __slots__ = (
        "_aligning",
        "_blocked",
        "_ch",
        "_cur",
        "_interrupted",
        "_replay",
        "_stash",
        "input_index",
    )

    def __init__(self, channel: _Channel) -> None:
        self._ch = channel
        self.input_index = 0
        self._cur = 0
        self._interrupted = False
        self._aligning: Barrier | None = None
        self._blocked: set[int] = set()
        """Inputs whose barrier has come while the others' has not: their items wait."""
        self._stash: list[tuple[Batch | TaggedControl, int]] = []
        self._replay: deque[tuple[Batch | TaggedControl, int]] = deque()

    def interrupt(self) -> None:
        """Make the pending (or next) :meth:`receive` return None when nothing is queued.

        The operator a channel feeds calls this when it has work of its own -- an async
        call completed -- so its stage stops waiting for input and runs its timers.
        """
        self._interrupted = True
        self._ch.wake_reader()

    @property
    def name(self) -> str:
        return self._ch.name

    @property
    def fill(self) -> int:
        """Records queued, including those held back while aligning a barrier."""
        ch = self._ch
        return ch.fill + sum(ch.held) if self._blocked else ch.fill

    def receive_nowait(self) -> Batch | TaggedControl | None:
        """The next item if one is queued, else None.  Raises EndOfStream at the end.

        A checkpoint barrier from a fan-in's input is returned only once it has come
        from every open input (see the module docs on alignment).
        """
        ch = self._ch
        queue, replay = ch.queue, self._replay
        while True:
            if replay:
                item, idx = replay.popleft()
            elif queue:
                raw = queue.popleft()
                if type(raw) is _InputMark:
                    self._cur = raw.input_index
                    continue
                item = raw  # type: ignore[assignment]
                idx = item.input_index if type(item) is TaggedControl else self._cur
            else:
                break
            if self._blocked and idx in self._blocked:
                self._hold(item, idx)
                continue
            if type(item) is Batch:
                n = len(item)
                ch.fill -= n
                ch.records_received += n
                if ch.writer_waiters:
                    ch.wake_writers()
                self.input_index = idx
                return item
            assert isinstance(item, TaggedControl)
            if (
                type(item.message) is Barrier
                and len(ch.closed) > 1
                and not self._align(item.message, idx)
            ):
                continue
            return item
        if self._aligning is not None and self._aligned():
            return self._release(self._aligning)
        if ch.writers_open == 0:
            raise EndOfStream(ch.name)
        return None

    # -- barrier alignment -------------------------------------------------------------

    def _hold(self, item: Batch | TaggedControl, idx: int) -> None:
        self._stash.append((item, idx))
        if type(item) is Batch:
            ch = self._ch
            n = len(item)
            ch.fill -= n
            ch.held[idx] += n
            if ch.writer_waiters:
                ch.wake_writers()

    def _align(self, barrier: Barrier, idx: int) -> bool:
        """A barrier from input ``idx``: True when it is now aligned (return it)."""
        current = self._aligning
        if current is None:
            self._aligning = barrier
        elif current != barrier:
            raise AssertionError(
                f"channel {self._ch.name!r}: barrier {barrier.checkpoint_id} from input "
                f"{idx} while aligning barrier {current.checkpoint_id}"
            )
        self._blocked.add(idx)
        if self._aligned():
            self._release(barrier)
            return True
        return False

    def _aligned(self) -> bool:
        closed, blocked = self._ch.closed, self._blocked
        return all(closed[i] or i in blocked for i in range(len(closed)))

    def _release(self, barrier: Barrier) -> TaggedControl:
        ch = self._ch
        for item, idx in self._stash:
            if type(item) is Batch:
                n = len(item)
                ch.held[idx] -= n
                ch.fill += n
        self._replay.extendleft(reversed(self._stash))
        self._stash = []
        self._blocked = set()
        self._aligning = None
        return TaggedControl(barrier, -1)

    async def receive(self, deadline: float | None = None) -> Batch | TaggedControl | None:
        """Wait for the next item; None if ``deadline`` (clock time) passed first, or if
        :meth:`interrupt` was called."""
        ch = self._ch
        while True:
            item = self.receive_nowait()
            if item is not None:
                return item
            if self._interrupted:
                self._interrupted = False
                return None
            if deadline is not None and ch.clock.monotonic() >= deadline:
                return None
            # Woken by data, by a writer closing (maybe not the last), or by the deadline.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ch.reader_waiter = waiter
            try:
                await ch.clock.wait_until(waiter, deadline)
            finally:
                ch.reader_waiter = None

    def close(self) -> None:
        """The reader is gone: blocked and future writers get BrokenResourceError."""
        self._ch.broken = True
        self._ch.wake_writers()

    def statistics(self) -> ChannelStatistics:
        ch = self._ch
        blocked = ch.blocked_seconds
        if ch.blocked_since:
            now = ch.clock.monotonic()
            blocked += sum(now - t for t in ch.blocked_since.values())
        return ChannelStatistics(
            name=ch.name,
            capacity=ch.capacity,
            overflow=ch.overflow,
            fill=ch.fill,
            max_fill=ch.max_fill,
            records_sent=ch.records_sent,
            records_received=ch.records_received,
            records_dropped=ch.records_dropped,
            blocked_seconds=blocked,
            writers_open=ch.writers_open,
        )


def open_channel(
    capacity: int,
    *,
    clock: Clock,
    name: str,
    overflow: Overflow = Overflow.BLOCK,
    writers: int = 1,
    flow: str = "",
    block_timeout: float | None = None,
) -> tuple[list[ChannelWriter], ChannelReader]:
    """Create a channel; returns one writer per input and the reader.

    ``block_timeout`` (dropping policies only): seconds a writer waits for room before
    it drops.

    Raises:
        ValueError: if ``capacity < 1`` or ``writers < 1``, or ``block_timeout`` is
            negative or given with a policy that does not drop.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"channel capacity must be an int (records), got {capacity!r}")
    if capacity < 1:
        raise ValueError(f"channel capacity must be >= 1 record, got {capacity!r}")
    if writers < 1:
        raise ValueError(f"a channel needs at least one writer, got {writers!r}")
    if block_timeout is not None:
        if overflow not in (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST):
            raise ValueError(
                f"block_timeout applies to DROP_NEWEST and DROP_OLDEST, not {overflow.name}"
            )
        if not block_timeout >= 0:
            raise ValueError(f"block_timeout must be >= 0 seconds, got {block_timeout!r}")
    ch = _Channel(capacity, overflow, clock, name, flow, writers, block_timeout)
    return [ChannelWriter(ch, i) for i in range(writers)], ChannelReader(ch)
