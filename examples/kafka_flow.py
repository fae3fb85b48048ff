"""Spend per user per minute, from Kafka to Kafka, exactly once (Kafka connectors).

Run it (reads ``orders`` in consumer group ``spend``, writes ``spend-per-minute``)::

    scripts/kafka-broker up                  # a local broker on 127.0.0.1:9092
    sluiceway run examples/kafka_flow.py:flow --checkpoint-dir state/kafka-flow

Feed it from Python (or any Kafka client)::

    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": "127.0.0.1:9092"})
    p.produce("orders", b'{"user": "ada", "amount": 120}', key=b"ada")
    p.flush()

The windows use the records' Kafka timestamps as event time (one-minute tumbling windows;
a partition quiet for 10 s stops holding the watermark back).  With ``--checkpoint-dir``
the sink writes one Kafka transaction per checkpoint, holding the consumed offsets too:
read ``spend-per-minute`` with ``isolation.level=read_committed`` and every window is
there exactly once, whatever crashed in between.  Set ``KAFKA_BOOTSTRAP`` to use another
broker.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def row(w: sw.windows.WindowResult) -> dict[str, Any]:
    return {"user": w.key, "minute": w.start, "orders": w.value["n"], "spent": w.value["total"]}


def build(
    bootstrap: str = BOOTSTRAP,
    orders: str = "orders",
    out: str = "spend-per-minute",
    *,
    stop_after_idle: float | None = None,
    exactly_once: bool = True,
    transactional_id: str | None = None,
) -> sw.Flow:
    """``orders`` -> per user, one-minute windows (count, sum of amount) -> ``out``."""
    flow = sw.Flow("kafka-spend")
    source = sw.sources.Kafka(
        bootstrap, orders, group="spend", idle_timeout=10, stop_after_idle=stop_after_idle
    )
    (
        flow.source(source, name="orders", on_error=sw.DeadLetter(sw.sinks.Stdout()))
        .key_by(lambda o: o["user"], name="by_user")
        .window(sw.windows.Tumbling(60))
        .aggregate(n=sw.agg.count(), total=sw.agg.sum(lambda o: o["amount"]), name="per_minute")
        .map(row, name="row")
        .sink(
            sw.sinks.Kafka(
                bootstrap,
                out,
                key=lambda r: r["user"],
                exactly_once=exactly_once,
                transactional_id=transactional_id,  # None: "sluiceway.kafka-spend.spend"
            ),
            name="spend",
        )
    )
    return flow


flow = build()
