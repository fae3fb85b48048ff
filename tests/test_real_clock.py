"""The real-clock tier: every timer, deadline and sleep, once on the ``SystemClock``.

The virtual clock moves only when the event loop is idle, so it cannot show a stage that
spins without awaiting: virtual time simply stands still with it.  These smoke tests
run each operator and connector that waits on the clock for about a second of real
time under :class:`sluiceway.testing.Watchdog`: the test fails when the event loop
stops turning for more than a second, or when a stop is not honoured within the grace
period.  Each checks that the operator did its job, not only that nothing hung.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.testing import run_watched
from sluiceway.time import Clock

pytestmark = pytest.mark.slow


def endless() -> Any:
    return itertools.count()


async def echo(x: int) -> int:
    return x


def test_map_async_fed_by_a_paced_generator() -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_map_async")
    (flow.source(sw.sources.Generator(endless, rate=100)).map_async(echo, concurrency=4).sink(out))
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 50  # about 100 in a second: the stage kept moving
    assert out.items == list(range(len(out.items)))


def test_stateful_map_with_a_processing_time_ttl() -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_ttl")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .key_by(lambda x: x % 3)
        .stateful_map(lambda n, x: ((n or 0) + 1, (n or 0) + 1), ttl=0.2, name="counts")
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 50


def test_processing_time_window() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_window")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .key_by(lambda x: x % 2)
        .window(sw.windows.Tumbling(0.2), time="processing")
        .aggregate(n=sw.agg.count())
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 4  # windows fired on the clock, while records kept coming


class _AlwaysDue(OpSpec):
    """An operator whose timer is always due and never does anything: a runtime must
    survive it (the stage keeps taking input, the loop keeps turning, a stop ends it)."""

    def __init__(self, deadline: Callable[[Clock], float]) -> None:
        self.deadline = deadline

    @property
    def boundary(self) -> bool:
        return True

    def build(self, ctx: BuildContext) -> Step:
        deadline, clock = self.deadline, ctx.clock

        class AlwaysDue(Step):
            fired = 0

            def uses_timer(self) -> bool:
                return True

            def next_deadline(self) -> float:
                return deadline(clock)

            async def on_timer(self, now: float) -> None:
                AlwaysDue.fired += 1

        return AlwaysDue(ctx.name, ctx.metrics)


@pytest.mark.parametrize(
    "deadline",
    [
        lambda clock: clock.monotonic(),  # "now", from a later read than the stage's
        lambda clock: clock.monotonic() + 1e-9,  # always a hair ahead
        lambda clock: 0.0,  # long past
    ],
    ids=["now", "a-hair-ahead", "past"],
)
def test_a_timer_that_is_always_due_cannot_freeze_the_loop(
    deadline: Callable[[Clock], float],
) -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_always_due")
    stream = flow.source(sw.sources.Generator(endless, rate=100))
    stream._wrap(stream._derive(_AlwaysDue(deadline), "spin", "spin")).sink(out)
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 50  # input still taken between firings


class _EveryMinute:
    def process(self, ctx: sw.state.ProcessContext[Any], x: int) -> None:
        assert ctx.timestamp is not None
        ctx.timers.at_event_time(ctx.timestamp + 60)

    def on_timer(self, ctx: sw.state.ProcessContext[Any], t: float) -> None:
        ctx.emit((ctx.key, t))
        ctx.timers.at_event_time(t + 60)  # a timer per minute, for ever


def test_event_time_timers_that_rearm_themselves_end_with_the_input() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_rearm")
    (
        flow.source(sw.sources.Iterable([0, 30]))
        .with_timestamps(float, 0)
        .key_by(lambda x: "k")
        .process(_EveryMinute)
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert not result.stopped  # it ended by itself
    assert out.items == [("k", 60.0), ("k", 90.0)]


class _Tick:
    def process(self, ctx: sw.state.ProcessContext[Any], x: int) -> None:
        ctx.value("n").set((ctx.value("n").get() or 0) + 1)
        ctx.timers.at_processing_time(ctx.processing_time + 0.05)

    def on_timer(self, ctx: sw.state.ProcessContext[Any], t: float) -> None:
        ctx.emit((ctx.key, ctx.value("n").get()))


def test_processing_time_timers_of_process() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_process_pt")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .key_by(lambda x: x % 3)
        .process(_Tick)
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 30  # timers fired on the clock


def test_rate_limit_and_its_pull() -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_rate_limit")
    (
        flow.source(sw.sources.Generator(endless), name="src")
        .rate_limit(sw.flowcontrol.TokenBucket(rate=20, burst=1))
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0, grace_period=1.0)
    assert result.stopped  # drained within the grace period
    assert 10 <= len(out.items) <= 25
    assert result.metrics.operator("src").records_out == len(out.items)


def test_generator_rate() -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_generator")
    flow.source(sw.sources.Generator(endless, rate=50)).sink(out)
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert 25 <= len(out.items) <= 75
