"""Broker connectors at the flow's start: a server that is not there fails fast
(``open_timeout``, default 10 s, instead of the 60 s ``reconnect_timeout`` meant for
outages mid-run), as one ConnectorOpenError, without a client library's log noise."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import sluiceway as sw
from services import free_port


def _nobody() -> str:
    return f"127.0.0.1:{free_port()}"


CONNECTORS: dict[str, Any] = {
    "redis-source": lambda a, **kw: sw.sources.RedisStream(f"redis://{a}/0", "s", "g", **kw),
    "redis-sink": lambda a, **kw: sw.sinks.RedisStream(f"redis://{a}/0", "s", **kw),
    "nats-source": lambda a, **kw: sw.sources.NatsJetStream(f"nats://{a}", "S", durable="d", **kw),
    "nats-sink": lambda a, **kw: sw.sinks.NatsJetStream(f"nats://{a}", "s.x", **kw),
    "rabbitmq-source": lambda a, **kw: sw.sources.RabbitMQ(f"amqp://guest:guest@{a}/", "q", **kw),
    "rabbitmq-sink": lambda a, **kw: sw.sinks.RabbitMQ(
        f"amqp://guest:guest@{a}/", routing_key="q", **kw
    ),
    "mqtt-source": lambda a, **kw: sw.sources.Mqtt(
        a.split(":")[0], "t", port=int(a.split(":")[1]), client_id="c", **kw
    ),
    "mqtt-sink": lambda a, **kw: sw.sinks.Mqtt(
        a.split(":")[0], "t", port=int(a.split(":")[1]), **kw
    ),
    "postgres-sink": lambda a, **kw: sw.sinks.Postgres(f"postgresql://u@{a}/db", "t", **kw),
}


def _flow(connector: Any) -> sw.Flow:
    flow = sw.Flow("start")
    if isinstance(connector, sw.sources.Source):
        flow.source(connector, name="conn").sink(sw.sinks.Collect())
    else:
        flow.source(sw.sources.Iterable([{"id": 1}])).sink(connector, name="conn")
    return flow


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_an_unreachable_server_fails_the_start_after_open_timeout(kind: str) -> None:
    clock = sw.VirtualClock()
    connector = CONNECTORS[kind](_nobody())  # reconnect_timeout stays 60 s
    with pytest.raises(sw.ConnectorOpenError) as info:
        sw.run(_flow(connector), clock=clock)
    message = str(info.value)
    assert "'conn'" in message
    assert "open_timeout=10" in message
    # on the flow's clock, not the 60 s of outages (MQTT gives up when its next attempt
    # would come too late)
    assert 5.0 <= clock.monotonic() < 20.0


@pytest.mark.parametrize("kind", ["redis-source", "rabbitmq-sink", "postgres-sink"])
def test_open_timeout_none_waits_as_long_as_reconnect_timeout(kind: str) -> None:
    clock = sw.VirtualClock()
    connector = CONNECTORS[kind](_nobody(), open_timeout=None, reconnect_timeout=30)
    with pytest.raises(sw.ConnectorOpenError, match="reconnect_timeout=30"):
        sw.run(_flow(connector), clock=clock)
    assert 30.0 <= clock.monotonic() < 40.0


def test_a_bad_open_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="open_timeout must be a finite number > 0 seconds"):
        CONNECTORS["redis-sink"](_nobody(), open_timeout=0)


def test_rabbitmq_reports_an_unreachable_broker_once(caplog: pytest.LogCaptureFixture) -> None:
    """One WARNING from sluiceway, not an ERROR from aiormq per attempt."""
    caplog.set_level(logging.INFO)
    with pytest.raises(sw.ConnectorOpenError):
        sw.run(_flow(CONNECTORS["rabbitmq-source"](_nobody())), clock=sw.VirtualClock())
    loud = [(r.name, r.levelname) for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [("sluiceway", "WARNING")], loud
    assert logging.getLogger("aiormq.connection").filters == []  # quiet only meanwhile


def test_the_open_error_masks_a_password_in_the_connectors_message() -> None:
    class Leaky(sw.sources.Source):
        async def open(self, ctx: Any) -> None:
            raise OSError("cannot reach postgresql://ann:s3cret@db:5432/x")

        async def next_batch(self, max_records: int) -> sw.Batch | None:
            return None

    with pytest.raises(sw.ConnectorOpenError) as info:
        sw.run(_flow(Leaky()), clock=sw.VirtualClock())
    assert "postgresql://ann:***@db:5432/x" in str(info.value)
    assert "s3cret" not in str(info.value)
