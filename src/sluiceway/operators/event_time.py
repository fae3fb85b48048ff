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
from collections.abc import Callable
from datetime import datetime
from functools import partial
from itertools import accumulate
from typing import Any, ClassVar

from sluiceway.operators.base import BuildContext, OpSpec, Step, apply_each, without
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.stateless import make_passthrough
from sluiceway.policies import ErrorPolicy, Fail
from sluiceway.runtime.messages import Batch, Control, Watermark
from sluiceway.time import Clock
from sluiceway.windows.assigners import ticks

__all__ = ["MergeSpec", "WithTimestampsSpec", "to_ticks"]

_INF = math.inf
_MICROS = 1e6


def to_ticks(t: object) -> int:
    """An event time (epoch seconds or aware datetime) as integer microseconds.

    Raises:
        TypeError / ValueError: naming what was wrong with ``t``.
    """
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(
                f"timestamp {t!r} is a naive datetime; give it a timezone "
                "(e.g. datetime(..., tzinfo=timezone.utc)) or use epoch seconds"
            )
        return ticks(t.timestamp())
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise TypeError(
            f"timestamp must be epoch seconds (int or float) or an aware datetime, "
            f"got {type(t).__name__} {t!r}"
        )
    if not math.isfinite(t):
        raise ValueError(f"timestamp must be a finite number of seconds, got {t!r}")
    return ticks(t)


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
                return batch, list(map(float.__round__, map(_MICROS.__mul__, raw)))
            except (TypeError, ValueError, OverflowError):
                pass
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


class _MergeStep(Step):
    """Fan-in of timestamped inputs: the watermark is the minimum over active inputs.

    Each input's watermark is the latest it announced (in a record's column or a control
    message); an input marked idle is left out until its next record; an ended input
    announces +inf.  The merged watermark never goes back.
    """

    def __init__(self, ctx: BuildContext, inputs: int) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.wms: list[float] = [-_INF] * inputs
        self.idle = [False] * inputs
        self.out: float = -_INF

    def snapshot(self) -> Any:
        return (self.wms, self.idle, self.out)

    def restore(self, state: Any) -> None:
        self.wms, self.idle, self.out = state
        if self.out > -_INF:
            self.metrics.watermark = self.out / _MICROS

    def _others(self, i: int) -> float:
        low = _INF
        for j, w in enumerate(self.wms):
            if j != i and not self.idle[j] and w < low:
                low = w
        return low

    async def push_input(self, batch: Batch, index: int) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        self.idle[index] = False
        col = batch.watermarks
        assert col is not None, "merge of timestamped streams received a batch without them"
        floor = self.out
        cap = max(self._others(index), floor)  # floor: an idle input may have let it pass
        if col[0] < floor or col[-1] > cap:
            col = [floor if w < floor else cap if w > cap else w for w in col]
            batch = Batch(batch.values, batch.timestamps, batch.keys, col)
        self.wms[index] = max(self.wms[index], col[-1])
        self.out = col[-1]
        await self.emit(batch)

    async def control_input(self, message: Control, index: int) -> None:
        if not isinstance(message, Watermark):
            await self.control(message)
            return
        if message.idle:
            self.idle[index] = True
        elif message.time > self.wms[index]:
            self.wms[index] = message.time
        active = [w for w, idle in zip(self.wms, self.idle, strict=True) if not idle]
        if not active:  # every input idle: so is the merged stream
            await self.control(Watermark(self.out, idle=True))
            return
        low = min(active)
        if low > self.out:
            self.out = low
            self.metrics.watermark = low / _MICROS
            await self.control(Watermark(low))


class MergeSpec(OpSpec):
    """``stream.merge(*others)``: fan-in through one channel with one writer per input."""

    kind: ClassVar[str] = "merge"

    def __init__(self, capacity: int | None, inputs: int, event_time: bool) -> None:
        self.capacity = capacity
        self.inputs = inputs
        self.event_time = event_time

    @property
    def boundary(self) -> bool:
        return True

    @property
    def channel_capacity(self) -> int | None:
        return self.capacity

    def build(self, ctx: BuildContext) -> Step:
        if self.event_time:
            return _MergeStep(ctx, self.inputs)
        return make_passthrough(ctx.name, ctx.metrics)
