"""Bounded channels (``open_channel``): capacity in records, overflow policies, control
messages, fan-in, close semantics, blocked-time accounting, deadlines.

Everything runs on a :class:`VirtualClock`; nothing sleeps in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.errors import (
    BrokenResourceError,
    ChannelOverflowError,
    ClosedResourceError,
    EndOfStream,
    FlowFailedError,
)
from sluiceway.runtime.channel import (
    ChannelReader,
    ChannelWriter,
    Overflow,
    TaggedControl,
    open_channel,
)
from sluiceway.runtime.messages import Barrier, Batch, Watermark
from sluiceway.time import VirtualClock

DROPPING = [Overflow.DROP_NEWEST, Overflow.DROP_OLDEST]


def make(
    capacity: int,
    overflow: Overflow = Overflow.BLOCK,
    *,
    writers: int = 1,
    clock: VirtualClock | None = None,
    name: str = "map_a.in",
) -> tuple[VirtualClock, list[ChannelWriter], ChannelReader]:
    clock = clock or VirtualClock()
    ws, r = open_channel(
        capacity, clock=clock, name=name, overflow=overflow, writers=writers, flow="f"
    )
    return clock, ws, r


def drain(r: ChannelReader) -> list[Batch | TaggedControl]:
    """Everything queued right now (stops at an empty queue or at the end of stream)."""
    out: list[Batch | TaggedControl] = []
    while True:
        try:
            item = r.receive_nowait()
        except EndOfStream:
            return out
        if item is None:
            return out
        out.append(item)


def values(items: list[Batch | TaggedControl]) -> list[Any]:
    return [v for i in items if isinstance(i, Batch) for v in i.values]


def shape(items: list[Batch | TaggedControl]) -> list[Any]:
    """Batches as their value lists, control messages as (message, input index)."""
    return [i.values if isinstance(i, Batch) else (i.message, i.input_index) for i in items]


async def settle(n: int = 10) -> None:
    """Let every runnable task run (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


# -- capacity and BLOCK ---------------------------------------------------------------


def test_batch_that_fits_is_queued_whole() -> None:
    async def main() -> None:
        _, (w,), r = make(5)
        await w.send(Batch([1, 2, 3]))
        assert r.fill == 3
        assert w.room == 2
        assert shape(drain(r)) == [[1, 2, 3]]
        assert r.fill == 0

    asyncio.run(main())


def test_empty_batch_is_a_no_op() -> None:
    async def main() -> None:
        _, (w,), r = make(1, Overflow.FAIL)
        await w.send(Batch([1]))
        await w.send(Batch([]))  # a full FAIL channel: an empty batch is not an overflow
        s = r.statistics()
        assert (s.fill, s.records_sent, s.records_dropped) == (1, 1, 0)

    asyncio.run(main())


def test_block_splits_a_batch_larger_than_the_room_and_waits_for_the_rest() -> None:
    async def main() -> None:
        _, (w, *_), r = make(3)
        await w.send(Batch([0]))
        sender = asyncio.ensure_future(
            w.send(
                Batch(
                    [1, 2, 3, 4, 5, 6, 7],
                    timestamps=[float(i) for i in range(1, 8)],
                    keys=list("abcdefg"),
                )
            )
        )
        await settle()
        assert not sender.done(), "the writer must wait for room for the rest"
        assert r.fill == 3
        got: list[Batch] = []
        while not sender.done() or r.fill:
            item = r.receive_nowait()
            if item is None:
                await settle()
                continue
            assert isinstance(item, Batch)
            got.append(item)
            assert r.fill <= 3
            await settle()
        await sender
        assert [v for b in got for v in b.values] == [0, 1, 2, 3, 4, 5, 6, 7]
        assert all(len(b) <= 3 for b in got)
        # columns stay aligned through the split
        for b in got[1:]:
            assert b.timestamps == [float(v) for v in b.values]
            assert b.keys == ["abcdefg"[v - 1] for v in b.values]
        s = r.statistics()
        assert s.max_fill == 3
        assert (s.records_sent, s.records_received, s.records_dropped) == (8, 8, 0)

    asyncio.run(main())


def test_block_waits_exactly_until_room_is_freed() -> None:
    async def main() -> None:
        clock, (w,), r = make(2)
        await w.send(Batch([1, 2]))

        async def reader() -> list[tuple[float, list[Any]]]:
            seen = []
            for _ in range(3):
                await clock.sleep(1.0)
                item = r.receive_nowait()
                assert isinstance(item, Batch)
                seen.append((clock.monotonic(), item.values))
            return seen

        task = asyncio.ensure_future(reader())
        await w.send(Batch([3, 4, 5]))  # room for none: 3,4 at t=1, 5 at t=2
        assert clock.monotonic() == 2.0
        w.close()
        assert await task == [(1.0, [1, 2]), (2.0, [3, 4]), (3.0, [5])]

    asyncio.run(main())


# -- dropping policies ----------------------------------------------------------------


def test_drop_newest_keeps_what_fits_and_drops_the_rest_of_the_batch() -> None:
    async def main() -> None:
        _, (w,), r = make(3, Overflow.DROP_NEWEST)
        await w.send(Batch([1, 2]))
        await w.send(Batch([3, 4, 5]))  # room 1: keep 3, drop 4 and 5
        await w.send(Batch([6]))  # full: dropped
        s = r.statistics()
        assert (s.fill, s.records_sent, s.records_dropped) == (3, 3, 3)
        assert shape(drain(r)) == [[1, 2], [3]]

    asyncio.run(main())


def test_drop_newest_batch_larger_than_the_whole_capacity() -> None:
    async def main() -> None:
        _, (w,), r = make(3, Overflow.DROP_NEWEST)
        await w.send(Batch(list(range(10))))
        assert r.statistics().records_dropped == 7
        assert shape(drain(r)) == [[0, 1, 2]]

    asyncio.run(main())


def test_drop_oldest_drops_the_oldest_queued_records() -> None:
    async def main() -> None:
        _, (w,), r = make(4, Overflow.DROP_OLDEST)
        await w.send(Batch([1]))
        await w.send(Batch([2, 3]))
        # 2 too many: 4 goes into the free room; the reader takes nothing in its turn, so
        # 1 (whole batch) and 2 (split) are dropped to make room for 5 and 6
        await w.send(Batch([4, 5, 6]))
        s = r.statistics()
        assert (s.fill, s.records_dropped) == (4, 2)
        assert shape(drain(r)) == [[3], [4], [5, 6]]

    asyncio.run(main())


def test_drop_oldest_batch_larger_than_the_whole_capacity_keeps_its_newest() -> None:
    async def main() -> None:
        _, (w,), r = make(3, Overflow.DROP_OLDEST)
        await w.send(Batch([1, 2]))
        await w.send(Batch([3, 4, 5, 6, 7, 8]))
        # the queued 1, 2 and the incoming 3, 4, 5 are dropped: the newest 3 survive
        assert r.statistics().records_dropped == 5
        assert shape(drain(r)) == [[6, 7, 8]]

    asyncio.run(main())


def test_drop_oldest_keeps_columns_aligned() -> None:
    async def main() -> None:
        _, (w,), r = make(2, Overflow.DROP_OLDEST)
        await w.send(Batch([1, 2], timestamps=[1.0, 2.0], keys=["a", "b"]))
        await w.send(Batch([3], timestamps=[3.0], keys=["c"]))
        got = drain(r)
        first = got[0]
        assert isinstance(first, Batch)
        assert (first.values, first.timestamps, first.keys) == ([2], [2.0], ["b"])

    asyncio.run(main())


def test_drop_oldest_accounting_counts_each_record_once() -> None:
    async def main() -> None:
        _, (w,), r = make(3, Overflow.DROP_OLDEST)
        await w.send(Batch([1, 2, 3]))
        await w.send(Batch([4, 5]))  # evicts 1 and 2
        w.close()
        drain(r)
        s = r.statistics()
        assert s.records_dropped == 2
        assert s.records_received == 3
        assert s.records_sent + s.records_dropped == 5
        assert s.records_received == s.records_sent

    asyncio.run(main())


# -- FAIL -----------------------------------------------------------------------------


def test_fail_raises_naming_the_edge_and_capacity() -> None:
    async def main() -> None:
        _, (w,), r = make(2, Overflow.FAIL, name="parse.in")
        await w.send(Batch([1, 2]))
        with pytest.raises(ChannelOverflowError) as info:
            await w.send(Batch([3]))
        err = info.value
        assert isinstance(err, FlowFailedError)
        assert err.edge == "parse.in"
        assert err.capacity == 2
        assert err.flow == "f"
        msg = str(err)
        assert "'parse.in'" in msg
        assert "capacity 2" in msg
        assert "Overflow.FAIL" in msg
        # nothing of the refused batch is queued, nothing counted as dropped
        s = r.statistics()
        assert (s.fill, s.records_sent, s.records_dropped) == (2, 2, 0)
        assert shape(drain(r)) == [[1, 2]]

    asyncio.run(main())


def test_fail_on_a_batch_larger_than_the_capacity_of_a_channel_nobody_reads() -> None:
    async def main() -> None:
        _, (w,), r = make(2, Overflow.FAIL)
        with pytest.raises(ChannelOverflowError, match="capacity 2") as info:
            await w.send(Batch([1, 2, 3]))
        assert info.value.incoming == 1  # 1 and 2 fitted; 3 found it still full
        assert r.fill == 2

    asyncio.run(main())


@pytest.mark.parametrize("overflow", [Overflow.DROP_NEWEST, Overflow.DROP_OLDEST, Overflow.FAIL])
def test_a_batch_larger_than_the_room_is_not_an_overflow_while_the_reader_keeps_up(
    overflow: Overflow,
) -> None:
    """Issue 13.4: a 1,024-record batch meets a 100-record channel whose reader takes
    whatever is queued: nothing is dropped, nothing fails."""

    async def main() -> None:
        _, (w,), r = make(100, overflow)
        got: list[int] = []

        async def reader() -> None:
            while True:
                try:
                    item = await r.receive()
                except EndOfStream:
                    return
                if isinstance(item, Batch):
                    got.extend(item.values)

        task = asyncio.ensure_future(reader())
        await w.send(Batch(list(range(1024))))
        w.close()
        await task
        assert got == list(range(1024))
        s = r.statistics()
        assert (s.records_dropped, s.max_fill) == (0, 100)

    asyncio.run(main())


@pytest.mark.parametrize("overflow", [Overflow.DROP_NEWEST, Overflow.DROP_OLDEST, Overflow.FAIL])
def test_a_buffer_with_a_dropping_policy_drops_nothing_before_a_fast_consumer(
    overflow: Overflow,
) -> None:
    """Issue 13.4: ``Iterable(range(2000)).buffer(100, DROP_NEWEST)`` into a fast sink kept
    200 records and dropped 1,800 (FAIL raised at the first batch)."""
    flow = sw.Flow("fast")
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow.source(sw.sources.Iterable(range(2000))).buffer(100, overflow, name="buf").sink(out)
    result = sw.testing.run_flow(flow)
    assert out.items == list(range(2000))
    assert result.metrics.channel("buf.in").records_dropped == 0


def test_fail_policy_stops_a_flow_with_the_edge_named() -> None:
    class Stuck(sw.sinks.Sink):
        def __init__(self, clock: sw.Clock) -> None:
            self.clock = clock

        async def write(self, batch: Batch) -> None:
            await self.clock.sleep(3600)

    clock = VirtualClock()
    flow = sw.Flow("overflowing")
    (
        flow.source(sw.sources.Iterable(range(100)), name="src")
        .buffer(4, Overflow.FAIL, name="buf")
        .sink(Stuck(clock), name="out")
    )
    with pytest.raises(ChannelOverflowError) as info:
        sw.testing.run_flow(flow, clock=clock, max_batch_size=1)
    assert info.value.edge == "buf.in"
    assert info.value.capacity == 4
    assert "'overflowing'" in str(info.value)


# -- control messages -----------------------------------------------------------------


@pytest.mark.parametrize("overflow", list(Overflow))
def test_control_messages_are_never_dropped_nor_counted(overflow: Overflow) -> None:
    async def main() -> None:
        _, (w,), r = make(2, overflow)
        await w.send(Batch([1, 2]))
        for i in range(5):  # a full channel still takes control messages, synchronously
            w.send_control(Watermark(float(i)))
        w.send_control(Barrier(7))
        s = r.statistics()
        assert (s.fill, s.records_sent, s.records_dropped) == (2, 2, 0)
        assert w.room == 0
        got = shape(drain(r))
        assert got == [[1, 2]] + [(Watermark(float(i)), 0) for i in range(5)] + [(Barrier(7), 0)]

    asyncio.run(main())


@pytest.mark.parametrize("overflow", DROPPING)
def test_dropping_keeps_control_messages_in_order(overflow: Overflow) -> None:
    async def main() -> None:
        _, (w,), r = make(3, overflow)
        await w.send(Batch([1]))
        w.send_control(Watermark(1.0))
        await w.send(Batch([2, 3]))
        w.send_control(Barrier(1))
        await w.send(Batch([4, 5]))  # over capacity by 2
        got = shape(drain(r))
        if overflow is Overflow.DROP_NEWEST:
            assert got == [[1], (Watermark(1.0), 0), [2, 3], (Barrier(1), 0)]
        else:
            assert got == [(Watermark(1.0), 0), [3], (Barrier(1), 0), [4, 5]]
        assert r.statistics().records_dropped == 2

    asyncio.run(main())


def test_control_messages_keep_their_place_after_a_split_blocking_send() -> None:
    async def main() -> None:
        clock, (w,), r = make(2)

        async def reader() -> list[Any]:
            got: list[Any] = []
            while True:
                try:
                    item = await r.receive()
                except EndOfStream:
                    return got
                if item is not None:
                    got.extend(shape([item]))
                await clock.sleep(1)

        task = asyncio.ensure_future(reader())
        w.send_control(Watermark(0.0))
        await w.send(Batch([1, 2, 3, 4, 5]))
        w.send_control(Watermark(5.0))
        await w.send(Batch([6]))
        w.close()
        got = await task
        assert got[0] == (Watermark(0.0), 0)
        assert got.index((Watermark(5.0), 0)) == len(got) - 2
        assert [v for g in got if isinstance(g, list) for v in g] == [1, 2, 3, 4, 5, 6]

    asyncio.run(main())


def test_control_messages_carry_the_writers_input_index() -> None:
    async def main() -> None:
        _, ws, r = make(10, writers=3)
        ws[2].send_control(Watermark(2.0))
        ws[0].send_control(Watermark(0.5))
        ws[1].send_control(Watermark(1.0))
        got = drain(r)
        assert [(c.message, c.input_index) for c in got if isinstance(c, TaggedControl)] == [
            (Watermark(2.0), 2),
            (Watermark(0.5), 0),
            (Watermark(1.0), 1),
        ]
        assert [w.index for w in ws] == [0, 1, 2]

    asyncio.run(main())


# -- several writers and the end of the stream ----------------------------------------


def test_end_of_stream_only_after_every_writer_closed_and_the_queue_drained() -> None:
    async def main() -> None:
        _, (a, b), r = make(10, writers=2)
        await a.send(Batch([1]))
        a.close()
        assert r.statistics().writers_open == 1
        assert shape(drain(r)) == [[1]]
        assert r.receive_nowait() is None  # b is still open: not the end
        await b.send(Batch([2]))
        b.send_control(Watermark(9.0))
        b.close()
        assert r.statistics().writers_open == 0
        # everything queued is still delivered after the last close ...
        assert shape([r.receive_nowait(), r.receive_nowait()]) == [[2], (Watermark(9.0), 1)]
        # ... and only then the end, every time it is asked
        with pytest.raises(EndOfStream):
            r.receive_nowait()
        with pytest.raises(EndOfStream):
            await r.receive()
        with pytest.raises(EndOfStream):
            await r.receive(deadline=100.0)

    asyncio.run(main())


def test_a_waiting_reader_sees_the_end_when_the_last_writer_closes() -> None:
    async def main() -> None:
        _, (a, b), r = make(10, writers=2)

        async def reader() -> list[Any]:
            got: list[Any] = []
            while True:
                try:
                    item = await r.receive()
                except EndOfStream:
                    return got
                if item is not None:
                    got.extend(values([item]))

        task = asyncio.ensure_future(reader())
        await settle()
        await a.send(Batch([1]))
        a.close()
        await settle()
        assert not task.done()
        await b.send(Batch([2]))
        await settle()
        assert not task.done()
        b.close()
        assert await task == [1, 2]

    asyncio.run(main())


def test_receive_without_deadline_never_returns_none() -> None:
    async def main() -> None:
        _, (a, b), r = make(10, writers=2)
        task = asyncio.ensure_future(r.receive())
        await settle()
        a.close()
        await settle()
        await b.send(Batch([1]))
        got = await task
        assert isinstance(got, Batch)
        assert got.values == [1]

    asyncio.run(main())


def test_writers_keep_their_own_order_when_interleaved() -> None:
    async def main() -> None:
        _, (a, b), r = make(100, writers=2)
        for i in range(5):
            await a.send(Batch([("a", i)]))
            await b.send(Batch([("b", i), ("b", i + 100)]))
        got = values(drain(r))
        assert [v for v in got if v[0] == "a"] == [("a", i) for i in range(5)]
        assert [v for v in got if v[0] == "b"] == [("b", j) for i in range(5) for j in (i, i + 100)]

    asyncio.run(main())


# -- closing --------------------------------------------------------------------------


def test_send_after_close_raises_closed_resource_error() -> None:
    async def main() -> None:
        _, (a, b), r = make(10, writers=2)
        a.close()
        a.close()  # idempotent: counts once
        assert r.statistics().writers_open == 1
        with pytest.raises(ClosedResourceError, match=r"'map_a\.in'"):
            await a.send(Batch([1]))
        with pytest.raises(ClosedResourceError):
            a.send_control(Watermark(1.0))
        await b.send(Batch([2]))  # the other writer is unaffected
        assert values(drain(r)) == [2]

    asyncio.run(main())


def test_reader_close_breaks_blocked_and_later_writers() -> None:
    async def main() -> None:
        _, (a, b), r = make(1, writers=2)
        await a.send(Batch([1]))
        blocked_a = asyncio.ensure_future(a.send(Batch([2, 3])))
        blocked_b = asyncio.ensure_future(b.send(Batch([4])))
        await settle()
        assert not blocked_a.done()
        assert not blocked_b.done()
        r.close()
        with pytest.raises(BrokenResourceError, match=r"'map_a\.in'"):
            await blocked_a
        with pytest.raises(BrokenResourceError):
            await blocked_b
        with pytest.raises(BrokenResourceError):
            await a.send(Batch([5]))
        with pytest.raises(BrokenResourceError):
            await b.send(Batch([]))
        assert r.statistics().blocked_seconds == 0.0

    asyncio.run(main())


@pytest.mark.parametrize("overflow", [*DROPPING, Overflow.FAIL])
def test_reader_close_breaks_writers_under_every_policy(overflow: Overflow) -> None:
    async def main() -> None:
        _, (w,), r = make(4, overflow)
        r.close()
        with pytest.raises(BrokenResourceError):
            await w.send(Batch([1]))

    asyncio.run(main())


def test_send_control_after_reader_close_raises_broken() -> None:
    async def main() -> None:
        _, (w,), r = make(4)
        r.close()
        with pytest.raises(BrokenResourceError):
            w.send_control(Watermark(1.0))

    asyncio.run(main())


# -- blocked time ---------------------------------------------------------------------


def test_blocked_seconds_from_t1_to_t4_is_three_also_while_still_blocked() -> None:
    async def main() -> None:
        clock, (w,), r = make(1, clock=VirtualClock(autojump=False))
        await w.send(Batch([0]))
        clock.advance(1.0)
        sender = asyncio.ensure_future(w.send(Batch([1])))
        await settle()
        assert not sender.done()
        clock.advance(2.0)
        assert r.statistics().blocked_seconds == 2.0  # still blocked: counted up to now
        clock.advance(1.0)
        assert r.statistics().blocked_seconds == 3.0
        r.receive_nowait()
        await sender
        clock.advance(10.0)  # no longer blocked: no longer counting
        assert r.statistics().blocked_seconds == 3.0

    asyncio.run(main())


def test_blocked_seconds_sums_over_writers_and_episodes() -> None:
    async def main() -> None:
        clock, (a, b), r = make(1, writers=2)
        await a.send(Batch([0]))

        async def reader() -> None:
            await clock.sleep(4.0)  # both writers block from t=0 to t=4
            r.receive_nowait()
            await clock.sleep(1.0)  # one of them blocks again from t=4 to t=5
            r.receive_nowait()
            await clock.sleep(1.0)
            r.receive_nowait()

        task = asyncio.ensure_future(reader())
        await asyncio.gather(a.send(Batch([1])), b.send(Batch([2])))
        await task
        assert clock.monotonic() == 6.0
        assert r.statistics().blocked_seconds == 4.0 + 4.0 + 1.0

    asyncio.run(main())


def test_dropping_and_failing_never_count_blocked_time() -> None:
    async def main() -> None:
        for overflow in [*DROPPING, Overflow.FAIL]:
            clock, (w,), r = make(1, overflow)
            await w.send(Batch([1]))
            expect = (
                pytest.raises(ChannelOverflowError)
                if overflow is Overflow.FAIL
                else contextlib.nullcontext()
            )
            with expect:
                await w.send(Batch([2]))
            await clock.sleep(5)
            assert r.statistics().blocked_seconds == 0.0

    asyncio.run(main())


# -- receive with a deadline ----------------------------------------------------------


def test_receive_returns_none_at_the_deadline_on_an_autojump_clock() -> None:
    async def main() -> None:
        clock, _, r = make(4)
        assert await r.receive(deadline=5.0) is None
        assert clock.monotonic() == 5.0
        assert clock.jumps == [5.0]

    asyncio.run(main())


def test_receive_returns_none_exactly_when_advanced_to_the_deadline() -> None:
    async def main() -> None:
        clock, _, r = make(4, clock=VirtualClock(autojump=False))
        task = asyncio.ensure_future(r.receive(deadline=5.0))
        await settle()
        clock.advance(4.5)
        await settle()
        assert not task.done()
        clock.advance(0.5)
        await settle()
        assert task.done()
        assert task.result() is None

    asyncio.run(main())


def test_receive_returns_data_arriving_before_the_deadline() -> None:
    async def main() -> None:
        clock, (w,), r = make(4)

        async def later() -> None:
            await clock.sleep(2.0)
            await w.send(Batch(["x"]))

        task = asyncio.ensure_future(later())
        item = await r.receive(deadline=5.0)
        await task
        assert isinstance(item, Batch)
        assert item.values == ["x"]
        assert clock.monotonic() == 2.0

    asyncio.run(main())


def test_receive_with_a_past_deadline_on_an_autojump_clock_returns_none() -> None:
    async def main() -> None:
        clock, _, r = make(4, clock=VirtualClock(start=10.0))
        assert await r.receive(deadline=3.0) is None
        assert clock.monotonic() == 10.0

    asyncio.run(main())


def test_receive_with_a_deadline_already_reached_returns_at_once() -> None:
    async def main() -> None:
        clock, _, r = make(4, clock=VirtualClock(autojump=False))
        task = asyncio.ensure_future(r.receive(deadline=clock.monotonic()))
        await settle(50)
        done = task.done()
        task.cancel()
        assert done
        assert task.result() is None

    asyncio.run(main())


# -- construction ---------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, -100])
def test_capacity_below_one_is_rejected_clearly(capacity: int) -> None:
    with pytest.raises(ValueError, match=rf"capacity must be >= 1 record, got {capacity}"):
        open_channel(capacity, clock=VirtualClock(), name="e")


def test_writers_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one writer, got 0"):
        open_channel(1, clock=VirtualClock(), name="e", writers=0)


def test_statistics_describe_the_channel() -> None:
    _, ws, r = make(7, Overflow.DROP_OLDEST, writers=3, name="merge.in")
    s = r.statistics()
    assert (s.name, s.capacity, s.overflow, s.writers_open) == (
        "merge.in",
        7,
        Overflow.DROP_OLDEST,
        3,
    )
    assert (s.fill, s.max_fill, s.records_sent, s.records_received, s.records_dropped) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert s.blocked_seconds == 0.0
    assert r.name == ws[0].name == "merge.in"
    assert [w.room for w in ws] == [7, 7, 7]


# -- property -------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.integers(0, 3),  # virtual seconds to wait before this send
        st.integers(0, 12),  # records in the batch
        st.booleans(),  # follow it with a watermark
    ),
    max_size=25,
)
reads = st.lists(
    st.tuples(
        st.integers(0, 3),  # virtual seconds to wait before this drain
        st.integers(1, 5),  # items to take
    ),
    max_size=25,
)


