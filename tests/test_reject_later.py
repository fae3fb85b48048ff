"""rate_limit(when_limited="reject"): records over the limit go back to the broker for a
later redelivery instead of being waited for -- and every one of them is processed, once.

The operator logic runs on a virtual clock against an in-process source that redelivers
like a broker; each broker connector that supports it is then tested against its real
server (see services_*.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import services_nats
import services_rabbitmq
import sluiceway as sw
from services import import_or_missing
from sluiceway.flowcontrol import KeyedLimiter, TokenBucket

nats_url = services_nats.nats_url
nats_names = services_nats.nats_names
rabbitmq_url = services_rabbitmq.rabbitmq_url
rabbitmq_queue = services_rabbitmq.rabbitmq_queue


class Redelivering(sw.sources.Source):
    """A broker in a list: hands out records, takes rejected ones back and offers them
    again after their delay (on the flow's clock); ends once everything was handed out
    and nothing is waiting to come back."""

    def __init__(self, records: list[Any], *, batch: int = 8) -> None:
        self.ready: deque[Any] = deque(records)
        self.later: list[tuple[float, Any]] = []
        self.last: list[Any] = []
        self.deliveries: Counter[Any] = Counter()
        self.batch = batch
        self.clock: sw.Clock | None = None

    async def open(self, ctx: sw.sources.SourceContext) -> None:
        self.clock = ctx.clock

    async def next_batch(self, max_records: int) -> sw.Batch | None:
        clock = self.clock
        assert clock is not None
        while not self.ready:
            if not self.later:
                return None
            due = min(t for t, _ in self.later)
            await clock.sleep_until(due)
            now = clock.monotonic()
            self.ready.extend(r for t, r in self.later if t <= now)
            self.later = [(t, r) for t, r in self.later if t > now]
        n = min(max_records, self.batch, len(self.ready))
        self.last = [self.ready.popleft() for _ in range(n)]
        self.deliveries.update(self.last)
        return sw.Batch(list(self.last))

    async def redeliver_later(self, indices: Sequence[int], delay: float) -> None:
        assert self.clock is not None
        at = self.clock.monotonic() + delay
        self.later += [(at, self.last[i]) for i in indices]


def test_over_the_limit_goes_back_for_later_and_everything_is_processed_once() -> None:
    records = [f"{tenant}{i}" for i in range(20) for tenant in "ab"]
    src = Redelivering(records)
    out = sw.testing.TimedCollect()
    flow = sw.Flow("reject")
    (
        flow.source(src)
        .key_by(lambda r: r[0])
        .rate_limit(
            KeyedLimiter(lambda: TokenBucket(rate=4, burst=2)),
            when_limited="reject",
            retry_after=0.5,
            name="per_tenant",
        )
        .sink(out)
    )
    clock = sw.VirtualClock()
    sw.testing.run_flow(flow, clock=clock)
    done = [r for _, r in out.items]
    assert Counter(done) == Counter(records)  # every record exactly once
    assert max(src.deliveries.values()) > 1  # some came back, more than once
    for tenant in "ab":  # each tenant's rate held: at most burst + rate * t by any time t
        times = [t for t, r in out.items if r[0] == tenant]
        assert all(k + 1 <= 2 + 4 * t + 1e-9 for k, t in enumerate(times))


def test_reject_is_refused_where_records_could_not_go_back() -> None:
    flow = sw.Flow("x")
    with pytest.raises(sw.FlowDefinitionError, match="cannot hand records back"):
        flow.source(sw.sources.Iterable([1])).rate_limit(TokenBucket(1, 1), when_limited="reject")
    mapped = flow.source(Redelivering([1])).map(str)
    with pytest.raises(sw.FlowDefinitionError, match="must follow its broker source directly"):
        mapped.rate_limit(TokenBucket(1, 1), when_limited="reject")
    with pytest.raises(ValueError, match="when_limited must be 'wait' or 'reject', got 'drop'"):
        mapped.rate_limit(TokenBucket(1, 1), when_limited="drop")  # type: ignore[arg-type]
    branching = sw.Flow("branching")
    s = branching.source(Redelivering([1]))
    s.rate_limit(TokenBucket(1, 1), when_limited="reject").sink(sw.sinks.Collect())
    s.sink(sw.sinks.Collect())
    with pytest.raises(sw.FlowDefinitionError, match="processed twice"):
        sw.testing.run_flow(branching)


def test_mqtt_and_kafka_sources_pause_instead_and_say_so_at_build() -> None:
    """MQTT has no negative acknowledgement and Kafka commits offsets: no hand-back.  The
    flow is refused when built, naming the mode that pauses the source instead."""
    import_or_missing("aiomqtt")
    from sluiceway.connectors.mqtt import MqttSource  # noqa: PLC0415 - needs aiomqtt

    sources: list[sw.sources.Source] = [MqttSource("127.0.0.1", "t/#", client_id="x")]
    if importlib.util.find_spec("confluent_kafka") is not None:
        from sluiceway.connectors.kafka import KafkaSource  # noqa: PLC0415

        sources.append(KafkaSource("127.0.0.1:9092", "t", group="g"))
    for src in sources:
        flow = sw.Flow("no-hand-back")
        with pytest.raises(sw.FlowDefinitionError, match=r"use when_limited='wait' \(the source"):
            flow.source(src).rate_limit(TokenBucket(1, 1), when_limited="reject")


# -- real brokers ---------------------------------------------------------------------------


def test_nats_naks_with_a_delay_and_redelivers_every_rejected_message(
    nats_names: services_nats.NatsNames,
) -> None:
    import_or_missing("nats")
    from test_connector_nats import consumer, make_stream, publish, source  # noqa: PLC0415 - needs nats

    asyncio.run(make_stream(nats_names))
    records = [{"id": i, "tenant": "ab"[i % 2]} for i in range(30)]
    asyncio.run(publish(nats_names.url, nats_names.subject, records))
    # ack_wait 1 s: a NAKed message that the server hands to a pull request that is just
    # expiring comes back after ack_wait (never lost); keep that inside the run
    src = source(nats_names, stop_after_idle=2.5, ack_wait=1.0, include_metadata=True)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("nats-reject")
    (
        flow.source(src)
        .key_by(lambda m: m.payload["tenant"])
        .rate_limit(
            KeyedLimiter(lambda: TokenBucket(rate=10, burst=3)),
            when_limited="reject",
            retry_after=0.2,
        )
        .sink(out)
    )
    sw.run(flow, handle_signals=False)
    assert Counter(m.payload["id"] for m in out.items) == Counter(range(30))  # each once
    assert src.rejected > 0
    assert max(m.delivered for m in out.items) > 1  # they came back from the server
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_pending == 0
    assert info.num_ack_pending == 0  # all acknowledged at the end, none left over


def test_rabbitmq_requeues_every_rejected_message_and_each_is_processed_once(
    rabbitmq_url: str, rabbitmq_queue: str
) -> None:
    import_or_missing("aio_pika")
    from sluiceway.connectors.rabbitmq import RabbitMQSource  # noqa: PLC0415
    from test_connector_rabbitmq import depth, publish  # noqa: PLC0415 - needs aio_pika

    publish(rabbitmq_url, rabbitmq_queue, [json.dumps({"id": i}).encode() for i in range(30)])
    src = RabbitMQSource(rabbitmq_url, rabbitmq_queue, stop_after_idle=1.0, include_metadata=True)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("rabbit-reject")
    (
        flow.source(src)
        .key_by(lambda m: "ab"[m.payload["id"] % 2])
        .rate_limit(
            KeyedLimiter(lambda: TokenBucket(rate=20, burst=3)),
            when_limited="reject",
            retry_after=0.2,
        )
        .sink(out)
    )
    sw.run(flow, handle_signals=False)
    assert Counter(m.payload["id"] for m in out.items) == Counter(range(30))  # each once
    assert src.rejected > 0
    assert any(m.redelivered for m in out.items)  # requeued by the broker, delivered again
    assert asyncio.run(depth(rabbitmq_url, rabbitmq_queue)) == 0  # all acknowledged


def test_redis_streams_leaves_rejected_entries_pending_and_claims_them_again(
    redis_url: str, redis_prefix: str
) -> None:
    import_or_missing("redis")
    from sluiceway.connectors.redis_streams import RedisStreamSource  # noqa: PLC0415
    from test_connector_redis_streams import pending_count, preload  # noqa: PLC0415

    stream = f"{redis_prefix}:jobs"
    preload(redis_url, stream, 30)
    src = RedisStreamSource(
        redis_url, stream, "g", start="0", block_ms=50, stop_after_idle=0.5, include_metadata=True
    )
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    seen: list[Any] = []
    flow = sw.Flow("redis-reject")
    (
        flow.source(src)
        .key_by(lambda e: "ab"[e.value["i"] % 2])
        .rate_limit(
            KeyedLimiter(lambda: TokenBucket(rate=20, burst=3)),
            when_limited="reject",
            retry_after=0.2,
            name="per_tenant",
        )
        .map(lambda e: seen.append(e) or e.value["i"])
        .sink(out)
    )
    result = sw.run(flow, handle_signals=False)
    assert Counter(out.items) == Counter(range(30))  # each once
    assert src.rejected > 0
    assert result.metrics.operator("per_tenant").rejected == src.rejected  # in the metrics
    assert any(e.redelivered for e in seen)  # claimed again from the pending list
    assert pending_count(redis_url, stream, "g") == 0  # all acknowledged at the end


def test_redis_streams_rejected_entries_survive_a_crash_and_a_restore(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A crash while rejected entries wait to be claimed again: the checkpoint's ``hw``
    is past them, yet the restart must deliver them (not acknowledge them as covered)."""
    import_or_missing("redis")
    from sluiceway.connectors.redis_streams import RedisStreamSource  # noqa: PLC0415
    from test_connector_redis_streams import pending_count, preload  # noqa: PLC0415

    stream, n = f"{redis_prefix}:jobs", 60
    preload(redis_url, stream, n)
    out = tmp_path / "out.jsonl"
    ck = sw.Checkpoints(tmp_path / "ck", interval=0.05)

    def build(src: RedisStreamSource, rate: float, retry_after: float) -> sw.Flow:
        flow = sw.Flow("redis-reject-crash")  # the same consumer in both runs
        (
            flow.source(src, name="entries")
            .key_by(lambda r: "ab"[r["i"] % 2])
            .rate_limit(
                KeyedLimiter(lambda: TokenBucket(rate=rate, burst=2)),
                when_limited="reject",
                retry_after=retry_after,
            )
            .sink(sw.sinks.JsonLines(out))
        )
        return flow

    first = RedisStreamSource(redis_url, stream, "g", start="0", block_ms=50)

    def checkpoints_done(handle: sw.FlowHandle) -> int:
        stats = handle.metrics().checkpoints
        return 0 if stats is None else stats.completed

    async def crash() -> None:
        # retry_after 60 s: what is rejected stays pending for the whole first run
        handle = sw.start(build(first, rate=2, retry_after=60.0), checkpoints=ck)
        deadline = time.monotonic() + 20
        while not (first.rejected and checkpoints_done(handle) >= 5):
            assert not handle.done(), await handle.wait()
            assert time.monotonic() < deadline, "no checkpoint with a rejection pending"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # more checkpoints, with hw past the rejected entries
        handle.force_stop("simulated crash")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()

    asyncio.run(crash())
    assert first.position()["rejected"]  # rejected entries were waiting
    assert pending_count(redis_url, stream, "g") >= first.rejected
    second = RedisStreamSource(redis_url, stream, "g", start="0", block_ms=50, stop_after_idle=1.0)
    sw.run(build(second, rate=200, retry_after=0.05), checkpoints=ck, handle_signals=False)
    rows = [json.loads(line)["i"] for line in out.read_text().splitlines()]
    assert sorted(rows) == list(range(n))  # nothing lost, nothing twice
    assert pending_count(redis_url, stream, "g") == 0


def test_rabbitmq_rejected_messages_are_never_skipped_as_covered_after_a_restore(
    rabbitmq_url: str, rabbitmq_queue: str, tmp_path: Path
) -> None:
    """A crash between storing a checkpoint and its acks: the restored source skips the
    redeliveries that checkpoint covers, but a message a rejecting rate limit requeued was
    handed out and not processed -- it must come out once, not be skipped as covered."""
    import_or_missing("aio_pika")
    from sluiceway.connectors.rabbitmq import RabbitMQSource  # noqa: PLC0415
    from test_connector_rabbitmq import _AckNeverSent, depth, publish  # noqa: PLC0415

    n = 60
    publish(rabbitmq_url, rabbitmq_queue, [json.dumps({"i": i}).encode() for i in range(n)])
    out = tmp_path / "out.jsonl"
    ck = sw.Checkpoints(tmp_path / "ck", interval=0.1)

    def build(src: RabbitMQSource, rate: float) -> sw.Flow:
        flow = sw.Flow("rabbit-reject-crash")
        (
            flow.source(src, name="messages")
            .key_by(lambda r: "ab"[r["i"] % 2])
            .rate_limit(
                KeyedLimiter(lambda: TokenBucket(rate=rate, burst=2)),
                when_limited="reject",
                retry_after=0.05,
            )
            .sink(sw.sinks.JsonLines(out))
        )
        return flow

    first = _AckNeverSent(rabbitmq_url, rabbitmq_queue, after=20)

    async def crash() -> None:
        handle = sw.start(build(first, rate=20), checkpoints=ck)
        deadline = time.monotonic() + 20
        while first.hung_at is None:
            assert not handle.done(), await handle.wait()
            assert time.monotonic() < deadline, "no checkpoint covered 20 records"
            await asyncio.sleep(0.01)
        handle.force_stop("simulated crash after storing a checkpoint, before its acks")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()

    asyncio.run(crash())
    assert first.rejected > 0
    second = RabbitMQSource(rabbitmq_url, rabbitmq_queue, stop_after_idle=1.0)
    sw.run(build(second, rate=2000), checkpoints=ck, handle_signals=False)
    rows = [json.loads(line)["i"] for line in out.read_text().splitlines()]
    assert sorted(rows) == list(range(n))  # nothing lost, nothing twice
    assert second.skipped_redeliveries > 0
    assert asyncio.run(depth(rabbitmq_url, rabbitmq_queue)) == 0
