"""Built-in sources: ``Iterable``, ``Generator``, ``JsonLines``, ``Csv``, ``Stdin``, and the
push sources ``Push`` and ``HttpIngest`` (fed by the application, with admission)."""

from typing import TYPE_CHECKING

from sluiceway.connectors import lazy_attributes
from sluiceway.connectors.files import Csv
from sluiceway.connectors.files import JsonLinesSource as JsonLines
from sluiceway.connectors.memory import Generator, Iterable
from sluiceway.connectors.push import HttpIngest, Push
from sluiceway.connectors.stdio import Stdin
from sluiceway.core.contract import Source, SourceContext

__all__ = [
    "Csv",
    "Generator",
    "HttpIngest",
    "Iterable",
    "JsonLines",
    "Push",
    "Source",
    "SourceContext",
    "Stdin",
]


if TYPE_CHECKING:  # the lazy names below, typed for mypy and editors
    from sluiceway.connectors.kafka import KafkaSource
    from sluiceway.connectors.lakehouse.sources import DeltaSource, IcebergSource, ParquetSource
    from sluiceway.connectors.mqtt import MqttSource
    from sluiceway.connectors.nats import NatsSource
    from sluiceway.connectors.rabbitmq import RabbitMQSource
    from sluiceway.connectors.redis_streams import RedisStreamSource

    Delta = DeltaSource
    Iceberg = IcebergSource
    Kafka = KafkaSource
    Mqtt = MqttSource
    NatsJetStream = NatsSource
    Parquet = ParquetSource
    RabbitMQ = RabbitMQSource
    RedisStream = RedisStreamSource

# Broker connectors, imported on first use so that ``import sluiceway`` needs none of the
# client libraries (they are extras: ``pip install 'sluiceway[nats]'`` and so on).
_LAZY: dict[str, str] = {
    # "Name": "sluiceway.connectors.<module>",
    "Kafka": "sluiceway.connectors.kafka:KafkaSource",
    "NatsJetStream": "sluiceway.connectors.nats:NatsSource",
    "RabbitMQ": "sluiceway.connectors.rabbitmq:RabbitMQSource",
    "Mqtt": "sluiceway.connectors.mqtt:MqttSource",
    "RedisStream": "sluiceway.connectors.redis_streams:RedisStreamSource",
    "Parquet": "sluiceway.connectors.lakehouse.sources:ParquetSource",
    "Delta": "sluiceway.connectors.lakehouse.sources:DeltaSource",
    "Iceberg": "sluiceway.connectors.lakehouse.sources:IcebergSource",
}


__getattr__, __dir__ = lazy_attributes(__name__, __all__, _LAZY)
