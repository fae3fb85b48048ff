"""map_async: bounded concurrency, order, timeouts, errors, backpressure, adaptive limits,
circuit breaking -- all on the virtual clock, with simulated services."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker, CircuitOpenError


class Service:
    """A simulated service on a virtual clock: latency per call, in-flight tracking."""

    def __init__(self, clock: sw.VirtualClock, latency: float = 0.010, capacity: int = 0) -> None:
        self.clock = clock
        self.latency = latency
        self.capacity = capacity  # > 0: latency grows with load beyond this many calls
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.started_at: list[float] = []
        self.fail_until = -1.0  # calls started before this instant fail

    async def __call__(self, x: Any) -> Any:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        now = self.clock.monotonic()
        self.started_at.append(now)
        try:
            latency = self.latency
            if self.capacity and self.in_flight > self.capacity:
                latency *= self.in_flight / self.capacity
            await self.clock.sleep(latency)
            if now < self.fail_until:
                raise ConnectionError(f"service down (call for {x!r})")
            return x * 10 if isinstance(x, int) else x
        finally:
            self.in_flight -= 1


def run(flow: sw.Flow, clock: sw.VirtualClock, **kw: Any) -> sw.RunResult:
    return sw.run(flow, clock=clock, handle_signals=False, **kw)


def test_results_keep_input_order_and_concurrency_is_bounded() -> None:
    clock = sw.VirtualClock()
    service = Service(clock)
    flow = sw.Flow("ordered")
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow.source(sw.sources.Iterable(range(1000))).map_async(service, concurrency=100).sink(out)
    result = run(flow, clock)
    assert out.items == [x * 10 for x in range(1000)]
    assert service.max_in_flight == 100
    # 1000 calls of 10 ms, 100 at a time: about 100 ms of (virtual) time, not 10 s.
    assert 0.099 <= result.elapsed < 0.2


def test_unordered_results_leave_as_they_complete() -> None:
    clock = sw.VirtualClock()

    async def varying(x: int) -> int:
        await clock.sleep(0.001 * (10 - x))  # later records finish first
        return x

    flow = sw.Flow("unordered")
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    src = flow.source(sw.sources.Iterable(range(10)))
    src.map_async(varying, concurrency=10, ordered=False).sink(out)
    run(flow, clock)
    assert out.items == list(range(9, -1, -1))


def test_a_slow_service_holds_the_source_back() -> None:
    """Backpressure: with 2 calls in flight at a time, the source is pulled only as far as
    the channel in front of map_async allows."""
    clock = sw.VirtualClock()
    service = Service(clock, latency=1.0)
    flow = sw.Flow("backpressure", channel_capacity=8)
    seen: list[int] = []
    out: sw.sinks.Collect[int] = sw.sinks.Collect()

    def pulled(handle_box: list[sw.FlowHandle]) -> None:
        m = handle_box[0].metrics()
        seen.append(m.operator("source_Iterable").records_out - service.calls)

    boxes: list[sw.FlowHandle] = []
    (
        flow.source(sw.sources.Iterable(range(200)))
        .map_async(service, concurrency=2)
        .inspect(lambda _: pulled(boxes))
        .sink(out)
    )

    async def main() -> None:
        handle = sw.start(flow, clock=clock, max_batch_size=4)
        boxes.append(handle)
        await handle.wait()

    asyncio.run(main())
    assert len(out.items) == 200
    # Pulled but not yet called: at most the channel (8) plus a batch in hand (4).
    assert max(seen) <= 8 + 4
    assert service.max_in_flight == 2


def test_timeouts_go_to_the_error_policy() -> None:
    clock = sw.VirtualClock()

    async def sometimes_slow(x: int) -> int:
        await clock.sleep(5.0 if x % 3 == 0 else 0.01)
        return x

    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("timeouts")
    (
        flow.source(sw.sources.Iterable(range(9)))
        .map_async(sometimes_slow, concurrency=4, timeout=1.0, on_error=sw.DeadLetter(dead))
        .sink(out)
    )
    result = run(flow, clock)
    assert out.items == [1, 2, 4, 5, 7, 8]
    assert [d.record for d in dead.items] == [0, 3, 6]
    assert all(d.error_type == "TimeoutError" for d in dead.items)
    assert "timed out after 1s" in dead.items[0].error_message
    assert result.elapsed < 5.0  # the slow calls were cut off, not waited for


def test_a_failing_call_fails_the_flow_naming_the_record() -> None:
    clock = sw.VirtualClock()

    async def boom(x: int) -> int:
        await clock.sleep(0.01)
        if x == 7:
            raise ValueError("bad seven")
        return x

    flow = sw.Flow("fails")
    flow.source(sw.sources.Iterable(range(20))).map_async(boom).sink(sw.sinks.Collect())
    with pytest.raises(sw.OperatorError, match=r"bad seven") as err:
        run(flow, clock)
    assert err.value.record == 7


def test_retries_with_backoff_then_succeeds() -> None:
    clock = sw.VirtualClock()
    attempts: dict[int, int] = {}

    async def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        await clock.sleep(0.01)
        if attempts[x] < 3:
            raise ConnectionError("try again")
        return x

    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("retries")
    policy = sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.1, jitter=0.0))
    flow.source(sw.sources.Iterable(range(5))).map_async(flaky, on_error=policy).sink(out)
    result = run(flow, clock)
    assert out.items == [0, 1, 2, 3, 4]
    assert attempts == dict.fromkeys(range(5), 3)
    assert result.metrics.operator("map_async_flaky").retries == 10


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("max_batch_size", [1, 3, 1024])
def test_watermarks_wait_for_the_records_in_flight(ordered: bool, max_batch_size: int) -> None:
    """Calls with very different latencies, then an event-time window: the watermark
    after a batch must not overtake records still in flight, and (unordered) a record
    that arrived later and finished first must not carry the watermark past them."""
    clock = sw.VirtualClock()

    async def lookup(e: dict[str, Any]) -> dict[str, Any]:
        await clock.sleep(3.0 if e["ts"] % 2 else 0.001)
        return e

    records = [{"ts": float(t)} for t in range(40)]
    flow = sw.Flow("watermarks")
    results: sw.sinks.Collect[sw.WindowResult] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    windows = (
        flow.source(sw.sources.Iterable(records))
        .with_timestamps(lambda e: e["ts"])
        .map_async(lookup, concurrency=8, ordered=ordered)
        .window(sw.windows.Tumbling(10.0))
        .aggregate(sw.agg.count())
    )
    windows.sink(results)
    windows.late().sink(late)
    run(flow, clock, max_batch_size=max_batch_size)
    assert late.items == []
    assert [r.value for r in results.items] == [10, 10, 10, 10]


def test_a_graceful_stop_drains_the_calls_in_flight() -> None:
    clock = sw.VirtualClock()
    service = Service(clock, latency=2.0)
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("drain")
    src = flow.source(sw.sources.Generator(lambda: iter(range(10**9)), rate=100))
    src.map_async(service, concurrency=50).sink(out)

    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=clock)
        await clock.sleep(1.0)
        handle.request_stop()
        return await handle.wait()

    result = asyncio.run(main())
    assert result.stopped
    pulled = result.metrics.operator("source_Generator").records_out
    assert pulled > 0
    assert out.items == [x * 10 for x in range(pulled)]  # every call finished and left


def test_adaptive_concurrency_settles_near_the_service_capacity() -> None:
    """A service that serves 40 calls at once in 10 ms, and queues beyond that (latency
    grows with load): the adaptive limit rises from 4 and settles near 40."""
    clock = sw.VirtualClock()
    service = Service(clock, latency=0.010, capacity=40)
    adaptive = Adaptive(min=1, max=500, initial=4)
    limits: list[int] = []
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("adaptive")
    (
        flow.source(sw.sources.Iterable(range(20_000)))
        .map_async(service, concurrency=adaptive)
        .inspect(lambda _: limits.append(adaptive.limit))
        .sink(out)
    )
    run(flow, clock)
    assert len(out.items) == 20_000
    settled = limits[len(limits) // 2 :]
    mean = sum(settled) / len(settled)
    assert 28 <= mean <= 56, mean
    assert max(limits) < 80


def test_adaptive_limit_backs_off_on_failures() -> None:
    a = Adaptive(min=2, max=100, initial=50)
    for _ in range(50):
        a.on_complete(0.01, ok=False, in_flight=50)
    assert a.limit == 40
    with pytest.raises(ValueError, match="max"):
        Adaptive(min=5, max=2)


def test_an_open_breaker_holds_records_back_and_nothing_is_lost() -> None:
    clock = sw.VirtualClock()
    service = Service(clock, latency=0.01)
    service.fail_until = 0.5  # calls started in the first half second fail
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=2.0)
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("breaker-wait")
    policy = sw.Retry(attempts=10, backoff=sw.Backoff(initial=0.05, jitter=0.0))
    (
        flow.source(sw.sources.Iterable(range(50)))
        .map_async(service, concurrency=1, breaker=breaker, on_error=policy)
        .sink(out)
    )
    run(flow, clock)
    assert out.items == [x * 10 for x in range(50)]
    # Opened after 3 failures (~0.03 s); no call started while open (for 2 s).
    opened = service.started_at[2]
    assert not [t for t in service.started_at if opened + 0.011 < t < opened + 2.0]
    assert breaker.state == "closed"
    assert breaker.transitions >= 3  # closed -> open -> half_open -> closed


def test_an_open_breaker_can_send_records_to_dead_letters() -> None:
    clock = sw.VirtualClock()
    service = Service(clock, latency=0.01)
    service.fail_until = 1.0  # calls that start in the first second fail
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=1.0)
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("breaker-dlq")
    (
        flow.source(sw.sources.Generator(lambda: iter(range(30)), rate=10))
        .map_async(
            service,
            concurrency=1,
            breaker=breaker,
            when_open="dead_letter",
            on_error=sw.DeadLetter(dead),
        )
        .sink(out)
    )
    run(flow, clock)
    kinds = {d.error_type for d in dead.items}
    assert kinds == {"ConnectionError", CircuitOpenError.__name__}
    assert sorted([d.record for d in dead.items] + [x // 10 for x in out.items]) == list(range(30))
    # Two failures opened it; for a second records went to the dead letters unattempted;
    # then a trial call found the service back, and it closed.
    assert [d.error_type for d in dead.items][:2] == ["ConnectionError", "ConnectionError"]
    assert breaker.state == "closed"


def test_bad_arguments_are_refused_clearly() -> None:
    flow = sw.Flow("bad")
    s = flow.source(sw.sources.Iterable([1]))

    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="async function"):
        s.map_async(lambda x: x)
    with pytest.raises(ValueError, match=">= 1"):
        s.map_async(f, concurrency=0)
    with pytest.raises(ValueError, match="'wait' or 'dead_letter'"):
        s.map_async(f, when_open="drop")
    with pytest.raises(sw.FlowDefinitionError, match=r"needs on_error=sw\.DeadLetter"):
        s.map_async(f, breaker=CircuitBreaker(), when_open="dead_letter")
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)


class FlakySink(sw.sinks.Sink):
    """Fails every write while ``down``; records each attempt's instant."""

    def __init__(self, clock: sw.VirtualClock, down_until: float) -> None:
        self.clock = clock
        self.down_until = down_until
        self.items: list[Any] = []
        self.attempts: list[float] = []

    async def write(self, batch: sw.Batch) -> None:
        now = self.clock.monotonic()
        self.attempts.append(now)
        if now < self.down_until:
            raise ConnectionError("sink down")
        self.items.extend(batch.values)


