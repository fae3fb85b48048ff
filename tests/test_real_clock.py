"""The real-clock tier: every timer, deadline and sleep, once on the ``SystemClock``.

The virtual clock moves only when the event loop is idle, so it cannot show a stage that
spins without awaiting: virtual time simply stands still with it.  These smoke tests
run each operator and connector that waits on the clock for about a second of real
time under :class:`sluiceway.testing.Watchdog`: the test fails when the event loop
stops turning for more than a second, or when a stop is not honoured within the grace
period.  Each checks that the operator did its job, not only that nothing hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import services_mqtt
import services_nats
import services_rabbitmq
import sluiceway as sw
from services import import_or_missing
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.testing import run_watched
from sluiceway.time import Clock
from sluiceway.time.clock import PROMPT_SWITCH_INTERVAL, yield_now

own_nats = services_nats.own_nats
own_mosquitto = services_mqtt.own_mosquitto
own_rabbitmq = services_rabbitmq.own_rabbitmq

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


class _Exact:
    def process(self, ctx: sw.state.ProcessContext[Any], x: int) -> None:
        at = ctx.processing_time + 0.05
        ctx.map("at").put(at, True)
        ctx.timers.at_processing_time(at)

    def on_timer(self, ctx: sw.state.ProcessContext[Any], t: float) -> None:
        ctx.emit((t in ctx.map("at"), ctx.processing_time >= t))


def test_a_processing_timer_hands_back_its_exact_time_on_the_system_clock() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_exact_timer")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .key_by(lambda x: x % 2)
        .process(_Exact)
        .sink(out)
    )
    result = run_watched(flow, run_for=0.6)
    assert result.stopped
    assert len(out.items) >= 5
    assert all(registered and reached for registered, reached in out.items)


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


# -- windows, batching, idleness --------------------------------------------------------


def test_early_results_of_an_event_time_window() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_early")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .with_timestamps(lambda x: x * 0.01)
        .window(sw.windows.Tumbling(3600), early_every=0.2)  # never closes on its own
        .aggregate(sw.agg.count())
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    early = [r for r in out.items if r.kind == "early"]
    assert len(early) >= 2  # every 0.2 s of the clock
    assert [r.value for r in early] == sorted(r.value for r in early)


def test_batch_max_delay() -> None:
    out: sw.sinks.Collect[list[int]] = sw.sinks.Collect()
    flow = sw.Flow("rt_batch")
    flow.source(sw.sources.Generator(endless, rate=50)).batch(1000, max_delay=0.1).sink(out)
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 5  # lists cut by the delay, not by the size
    assert [x for chunk in out.items for x in chunk] == list(range(sum(map(len, out.items))))


def test_a_timed_list_holds_the_watermark_back() -> None:
    """The list waits 0.1 s of real time for its delay while the end of input (+inf)
    comes in; the watermark waits with it, so the window counts the list on time."""
    results: sw.sinks.Collect[sw.WindowResult] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_batch_watermark")
    windows = (
        flow.source(sw.sources.Iterable([1.0, 2.0, 3.0]))
        .with_timestamps(lambda t: t)
        .batch(10, max_delay=0.1)
        .window(sw.windows.Tumbling(10.0))
        .aggregate(sw.agg.count())
    )
    windows.sink(results)
    windows.late().sink(late)
    run_watched(flow)
    assert ([(r.start, r.value) for r in results.items], late.items) == ([(0.0, 1)], [])


def test_a_dropping_buffer_before_a_fast_consumer_drops_nothing() -> None:
    """A batch larger than the room goes in parts, the reader taking each between them
    (an event-loop turn): on the real loop too, a reader that keeps up loses nothing."""
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_drop")
    flow.source(sw.sources.Iterable(range(20_000))).buffer(
        100, sw.Overflow.DROP_NEWEST, name="buf"
    ).sink(out)
    result = run_watched(flow, run_for=5.0)
    assert out.items == list(range(20_000))
    assert result.metrics.channel("buf.in").records_dropped == 0


async def bursts(n: int, every: float) -> Any:
    """An async source: ``n`` records at once, then a pause of ``every`` seconds."""
    clock = sw.SystemClock()
    for i in itertools.count():
        for j in range(n):
            yield i * n + j
        await clock.sleep(every)


async def wait_for(check: Callable[[], bool], within: float = 3.0) -> bool:
    clock = sw.SystemClock()
    deadline = clock.monotonic() + within
    while not check() and clock.monotonic() < deadline:
        await clock.sleep(0.02)
    return check()


def test_processing_time_session_windows() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_sessions")
    (
        flow.source(sw.sources.Iterable(bursts(5, 0.4)))
        .key_by(lambda x: "k")
        .window(sw.windows.Session(0.2), time="processing")
        .aggregate(sw.agg.count())
        .sink(out)
    )
    seen: list[bool] = []

    async def during(handle: sw.FlowHandle) -> None:
        seen.append(await wait_for(lambda: len(out.items) >= 2))

    run_watched(flow, during=during)
    assert seen == [True]  # sessions closed by the gap on the clock, not by the stop
    assert out.items[0].value == 5


def test_a_quiet_stream_advances_its_watermark_when_idle() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_quiet")
    (
        flow.source(sw.sources.Iterable(bursts(3, 3600)))
        .with_timestamps(lambda x: 1_000.0 + x, advance_when_idle=0.2)
        .window(sw.windows.Tumbling(0.5))
        .aggregate(sw.agg.count())
        .sink(out)
    )
    seen: list[bool] = []

    async def during(handle: sw.FlowHandle) -> None:
        seen.append(await wait_for(lambda: len(out.items) >= 3))

    run_watched(flow, during=during)
    assert seen == [True]  # the windows of the quiet stream closed without new records


def test_an_idle_input_stops_holding_the_merged_watermark() -> None:
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_idle")
    quiet = flow.source(sw.sources.Iterable(bursts(1, 3600)), name="quiet").with_timestamps(
        lambda x: 0.0, idle_timeout=0.2
    )
    busy = flow.source(sw.sources.Generator(endless, rate=50), name="busy").with_timestamps(
        lambda x: x * 0.1
    )
    (quiet.merge(busy).window(sw.windows.Tumbling(1.0)).aggregate(sw.agg.count()).sink(out))
    seen: list[bool] = []

    async def during(handle: sw.FlowHandle) -> None:
        seen.append(await wait_for(lambda: len(out.items) >= 2))

    run_watched(flow, during=during)
    assert seen == [True]


# -- errors, async calls, checkpoints, files --------------------------------------------


def test_retries_with_backoff() -> None:
    attempts: dict[int, int] = {}

    def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] < 3:
            raise ValueError(f"try again: {x}")
        return x

    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_retry")
    policy = sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.02, multiplier=2.0))
    flow.source(sw.sources.Generator(endless, rate=20)).map(flaky, on_error=policy).sink(out)
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 5
    assert out.items == list(range(len(out.items)))


def test_retries_with_linear_backoff() -> None:
    attempts: dict[int, int] = {}

    def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] < 3:
            raise ValueError(f"try again: {x}")
        return x

    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_retry_linear")
    backoff = sw.Backoff(kind="linear", initial=0.01, step=0.02, max_delay=0.05)
    flow.source(sw.sources.Generator(endless, rate=20)).map(
        flaky, on_error=sw.Retry(attempts=3, backoff=backoff)
    ).sink(out)
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(out.items) >= 5
    assert out.items == list(range(len(out.items)))


def test_map_async_timeouts_and_a_circuit_breaker() -> None:
    clock = sw.SystemClock()
    calls: list[int] = []

    async def sometimes_stuck(x: int) -> int:
        calls.append(x)
        if len(calls) in (2, 3):
            await clock.sleep(3600)  # stuck: the timeout cuts it off
        return x

    dead: sw.sinks.Collect[Any] = sw.sinks.Collect()
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_async_breaker")
    (
        flow.source(sw.sources.Generator(endless, rate=50))
        .map_async(
            sometimes_stuck,
            concurrency=2,
            timeout=0.05,
            breaker=sw.CircuitBreaker(failure_threshold=2, reset_timeout=0.2),
            on_error=sw.DeadLetter(dead),
        )
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0)
    assert result.stopped
    assert len(dead.items) == 2  # the two timeouts
    assert len(out.items) >= 10  # the breaker closed again after its reset timeout


def test_checkpoints_on_their_interval(tmp_path: Path) -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_checkpoints")
    (
        flow.source(sw.sources.Generator(endless, rate=100))
        .key_by(lambda x: x % 2)
        .stateful_map(lambda n, x: ((n or 0) + 1, x))
        .sink(out)
    )
    result = run_watched(flow, run_for=1.0, checkpoints=sw.Checkpoints(tmp_path, interval=0.1))
    assert result.stopped
    assert result.checkpoints is not None
    assert result.checkpoints.completed >= 3


def test_work_in_a_thread_is_not_starved_by_a_busy_event_loop() -> None:
    """A checkpoint's write runs in a thread while the event loop is busy with records:
    the thread must get the interpreter lock each time it asks for it (here 300 SQLite
    statements and hashes, each letting it go and taking it back), not only when it wins
    a race against the loop's turns (CK-2M: a 0.1 s write once took 15 s on an idle
    machine; this test, with the loop's turns shorter than the lowered switch interval,
    failed 2 runs in 3 until the loop's yield points handed the lock over).  The interval
    is lowered while the thread runs, and put back after."""
    clock = sw.SystemClock()
    block = b"x" * 65_536  # sha256 lets the lock go above 2 kB

    def statements() -> int:
        with contextlib.closing(sqlite3.connect(":memory:")) as db:
            db.execute("CREATE TABLE t (x BLOB)")
            for _ in range(300):
                db.execute("INSERT INTO t VALUES (?)", (hashlib.sha256(block).digest(),))
            return int(db.execute("SELECT count(*) FROM t").fetchone()[0])

    def work() -> int:  # a batch of records: 0.1-1 ms of Python, by the machine
        return sum(i * i for i in range(3_000))

    async def main() -> tuple[bool, float]:
        lowest = sys.getswitchinterval()
        deadline = clock.monotonic() + 20.0
        done = asyncio.ensure_future(clock.run_in_thread(statements))
        while not done.done() and clock.monotonic() < deadline:
            work()
            lowest = min(lowest, sys.getswitchinterval())
            await yield_now()  # the runtime's turn between two batches
        finished = done.done()
        done.cancel()
        await asyncio.gather(done, return_exceptions=True)
        return finished, lowest

    before = sys.getswitchinterval()
    finished, lowest = asyncio.run(main())
    assert finished, "the thread's 300 statements did not finish within 20 s of a busy loop"
    assert lowest == pytest.approx(PROMPT_SWITCH_INTERVAL)  # lowered while the thread ran
    assert sys.getswitchinterval() == before  # and put back


def test_a_followed_file_is_read_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_text("")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_follow")
    flow.source(sw.sources.JsonLines(path, follow=True, poll_interval=0.05)).sink(out)
    seen: list[bool] = []

    async def during(handle: sw.FlowHandle) -> None:
        clock = sw.SystemClock()
        for i in range(5):
            with path.open("a") as f:
                f.write(json.dumps({"i": i}) + "\n")
            await clock.sleep(0.1)
        seen.append(await wait_for(lambda: len(out.items) == 5))

    run_watched(flow, during=during)
    assert seen == [True]
    assert out.items == [{"i": i} for i in range(5)]


# -- broker sources: a stop while they wait to reconnect ----------------------------------


def _redis_source(request: pytest.FixtureRequest) -> tuple[sw.sources.Source, Callable[[], None]]:
    server = request.getfixturevalue("own_redis")
    import_or_missing("redis")
    from sluiceway.connectors.redis_streams import RedisStreamSource  # noqa: PLC0415

    src = RedisStreamSource(server.url, "rt", "g", start="0", block_ms=50)
    return src, lambda: server.stop(signal.SIGKILL)


def _nats_source(request: pytest.FixtureRequest) -> tuple[sw.sources.Source, Callable[[], None]]:
    server = request.getfixturevalue("own_nats")
    import_or_missing("nats")
    import nats  # noqa: PLC0415
    from nats.js.api import StreamConfig  # noqa: PLC0415

    from sluiceway.connectors.nats import NatsSource  # noqa: PLC0415

    async def make_stream() -> None:
        nc = await nats.connect(server.url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="RT", subjects=["RT.>"]))
        finally:
            await nc.close()

    asyncio.run(make_stream())
    src = NatsSource(server.url, "RT", "RT.in", durable="rt", fetch_timeout=0.1)
    return src, lambda: server.stop(signal.SIGKILL)


def _mqtt_source(request: pytest.FixtureRequest) -> tuple[sw.sources.Source, Callable[[], None]]:
    server = request.getfixturevalue("own_mosquitto")
    import_or_missing("paho.mqtt")
    from sluiceway.connectors.mqtt import MqttSource  # noqa: PLC0415

    src = MqttSource(server.host, "rt/in", port=server.port, client_id="rt-src")
    return src, lambda: server.stop(signal.SIGKILL)


def _rabbitmq_source(
    request: pytest.FixtureRequest,
) -> tuple[sw.sources.Source, Callable[[], None]]:
    server = request.getfixturevalue("own_rabbitmq")
    import_or_missing("aio_pika")
    from sluiceway.connectors.rabbitmq import RabbitMQSource  # noqa: PLC0415

    return RabbitMQSource(server.url, "rt-in"), server.kill


@pytest.mark.parametrize(
    "make",
    [_redis_source, _nats_source, _mqtt_source, _rabbitmq_source],
    ids=["redis", "nats", "mqtt", "rabbitmq"],
)
def test_a_broker_source_waiting_to_reconnect_stops_at_once(
    make: Callable[[pytest.FixtureRequest], tuple[sw.sources.Source, Callable[[], None]]],
    request: pytest.FixtureRequest,
) -> None:
    """The broker dies under an idle source: the source backs off and retries on the
    clock (the loop keeps turning), and a stop then ends the flow within its grace."""
    source, kill = make(request)
    flow = sw.Flow("rt_reconnect")
    flow.source(source, name="src").sink(sw.sinks.Collect())

    async def during(handle: sw.FlowHandle) -> None:
        clock = sw.SystemClock()
        await clock.sleep(0.3)  # connected, waiting for messages
        await asyncio.to_thread(kill)
        await clock.sleep(1.0)  # lost; backing off and reconnecting

    result = run_watched(flow, during=during, grace_period=1.0)
    assert result.stopped


def test_an_idle_http_connection_is_closed_at_its_request_timeout() -> None:
    """The Prometheus exporter (and the web view, same server) answer 408 and close a
    connection that sent nothing within ``request_timeout``."""
    import_or_missing("prometheus_client")
    from sluiceway.metrics.prometheus import PrometheusExporter  # noqa: PLC0415
    from sluiceway.testing import Watchdog  # noqa: PLC0415

    exporter = PrometheusExporter(port=0)
    exporter.request_timeout = 0.3
    flow = sw.Flow("rt_http")
    flow.source(sw.sources.Generator(endless, rate=50)).sink(sw.sinks.Collect())

    async def main() -> tuple[bytes, float]:
        clock = sw.SystemClock()
        async with Watchdog(max_stall=1.0) as dog:
            handle = sw.start(flow)
            serving = asyncio.ensure_future(exporter(handle))
            port = await exporter.wait_serving()
            t0 = clock.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await reader.read()
            waited = clock.monotonic() - t0
            writer.close()
            dog.expect_end_within(3.0, "the stop")
            await handle.stop()
            await serving
        return data, waited

    data, waited = asyncio.run(main())
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.25 <= waited < 2.0


def test_a_broker_that_is_not_there_fails_the_start_after_open_timeout() -> None:
    from services import free_port  # noqa: PLC0415

    import_or_missing("redis")
    source = sw.sources.RedisStream(
        f"redis://127.0.0.1:{free_port()}/0", "s", "g", open_timeout=0.5
    )
    flow = sw.Flow("rt_open")
    flow.source(source, name="src").sink(sw.sinks.Collect())
    with pytest.raises(
        sw.ConnectorOpenError, match=r"unreachable for 0\.\d s \(open_timeout=0\.5\)"
    ):
        run_watched(flow, run_for=3.0)


def test_rejected_redis_stream_entries_are_claimed_again_after_retry_after(
    redis_url: str, redis_prefix: str
) -> None:
    import_or_missing("redis")
    import redis  # noqa: PLC0415

    from sluiceway.connectors.redis_streams import RedisStreamSource  # noqa: PLC0415

    stream = f"{redis_prefix}:rt"
    client = redis.Redis.from_url(redis_url)
    try:
        for i in range(20):
            client.xadd(stream, {"data": json.dumps({"i": i})})
    finally:
        client.close()
    src = RedisStreamSource(redis_url, stream, "g", start="0", block_ms=200, stop_after_idle=0.3)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rt_redis_reject")
    (
        flow.source(src)
        .rate_limit(
            sw.flowcontrol.TokenBucket(rate=40, burst=4), when_limited="reject", retry_after=0.1
        )
        .sink(out)
    )
    result = run_watched(flow, run_for=5.0)
    assert not result.stopped  # ended by itself: every rejection came back in time
    assert sorted(r["i"] for r in out.items) == list(range(20))
    assert src.rejected > 0


class _SlowOpening(sw.sinks.Collect[int]):
    """Collects, after an ``open`` that takes 0.3 s of the clock (a producer's
    ``init_transactions``, a checkpoint restore)."""

    async def open(self, ctx: Any) -> None:
        await ctx.clock.sleep(0.3)
        await super().open(ctx)


def test_a_flow_says_when_it_runs_after_a_slow_open() -> None:
    """``FlowHandle.wait_running``: the time a task's restore ends (the worker's restore
    times are measured with it)."""
    out = _SlowOpening()
    flow = sw.Flow("rt_running")
    flow.source(sw.sources.Generator(endless, rate=100)).sink(out)
    seen: list[tuple[float, float | None, float]] = []

    async def during(handle: sw.FlowHandle) -> None:
        asked = handle.clock.monotonic()
        assert handle.running_since is None
        running = await handle.wait_running()
        seen.append((asked, running, handle.clock.monotonic()))
        await handle.clock.sleep(0.3)  # then it runs: records come through

    run_watched(flow, run_for=2.0, during=during)
    [(asked, running, after)] = seen
    assert running is not None
    assert asked + 0.25 <= running <= after
    assert out.items


class _FailsToOpen(sw.sinks.Collect[int]):
    async def open(self, ctx: Any) -> None:
        await ctx.clock.sleep(0.1)
        raise OSError("no such server")


def test_a_flow_that_ends_before_it_runs_says_so() -> None:
    """``wait_running`` returns None when the flow ends first (it never ran)."""
    flow = sw.Flow("rt_never_running")
    flow.source(sw.sources.Generator(endless, rate=100)).sink(_FailsToOpen())

    async def main() -> float | None:
        handle = sw.start(flow)
        running = await asyncio.wait_for(handle.wait_running(), 5)
        with pytest.raises(sw.SluicewayError):
            await handle.wait()
        return running

    assert asyncio.run(main()) is None
