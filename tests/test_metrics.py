"""The in-process metrics registry: operator counters, channel statistics, rates."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

import sluiceway as sw
from sluiceway.runtime.messages import Batch


class PacedSink(sw.sinks.Sink):
    """Takes ``delay`` clock seconds per record."""

    def __init__(self, clock: sw.Clock, delay: float) -> None:
        self.clock = clock
        self.delay = delay

    async def write(self, batch: Batch) -> None:
        await self.clock.sleep(self.delay * len(batch.values))


def test_counters_per_operator() -> None:
    flow = sw.Flow("counts")
    (
        flow.source(sw.sources.Iterable(range(100)), name="src")
        .filter(lambda x: x % 4 == 0, name="quarter")
        .flat_map(lambda x: [x, x], name="twice")
        .sink(sw.sinks.Collect(), name="out")
    )
    snap = sw.testing.run_flow(flow).metrics
    got = {o.name: (o.kind, o.records_in, o.records_out) for o in snap.operators}
    assert got == {
        "src": ("source", 100, 100),
        "quarter": ("filter", 100, 25),
        "twice": ("flat_map", 25, 50),
        "out": ("sink", 50, 50),
    }
    assert snap.flow == "counts"
    with pytest.raises(KeyError, match="known: src, quarter, twice, out"):
        snap.operator("nope")


def _run_paced(per_record: float) -> tuple[sw.FlowSnapshot, sw.FlowSnapshot]:
    clock = sw.VirtualClock()

    async def main() -> tuple[sw.FlowSnapshot, sw.FlowSnapshot]:
        flow = sw.Flow("bp")
        (
            flow.source(sw.sources.Generator(itertools.count, rate=1000), name="src")
            .buffer(100, name="buf")
            .sink(PacedSink(clock, per_record), name="out")
        )
        handle = sw.start(flow, clock=clock, max_batch_size=10)
        await clock.sleep(10.0)
        first = handle.metrics()
        await clock.sleep(10.0)
        second = handle.metrics()
        handle.force_stop()
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()
        return first, second

    return asyncio.run(main())


def test_backpressure_ratio_and_fill_on_a_virtual_clock() -> None:
    first, second = _run_paced(0.002)  # the sink handles 500/s: half the offered rate
    rates = second.rates_since(first)
    ch = second.channel("buf.in")
    assert ch.capacity == 100
    assert ch.fill >= 90  # saturated
    assert ch.max_fill <= 100
    # The sink sets the pace; the source, always behind its schedule, is ready at every
    # instant and so spends all its time blocked on the full channel.
    assert rates.records_out["out"] == pytest.approx(500, rel=0.05)
    assert rates.records_out["src"] == pytest.approx(500, rel=0.05)
    assert rates.backpressure["buf.in"] == pytest.approx(1.0, abs=0.02)


def test_no_backpressure_when_the_sink_keeps_up() -> None:
    first, second = _run_paced(0.0005)  # the sink could take 2000/s
    rates = second.rates_since(first)
    assert rates.records_out["out"] == pytest.approx(1000, rel=0.05)
    assert rates.backpressure["buf.in"] < 0.02
    assert second.channel("buf.in").fill < 100


def test_dropped_records_are_reported_on_the_operator_they_would_have_reached() -> None:
    clock = sw.VirtualClock()
    flow = sw.Flow("drops")
    (
        flow.source(sw.sources.Iterable(range(1000)), name="src")
        .buffer(10, sw.Overflow.DROP_NEWEST, name="shed")
        .sink(PacedSink(clock, 0.01), name="out")
    )
    snap = sw.testing.run_flow(flow, clock=clock, max_batch_size=50).metrics
    shed = snap.operator("shed")
    assert shed.dropped == snap.channel("shed.in").records_dropped > 0
    assert shed.records_in + shed.dropped == 1000
    assert snap.operator("out").records_in == shed.records_out


def test_rates_need_time_to_pass() -> None:
    flow = sw.Flow("r")
    flow.source(sw.sources.Iterable([1])).sink(sw.sinks.Collect())
    snap = sw.testing.run_flow(flow).metrics
    assert snap.rates_since(snap).records_in == {}


def test_stage_latency_percentiles_on_the_virtual_clock() -> None:
    """A sink that takes 0.5 s a batch: the records' time through the stage is 0.5 s,
    recorded on the operator that heads the stage (the source here, the buffer after it)."""
    clock = sw.VirtualClock()

    class Slow(sw.sinks.Sink):
        async def write(self, batch: sw.Batch) -> None:
            await clock.sleep(0.5)

    flow = sw.Flow("latency")
    flow.source(sw.sources.Iterable(range(100)), name="src").buffer(10, name="buf").sink(
        Slow(), name="slow"
    )
    result = sw.run(flow, clock=clock, max_batch_size=10, handle_signals=False)
    buf = result.metrics.operator("buf")
    assert 0.5 <= buf.latency_p50 <= 0.5 * 1.19
    assert 0.5 <= buf.latency_p99 <= 0.5 * 1.19
    assert math.isnan(result.metrics.operator("slow").latency_p99)  # not a stage head


def test_processing_time_is_per_operator_without_what_follows_it() -> None:
    """Each operator's own time per batch: a 0.2 s map before a 0.5 s sink in one stage.
    The map's time excludes the sink's; the source's (which only passes batches on)
    excludes both; the sink behind the buffer's channel is timed in its own stage; the
    buffer's wait for room in that channel (backpressure) is nobody's processing."""
    clock = sw.VirtualClock()

    class Slow(sw.sinks.Sink):
        async def write(self, batch: sw.Batch) -> None:
            await clock.sleep(0.5)

    class Thinking(sw.sinks.Sink):
        async def write(self, batch: sw.Batch) -> None:
            for _ in batch.values:
                await clock.sleep(0.2 / len(batch.values))

    flow = sw.Flow("processing")
    src = flow.source(sw.sources.Iterable(range(100)), name="src")
    src.sink(Thinking(), name="think")
    src.buffer(10, name="buf").sink(Slow(), name="slow")
    result = sw.run(flow, clock=clock, max_batch_size=10, handle_signals=False)
    m = result.metrics
    assert m.operator("think").processing_p50 == pytest.approx(0.2, rel=0.19)
    assert m.operator("slow").processing_p50 == pytest.approx(0.5, rel=0.19)
    assert m.operator("src").processing_p99 < 0.01  # the sinks' time is theirs
    assert m.operator("buf").processing_p99 < 0.01  # waiting on the slow sink: not work
    pytest.importorskip("prometheus_client")
    from sluiceway.metrics.prometheus import metric_families  # noqa: PLC0415

    [family] = [f for f in metric_families(m) if f.name == "sluiceway_operator_processing_seconds"]
    slow = {s.labels["quantile"]: s.value for s in family.samples if s.labels["operator"] == "slow"}
    assert slow["0.5"] == m.operator("slow").processing_p50
