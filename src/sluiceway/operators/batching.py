"""``stream.batch(max_size, max_delay)``: group records into lists.

A list is emitted when it reaches ``max_size`` records, or ``max_delay`` seconds (on the
flow's clock) after its first record arrived, whichever comes first; what is left is
flushed at end of input and on graceful shutdown.  With ``max_delay`` the operator needs a
processing-time timer, so it starts a stage of its own behind a channel.

The watermark never overtakes the records a batch holds: a watermark that arrives while
records wait goes on only up to the watermark of the earliest of them (the one its list
will carry), and the rest of it follows the list out.  So a list is late for a window
after it only if its first record already was, whatever the batch sizes or timing.

Marble diagram, ``max_size=3, max_delay=2``::

    input:   a b c d . . . e
    time:    0 0 0 1 2 3 4 5
    output:  [a,b,c]   [d]     (d flushed at t=3, two seconds after it arrived)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.time import Clock

__all__ = ["BatchSpec"]


class _BatchStep(Step):
    def __init__(self, ctx: BuildContext, max_size: int, max_delay: float | None) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.max_size = max_size
        self.max_delay = max_delay
        self.clock: Clock = ctx.clock
        self.values: list[Any] = []
        self.timestamps: list[int] | None = None
        self.watermarks: list[float] | None = None
        self.deadline: float | None = None
        self.held_wm: Watermark | None = None  # arrived while records wait: not sent yet
        self.sent_wm = -math.inf  # the latest watermark sent on

    def uses_timer(self) -> bool:
        return self.max_delay is not None

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        if not self.values and self.max_delay is not None:
            self.deadline = self.clock.monotonic() + self.max_delay
        self.values.extend(batch.values)
        if batch.timestamps is not None:
            if self.timestamps is None:
                self.timestamps = []
            self.timestamps.extend(batch.timestamps)
        if batch.watermarks is not None:
            if self.watermarks is None:
                self.watermarks = []
            self.watermarks.extend(batch.watermarks)
        size = self.max_size
        if len(self.values) < size:
            return
        full = len(self.values) - len(self.values) % size
        chunks = [self.values[i : i + size] for i in range(0, full, size)]
        ts, wms = self.timestamps, self.watermarks
        # A list's event time is its latest record's; its watermark, its first record's.
        out_ts = None if ts is None else [max(ts[i : i + size]) for i in range(0, full, size)]
        out_wms = None if wms is None else wms[0:full:size]
        del self.values[:full]
        if ts is not None:
            del ts[:full]
        if wms is not None:
            del wms[:full]
        if self.values and self.max_delay is not None:
            self.deadline = self.clock.monotonic() + self.max_delay
        elif not self.values:
            self.deadline = None
        await self._emit_lists(chunks, out_ts, out_wms)

    async def _emit_lists(
        self, chunks: list[list[Any]], ts: list[int] | None, wms: list[float] | None
    ) -> None:
        self.metrics.records_out += len(chunks)
        out = Batch(chunks, ts, None, wms)
        for child in self.children:
            await child.push(out)
        await self._release_watermark()

    async def control(self, message: Control) -> None:
        if type(message) is Watermark and self.values:
            self.held_wm = message
            await self._release_watermark()
            return
        await super().control(message)
        if type(message) is Watermark and not message.idle:
            self.sent_wm = max(self.sent_wm, message.time)

    async def _release_watermark(self) -> None:
        """Send on what the held watermark allows: all of it once no record waits, else
        up to the watermark of the earliest record waiting."""
        held = self.held_wm
        if held is None:
            return
        if not self.values or not self.watermarks:
            self.held_wm = None
            await self.control(held)
            return
        upto = min(held.time, self.watermarks[0])
        if upto > self.sent_wm:
            self.sent_wm = upto
            await super().control(Watermark(upto))

    async def flush(self) -> None:
        if not self.values:
            return
        chunk, self.values = self.values, []
        ts, self.timestamps = self.timestamps, None
        wms, self.watermarks = self.watermarks, None
        self.deadline = None
        await self._emit_lists(
            [chunk], None if ts is None else [max(ts)], None if wms is None else wms[:1]
        )

    def next_deadline(self) -> float | None:
        return self.deadline

    async def on_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            await self.flush()

    async def finish(self) -> None:
        await self.flush()
        await super().finish()

    def pending(self) -> int:
        return len(self.values)

    def output_weight(self, batch: Batch) -> int:
        return sum(len(chunk) for chunk in batch.values)  # a list stands for its records

    def snapshot(self) -> Any:
        if not self.values:
            return None
        return (self.values, self.timestamps, self.watermarks, self.held_wm, self.sent_wm)

    def restore(self, state: Any) -> None:
        self.values, self.timestamps, self.watermarks, *rest = state
        if rest:  # (a checkpoint of an earlier version holds no watermark)
            self.held_wm, self.sent_wm = rest
        if self.values and self.max_delay is not None:  # the delay restarts on this clock
            self.deadline = self.clock.monotonic() + self.max_delay


@dataclass(frozen=True, slots=True)
class BatchSpec(OpSpec):
    """Group records into lists of at most ``max_size``, waiting at most ``max_delay``."""

    max_size: int
    max_delay: float | None = None
    kind: ClassVar[str] = "batch"

    @property
    def boundary(self) -> bool:
        return self.max_delay is not None

    def build(self, ctx: BuildContext) -> Step:
        return _BatchStep(ctx, self.max_size, self.max_delay)
