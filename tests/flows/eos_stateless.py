"""The stateless flow test_scaleout_eos.py runs on several workers (``sluiceway run
eos_stateless.py:flow``), configured by environment variables:

``EOS_BOOTSTRAP``, ``EOS_INPUT`` (the input topic; the group is ``<input>.eos``),
``EOS_OUTPUT`` (a one-partition output topic), ``EOS_RATE`` (records per second each
task's rate limiter lets through: it paces the run so that a worker dies mid-stream).

Kafka -> ``map`` -> an exactly-once Kafka sink: no keyed state, so on several workers it
is exactly-once only because it runs as one task per partition.  Input records are
``{"p": partition, "i": n-th record of the partition}``; each output is the record with
``"w"``, the id of the worker (``SLUICEWAY_WORKER_ID``) that wrote it.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource
from sluiceway.flowcontrol import TokenBucket

WID = os.environ.get("SLUICEWAY_WORKER_ID", "solo")


def tag(r: dict[str, Any]) -> dict[str, Any]:
    return {"p": r["p"], "i": r["i"], "w": WID}


def flow() -> sw.Flow:
    bootstrap = os.environ["EOS_BOOTSTRAP"]
    inp = os.environ["EOS_INPUT"]
    rate = float(os.environ.get("EOS_RATE", "40"))
    f = sw.Flow("eos-stateless", channel_capacity=16)
    (
        f.source(
            KafkaSource(
                bootstrap,
                inp,
                f"{inp}.eos",
                poll_timeout=0.1,
                # A killed worker's partitions move after 6 s (the broker's minimum), not 45.
                config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
            ),
            name="in",
        )
        .rate_limit(TokenBucket(rate=rate, burst=max(1, int(rate / 4))), name="pace")
        .map(tag, name="tag")
        .sink(KafkaSink(bootstrap, os.environ["EOS_OUTPUT"], exactly_once=True), name="out")
    )
    return f
