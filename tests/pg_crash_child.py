"""The flow the PostgreSQL crash test kills (run as a subprocess by
test_connector_postgres.py).

Writes ``{"id": i, "v": 2 * i}`` for i in range(N), paced by a token bucket so a run
lasts long enough to be killed mid-stream, into a PostgresSink with checkpoints every
50 ms.  ``mode`` is ``exactly_once`` (the table must end with every id once) or
``append`` (at-least-once: the crashes must leave duplicates, so the test can fail).

Usage: pg_crash_child.py DSN TABLE WORKDIR N RATE MODE
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import sluiceway as sw
from sluiceway.connectors.postgres import PostgresSink
from sluiceway.flowcontrol import TokenBucket


def row(i: int) -> dict[str, Any]:
    return {"id": i, "v": 2 * i}


def build(dsn: str, table: str, n: int, rate: float, mode: Any) -> sw.Flow:
    flow = sw.Flow("pg_crash")
    (
        flow.source(sw.sources.Iterable(range(n)), name="numbers")
        .rate_limit(TokenBucket(rate=rate, burst=200), name="pace")
        .map(row, name="to_row")
        .sink(PostgresSink(dsn, table, mode=mode, create_table=True), name="table")
    )
    return flow


def main() -> None:
    dsn, table, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    n, rate, mode = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    flow = build(dsn, table, n, rate, mode)
    print("ready", flush=True)
    sw.run(flow, checkpoints=sw.Checkpoints(work / "ckpt", interval=0.05))


if __name__ == "__main__":
    main()
