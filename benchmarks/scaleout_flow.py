"""The keyed flow bench_scaleout.py runs with ``sluiceway run scaleout_flow.py:flow``,
configured by environment variables: ``SCALE_BOOTSTRAP``, ``SCALE_INPUT`` (group
``<input>.scale``), ``SCALE_OUTPUT`` (transactional id ``<output>.tx``), ``SCALE_ROUNDS``
(CPU work per record: rounds of an integer hash, ~0.1 ms per 1,000 on one core).

Kafka -> ``key_by(k)`` -> ``stateful_map`` (a count per key; the hash of each record) ->
the transactional Kafka sink.  Records ``{"k", "i", "p", "ts"?, "q"?}``: ``q`` (quiet)
records only build state and write nothing; the others write
``{"k", "n", "h", "p", "ts", "w", "at"}`` (``w``: the worker, ``SLUICEWAY_WORKER_ID``;
``at``: the wall-clock time the record was processed, for rates that do not depend on
when transactions commit).
"""

from __future__ import annotations

import os
import time
from typing import Any

import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource

ROUNDS = int(os.environ.get("SCALE_ROUNDS", "0"))
WORKER = os.environ.get("SLUICEWAY_WORKER_ID", "solo")


def burn(x: int, rounds: int) -> int:
    """CPU work that nothing can skip: ``rounds`` steps of a linear congruential hash."""
    h = x
    for _ in range(rounds):
        h = (h * 1103515245 + 12345) & 0x7FFFFFFF
    return h


def count(state: int | None, r: dict[str, Any]) -> tuple[int, Any]:
    n = (state or 0) + 1
    if r.get("q"):
        return n, None
    out = {"k": r["k"], "n": n, "h": burn(r["i"], ROUNDS), "p": r.get("p"), "ts": r.get("ts")}
    return n, {**out, "w": WORKER, "at": time.time()}


def flow() -> sw.Flow:
    bootstrap = os.environ["SCALE_BOOTSTRAP"]
    inp = os.environ["SCALE_INPUT"]
    out = os.environ["SCALE_OUTPUT"]
    f = sw.Flow("scaleout-bench")
    (
        f.source(
            KafkaSource(
                bootstrap,
                inp,
                f"{inp}.scale",
                timestamp=None,
                poll_timeout=0.1,
                config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
            ),
            name="in",
        )
        .key_by(lambda r: r["k"], name="by_key", partitioned=True)
        .stateful_map(count, name="count")
        .filter(lambda r: r is not None, name="loud")
        .sink(
            KafkaSink(
                bootstrap,
                out,
                key=lambda r: r["k"],
                exactly_once=True,
                transactional_id=f"{out}.tx",
            ),
            name="out",
        )
    )
    return f
