"""The keyed flow test_workers_keyed.py runs on several workers (``sluiceway run
keyed_chaos.py:flow``), configured by environment variables:

``CHAOS_BOOTSTRAP``, ``CHAOS_INPUT`` (the input topic; the group is ``<input>.chaos``),
``CHAOS_OUTPUT`` (the output topic; transactional id ``<output>.tx``), ``CHAOS_RATE``
(records per second the flow's rate limiter lets through: it paces the run so that
workers join, die and leave mid-stream).

Input records are ``{"k": key, "i": n-th record of the key, "t": event time, "v": int}``
with keys ``"<partition>-<name>"`` written to partition ``<partition>``.  Two keyed
operators with state, merged into one transactional Kafka sink:

* ``stateful_map``: a running count and total per key, one output per record
  ``{"kind": "run", "k", "i", "n", "total", "w"}`` (``n`` is the key's count *from the
  state*: it equals ``i + 1`` only if the state followed the key exactly);
* one-second tumbling event-time windows: count and sum per key and window,
  ``{"kind": "win", "k", "start", "n", "sum", "w"}``.

``w`` is the id of the worker (``SLUICEWAY_WORKER_ID``) that produced the output.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource
from sluiceway.flowcontrol import TokenBucket


def _worker() -> str:
    return os.environ.get("SLUICEWAY_WORKER_ID", "solo")


def running_total(state: tuple[int, int] | None, r: dict[str, Any]) -> tuple[Any, Any]:
    n, total = state or (0, 0)
    n, total = n + 1, total + r["v"]
    out = {"kind": "run", "k": r["k"], "i": r["i"], "n": n, "total": total, "w": _worker()}
    return (n, total), out


def window_row(w: Any) -> dict[str, Any]:
    return {
        "kind": "win",
        "k": w.key,
        "start": w.start,
        "n": w.value["n"],
        "sum": w.value["sum"],
        "w": _worker(),
    }


def flow() -> sw.Flow:
    bootstrap = os.environ["CHAOS_BOOTSTRAP"]
    inp = os.environ["CHAOS_INPUT"]
    out = os.environ["CHAOS_OUTPUT"]
    rate = float(os.environ.get("CHAOS_RATE", "20"))
    f = sw.Flow("keyed-chaos", channel_capacity=64)
    keyed = (
        f.source(
            KafkaSource(
                bootstrap,
                inp,
                f"{inp}.chaos",
                timestamp=lambda r: r["t"],
                poll_timeout=0.1,
                # Every partition has records up to its end record: a partition waiting
                # for its turn must hold the windows back, never make its records late.
                idle_timeout=None,
                # A killed worker's partitions move after 6 s (the broker's minimum), not 45.
                config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
            ),
            name="in",
        )
        .rate_limit(TokenBucket(rate=rate, burst=max(1, int(rate / 4))), name="pace")
        .key_by(lambda r: r["k"], name="by_key", partitioned=True)
    )
    totals = keyed.stateful_map(running_total, name="totals")
    windows = (
        keyed.window(sw.windows.Tumbling(1.0))
        .aggregate(n=sw.agg.count(), sum=sw.agg.sum(lambda r: r["v"]), name="per_second")
        .map(window_row, name="window_row")
    )
    totals.merge(windows, name="both").sink(
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
