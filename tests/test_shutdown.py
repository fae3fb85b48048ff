"""Stopping flows: graceful drain, the grace period, forced cancellation, signals."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.runtime.messages import Batch


def endless() -> Any:
    return itertools.count()


class SlowSink(sw.sinks.Sink):
    def __init__(self, clock: sw.Clock, delay: float) -> None:
        self.clock = clock
        self.delay = delay
        self.items: list[Any] = []
        self.closed = False

    async def write(self, batch: Batch) -> None:
        await self.clock.sleep(self.delay)
        self.items.extend(batch.values)

    async def close(self) -> None:
        self.closed = True


def test_graceful_stop_drains_everything_pulled() -> None:
    clock = sw.VirtualClock()

    async def main() -> tuple[sw.RunResult, SlowSink]:
        sink = SlowSink(clock, 0.01)
        flow = sw.Flow("drain")
        (
            flow.source(sw.sources.Generator(endless, rate=5_000), name="src")
            .map(lambda x: x + 1)
            .buffer(500, name="buf")
            .sink(sink, name="out")
        )
        handle = sw.start(flow, clock=clock)
        await clock.sleep(3.0)
        assert handle.unflushed(), "the slow sink should have a backlog to drain"
        result = await handle.stop()
        return result, sink

    result, sink = asyncio.run(main())
    assert result.stopped
    pulled = result.metrics.operator("src").records_out
    assert pulled > 0
    assert len(sink.items) == pulled  # nothing left behind in channels or stages
    assert sink.items == list(range(1, pulled + 1))
    assert sink.closed


def test_graceful_stop_flushes_partial_batches() -> None:
    clock = sw.VirtualClock()
    out: sw.sinks.Collect[list[int]] = sw.sinks.Collect()

    async def main() -> sw.RunResult:
        flow = sw.Flow("flush")
        flow.source(sw.sources.Generator(endless, rate=10), name="src").batch(
            1000, max_delay=60
        ).sink(out)
        handle = sw.start(flow, clock=clock)
        await clock.sleep(2.05)
        return await handle.stop()

    result = asyncio.run(main())
    assert out.items == [list(range(20))]
    assert result.metrics.operator("src").records_out == 20


def test_grace_period_exceeded_reports_exactly_what_was_not_flushed() -> None:
    clock = sw.VirtualClock()

    async def main() -> None:
        sink = SlowSink(clock, 100.0)  # hopelessly slow
        flow = sw.Flow("stuck")
        (
            flow.source(sw.sources.Iterable(range(50)), name="src")
            .buffer(30, name="buf")
            .batch(5, max_delay=1.0, name="groups")
            .sink(sink, name="out")
        )
        handle = sw.start(flow, clock=clock, grace_period=5.0, max_batch_size=10)
        await clock.sleep(1.5)
        started = clock.monotonic()
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.stop()
        assert clock.monotonic() - started == pytest.approx(5.0)
        err = info.value
        assert "grace period of 5s exceeded" in str(err)
        assert err.reason is sw.CancelReason.GRACE_PERIOD
        held = err.unflushed
        # The exact inventory: the 30-record buffer drained at once into the batcher's
        # (default, 1024-record) channel; the stage behind it is stuck in the sink with
        # the 10 records it took.  Nothing was sunk, so all 50 are accounted for here.
        assert held == {"channel groups.in": 40, "in process in stage 2 (groups -> out)": 10}
        assert sum(held.values()) + len(sink.items) == 50
        assert sink.closed

    asyncio.run(main())


class PerRecordSink(sw.sinks.Sink):
    """Writes record by record (50 ms each) and says how far it got (``progress``)."""

    def __init__(self, clock: sw.Clock) -> None:
        self.clock = clock
        self.items: list[Any] = []
        self.done = 0

    async def write(self, batch: Batch) -> None:
        self.done = 0
        for v in batch.values:
            await self.clock.sleep(0.05)
            self.items.append(v)
            self.done += 1

    def progress(self) -> int:
        return self.done


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("fused", {"in process in stage 0 (src -> out)": 62}),
        ("map", {"in process in stage 0 (src -> twice -> out)": 62}),
        ("filter", {"in process in stage 0 (src -> evens -> out)": 12}),
        ("buffer", {"channel buf.in": 100, "in process in stage 1 (buf -> out)": 62}),
    ],
)
def test_the_inventory_does_not_count_what_a_sink_already_wrote(
    shape: str, expected: dict[str, int]
) -> None:
    """A sink at 50 ms/record, stopped with a 1 s grace period after 0.95 s: it wrote
    38 records of the batch of 100 it is writing; the other 62 are what was not
    flushed, not the whole batch."""
    clock = sw.VirtualClock()
    sink = PerRecordSink(clock)
    flow = sw.Flow("slow")
    s = flow.source(sw.sources.Generator(endless), name="src")
    if shape == "map":
        s = s.map(lambda x: x * 2, name="twice")
    elif shape == "filter":
        s = s.filter(lambda x: x % 2 == 0, name="evens")
    elif shape == "buffer":
        s = s.buffer(100, name="buf")
    s.sink(sink, name="out")

    async def main() -> tuple[dict[str, int], int]:
        handle = sw.start(flow, clock=clock, grace_period=1.0, max_batch_size=100)
        await clock.sleep(0.95)
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.stop()
        return info.value.unflushed, handle.metrics().operator("src").records_out

    held, pulled = asyncio.run(main())
    assert len(sink.items) == 38
    assert held == expected
    dropped = 50 if shape == "filter" else 0  # (by the filter: done with, not held)
    assert sum(held.values()) + len(sink.items) + dropped == pulled


def test_the_inventory_counts_a_half_sent_batch_once() -> None:
    """A stage sending 30 records into a channel of 5 blocks with 20 of them still to
    send: those 20 are in process, the 5 queued are the channel's, the 5 in the sink
    the sink's -- 30 in all, as pulled."""
    clock = sw.VirtualClock()
    flow = sw.Flow("half-sent")
    (
        flow.source(sw.sources.Iterable(range(30)), name="src")
        .buffer(50, name="wide")
        .map(lambda x: x, name="same")
        .buffer(5, name="narrow")
        .sink(SlowSink(clock, 100.0), name="out")
    )

    async def main() -> dict[str, int]:
        handle = sw.start(flow, clock=clock, grace_period=1.0)
        await clock.sleep(1.0)
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.stop()
        return info.value.unflushed

    assert asyncio.run(main()) == {
        "channel narrow.in": 5,
        "in process in stage 1 (wide -> same)": 20,
        "in process in stage 2 (narrow -> out)": 5,
    }


