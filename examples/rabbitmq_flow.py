"""Big orders from a RabbitMQ queue into another queue (RabbitMQ connectors).

Run it (consumes the durable queue ``orders``, publishes to the queue ``big-orders``)::

    sluiceway run examples/rabbitmq_flow.py:flow

Feed it from another terminal once it runs (it declares ``orders``), one JSON body per
message; ``rabbitmqadmin`` comes with the management plugin (any AMQP client does)::

    rabbitmqadmin publish exchange=amq.default routing_key=orders \
        payload='{"user": "ada", "amount": 120}'
    rabbitmqadmin publish exchange=amq.default routing_key=orders \
        payload='{"user": "bob", "amount": 3}'
    rabbitmqadmin get queue=big-orders          # only ada's order

or from Python with aio-pika: ``await channel.default_exchange.publish(
aio_pika.Message(b'{"user": "ada", "amount": 120}'), routing_key="orders")``.

Messages are acknowledged once published to ``big-orders`` and confirmed by the broker;
stop the flow with Ctrl-C and start it again: unacknowledged messages are delivered again
(at-least-once).  Set ``RABBITMQ_URL`` to use another broker.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def is_big(order: dict[str, Any]) -> bool:
    return float(order.get("amount", 0)) >= 50


def build(
    url: str = URL,
    orders: str = "orders",
    big_orders: str = "big-orders",
    *,
    stop_after_idle: float | None = None,
) -> sw.Flow:
    """The flow: ``orders`` -> filter amount >= 50 -> ``big-orders``."""
    flow = sw.Flow("rabbitmq-big-orders")
    source = sw.sources.RabbitMQ(url, orders, prefetch=1000, stop_after_idle=stop_after_idle)
    flow.source(source, name="orders").filter(is_big, name="big").sink(
        sw.sinks.RabbitMQ(url, declare_queue=big_orders), name="big_orders"
    )
    return flow


flow = build()
