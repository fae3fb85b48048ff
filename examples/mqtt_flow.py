"""MQTT in, MQTT out: temperature readings become alerts.

Run it (Mosquitto on 127.0.0.1:1883)::

    sluiceway run examples/mqtt_flow.py:flow

Feed it from another terminal (QoS 1, one JSON reading per message)::

    mosquitto_pub -q 1 -t sluiceway-demo/readings -m '{"sensor": "a", "celsius": 31}'
    mosquitto_sub -q 1 -t sluiceway-demo/alerts -v

The source keeps a persistent session under ``MQTT_CLIENT_ID`` (default
``sluiceway-mqtt-example``): readings published while the flow is down wait in the broker
and arrive on the next start; each is acknowledged only after its alert was published.
Environment: ``MQTT_HOST``, ``MQTT_PORT``, ``MQTT_PREFIX`` (topic prefix),
``MQTT_CLIENT_ID``, ``MQTT_IDLE`` (end after that many idle seconds; default: run until
stopped).
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw


def build() -> sw.Flow:
    """The flow, configured from the environment."""
    host = os.environ.get("MQTT_HOST", "127.0.0.1")
    port = int(os.environ.get("MQTT_PORT", "1883"))
    prefix = os.environ.get("MQTT_PREFIX", "sluiceway-demo")
    idle = os.environ.get("MQTT_IDLE")

    def alert(reading: dict[str, Any]) -> dict[str, Any]:
        return {"sensor": reading["sensor"], "celsius": reading["celsius"], "level": "hot"}

    flow = sw.Flow("mqtt-alerts")
    (
        flow.source(
            sw.sources.Mqtt(
                host,
                f"{prefix}/readings",
                port=port,
                client_id=os.environ.get("MQTT_CLIENT_ID", "sluiceway-mqtt-example"),
                stop_after_idle=float(idle) if idle else None,
            )
        )
        .filter(lambda r: r["celsius"] > 30)
        .map(alert)
        .sink(sw.sinks.Mqtt(host, f"{prefix}/alerts", port=port))
    )
    return flow


flow = build()