def test_the_inventory_counts_what_a_rate_limit_let_through_as_gone() -> None:
    clock = sw.VirtualClock()
    sink = PerRecordSink(clock)
    flow = sw.Flow("paced")
    (
        flow.source(sw.sources.Iterable(range(30)), name="src")
        .buffer(50, name="buf")
        .rate_limit(sw.flowcontrol.TokenBucket(rate=1, burst=1), name="paced")
        .sink(sink, name="out")
    )

    async def main() -> dict[str, int]:
        handle = sw.start(flow, clock=clock, grace_period=1.0)
        await clock.sleep(8.5)
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.stop()
        return info.value.unflushed

    held = asyncio.run(main())
    assert len(sink.items) == 10  # one a second, from 0 to 9.5 s
    assert held == {"in process in stage 1 (buf -> paced -> out)": 20}


def test_force_stop_cancels_at_once() -> None:
    clock = sw.VirtualClock()

    async def main() -> None:
        flow = sw.Flow("forced")
        flow.source(sw.sources.Generator(endless, rate=100)).sink(SlowSink(clock, 50.0))
        handle = sw.start(flow, clock=clock)
        await clock.sleep(1.0)
        handle.request_stop()
        handle.force_stop("second signal (SIGINT)")
        with pytest.raises(sw.FlowCancelledError, match=r"second signal \(SIGINT\)") as info:
            await handle.wait()
        assert info.value.reason is sw.CancelReason.FORCED

    asyncio.run(main())


def test_stop_interrupts_a_source_waiting_for_data() -> None:
    clock = sw.VirtualClock()

    async def slow_gen() -> Any:
        for i in itertools.count():
            await clock.sleep(3600)  # an idle broker
            yield i

    async def main() -> sw.RunResult:
        flow = sw.Flow("idle")
        flow.source(sw.sources.Iterable(slow_gen()), name="src").sink(sw.sinks.Collect())
        handle = sw.start(flow, clock=clock)
        await clock.sleep(7300)
        return await handle.stop()

    result = asyncio.run(main())
    assert result.stopped
    assert result.metrics.operator("src").records_out == 2


