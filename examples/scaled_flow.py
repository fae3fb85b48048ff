"""Score orders on every core and every machine: a stateless Kafka -> Kafka flow built to
scale out (docs/scaling.md).

One process, every core of it (``map_in_processes``)::

    sluiceway run examples/scaled_flow.py:flow

Four processes on this machine, one consumer group (the broker splits the partitions of
``orders`` between them; give the topic at least as many partitions as workers)::

    sluiceway run examples/scaled_flow.py:flow --workers 4 --metrics-port 9100

Many machines: start the same command anywhere with the same ``KAFKA_BOOTSTRAP``, and a
distinct ``SLUICEWAY_WORKER_ID`` each; ``examples/kubernetes/`` runs it as a Deployment
scaled on consumer lag by KEDA.

Without checkpoints the source commits offsets once the sink has written the records:
at-least-once, also when partitions move between workers.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import sluiceway as sw

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
ORDERS = os.environ.get("ORDERS_TOPIC", "orders")
SCORES = os.environ.get("SCORES_TOPIC", "order-scores")
GROUP = "order-scoring"


def score(order: dict[str, Any]) -> dict[str, Any]:
    """A CPU-heavy score (a stand-in for a model): 2,000 rounds of SHA-256."""
    digest = repr(sorted(order.items())).encode()
    for _ in range(2000):
        digest = hashlib.sha256(digest).digest()
    return {**order, "score": digest[0] / 255}


def build(bootstrap: str = BOOTSTRAP, *, stop_after_idle: float | None = None) -> sw.Flow:
    """``orders`` -> ``score`` in a process pool -> ``order-scores`` (keyed by user)."""
    flow = sw.Flow("order-scoring")
    (
        flow.source(
            sw.sources.Kafka(bootstrap, ORDERS, group=GROUP, stop_after_idle=stop_after_idle),
            name="orders",
        )
        .map_in_processes(score, name="score")
        .sink(sw.sinks.Kafka(bootstrap, SCORES, key=lambda o: o.get("user")), name="scores")
    )
    return flow


flow = build()
