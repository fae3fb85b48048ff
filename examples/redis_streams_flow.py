"""Big orders from a Redis stream into another stream (Redis Streams connectors).

Run it (reads ``orders`` in consumer group ``big-orders``, writes ``big-orders``)::

    sluiceway run examples/redis_streams_flow.py:flow

Feed it from another terminal, one JSON payload per entry in the field ``data``::

    redis-cli XADD orders '*' data '{"user": "ada", "amount": 120}'
    redis-cli XADD orders '*' data '{"user": "bob", "amount": 3}'
    redis-cli XRANGE big-orders - +        # only ada's order

Entries are acknowledged once written to ``big-orders``; stop the flow with Ctrl-C and
start it again: unacknowledged entries are delivered again (at-least-once).  Set
``REDIS_URL`` to use another server.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def is_big(order: dict[str, Any]) -> bool:
    return float(order.get("amount", 0)) >= 50


def build(
    url: str = URL,
    orders: str = "orders",
    big_orders: str = "big-orders",
    *,
    stop_after_idle: float | None = None,
) -> sw.Flow:
    """The flow: ``orders`` -> filter amount >= 50 -> ``big-orders`` (max ~100k entries)."""
    flow = sw.Flow("redis-big-orders")
    source = sw.sources.RedisStream(
        url, orders, group="big-orders", start="0", stop_after_idle=stop_after_idle
    )
    flow.source(source, name="orders").filter(is_big, name="big").sink(
        sw.sinks.RedisStream(url, big_orders, maxlen=100_000), name="big_orders"
    )
    return flow


flow = build()
