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

With ``when_limited="reject"`` (:class:`_RejectingRateLimitStep`) a record the limiter
does not admit *now* is not waited for: it is handed back to the broker
(:meth:`Source.redeliver_later`) to come again after ``retry_after`` seconds, and the
records after it go on.  The operator must follow the broker source directly (or through
``key_by``), so that a record's place in the batch is its place in the source's batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sluiceway.core.messages import Batch
from sluiceway.operators.base import BuildContext, OpSpec, Step, without
from sluiceway.time import Clock

if TYPE_CHECKING:
    from sluiceway.core.contract import Source

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


class _RejectingRateLimitStep(Step):
    """``when_limited="reject"``: admit what the limiter admits now, hand the rest back
    to the broker for later, and (unkeyed) wait for the limiter before the next pull --
    holding no record meanwhile."""

    def __init__(self, ctx: BuildContext, spec: RateLimitSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.clock: Clock = ctx.clock
        self.limiter = spec.limiter.bind(ctx.clock)
        self.keyed = spec.keyed
        assert spec.source is not None
        self.source: Source = spec.source
        self.retry_after = spec.retry_after
        self.rejected = 0
        """Records handed back to the broker so far."""

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        now = self.clock.monotonic()
        limiter, keys = self.limiter, batch.keys
        taken: list[int] = []
        back: list[int] = []
        for i in range(n):
            if self.keyed:
                assert keys is not None
                ok = limiter.try_take(keys[i], 1, now)
            else:
                ok = limiter.try_take(1, now)
            (taken if ok else back).append(i)
        if back:
            await self.source.redeliver_later(back, self.retry_after)
            self.rejected += len(back)
            self.metrics.rejected += len(back)
        if taken:
            await self.emit(without(batch, back) if back else batch)
        if back and (not taken or not self.keyed):
            # Nothing is held now.  Do not pull again before a rejected record could pass
            # (unkeyed: any record), or a broker that offers them again at once (AMQP)
            # would be asked for them in a tight loop.
            now = self.clock.monotonic()
            if self.keyed:
                assert keys is not None
                wait = min(limiter.delay(keys[i], 1, now) for i in back)
            else:
                wait = limiter.delay(1, now)
            await self.clock.sleep(wait)

    def demand(self) -> int | None:
        if self.keyed:
            return None
        limiter, now = self.limiter, self.clock.monotonic()
        lo, hi = 0, limiter.max_units
        if limiter.delay(hi, now) == 0.0:
            return int(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if limiter.delay(mid, now) == 0.0:
                lo = mid
            else:
                hi = mid
        return lo


class RateLimitSpec(OpSpec):
    """``stream.rate_limit(limiter, when_limited=..., retry_after=...)``."""

    kind: ClassVar[str] = "rate_limit"

    def __init__(
        self,
        limiter: Any,
        *,
        keyed: bool,
        remote: bool = False,
        source: Source | None = None,
        retry_after: float = 1.0,
    ) -> None:
        self.limiter = limiter
        self.keyed = keyed
        self.remote = remote
        self.source = source
        """With ``when_limited="reject"``: the broker source records are handed back to."""
        self.retry_after = retry_after

    def build(self, ctx: BuildContext) -> Step:
        if self.source is not None:
            return _RejectingRateLimitStep(ctx, self)
        if self.remote:
            return _AsyncRateLimitStep(ctx, self.limiter)
        return _RateLimitStep(ctx, self.limiter, self.keyed)