async def _exercise(
    capacity: int,
    overflow: Overflow,
    sends: list[tuple[int, int, bool]],
    drains: list[tuple[int, int]],
) -> tuple[list[Any], list[Any], int, int, Any]:
    """Run one writer and one reader concurrently; check the invariants as they go.

    Returns (offered, received items, refused by FAIL, max fill seen, final statistics).
    """
    clock = VirtualClock()
    (w,), r = open_channel(capacity, clock=clock, name="p", overflow=overflow)
    offered: list[int] = []
    refused = 0
    fills: list[int] = []
    received: list[Any] = []

    def look() -> None:
        assert r.fill <= capacity
        fills.append(r.fill)

    async def writer() -> None:
        nonlocal refused
        nxt = 0
        for gap, size, mark in sends:
            await clock.sleep(gap)
            batch = list(range(nxt, nxt + size))
            nxt += size
            offered.extend(batch)
            try:
                await w.send(Batch(batch))
            except ChannelOverflowError as err:
                assert overflow is Overflow.FAIL
                refused += err.incoming
            look()
            if mark:
                w.send_control(Watermark(float(nxt)))  # everything before it is < nxt
                look()
        w.close()

    def take(item: Batch | TaggedControl) -> None:
        if isinstance(item, Batch):
            assert len(item) > 0
            received.extend(item.values)
        else:
            received.append(item.message)
        look()

    async def reader() -> None:
        for gap, k in drains:
            await clock.sleep(gap)
            for _ in range(k):
                try:
                    item = r.receive_nowait()
                except EndOfStream:
                    return
                if item is None:
                    break
                take(item)
        while True:
            try:
                item = await r.receive()
            except EndOfStream:
                return
            if item is not None:
                take(item)

    await asyncio.gather(writer(), reader())
    return offered, received, refused, max(fills, default=0), r.statistics()


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 10),
    overflow=st.sampled_from(list(Overflow)),
    sends=steps,
    drains=reads,
)
def test_property_channel_never_overfills_reorders_or_loses_uncounted(
    capacity: int,
    overflow: Overflow,
    sends: list[tuple[int, int, bool]],
    drains: list[tuple[int, int]],
) -> None:
    offered, received, refused, max_fill, s = asyncio.run(
        _exercise(capacity, overflow, sends, drains)
    )
    data = [v for v in received if isinstance(v, int)]
    marks = [v for v in received if isinstance(v, Watermark)]
    # order: a subsequence of what was offered, in order
    assert data == sorted(data)
    assert set(data) <= set(offered)
    # every record is received, dropped (counted) or refused (FAIL raised)
    assert len(data) + s.records_dropped + refused == len(offered)
    assert s.records_received == len(data)
    # capacity
    assert max_fill <= capacity
    assert s.max_fill <= capacity
    assert s.fill == 0
    # control messages: all delivered, in order, in their place relative to data
    assert marks == [
        Watermark(float(sum(n for _, n, _ in sends[: i + 1])))
        for i, (_, _, m) in enumerate(sends)
        if m
    ]
    for pos, v in enumerate(received):
        if isinstance(v, Watermark):
            assert all(d < v.time for d in received[:pos] if isinstance(d, int))
            assert all(d >= v.time for d in received[pos + 1 :] if isinstance(d, int))
    if overflow is Overflow.BLOCK:
        assert data == offered
        assert s.records_dropped == 0
    if overflow in (Overflow.BLOCK, Overflow.FAIL):
        assert s.records_dropped == 0
    if overflow is not Overflow.FAIL:
        assert refused == 0


@pytest.mark.parametrize("overflow", list(Overflow))
@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 6), sends=steps, drains=reads)
def test_property_sent_plus_dropped_equals_offered(
    overflow: Overflow,
    capacity: int,
    sends: list[tuple[int, int, bool]],
    drains: list[tuple[int, int]],
) -> None:
    # Start with an overflow, so every example exercises the policy.
    sends = [(0, capacity, False), (0, capacity, False), *sends]
    drains = [(1, 1), *drains]
    offered, _, refused, _, s = asyncio.run(_exercise(capacity, overflow, sends, drains))
    assert s.records_sent + s.records_dropped + refused == len(offered)
    assert s.records_received == s.records_sent
