"""The keyed flow test_repartition.py runs on several workers (``sluiceway run
repart_flow.py:flow``): its input topic is **not** keyed by the flow's key, so the workers
repartition it through Kafka (``key_by`` without ``partitioned=True``).  Configured by
environment variables:

``REPART_BOOTSTRAP``, ``REPART_INPUT`` (the group is ``<input>.repart``),
``REPART_OUTPUT`` (transactional id ``<output>.tx``), ``REPART_PARTITIONS`` (the
repartition topic's partition count, ``key_by(partitions=...)``; unset: the input's),
``REPART_RATE`` (records per second the flow's rate limiter lets through; unset: no
limit), ``REPART_WINDOWS`` (``1``: also one-second event-time windows per key),
``REPART_IDLE`` (the source's ``idle_timeout`` in seconds; unset: None).

Input records are ``{"k": key, "i": n-th record of the key, "t": event time, "v": int}``.
Outputs, through one transactional Kafka sink:

* ``stateful_map``: a running count and total per key, one output per record
  ``{"kind": "run", "k", "i", "n", "total", "w"}`` (``n`` is the key's count *from the
  state*: it equals ``i + 1`` only if every record of the key reached one state, in order);
* with ``REPART_WINDOWS=1``, one-second tumbling event-time windows: count and sum per key
  and window, ``{"kind": "win", "k", "start", "n", "sum", "w"}``.

``w`` is the id of the worker (``SLUICEWAY_WORKER_ID``) that produced the output.
"""

from __future__ import annotations

import os

# The same outputs as the chaos flow's (the workers put this file's folder on sys.path).
from keyed_chaos import running_total, window_row

import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource
from sluiceway.flowcontrol import TokenBucket


def flow() -> sw.Flow:
    bootstrap = os.environ["REPART_BOOTSTRAP"]
    inp = os.environ["REPART_INPUT"]
    out = os.environ["REPART_OUTPUT"]
    partitions = os.environ.get("REPART_PARTITIONS")
    rate = os.environ.get("REPART_RATE")
    idle = os.environ.get("REPART_IDLE")
    f = sw.Flow("repart", channel_capacity=64)
    stream = f.source(
        KafkaSource(
            bootstrap,
            inp,
            f"{inp}.repart",
            timestamp=lambda r: r["t"],
            poll_timeout=0.1,
            # Every partition has records up to its end record: a partition waiting for
            # its turn must hold the windows back, never make its records late.
            idle_timeout=float(idle) if idle else None,
            # A killed worker's partitions move after 6 s (the broker's minimum), not 45.
            config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        ),
        name="in",
    )
    if rate:
        r = float(rate)
        stream = stream.rate_limit(TokenBucket(rate=r, burst=max(1, int(r / 4))), name="pace")
    keyed = stream.key_by(
        lambda r: r["k"], name="by_key", partitions=int(partitions) if partitions else None
    )
    results = keyed.stateful_map(running_total, name="totals")
    if os.environ.get("REPART_WINDOWS") == "1":
        windows = (
            keyed.window(sw.windows.Tumbling(1.0))
            .aggregate(n=sw.agg.count(), sum=sw.agg.sum(lambda r: r["v"]), name="per_second")
            .map(window_row, name="window_row")
        )
        results = results.merge(windows, name="both")
    results.sink(
        KafkaSink(
            bootstrap,
            out,
            key=lambda r: r["k"],
            exactly_once=True,
            transactional_id=f"{out}.tx",
        ),
        name="out",
    )
    return f
