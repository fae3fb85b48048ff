"""``stream.rate_limit(limiter)``: shape the stream to a rate, by backpressure.

Each record reserves one unit of the limiter (``reserve(1, now)``, on the flow's clock);
when the limiter says wait, the records admitted so far move on and the operator sleeps.
Sleeping holds up its stage, so the channel in front fills and the source is pulled more
slowly: nothing is dropped unless the user puts a dropping ``buffer`` in front.  Fused
into a source's stage, the step also limits how much the source is asked for
(``Step.demand``: what the limiter admits now, at least one record), so the source is
pulled about as fast as records are let through and a stop drains at once.  Order,
timestamps, keys and watermarks are kept.  On a keyed stream with a ``KeyedLimiter``,
each key has its own rate; a key that must wait holds up the records behind it (order
is kept).  A ``RedisLimiter`` (a limit shared by processes) costs a round trip to Redis
per record and limits the whole stream (its own ``key=`` picks the subject).
"""

from __future__ import annotations

from typing import Any, ClassVar

from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.runtime.messages import Batch
from sluiceway.time import Clock

__all__ = ["RateLimitSpec"]


class _AsyncRateLimitStep(Step):
    """A limiter whose decisions are remote and async (``RedisLimiter``): a round trip
    per record; when a record is not admitted at once, what was admitted goes on and the
    step waits in ``acquire``."""

    def __init__(self, ctx: BuildContext, limiter: Any) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.limiter = limiter
        self.sent = 0  # records of the push under way let through

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        limiter = self.limiter
        start = self.sent = 0
        for i in range(n):
            if not await limiter.try_acquire(1):
                if i > start:
                    part, start = batch.slice(start, i), i
                    self.sent = i
                    await self.emit(part)
                await limiter.acquire(1)
        self.sent = n
        await self.emit(batch if start == 0 else batch.slice(start))

    def in_process(self, n: int, passed: bool) -> int:
        return n - self.sent  # the records not let through yet


class _RateLimitStep(Step):
    def __init__(self, ctx: BuildContext, limiter: Any, keyed: bool) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.clock: Clock = ctx.clock
        self.limiter = limiter.bind(ctx.clock)
        self.keyed = keyed
        self.sent = 0  # records of the push under way let through

    def in_process(self, n: int, passed: bool) -> int:
        return n - self.sent  # the records not let through yet

    def demand(self) -> int | None:
        """The records the limiter admits now without a wait: the most ``n`` with
        ``delay(n, now) == 0`` (delay grows with ``n``, so a bisection finds it).  A
        keyed limiter's answer depends on keys not pulled yet: no limit then."""
        if self.keyed:
            return None
        limiter, now = self.limiter, self.clock.monotonic()
        lo, hi = 0, limiter.max_units  # delay(lo) == 0 (lo = 0: trivially)
        if limiter.delay(hi, now) == 0.0:
            return int(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if limiter.delay(mid, now) == 0.0:
                lo = mid
            else:
                hi = mid
        return lo

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        clock, limiter = self.clock, self.limiter
        keys = batch.keys
        start = self.sent = 0
        for i in range(n):
            now = clock.monotonic()
            if self.keyed:
                assert keys is not None
                wait = limiter.reserve(keys[i], 1, now)
            else:
                wait = limiter.reserve(1, now)
            if wait > 0:
                if i > start:  # what was admitted so far goes on now
                    part, start = batch.slice(start, i), i
                    self.sent = i
                    await self.emit(part)
                await clock.sleep(wait)
        self.sent = n
        await self.emit(batch if start == 0 else batch.slice(start))


class RateLimitSpec(OpSpec):
    """``stream.rate_limit(limiter)``."""

    kind: ClassVar[str] = "rate_limit"

    def __init__(self, limiter: Any, *, keyed: bool, remote: bool = False) -> None:
        self.limiter = limiter
        self.keyed = keyed
        self.remote = remote

    def build(self, ctx: BuildContext) -> Step:
        if self.remote:
            return _AsyncRateLimitStep(ctx, self.limiter)
        return _RateLimitStep(ctx, self.limiter, self.keyed)
