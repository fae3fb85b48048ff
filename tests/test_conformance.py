"""Every broker connector against the one conformance suite (tests/conformance.py), on
the real servers: Redis Streams, NATS JetStream, RabbitMQ, MQTT and Kafka sources and
sinks, and the PostgreSQL sink.  Each broker's own edge cases and its outage test are in
tests/test_connector_<broker>.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance import IDLE, SINK_CHECKS, SOURCE_CHECKS, Harness
from services import import_or_missing, redis_prefix, redis_url  # noqa: F401 - fixtures
from services_kafka import KafkaTopics, kafka_bootstrap, kafka_topics  # noqa: F401 - fixtures
from services_mqtt import MqttNames, mqtt_broker, mqtt_names  # noqa: F401 - fixtures
from services_nats import NatsNames, nats_names, nats_url  # noqa: F401 - fixtures
from services_postgres import pg_dsn, pg_table  # noqa: F401 - fixtures
from services_rabbitmq import rabbitmq_queue, rabbitmq_url  # noqa: F401 - fixtures
from sluiceway.connectors.base import Sink, Source

for _module in ("redis", "nats", "aio_pika", "aiomqtt", "psycopg", "confluent_kafka"):
    import_or_missing(_module)

import aio_pika  # noqa: E402 - after the skip-or-fail check above
import aiomqtt  # noqa: E402
import confluent_kafka as ck  # noqa: E402
import nats  # noqa: E402
import psycopg  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402

from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: E402
from sluiceway.connectors.mqtt import MqttSink, MqttSource  # noqa: E402
from sluiceway.connectors.nats import NatsSink, NatsSource  # noqa: E402
from sluiceway.connectors.postgres import PostgresSink  # noqa: E402
from sluiceway.connectors.rabbitmq import RabbitMQSink, RabbitMQSource  # noqa: E402
from sluiceway.connectors.redis_streams import (  # noqa: E402
    RedisStreamSink,
    RedisStreamSource,
)

# -- one harness per broker --------------------------------------------------------------


class RedisStreams:
    name = "redis-streams"
    backlog = 3000

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.stream, self.out = url, f"{prefix}:in", f"{prefix}:out"

    async def setup(self) -> None:
        async with aioredis.Redis.from_url(self.url) as r:
            await r.xgroup_create(self.stream, "g", id="0", mkstream=True)

    def source(self) -> Source:
        return RedisStreamSource(
            self.url, self.stream, "g", "c1", start="0", block_ms=100, stop_after_idle=IDLE
        )

    def sink(self) -> Sink:
        return RedisStreamSink(self.url, self.out)

    async def publish(self, values: list[Any]) -> None:
        async with aioredis.Redis.from_url(self.url) as r:
            pipe = r.pipeline(transaction=False)
            for v in values:
                pipe.xadd(self.stream, {"data": json.dumps(v)})
            await pipe.execute()

    async def read_output(self, n: int) -> list[Any]:
        async with aioredis.Redis.from_url(self.url) as r:
            return [json.loads(f[b"data"]) for _, f in await r.xrange(self.out, count=n)]

    async def held(self) -> int:
        async with aioredis.Redis.from_url(self.url) as r:
            [group] = [g for g in await r.xinfo_groups(self.stream) if g["name"] == b"g"]
            return int(group["pending"]) + int(group["lag"] or 0)


class NatsJetStream:
    name = "nats-jetstream"
    backlog = 3000

    def __init__(self, names: NatsNames) -> None:
        self.names = names
        self.out = f"{names.stream}.out"

    async def _js(self) -> Any:
        nc = await nats.connect(self.names.url, allow_reconnect=False, connect_timeout=2)
        return nc, nc.jetstream()

    async def setup(self) -> None:
        nc, js = await self._js()
        try:
            config = StreamConfig(name=self.names.stream, subjects=[self.names.wildcard])
            await js.add_stream(config)
        finally:
            await nc.close()

    def source(self) -> Source:
        n = self.names
        return NatsSource(
            n.url, n.stream, n.subject, durable=n.durable, fetch_timeout=0.2, stop_after_idle=IDLE
        )

    def sink(self) -> Sink:
        return NatsSink(self.names.url, self.out)

    async def publish(self, values: list[Any]) -> None:
        nc, js = await self._js()
        try:
            for v in values:  # one at a time: the stream order is the publish order
                await js.publish(self.names.subject, json.dumps(v).encode())
        finally:
            await nc.close()

    async def read_output(self, n: int) -> list[Any]:
        nc, js = await self._js()
        out: list[Any] = []
        try:
            info = await js.stream_info(self.names.stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(self.names.stream, seq)
                if msg.subject == self.out and msg.data is not None:
                    out.append(json.loads(msg.data))
        finally:
            await nc.close()
        return out[:n]

    async def held(self) -> int:
        nc, js = await self._js()
        try:
            info = await js.consumer_info(self.names.stream, self.names.durable)
            return int(info.num_pending) + int(info.num_ack_pending)
        finally:
            await nc.close()


class RabbitMQ:
    name = "rabbitmq"
    backlog = 3000

    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue, self.out = url, queue, f"{queue}.out"

    async def setup(self) -> None:
        async with await aio_pika.connect(self.url) as conn:
            channel = await conn.channel()
            await channel.declare_queue(self.queue, durable=True)

    def source(self) -> Source:
        return RabbitMQSource(self.url, self.queue, stop_after_idle=IDLE)

    def sink(self) -> Sink:
        return RabbitMQSink(self.url, routing_key=self.out, declare_queue=self.out)

    async def publish(self, values: list[Any]) -> None:
        async with await aio_pika.connect(self.url) as conn:
            channel = await conn.channel()  # publisher confirms: each publish awaits its ack
            for v in values:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(v).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    routing_key=self.queue,
                )

    async def read_output(self, n: int) -> list[Any]:
        out: list[Any] = []
        async with await aio_pika.connect(self.url) as conn:
            queue = await (await conn.channel()).declare_queue(self.out, durable=True)
            while len(out) < n:
                msg = await queue.get(no_ack=True, fail=False, timeout=5)
                if msg is None:
                    break
                out.append(json.loads(msg.body))
        return out

    async def held(self) -> int:
        await asyncio.sleep(0.2)  # the closed connection's unacked messages are requeued
        async with await aio_pika.connect(self.url) as conn:
            queue = await (await conn.channel()).declare_queue(self.queue, passive=True)
            return int(queue.declaration_result.message_count or 0)


class Mqtt:
    name = "mqtt"
    backlog = 900  # Mosquitto keeps at most 1000 queued messages per session by default

    def __init__(self, names: MqttNames) -> None:
        self.host, self.port = names.host, names.port
        self.topic, self.out = names.topic("in"), names.topic("out")
        self.client, self.reader = names.client("src"), names.client("out")

    def _connect(self, cid: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=cid,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=cid is None,
            properties=_session_expiry() if cid is not None else None,
            timeout=5,
        )

    async def setup(self) -> None:
        for cid, topic in ((self.client, self.topic), (self.reader, self.out)):
            async with self._connect(cid) as c:  # persistent sessions, subscribed
                await c.subscribe(topic, qos=1)

    def source(self) -> Source:
        return MqttSource(
            self.host, self.topic, port=self.port, client_id=self.client, stop_after_idle=IDLE
        )

    def sink(self) -> Sink:
        return MqttSink(self.host, self.out, port=self.port)

    async def publish(self, values: list[Any]) -> None:
        async with self._connect() as c:
            for v in values:
                await c.publish(self.topic, json.dumps(v), qos=1)

    async def _drain(self, cid: str, topic: str, n: int | None = None) -> list[Any]:
        got: list[Any] = []
        async with self._connect(cid) as c:
            await c.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                while n is None or len(got) < n:
                    async with asyncio.timeout(1.0):
                        msg = await anext(aiter(c.messages))
                    got.append(json.loads(bytes(msg.payload)))  # type: ignore[arg-type]
        return got

    async def read_output(self, n: int) -> list[Any]:
        return await self._drain(self.reader, self.out, n)

    async def held(self) -> int:
        return len(await self._drain(self.client, self.topic))


class Kafka:
    name = "kafka"
    backlog = 3000

    def __init__(self, topics: KafkaTopics) -> None:
        self.bootstrap = topics.bootstrap
        self.topic, self.out = topics.new(1), topics.new(1)
        self.group = f"{self.topic}.g"

    async def setup(self) -> None:
        pass  # the topics exist; the group starts at the earliest offset

    def source(self) -> Source:
        return KafkaSource(
            self.bootstrap, self.topic, self.group, stop_after_idle=IDLE, poll_timeout=0.1
        )

    def sink(self) -> Sink:
        return KafkaSink(self.bootstrap, self.out)

    async def publish(self, values: list[Any]) -> None:
        def produce() -> None:
            p = ck.Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
            for v in values:
                p.produce(self.topic, json.dumps(v).encode())
            assert p.flush(30) == 0

        await asyncio.to_thread(produce)

    async def read_output(self, n: int) -> list[Any]:
        return await asyncio.to_thread(kafka_read, self.bootstrap, self.out, n)

    async def held(self) -> int:
        def lag() -> int:
            c = ck.Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
            try:
                [tp] = c.committed([ck.TopicPartition(self.topic, 0)], timeout=10)
                _, high = c.get_watermark_offsets(ck.TopicPartition(self.topic, 0), timeout=10)
                return int(high - max(tp.offset, 0))
            finally:
                c.close()

        return await asyncio.to_thread(lag)


def kafka_read(
    bootstrap: str, topic: str, n: int, *, partitions: int = 1, committed: bool = True
) -> list[Any]:
    """The first ``n`` JSON values of ``topic`` (read_committed), in partition order."""
    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        }
    )
    try:
        c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(partitions)])
        out: list[Any] = []
        idle = 0
        while len(out) < n and idle < 5:
            msgs = c.consume(min(1000, n - len(out)), 1.0)
            idle = 0 if msgs else idle + 1
            out += [json.loads(m.value()) for m in msgs if m.error() is None]
        return out
    finally:
        c.close()


def _session_expiry() -> Any:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    return props


class Postgres:
    """The PostgreSQL sink (there is no PostgreSQL source in this release)."""

    name = "postgres"
    backlog = 0

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn, self.table = dsn, table

    async def setup(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f'CREATE TABLE "{self.table}" (i integer, s text)')

    def source(self) -> Source:
        raise NotImplementedError("no PostgreSQL source")

    def sink(self) -> Sink:
        return PostgresSink(self.dsn, self.table)

    async def publish(self, values: list[Any]) -> None:
        raise NotImplementedError("no PostgreSQL source")

    async def read_output(self, n: int) -> list[Any]:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(f'SELECT i, s FROM "{self.table}" ORDER BY i LIMIT %s', (n,))
            return [{"i": i, "s": s} for i, s in await cur.fetchall()]

    async def held(self) -> int:
        raise NotImplementedError("no PostgreSQL source")


HARNESSES: dict[str, Callable[[pytest.FixtureRequest], Harness]] = {
    "redis-streams": lambda rq: RedisStreams(
        rq.getfixturevalue("redis_url"), rq.getfixturevalue("redis_prefix")
    ),
    "nats-jetstream": lambda rq: NatsJetStream(rq.getfixturevalue("nats_names")),
    "rabbitmq": lambda rq: RabbitMQ(
        rq.getfixturevalue("rabbitmq_url"), rq.getfixturevalue("rabbitmq_queue")
    ),
    "mqtt": lambda rq: Mqtt(rq.getfixturevalue("mqtt_names")),
    "kafka": lambda rq: Kafka(rq.getfixturevalue("kafka_topics")),
}
SINKS: dict[str, Callable[[pytest.FixtureRequest], Harness]] = {
    **HARNESSES,
    "postgres": lambda rq: Postgres(rq.getfixturevalue("pg_dsn"), rq.getfixturevalue("pg_table")),
}


@pytest.fixture
def harness_of(request: pytest.FixtureRequest) -> Callable[..., Harness]:
    """Makes a broker's harness from that broker's fixtures (its names, cleaned up)."""

    def make(table: dict[str, Callable[[pytest.FixtureRequest], Harness]], name: str) -> Harness:
        h = table[name](request)
        asyncio.run(h.setup())
        return h

    return make


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", list(SOURCE_CHECKS))
@pytest.mark.parametrize("broker", list(HARNESSES))
def test_source_conformance(
    broker: str, check: str, harness_of: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_of(HARNESSES, broker)
    fn = SOURCE_CHECKS[check]
    args: tuple[Any, ...] = (h, tmp_path) if fn.__code__.co_argcount == 2 else (h,)
    asyncio.run(fn(*args))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", list(SINK_CHECKS))
@pytest.mark.parametrize("broker", list(SINKS))
def test_sink_conformance(broker: str, check: str, harness_of: Callable[..., Harness]) -> None:
    asyncio.run(SINK_CHECKS[check](harness_of(SINKS, broker)))
