"""Backpressure keeps batches whole: a saturated pipeline must not grind its micro-batches
down to single records (found by benchmarks/bench_backpressure.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import sluiceway as sw
from sluiceway.runtime.messages import Batch


class PacedSink(sw.sinks.Sink):
    def __init__(self, clock: sw.Clock, per_record: float) -> None:
        self.clock = clock
        self.per_record = per_record
        self.sizes: list[int] = []

    async def write(self, batch: Batch) -> None:
        self.sizes.append(len(batch.values))
        await self.clock.sleep(self.per_record * len(batch.values))


def run_saturated(capacity: int, max_batch: int) -> tuple[PacedSink, sw.FlowSnapshot]:
    clock = sw.VirtualClock()

    async def main() -> tuple[PacedSink, sw.FlowSnapshot]:
        sink = PacedSink(clock, 0.0001)  # 10,000 records/s
        flow = sw.Flow("saturated")
        (
            flow.source(sw.sources.Generator(itertools.count), name="src")
            .buffer(capacity, name="buf")
            .sink(sink, name="out")
        )
        handle = sw.start(flow, clock=clock, max_batch_size=max_batch)
        await clock.sleep(30.0)
        snap = handle.metrics()
        handle.force_stop()
        with contextlib.suppress(sw.FlowCancelledError):
            await handle.wait()
        return sink, snap

    return asyncio.run(main())


def test_sink_writes_stay_large_under_sustained_backpressure() -> None:
    sink, snap = run_saturated(capacity=10_000, max_batch=1024)
    late = sink.sizes[len(sink.sizes) // 2 :]  # the steady state
    assert min(late) >= 512, f"batches fragmented: smallest late write {min(late)}"
    assert sum(late) / len(late) >= 900
    assert snap.operator("out").records_in >= 0.95 * 30 * 10_000  # the sink is never starved


def test_small_channels_refill_by_half_their_capacity() -> None:
    sink, _ = run_saturated(capacity=10, max_batch=1024)
    late = sink.sizes[len(sink.sizes) // 2 :]
    assert min(late) >= 5


def test_pulled_minus_sunk_stays_within_the_buffer_and_one_batch_per_stage() -> None:
    _sink, snap = run_saturated(capacity=1000, max_batch=100)
    in_flight = snap.operator("src").records_out - snap.operator("out").records_out
    assert in_flight <= 1000 + 2 * 100
