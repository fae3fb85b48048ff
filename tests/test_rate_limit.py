"""stream.rate_limit(limiter): shaping by backpressure, on the virtual clock."""

from __future__ import annotations

import asyncio
import itertools
from itertools import pairwise
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.flowcontrol import (
    FixedWindow,
    KeyedLimiter,
    LeakyBucket,
    SlidingWindowLog,
    TokenBucket,
)


def timed(limiter: Any, n: int, **run: Any) -> list[float]:
    flow = sw.Flow("paced")
    out = sw.testing.TimedCollect()
    flow.source(sw.sources.Iterable(range(n))).rate_limit(limiter).sink(out)
    sw.testing.run_flow(flow, **run)
    assert out.values == list(range(n))  # nothing dropped, order kept
    return [t for t, _ in out.items]


def test_a_token_bucket_paces_records_after_the_burst() -> None:
    times = timed(TokenBucket(rate=100, burst=10), 110)
    assert times[:10] == [0.0] * 10  # the burst goes at once
    assert times[-1] == pytest.approx(1.0)  # then 100 per second
    gaps = [b - a for a, b in pairwise(times[10:])]
    assert all(g == pytest.approx(0.01) for g in gaps)


@pytest.mark.parametrize("batch", [1, 7, 1024])
def test_no_window_of_a_second_lets_more_through_than_the_limit(batch: int) -> None:
    times = timed(SlidingWindowLog(limit=20, window=1.0), 100, max_batch_size=batch)
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1.0) <= 20
    assert times[-1] == pytest.approx(4.0)  # 100 records at 20 per second


def test_a_leaky_bucket_gives_a_steady_outflow() -> None:
    times = timed(LeakyBucket(rate=50, capacity=1000), 51)
    gaps = [b - a for a, b in pairwise(times)]
    assert all(g == pytest.approx(0.02) for g in gaps)


def test_waiting_holds_the_source_back() -> None:
    """Backpressure, not buffering: with 10 records/s through a channel of 16, the source
    is never more than the channel plus a batch ahead of the limiter."""
    clock = sw.VirtualClock()
    limiter = FixedWindow(limit=10, window=1.0)
    flow = sw.Flow("held", channel_capacity=16)
    ahead: list[int] = []
    boxes: list[sw.FlowHandle] = []

    def look(_: Any) -> None:
        m = boxes[0].metrics()
        ahead.append(m.operator("source_Iterable").records_out - m.operator("limited").records_out)

    (
        flow.source(sw.sources.Iterable(range(100)))
        .buffer(16)
        .rate_limit(limiter, name="limited")
        .inspect(look)
        .sink(sw.sinks.Collect())
    )

    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=clock, max_batch_size=8)
        boxes.append(handle)
        return await handle.wait()

    result = asyncio.run(main())
    assert result.elapsed == pytest.approx(9.0)  # 100 at 10 per window of 1 s
    assert max(ahead) <= 16 + 8 + 8


def test_a_keyed_limiter_gives_each_key_its_rate() -> None:
    limiter: KeyedLimiter[str] = KeyedLimiter(lambda: TokenBucket(rate=1, burst=1))
    flow = sw.Flow("per-key")
    out = sw.testing.TimedCollect()
    records = ["a", "b", "a", "b", "c"]
    (flow.source(sw.sources.Iterable(records)).key_by(lambda r: r).rate_limit(limiter).sink(out))
    sw.testing.run_flow(flow)
    # a and b go at once; their second records wait a second (and c, behind them, too)
    assert out.items == [(0.0, "a"), (0.0, "b"), (1.0, "a"), (1.0, "b"), (1.0, "c")]


def test_bad_uses_are_refused() -> None:
    flow = sw.Flow("bad")
    s = flow.source(sw.sources.Iterable([1]))
    with pytest.raises(TypeError, match="expects a limiter"):
        s.rate_limit(10)  # type: ignore[arg-type]
    with pytest.raises(sw.FlowDefinitionError, match="needs a keyed stream"):
        s.rate_limit(KeyedLimiter(lambda: TokenBucket(rate=1, burst=1)))


def endless() -> Any:
    return itertools.count()


def test_the_source_is_pulled_about_as_fast_as_the_limiter_admits() -> None:
    """Fused with the source, the limiter caps the pull: after a second at 10/s the
    source has handed over about 10 records, not a batch of 1,024, and a stop with a
    3 s grace period drains at once."""
    clock = sw.VirtualClock()
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("capped")
    (
        flow.source(sw.sources.Generator(endless), name="src")
        .rate_limit(TokenBucket(rate=10, burst=1), name="limited")
        .sink(out)
    )

    async def main() -> tuple[int, sw.RunResult]:
        handle = sw.start(flow, clock=clock, grace_period=3.0)
        await clock.sleep(1.0)
        pulled = handle.metrics().operator("src").records_out
        return pulled, await handle.stop()

    pulled, result = asyncio.run(main())
    assert pulled <= 12  # 10 admitted in the second, at most one waiting
    assert result.stopped  # drained within the grace period, not cancelled
    assert result.metrics.operator("src").records_out == len(out.items)
    assert out.items == list(range(len(out.items)))


def test_the_cap_still_lets_a_whole_burst_through_at_once() -> None:
    clock = sw.VirtualClock()
    sizes: list[int] = []

    class Sizes(sw.sinks.Sink):
        async def write(self, batch: Any) -> None:
            sizes.append(len(batch.values))

    flow = sw.Flow("burst")
    flow.source(sw.sources.Generator(endless)).rate_limit(TokenBucket(rate=100, burst=40)).sink(
        Sizes()
    )

    async def main() -> None:
        handle = sw.start(flow, clock=clock)
        await clock.sleep(0.5)
        await handle.stop()

    asyncio.run(main())
    assert sizes[0] == 40  # the whole burst in one pull, then what each wait frees
    assert max(sizes[1:]) <= 2
