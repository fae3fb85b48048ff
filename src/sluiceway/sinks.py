"""Built-in sinks: ``sw.sinks.Collect``, ``Stdout``, ``Function``, ``JsonLines``."""

from typing import TYPE_CHECKING

from sluiceway.connectors import lazy_attributes
from sluiceway.connectors.files import JsonLinesSink as JsonLines
from sluiceway.connectors.memory import Collect, Function, Stdout
from sluiceway.core.contract import PartialWriteError, Sink, SinkContext

__all__ = [
    "Collect",
    "Function",
    "JsonLines",
    "PartialWriteError",
    "Sink",
    "SinkContext",
    "Stdout",
]


if TYPE_CHECKING:  # the lazy names below, typed for mypy and editors
    from sluiceway.connectors.kafka import KafkaSink
    from sluiceway.connectors.lakehouse.delta import DeltaSink
    from sluiceway.connectors.lakehouse.iceberg import IcebergSink
    from sluiceway.connectors.lakehouse.parquet import ParquetSink
    from sluiceway.connectors.mqtt import MqttSink
    from sluiceway.connectors.nats import NatsSink
    from sluiceway.connectors.postgres import PostgresSink
    from sluiceway.connectors.rabbitmq import RabbitMQSink
    from sluiceway.connectors.redis_streams import RedisStreamSink

    Delta = DeltaSink
    Iceberg = IcebergSink
    Kafka = KafkaSink
    Mqtt = MqttSink
    NatsJetStream = NatsSink
    Parquet = ParquetSink
    Postgres = PostgresSink
    RabbitMQ = RabbitMQSink
    RedisStream = RedisStreamSink

# Broker connectors, imported on first use so that ``import sluiceway`` needs none of the
# client libraries (they are extras: ``pip install 'sluiceway[nats]'`` and so on).
_LAZY: dict[str, str] = {
    # "Name": "sluiceway.connectors.<module>",
    "Kafka": "sluiceway.connectors.kafka:KafkaSink",
    "NatsJetStream": "sluiceway.connectors.nats:NatsSink",
    "RabbitMQ": "sluiceway.connectors.rabbitmq:RabbitMQSink",
    "Postgres": "sluiceway.connectors.postgres",
    "Mqtt": "sluiceway.connectors.mqtt:MqttSink",
    "RedisStream": "sluiceway.connectors.redis_streams:RedisStreamSink",
    "Parquet": "sluiceway.connectors.lakehouse.parquet:ParquetSink",
    "Delta": "sluiceway.connectors.lakehouse.delta:DeltaSink",
    "Iceberg": "sluiceway.connectors.lakehouse.iceberg:IcebergSink",
}


__getattr__, __dir__ = lazy_attributes(__name__, __all__, _LAZY)
