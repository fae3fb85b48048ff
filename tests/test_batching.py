"""``stream.batch(max_size, max_delay)``: size- and delay-triggered lists, exact instants
on a virtual clock, flushing at end of input and on a graceful stop, fusion and arguments.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.connectors.base import SinkContext
from sluiceway.plan import plan
from sluiceway.runtime.messages import Batch
from sluiceway.testing import ScriptedSource
from sluiceway.time import Clock, VirtualClock


class Timed(sw.sinks.Sink):
    """Records ``(clock time, list)`` for every list written."""

    def __init__(self) -> None:
        self.clock: Clock | None = None
        self.got: list[tuple[float, Any]] = []

    async def open(self, ctx: SinkContext) -> None:
        self.clock = ctx.clock

    async def write(self, batch: Batch) -> None:
        assert self.clock is not None
        now = self.clock.monotonic()
        self.got.extend((now, v) for v in batch.values)


def run_batched(
    source: sw.sources.Source,
    max_size: int,
    max_delay: float | timedelta | None,
    *,
    clock: VirtualClock | None = None,
    max_batch_size: int = 1024,
) -> list[tuple[float, Any]]:
    flow = sw.Flow("batching")
    out = Timed()
    flow.source(source, name="src").batch(max_size, max_delay, name="b").sink(out, name="out")
    sw.testing.run_flow(flow, clock=clock or VirtualClock(), max_batch_size=max_batch_size)
    return out.got


# -- size -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [1, 2, 3, 7, 1024])
def test_size_triggered_lists(max_batch_size: int) -> None:
    got = sw.testing.run_collect(lambda s: s.batch(3), range(10), max_batch_size=max_batch_size)
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_one_micro_batch_can_fill_several_lists() -> None:
    got = run_batched(ScriptedSource([(0.0, list(range(7)))]), 2, None)
    assert got == [(0.0, [0, 1]), (0.0, [2, 3]), (0.0, [4, 5]), (0.0, [6])]


def test_max_size_one_gives_singletons() -> None:
    assert sw.testing.run_collect(lambda s: s.batch(1), "abc") == [["a"], ["b"], ["c"]]


def test_empty_input_gives_no_lists() -> None:
    assert sw.testing.run_collect(lambda s: s.batch(3, 1.0), []) == []


def test_lists_are_fresh_objects() -> None:
    got = sw.testing.run_collect(lambda s: s.batch(2), range(4))
    assert got[0] is not got[1]
    got[0].append("mutated")
    assert got[1] == [2, 3]


# -- delay ----------------------------------------------------------------------------


def test_marble_diagram_from_the_docs() -> None:
    # input:  a b c d . . . e / time: 0 0 0 1 2 3 4 5 / output: [a,b,c] at 0, [d] at 3
    script = [(0.0, ["a", "b", "c"]), (1.0, ["d"]), (5.0, ["e"])]
    got = run_batched(ScriptedSource(script), 3, 2.0)
    assert got == [(0.0, ["a", "b", "c"]), (3.0, ["d"]), (5.0, ["e"])]  # e: end of input


def test_delay_counts_from_the_first_record_of_the_list() -> None:
    # later records do not push the deadline back
    script = [(0.0, ["a"]), (1.5, ["b"]), (1.9, ["c"]), (10.0, ["d"]), (11.0, ["e"]), (30.0, ["f"])]
    got = run_batched(ScriptedSource(script), 100, 2.0)
    assert got == [(2.0, ["a", "b", "c"]), (12.0, ["d", "e"]), (30.0, ["f"])]


def test_after_a_size_flush_the_remainder_starts_a_new_deadline() -> None:
    # [a] at 0; [b, c, d] at 1 fills [a, b, c]; d arrived at 1, so it is due at 3
    script = [(0.0, ["a"]), (1.0, ["b", "c", "d"]), (20.0, ["e"])]
    got = run_batched(ScriptedSource(script), 3, 2.0)
    assert got == [(1.0, ["a", "b", "c"]), (3.0, ["d"]), (20.0, ["e"])]


def test_size_flush_before_the_deadline_cancels_it() -> None:
    script = [(0.0, ["a"]), (0.5, ["b"]), (1.0, ["c"]), (9.0, ["d"])]
    got = run_batched(ScriptedSource(script), 3, 2.0)
    # no empty or duplicate flush at t=2; d flushes at the end of input (t=9)
    assert got == [(1.0, ["a", "b", "c"]), (9.0, ["d"])]


def test_delay_flush_with_a_paced_generator_source() -> None:
    # rate 4/s: records at 0.25, 0.5, 0.75, ...; max_delay 0.625 from each list's first
    source = sw.sources.Generator(lambda: iter(range(8)), rate=4)
    got = run_batched(source, 100, 0.625)
    assert got == [
        (0.875, [0, 1, 2]),  # first at 0.25
        (1.625, [3, 4, 5]),  # first at 1.0
        (2.25, [6, 7]),  # first at 1.75, due at 2.375, but the input ends at 2.25
    ]


def test_delay_flush_with_an_async_generator_source() -> None:
    clock = VirtualClock()

    async def records() -> AsyncIterator[str]:
        for at, v in [(0.0, "a"), (0.5, "b"), (4.0, "c"), (4.1, "d"), (4.2, "e"), (9.0, "f")]:
            await clock.sleep_until(at)
            yield v

    got = run_batched(sw.sources.Iterable(records()), 2, 1.0, clock=clock)
    assert got == [(0.5, ["a", "b"]), (4.1, ["c", "d"]), (5.2, ["e"]), (9.0, ["f"])]


def test_timedelta_delay() -> None:
    script = [(0.0, ["a"]), (3.0, ["b"])]
    got = run_batched(ScriptedSource(script), 10, timedelta(milliseconds=1500))
    assert got == [(1.5, ["a"]), (3.0, ["b"])]


def test_results_do_not_depend_on_micro_batch_size() -> None:
    script = [(float(t), [t * 10 + i for i in range(5)]) for t in range(6)]
    runs = {
        n: run_batched(ScriptedSource(script), 4, 0.5, max_batch_size=n) for n in (1, 2, 3, 1024)
    }
    assert len({repr(r) for r in runs.values()}) == 1, runs
    flat = [v for _, lst in runs[1024] for v in lst]
    assert flat == [v for _, vs in script for v in vs]


# -- end of input and graceful stop ---------------------------------------------------


def test_remainder_is_flushed_at_end_of_input_without_delay() -> None:
    got = run_batched(ScriptedSource([(0.0, [1, 2, 3, 4, 5]), (7.0, [6])]), 4, None)
    assert got == [(0.0, [1, 2, 3, 4]), (7.0, [5, 6])]


@pytest.mark.parametrize("max_delay", [None, 1000.0], ids=["fused", "timed"])
def test_remainder_is_flushed_on_graceful_stop(max_delay: float | None) -> None:
    clock = VirtualClock()

    async def main() -> tuple[sw.RunResult, Timed]:
        flow = sw.Flow("stopping")
        out = Timed()
        (
            flow.source(sw.sources.Generator(itertools.count, rate=1), name="src")
            .batch(100, max_delay, name="b")
            .sink(out, name="out")
        )
        handle = sw.start(flow, clock=clock)
        await clock.sleep(5.5)
        assert handle.unflushed() == {"operator b": 5}
        result = await handle.stop()
        return result, out

    result, out = asyncio.run(main())
    assert result.stopped
    assert out.got == [(5.5, [0, 1, 2, 3, 4])]
    assert result.metrics.operator("b").records_in == 5
    assert result.metrics.operator("b").records_out == 1


# -- plan -----------------------------------------------------------------------------


def _flow(max_delay: float | None) -> sw.Flow:
    flow = sw.Flow("p")
    (
        flow.source(sw.sources.Iterable([1]), name="src")
        .map(str, name="m")
        .batch(10, max_delay, name="b")
        .sink(sw.sinks.Collect(), name="out")
    )
    return flow


def test_batch_without_delay_is_fused_into_the_source_stage() -> None:
    p = plan(_flow(None))
    assert [[n.name for n in st.nodes] for st in p.stages] == [["src", "m", "b", "out"]]
    assert p.channels == []
    assert "stage 0: src -> m -> b -> out" in p.describe()
    assert "channel" not in p.describe()


def test_batch_with_delay_gets_its_own_stage_behind_a_channel() -> None:
    p = plan(_flow(2.0))
    assert [[n.name for n in st.nodes] for st in p.stages] == [["src", "m"], ["b", "out"]]
    (ch,) = p.channels
    assert (ch.name, ch.target.name, [w.name for w in ch.writers]) == ("b.in", "b", ["m"])
    assert ch.capacity == 1024
    assert ch.overflow is sw.Overflow.BLOCK
    text = p.describe()
    assert "stage 1: b -> out  <- channel 'b.in'" in text
    assert "channel 'b.in': m => b (capacity 1024, block)" in text


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((0,), ValueError, "batch max_size must be >= 1, got 0"),
        ((-3,), ValueError, "batch max_size must be >= 1, got -3"),
        (("3",), TypeError, "batch max_size must be an int, got str '3'"),
        ((2.5,), TypeError, "batch max_size must be an int, got float 2.5"),
        ((True,), TypeError, "batch max_size must be an int, got bool True"),
        ((None,), TypeError, "batch max_size must be an int, got NoneType None"),
        ((3, 0), ValueError, "batch max_delay must be > 0 seconds, got 0"),
        ((3, -1.5), ValueError, "batch max_delay must be > 0 seconds, got -1.5"),
        ((3, math.nan), ValueError, "batch max_delay must be > 0 seconds, got nan"),
        ((3, timedelta(0)), ValueError, "batch max_delay must be > 0 seconds, got datetime"),
        ((3, timedelta(seconds=-1)), ValueError, "batch max_delay must be > 0 seconds"),
        ((3, "1"), TypeError, "batch max_delay must be seconds (float) or a timedelta, got '1'"),
        ((3, True), TypeError, "batch max_delay must be seconds (float) or a timedelta, got True"),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(
    args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    flow = sw.Flow("bad")
    stream = flow.source(sw.sources.Iterable([1]))
    with pytest.raises(error) as info:
        stream.batch(*args)
    assert message in str(info.value)
    assert len(flow.nodes) == 1  # nothing half-added


def test_batch_output_is_unkeyed() -> None:
    flow = sw.Flow("k")
    keyed = flow.source(sw.sources.Iterable([1])).key_by(lambda x: x)
    batched = keyed.batch(2)
    assert isinstance(keyed, sw.KeyedStream)
    assert not isinstance(batched, sw.KeyedStream)
    assert not batched.node.keyed


def test_infinite_max_delay_is_refused_with_the_way_out() -> None:
    s = sw.Flow("inf").source(sw.sources.Iterable([1]))
    with pytest.raises(ValueError, match=r"batch max_delay must be finite, got inf; leave it out"):
        s.batch(10, float("inf"))


def _windowed_lists(
    source: sw.sources.Source, max_size: int, max_delay: float | None, max_batch_size: int
) -> tuple[list[Any], list[Any]]:
    """Lists of event-timed records, counted in 10 s tumbling windows; (results, late)."""
    flow = sw.Flow("batch_then_window")
    results: sw.sinks.Collect[sw.WindowResult] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    windows = (
        flow.source(source)
        .with_timestamps(lambda t: t)
        .batch(max_size, max_delay)
        .window(sw.windows.Tumbling(10.0))
        .aggregate(sw.agg.count())
    )
    windows.sink(results)
    windows.late().sink(late)
    sw.testing.run_flow(flow, max_batch_size=max_batch_size)
    return [(r.start, r.value) for r in results.items], [x.value for x in late.items]


@pytest.mark.parametrize("max_batch_size", [1, 2, 1024])
def test_the_watermark_does_not_overtake_the_records_a_batch_holds(max_batch_size: int) -> None:
    """In-order input 1..5 in lists of 2: the last list [5.0] leaves at the end of input,
    after the watermark +inf came in; it must still be on time (3 lists, none late)."""
    got = _windowed_lists(sw.sources.Iterable([1.0, 2.0, 3.0, 4.0, 5.0]), 2, None, max_batch_size)
    assert got == ([(0.0, 3)], [])


@pytest.mark.parametrize(("gap", "want"), [(0.5, [(20.0, 1)]), (5.0, [(0.0, 1), (20.0, 1)])])
def test_with_max_delay_a_list_is_on_time_however_late_the_next_record_comes(
    gap: float, want: list[Any]
) -> None:
    """The next record coming soon joins the waiting list; coming late, it starts a list
    of its own, which waits for its delay while the end of input (+inf) comes in: the
    watermark must wait for that list too.  Either way nothing is late."""
    script = [(0.0, [1.0, 2.0, 3.0]), (gap, [25.0])]
    assert _windowed_lists(ScriptedSource(script), 10, 1.0, 1024) == (want, [])