def test_run_refuses_a_running_loop() -> None:
    flow = sw.Flow("nested")
    flow.source(sw.sources.Iterable([1])).sink(sw.sinks.Collect())

    async def main() -> None:
        with pytest.raises(RuntimeError, match="run_async"):
            sw.run(flow)

    asyncio.run(main())


def test_monitor_runs_beside_the_flow_and_may_stop_it() -> None:
    ticks: list[float] = []

    async def monitor(handle: sw.FlowHandle) -> None:
        for _ in range(3):
            await handle.clock.sleep(1.0)
            ticks.append(handle.clock.monotonic())
        handle.request_stop()
        await handle.wait()

    flow = sw.Flow("watched")
    flow.source(sw.sources.Generator(endless, rate=10)).sink(sw.sinks.Collect())
    result = sw.run(flow, clock=sw.VirtualClock(), monitor=monitor)
    assert ticks == [1.0, 2.0, 3.0]
    assert result.stopped


def test_a_failing_monitor_stops_the_flow_and_raises() -> None:
    async def monitor(handle: sw.FlowHandle) -> None:
        await handle.clock.sleep(1.0)
        raise RuntimeError("dashboard crashed")

    flow = sw.Flow("watched")
    flow.source(sw.sources.Generator(endless, rate=10)).sink(sw.sinks.Collect())
    with pytest.raises(RuntimeError, match="dashboard crashed"):
        sw.run(flow, clock=sw.VirtualClock(), monitor=monitor)


SCRIPT = textwrap.dedent(
    """
    import asyncio, itertools, sys
    import sluiceway as sw

    class Slow(sw.sinks.Sink):
        def __init__(self, delay):
            self.delay, self.n = delay, 0
        async def write(self, batch):
            if self.n == 0:
                print("started", flush=True)
            await asyncio.sleep(self.delay)   # user code may sleep for real
            self.n += len(batch.values)

    delay = float(sys.argv[1])
    sink = Slow(delay)
    flow = sw.Flow("signals")
    flow.source(sw.sources.Generator(itertools.count, rate=2000), name="src").buffer(
        100, name="buf").sink(sink, name="out")
    try:
        result = sw.run(flow, grace_period=float(sys.argv[2]))
    except sw.FlowCancelledError as exc:
        print("cancelled:", exc, flush=True)
        sys.exit(3)
    pulled = result.metrics.operator("src").records_out
    print(f"stopped={result.stopped} pulled={pulled} sunk={sink.n}", flush=True)
    """
)


def _start(tmp_path: Path, delay: float, grace: float) -> subprocess.Popen[str]:
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(delay), str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_gracefully_in_a_real_process(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start(tmp_path, delay=0.001, grace=10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    line = out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["stopped"] == "True"
    assert fields["pulled"] == fields["sunk"]
    assert f"{sig.name} received" in err


@pytest.mark.slow
def test_second_signal_forces_a_nonzero_exit(tmp_path: Path) -> None:
    proc = _start(tmp_path, delay=5.0, grace=60)  # the drain would take minutes
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    assert "SIGINT received" in proc.stderr.readline() + proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "second signal (SIGINT)" in out
    assert "not flushed" in out


def test_one_sink_in_two_running_flows_is_refused_naming_both(tmp_path: Path) -> None:
    sink = sw.sinks.JsonLines(tmp_path / "out.jsonl")

    def flow_of(name: str, source: sw.sources.Source) -> sw.Flow:
        flow = sw.Flow(name)
        flow.source(source).sink(sink, name=f"{name}_out")
        return flow

    async def main() -> tuple[int, str]:
        clock = sw.VirtualClock()
        first = sw.start(
            flow_of("first", sw.sources.Generator(itertools.count, rate=100)), clock=clock
        )
        await clock.sleep(1.0)
        second = sw.start(flow_of("second", sw.sources.Iterable(range(5))), clock=clock)
        with pytest.raises(sw.FlowDefinitionError) as info:
            await second.wait()
        await clock.sleep(1.0)
        result = await first.stop()  # the first flow never noticed
        written = result.metrics.operator("first_out").records_in
        # once the first has ended, the sink is free for another run
        await sw.run_async(flow_of("third", sw.sources.Iterable(range(5))), clock=clock)
        return written, str(info.value)

    written, message = asyncio.run(main())
    assert message.startswith("sink 'second_out' (JsonLines(")
    assert "of flow 'second' is already running in flow 'first' (as 'first_out')" in message
    assert "create one per flow" in message
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == written + 5
    assert written >= 150