def test_a_breaker_on_a_sink_stops_writing_while_it_fails() -> None:
    clock = sw.VirtualClock()
    sink = FlakySink(clock, down_until=3.0)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0, name="db")
    flow = sw.Flow("sink-breaker")
    policy = sw.Retry(attempts=100, backoff=sw.Backoff(initial=0.01, max_delay=0.01, jitter=0.0))
    flow.source(sw.sources.Iterable(range(10))).sink(
        sink, breaker=breaker, on_error=policy, name="db_sink"
    )
    result = run(flow, clock)
    assert sink.items == list(range(10))
    m = result.metrics.operator("db_sink")  # state changes are metrics too
    assert m.circuit_state == "closed"
    assert 1 <= m.circuit_opens <= 4
    # Without the breaker, retries every 10 ms would make ~300 attempts in 3 s; with it,
    # 3 failures open it, then one trial per second.
    assert len(sink.attempts) <= 3 + 3 + 1
    assert breaker.state == "closed"


def test_a_breaker_on_a_sink_can_dead_letter_while_open() -> None:
    clock = sw.VirtualClock()
    sink = FlakySink(clock, down_until=0.25)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.5)
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("sink-breaker-dlq")
    source = sw.sources.Generator(lambda: iter(range(10)), rate=10)
    flow.source(source).sink(
        sink, breaker=breaker, when_open="dead_letter", on_error=sw.DeadLetter(dead)
    )
    run(flow, clock)
    assert sorted(sink.items + [d.record for d in dead.items]) == list(range(10))
    assert {d.error_type for d in dead.items} == {"ConnectionError", "CircuitOpenError"}


