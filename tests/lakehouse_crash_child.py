"""The flow the lakehouse crash tests kill (run as a subprocess by test_lakehouse_crash.py).

Reads a JSON Lines file of ``{"id", "k", "t"}`` records, paced by a token bucket so a
run lasts long enough to be killed mid-stream, and writes them with checkpoints every
second into a Parquet dataset (partitioned), a Delta table or an Iceberg table.
``--naive`` swaps in a Parquet sink that publishes each file as soon as it is written,
ignoring checkpoints: the at-least-once sink that must make the test fail.

It prints ``ready`` once the flow is built (nothing opened yet), then waits for a line on
stdin before it runs: the test starts the next run while this one still runs, so that
the kills come one after the other, not an interpreter's start apart.  Stdin closed
without a line: it ends without running.

Usage: lakehouse_crash_child.py FORMAT INPUT WORKDIR RATE [--naive]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import sluiceway as sw
from sluiceway.connectors.lakehouse.parquet import ParquetSink, _OpenFile
from sluiceway.flowcontrol import TokenBucket

CHECKPOINT_INTERVAL = 1.0


class NaiveParquet(ParquetSink):
    """Publishes every file at once and never takes anything back: duplicates."""

    def _finish(self, f: _OpenFile) -> None:
        self._flush(f)
        f.writer.close()
        self._publish(f.tmp, f.final)


def iceberg_catalog(work: Path) -> dict[str, str]:
    return {
        "type": "sql",
        "uri": f"sqlite:///{work}/catalog.db",
        "warehouse": f"file://{work}/warehouse",
    }


def make_sink(fmt: str, work: Path, naive: bool) -> sw.sinks.Sink:
    table = work / "table"
    if fmt == "parquet":
        if naive:
            return NaiveParquet(table, partition_by=["p"], max_file_age=1e-6)
        return sw.sinks.Parquet(table, partition_by=["p"])
    if fmt == "delta":
        return sw.sinks.Delta(str(table), partition_by=["p"])
    if fmt == "iceberg":
        return sw.sinks.Iceberg("crash.events", catalog=iceberg_catalog(work), partition_by=["p"])
    raise SystemExit(f"unknown format {fmt!r}")


def row(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "k": r["k"], "p": r["k"] % 4}


def main() -> None:
    fmt, inp, work, rate = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    flow = sw.Flow("lakehouse_crash")
    (
        flow.source(sw.sources.JsonLines(inp), name="input")
        .rate_limit(TokenBucket(rate=rate, burst=500), name="pace")
        .map(row, name="row")
        .sink(make_sink(fmt, work, "--naive" in sys.argv), name="table_out")
    )
    print("ready", flush=True)
    if not sys.stdin.readline():  # the test went away before this run's turn
        return
    sw.run(flow, checkpoints=sw.Checkpoints(work / "ckpt", interval=CHECKPOINT_INTERVAL))


if __name__ == "__main__":
    main()
