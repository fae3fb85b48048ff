"""A broker connector whose client library is missing names the extra to install."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import sluiceway as sw
from sluiceway import sinks, sources
from sluiceway.connectors import EXTRAS

ROOT = Path(__file__).resolve().parent.parent

# (namespace, name, the client library's top-level package, extra)
CONNECTORS = [
    ("sources", "RedisStream", "redis", "redis"),
    ("sinks", "RedisStream", "redis", "redis"),
    ("sources", "NatsJetStream", "nats", "nats"),
    ("sinks", "NatsJetStream", "nats", "nats"),
    ("sources", "RabbitMQ", "aio_pika", "rabbitmq"),
    ("sinks", "RabbitMQ", "aio_pika", "rabbitmq"),
    ("sources", "Mqtt", "aiomqtt", "mqtt"),
    ("sinks", "Mqtt", "aiomqtt", "mqtt"),
    ("sinks", "Postgres", "psycopg", "postgres"),
    ("sources", "Kafka", "confluent_kafka", "kafka"),
    ("sinks", "Kafka", "confluent_kafka", "kafka"),
]


@pytest.mark.parametrize(("space", "name", "package", "extra"), CONNECTORS)
def test_a_missing_client_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, space: str, name: str, package: str, extra: str
) -> None:
    module = getattr(sw, space)._LAZY[name].partition(":")[0]
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        getattr(getattr(sw, space), name)
    assert str(info.value) == (
        f"sw.{space}.{name} needs the {package!r} package, which is not installed: "
        f"pip install 'sluiceway[{extra}]'"
    )
    assert (info.value.name or "").partition(".")[0] == package


def test_every_lazy_connector_has_an_extra_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    lazy = {t.partition(":")[0] for t in [*sources._LAZY.values(), *sinks._LAZY.values()]}
    # The lakehouse connectors import their libraries only when used, naming the extra
    # themselves (lakehouse.arrow.import_extra); every other lazy module is in EXTRAS.
    others = {m for m in lazy if not m.startswith("sluiceway.connectors.lakehouse.")}
    assert others == set(EXTRAS)
    assert set(EXTRAS.values()) <= set(extras)
