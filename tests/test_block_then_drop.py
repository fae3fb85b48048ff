"""Dropping channels with ``block_timeout``: wait up to the timeout for room, then drop
(and count) what still does not fit -- Go's select with time.After."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.runtime.channel import Overflow, open_channel
from sluiceway.runtime.messages import Batch
from sluiceway.testing import run_watched


def test_a_full_channel_waits_exactly_the_timeout_then_drops_and_counts() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        (writer,), reader = open_channel(
            2, clock=clock, name="c", overflow=Overflow.DROP_NEWEST, block_timeout=0.01
        )
        await writer.send(Batch([1, 2]))
        await writer.send(Batch([3, 4, 5]))  # nobody reads: waits 10 ms, then drops
        assert clock.monotonic() == pytest.approx(0.01)
        stats = reader.statistics()
        assert (stats.fill, stats.records_dropped) == (2, 3)
        assert stats.blocked_seconds == pytest.approx(0.01)  # the wait is backpressure
        assert reader.receive_nowait().values == [1, 2]  # type: ignore[union-attr]

    asyncio.run(main())


def test_room_within_the_timeout_drops_nothing_and_returns_at_once() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        (writer,), reader = open_channel(
            2, clock=clock, name="c", overflow=Overflow.DROP_OLDEST, block_timeout=1.0
        )
        await writer.send(Batch([1, 2]))

        async def read_later() -> list[Any]:
            await clock.sleep(0.3)
            got: list[Any] = []
            while len(got) < 5:
                item = await reader.receive()
                assert isinstance(item, Batch)
                got += item.values
            return got

        task = asyncio.ensure_future(read_later())
        await writer.send(Batch([3, 4, 5]))  # waits for the reader, not for the timeout
        assert clock.monotonic() == pytest.approx(0.3)
        writer.close()
        assert await task == [1, 2, 3, 4, 5]
        assert reader.statistics().records_dropped == 0

    asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 5),
    timeout=st.sampled_from([0.0, 0.005, 0.01, 0.05]),
    policy=st.sampled_from([Overflow.DROP_NEWEST, Overflow.DROP_OLDEST]),
    sends=st.lists(st.integers(1, 8), min_size=1, max_size=12),
    reads=st.lists(st.tuples(st.sampled_from([0.001, 0.004, 0.02, 0.1]), st.integers(1, 6))),
)
def test_never_waits_longer_than_the_timeout_and_every_record_is_counted(
    capacity: int, timeout: float, policy: Overflow, sends: list[int], reads: list[Any]
) -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        (writer,), reader = open_channel(
            capacity, clock=clock, name="c", overflow=policy, block_timeout=timeout
        )
        received: list[int] = []

        async def reader_task() -> None:
            for pause, n in reads:
                await clock.sleep(pause)
                for _ in range(n):
                    item = reader.receive_nowait()
                    if isinstance(item, Batch):
                        received.extend(item.values)

        task = asyncio.ensure_future(reader_task())
        seq = 0
        for n in sends:
            t0 = clock.monotonic()
            await writer.send(Batch(list(range(seq, seq + n))))
            seq += n
            assert clock.monotonic() - t0 <= timeout + 1e-9  # never longer than the timeout
        await task
        stats = reader.statistics()
        assert stats.fill <= capacity
        # every record offered is received, still queued, or counted as dropped
        assert len(received) + stats.fill + stats.records_dropped == seq

    asyncio.run(main())


def test_block_timeout_is_only_for_dropping_policies() -> None:
    stream = sw.Flow("x").source(sw.sources.Iterable([1]))
    with pytest.raises(sw.FlowDefinitionError, match=r"needs Overflow\.DROP_NEWEST or DROP_OLDEST"):
        stream.buffer(4, sw.Overflow.BLOCK, block_timeout=0.01)
    with pytest.raises(ValueError, match="block_timeout must be finite and >= 0 seconds, got -1"):
        stream.buffer(4, sw.Overflow.DROP_OLDEST, block_timeout=-1)
    flow = sw.Flow("described")
    flow.source(sw.sources.Iterable([1])).buffer(
        4, sw.Overflow.DROP_OLDEST, block_timeout=0.01, name="soft"
    ).sink(sw.sinks.Collect())
    assert "(capacity 4, drop_oldest after 0.01s)" in sw.plan.plan(flow).describe()


@pytest.mark.slow
def test_block_then_drop_on_the_real_clock() -> None:
    clock = sw.SystemClock()

    async def slow(x: int) -> None:
        await clock.sleep(0.02)

    flow = sw.Flow("rt_block_then_drop")
    (
        flow.source(sw.sources.Generator(lambda: iter(range(10**9)), rate=200))
        .buffer(4, sw.Overflow.DROP_NEWEST, block_timeout=0.01, name="soft")
        .sink(sw.sinks.Function(slow), name="out")
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    ch = result.metrics.channel("soft.in")
    written = result.metrics.operator("out").records_in
    assert ch.records_dropped > 0  # 200/s into a 50/s sink: some had to go
    assert written > 10
    assert ch.blocked_seconds > 0  # and the writer did wait before dropping
    sent = result.metrics.operator("source_Generator").records_out
    assert sent == written + ch.records_dropped + ch.fill  # every record is accounted for