def test_the_async_and_breaker_examples_in_the_docs_run() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "flow-control.md").read_text()
    section = page.split("## Async I/O and adaptive concurrency", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(block, {"__name__": "docs_example"})


def test_adaptive_baseline_does_not_creep_up_under_sustained_load() -> None:
    """Rounds far above capacity (every call queued) must not become the new normal: the
    limit keeps coming back down near the capacity however long the overload lasts."""
    a = Adaptive(min=1, max=1000, initial=10)
    capacity = 100

    def round_at(limit: int) -> None:
        latency = 0.010 * max(1.0, limit / capacity)
        for _ in range(limit):
            a.on_complete(latency, ok=True, in_flight=limit)

    for _ in range(5000):
        round_at(a.limit)
    assert capacity <= a.limit <= 1.5 * capacity + 1
    assert a.baseline == 0.010


def test_adaptive_relearns_a_service_that_became_slower_for_good() -> None:
    a = Adaptive(min=1, max=100, initial=50, baseline_rounds=5)
    for _ in range(50):
        a.on_complete(0.010, ok=True, in_flight=50)
    for _ in range(2000):  # now 100 ms at any load
        a.on_complete(0.100, ok=True, in_flight=a.limit)
    assert a.baseline == 0.100
    assert a.limit > 10  # growing again


def test_a_forced_stop_cancels_the_calls_in_flight() -> None:
    clock = sw.VirtualClock()
    started: list[int] = []
    finished: list[int] = []

    async def slow(x: int) -> int:
        started.append(x)
        await clock.sleep(100.0)
        finished.append(x)
        return x

    flow = sw.Flow("forced")
    flow.source(sw.sources.Iterable(range(10))).map_async(slow, concurrency=5).sink(
        sw.sinks.Collect()
    )

    async def main() -> None:
        handle = sw.start(flow, clock=clock)
        await clock.sleep(1.0)
        handle.force_stop()
        with pytest.raises(sw.FlowCancelledError) as err:
            await handle.wait()
        assert "operator map_async_slow" in str(err.value.unflushed)
        await clock.sleep(200.0)  # long after the calls would have finished

    asyncio.run(main())
    assert len(started) == 5
    assert finished == []  # cancelled with the flow, not left running behind it


@pytest.mark.parametrize("ordered", [True, False])
def test_one_hung_call_holds_a_bounded_number_of_results(ordered: bool) -> None:
    """Results wait behind a call that never ends (in order; or, unordered, behind the
    watermark that follows it): they count against the limit, so the operator stops
    taking input instead of piling results up."""
    clock = sw.VirtualClock()

    async def call(x: float) -> float:
        await clock.sleep(10_000.0 if x == 3.0 else 0.01)
        return x

    flow = sw.Flow("hung")
    (
        flow.source(sw.sources.Iterable([float(i) for i in range(100_000)]))
        .with_timestamps(lambda t: t)
        .map_async(call, concurrency=8, ordered=ordered, name="call")
        .sink(sw.sinks.Collect())
    )

    async def main() -> dict[str, int]:
        handle = sw.start(flow, clock=clock, max_batch_size=16)
        await clock.sleep(60.0)
        handle.force_stop()
        with pytest.raises(sw.FlowCancelledError) as err:
            await handle.wait()
        return err.value.unflushed

    held = asyncio.run(main())
    assert held["operator call"] <= 16  # 8 in flight (one hung) + 8 finished, waiting
