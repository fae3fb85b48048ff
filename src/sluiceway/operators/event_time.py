"""Event time: ``with_timestamps`` (timestamps and watermarks) and watermark fan-in.

Timestamps travel in ``Batch.timestamps`` as integer microseconds since the epoch (window
arithmetic is exact in integers).  Beside them, ``Batch.watermarks`` holds the watermark
as it stood just *before* each record, also in microseconds; a :class:`Watermark` control
message follows each batch with the watermark after it.  Lateness and firing therefore
depend only on the order of records, not on where batches were cut.

Strategy (bounded out-of-orderness): watermark = largest timestamp so far - bound.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from functools import partial
from itertools import accumulate
from typing import Any, ClassVar

from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.operators.base import BuildContext, OpSpec, Step, apply_each, without
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.stateless import make_passthrough
from sluiceway.policies import ErrorPolicy, Fail
from sluiceway.time import Clock
from sluiceway.time.ticks import _MAX_TICKS, _MIN_TICKS, to_ticks

__all__ = ["MergeSpec", "WithTimestampsSpec", "to_ticks"]

_INF = math.inf
_MICROS = 1e6


def _record_ticks(fn: Callable[[Any], object], value: Any) -> int:
    return to_ticks(fn(value))


class _WithTimestampsStep(Step):
    def __init__(
        self,
        ctx: BuildContext,
        fn: Callable[[Any], object],
        bound: int,
        idle_timeout: float | None,
        advance_when_idle: float | None,
    ) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.fn = fn
        self.errors: ErrorHandler = ctx.errors
        self.bound = bound
        self.clock: Clock = ctx.clock
        self.idle_timeout = idle_timeout
        self.advance = advance_when_idle
        self.max_t: float = -_INF  # largest timestamp so far (ticks)
        self.wm: float = -_INF  # watermark announced so far (ticks)
        self.idle = False
        self.last_arrival = self.clock.monotonic()
        self.next_advance = None if advance_when_idle is None else self.last_arrival

    async def _ticks(self, batch: Batch) -> tuple[Batch, list[int]]:
        """The batch (minus dead-lettered records) and its timestamps in ticks."""
        raw, failed = await apply_each(self.fn, batch.values, self.errors)
        if failed is not None:
            batch = without(batch, failed)
        # The common case, in C: finite int/float seconds.  Bools are numbers to Python:
        # a batch with one goes through the checks, which refuse it.
        if bool not in set(map(type, raw)):
            try:
                fast = list(map(float.__round__, map(_MICROS.__mul__, raw)))
            except (TypeError, ValueError, OverflowError):
                pass
            else:
                if min(fast) >= _MIN_TICKS and max(fast) <= _MAX_TICKS:
                    return batch, fast
        ticks: list[int] = []
        bad: list[int] = []
        for i, (v, t) in enumerate(zip(batch.values, raw, strict=True)):
            try:
                ticks.append(to_ticks(t))
            except (TypeError, ValueError) as exc:
                err = type(exc)(f"{exc}; record: {v!r}")
                ok, result = await self.errors.recover([v], err, partial(_record_ticks, self.fn, v))
                if ok:
                    ticks.append(result)
                else:
                    bad.append(i)
        return (batch if not bad else without(batch, bad)), ticks

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        batch, ts = await self._ticks(batch)
        if not ts:
            return
        before = self.max_t
        self.max_t = last = max(before, max(ts))  # noqa: PLW3301 - max(ts) runs in C
        b = self.bound
        if before - b >= self.wm:  # the usual case: the column follows from the data
            out = Batch(batch.values, ts, batch.keys, watermark_base=(before, b))
        else:  # a processing-time advance ran ahead of the data: the column is clamped
            floor = self.wm
            acc = list(accumulate(ts, max, initial=before))
            acc.pop()
            wms = [m - b if m - b > floor else floor for m in acc]
            out = Batch(batch.values, ts, batch.keys, wms)
        self.last_arrival = self.clock.monotonic()
        if self.advance is not None:
            self.next_advance = self.last_arrival + self.advance
        self.idle = False
        await self.emit(out)
        after = last - b
        if after > self.wm:
            self.wm = after
            self.metrics.watermark = after / _MICROS
            await self.control(Watermark(after))

    def uses_timer(self) -> bool:
        return self.idle_timeout is not None or self.advance is not None

    def snapshot(self) -> Any:
        return (self.max_t, self.wm, self.idle)

    def restore(self, state: Any) -> None:
        # Idleness and advancing count processing time from the restoring run's start.
        self.max_t, self.wm, self.idle = state
        if self.wm > -_INF:
            self.metrics.watermark = self.wm / _MICROS

    def next_deadline(self) -> float | None:
        d: float | None = None
        if self.idle_timeout is not None and not self.idle:
            d = self.last_arrival + self.idle_timeout
        if self.next_advance is not None and (d is None or self.next_advance < d):
            d = self.next_advance
        return d

    async def on_timer(self, now: float) -> None:
        if self.next_advance is not None and now >= self.next_advance:
            assert self.advance is not None
            self.next_advance = now + self.advance
            if self.max_t > -_INF:
                quiet = round((now - self.last_arrival) * _MICROS)
                moved = self.max_t - self.bound + quiet
                if moved > self.wm:
                    self.wm = moved
                    self.metrics.watermark = moved / _MICROS
                    await self.control(Watermark(moved))
        timeout = self.idle_timeout
        if timeout is not None and not self.idle and now >= self.last_arrival + timeout:
            self.idle = True
            await self.control(Watermark(self.wm, idle=True))

    async def finish(self) -> None:
        if self.wm < _INF:
            self.wm = _INF
            self.metrics.watermark = _INF
            await self.control(Watermark(_INF))
        await super().finish()


class WithTimestampsSpec(OpSpec):
    """``stream.with_timestamps(fn, max_out_of_orderness)``: event time and watermarks."""

    kind: ClassVar[str] = "with_timestamps"

    def __init__(
        self,
        fn: Callable[[Any], object],
        bound: int,
        *,
        idle_timeout: float | None = None,
        advance_when_idle: float | None = None,
        on_error: ErrorPolicy = Fail(),
    ) -> None:
        self.fn = fn
        self.bound = bound
        self.idle_timeout = idle_timeout
        self.advance_when_idle = advance_when_idle
        self.on_error = on_error

    @property
    def boundary(self) -> bool:  # timers for idleness need a stage of its own
        return self.idle_timeout is not None or self.advance_when_idle is not None

    def build(self, ctx: BuildContext) -> Step:
        return _WithTimestampsStep(
            ctx, self.fn, self.bound, self.idle_timeout, self.advance_when_idle
        )


class _Waiting:
    """One input's records that wait in a merge: parallel columns from ``head`` on.

    ``order`` is the running maximum of the watermark column: the key the merge sorts
    by (the same as the column when it grows, as it does; it keeps an input's records
    in their order even when it does not)."""

    __slots__ = ("head", "keys", "order", "timestamps", "values", "watermarks")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.timestamps: list[int] = []
        self.keys: list[Any] | None = None
        self.watermarks: list[float] = []
        self.order: list[float] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.values) - self.head

    def first(self) -> float:
        return self.order[self.head]

    def add(self, batch: Batch, col: list[float]) -> None:
        if self.head and self.head * 2 >= len(self.values):  # drop what has left
            h = self.head
            del self.values[:h], self.timestamps[:h], self.watermarks[:h], self.order[:h]
            if self.keys is not None:
                del self.keys[:h]
            self.head = 0
        last = self.order[-1] if self.order else -_INF
        self.values += batch.values
        assert batch.timestamps is not None
        self.timestamps += batch.timestamps
        if batch.keys is not None:
            if self.keys is None:
                self.keys = [None] * len(self.watermarks)
            self.keys += batch.keys
        elif self.keys is not None:
            self.keys += [None] * len(batch.values)
        self.watermarks += col
        ordered = accumulate(col, max, initial=last)
        next(ordered)
        self.order += ordered

    def take(self, stop: int) -> _Run:
        h, self.head = self.head, stop
        keys = None if self.keys is None else self.keys[h:stop]
        return (
            self.values[h:stop],
            self.timestamps[h:stop],
            keys,
            self.watermarks[h:stop],
            self.order[h:stop],
        )

    def state(self) -> Any:
        h = self.head
        keys = None if self.keys is None else self.keys[h:]
        return (self.values[h:], self.timestamps[h:], keys, self.watermarks[h:])

    @classmethod
    def restored(cls, state: Any) -> _Waiting:
        w = cls()
        values, ts, keys, col = state
        if values:
            w.add(Batch(values, ts, keys, col), col)
        return w


_Run = tuple[list[Any], list[int], list[Any] | None, list[float], list[float]]
"""Records leaving a merge from one input: values, timestamps, keys, watermarks, and
the sort key (``_Waiting.order``)."""


class _MergeStep(Step):
    """Fan-in of timestamped inputs, in an order that depends only on each input's records.

    How the inputs' records interleave in the channel depends on batch sizes and timing;
    so the merge does not pass them on in that order.  It passes them on sorted by the
    watermark each record carries, then by input, then in each input's order (a k-way
    merge: each input's watermarks only grow).  A record waits until no other input can
    still deliver one that sorts before it: until every other input has announced a
    later watermark (by a record or a control message), or is idle, or has ended.  So
    each record keeps its own watermark, which is also the minimum over the inputs --
    and which records are late, and when windows fire, does not depend on the batches.

    Memory stays bounded: when an input has more than ``hold`` records waiting (it runs
    that far ahead of another input in event time), its oldest go on at once, with the
    watermark capped at the other inputs' (the order then depends on timing).  An input
    marked idle is left out until its next record; an ended input announced +inf.  The
    merged watermark never goes back.
    """

    def __init__(self, ctx: BuildContext, inputs: int, hold: int) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.wms: list[float] = [-_INF] * inputs
        self.idle = [False] * inputs
        self.out: float = -_INF
        self.hold = hold
        self.waiting = [_Waiting() for _ in range(inputs)]

    def snapshot(self) -> Any:
        return (list(self.wms), list(self.idle), self.out, [w.state() for w in self.waiting])

    def restore(self, state: Any) -> None:
        self.wms, self.idle, self.out, *waiting = state
        if waiting:  # (a checkpoint of an earlier version has no records waiting)
            self.waiting = [_Waiting.restored(w) for w in waiting[0]]
        if self.out > -_INF:
            self.metrics.watermark = self.out / _MICROS

    def pending(self) -> int:
        return sum(map(len, self.waiting))

    def _bounds(self) -> list[tuple[float, int]]:
        """Per input, the smallest ``(watermark, input)`` it can still send: its records
        to come carry at least its watermark; an idle input is not waited for."""
        pairs = zip(self.wms, self.idle, strict=True)
        return [(_INF if idle else wm, j) for j, (wm, idle) in enumerate(pairs)]

    async def push_input(self, batch: Batch, index: int) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        self.idle[index] = False
        col = batch.watermarks
        assert col is not None, "merge of timestamped streams received a batch without them"
        self.waiting[index].add(batch, col)
        self.wms[index] = max(self.wms[index], col[-1])
        await self._release(index)

    async def control_input(self, message: Control, index: int) -> None:
        if not isinstance(message, Watermark):
            await self.control(message)
            return
        if message.idle:
            self.idle[index] = True
        elif message.time > self.wms[index]:
            self.wms[index] = message.time
        await self._release(None)
        waiting = self.waiting
        if all(self.idle[i] and not waiting[i] for i in range(len(waiting))):
            await self.control(Watermark(self.out, idle=True))  # so is the merged stream
            return
        # The merged watermark: what no input can still go below (records waiting, or
        # to come).
        low = min(
            min(w.first(), b) if w else b for w, (b, _) in zip(waiting, self._bounds(), strict=True)
        )
        if low > self.out:
            self.out = low
            self.metrics.watermark = low / _MICROS
            await self.control(Watermark(low))

    async def _release(self, pushed: int | None) -> None:
        """Send on every record no other input can still sort before (see the class):
        from each input, the waiting records that sort before every other input's bound;
        together, in order."""
        bounds = self._bounds()
        runs: list[_Run] = []
        for i, w in enumerate(self.waiting):
            if not w:
                continue
            bound, j = min(bounds[:i] + bounds[i + 1 :], default=(_INF, i + 1))
            # (wm, i) < (bound, j): by watermark, then by input
            order = w.order
            stop = (
                bisect_right(order, bound, w.head) if i < j else bisect_left(order, bound, w.head)
            )
            if stop > w.head:
                runs.append(w.take(stop))
        if pushed is not None and len(self.waiting[pushed]) > self.hold:
            # Too far ahead: its oldest go on now, capped at the others' watermark.
            w = self.waiting[pushed]
            bound = min((b for b, j in bounds if j != pushed), default=_INF)
            vals, ts, keys, col, order = w.take(len(w.values) - self.hold)
            capped = [c if c < bound else bound for c in col]
            runs.append((vals, ts, keys, capped, [o if o < bound else bound for o in order]))
        if runs:
            await self._send(runs)

    async def _send(self, runs: list[_Run]) -> None:
        keys: list[Any] | None
        if len(runs) == 1:
            values, ts, keys, col, _ = runs[0]
        else:
            values, ts, col, order = [], [], [], []
            keys = [] if any(r[2] is not None for r in runs) else None
            for v, t, k, c, o in runs:
                values += v
                ts += t
                col += c
                order += o
                if keys is not None:
                    keys += k if k is not None else [None] * len(v)
            # A stable sort by the key: ties keep the input order, then each input's.
            perm = sorted(range(len(order)), key=order.__getitem__)
            pick = perm.__iter__
            values = list(map(values.__getitem__, pick()))
            ts = list(map(ts.__getitem__, pick()))
            col = list(map(col.__getitem__, pick()))
            if keys is not None:
                keys = list(map(keys.__getitem__, pick()))
        # The merged column never goes back (an input back from idleness may carry less
        # than what went before, or an input's column may not grow): clamped up.
        clamped = accumulate(col, max, initial=self.out)
        next(clamped)
        col = list(clamped)
        self.out = col[-1]
        await self.emit(Batch(values, ts, keys, col))

    async def finish(self) -> None:
        # Every input has ended: what waits goes on, in order.
        self.wms = [_INF] * len(self.wms)
        self.idle = [False] * len(self.wms)
        await self._release(None)
        await super().finish()


class MergeSpec(OpSpec):
    """``stream.merge(*others)``: fan-in through one channel with one writer per input."""

    kind: ClassVar[str] = "merge"

    def __init__(self, capacity: int | None, inputs: int, event_time: bool, hold: int) -> None:
        self.capacity = capacity
        self.inputs = inputs
        self.event_time = event_time
        self.hold = hold
        """Records an input may have waiting for the others' watermarks (the merge's
        channel capacity)."""

    @property
    def boundary(self) -> bool:
        return True

    @property
    def channel_capacity(self) -> int | None:
        return self.capacity

    def build(self, ctx: BuildContext) -> Step:
        if self.event_time:
            return _MergeStep(ctx, self.inputs, self.hold)
        return make_passthrough(ctx.name, ctx.metrics)
