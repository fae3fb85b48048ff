"""LH: rows/s into Parquet, Delta Lake and Iceberg through the sluiceway sinks vs the
libraries used directly, same rows, same batch sizes.

    python benchmarks/bench_lakehouse.py           # full (~3 min), prints the table
    python benchmarks/bench_lakehouse.py --quick   # a smoke run

Each format, each system in fresh child processes, alternating (best of ``repeats``),
every run into a fresh directory under the system's temp dir.  Rows/s by wall time
decide the target; rows/s by the process's CPU time (all its threads) are shown beside
them, being far less disturbed by other load on a shared machine:

* ``sluiceway``: a flow ``Iterable(records) -> sink`` with micro-batches of 1024, no
  checkpoints: ``sw.sinks.Parquet(dir)`` (row groups of 64 Ki rows, zstd),
  ``sw.sinks.Delta(dir)``, ``sw.sinks.Iceberg("bench.t", catalog=<SQLite>)`` (both
  commit once at close, as they do for up to ``flush_rows`` = 1 M rows).
* ``library``: a loop that converts the same records 1024 at a time with
  ``pyarrow.Table.from_pylist(batch, schema)`` and writes them the way the library is
  meant to be used for a bulk load: a ``pyarrow.parquet.ParquetWriter`` with the same
  row groups and compression; one ``deltalake.write_deltalake(..., mode="append")`` of
  the batches; one pyiceberg ``table.append`` of the batches.

The checkpointed variants (a checkpoint, i.e. a file or a table commit, every second)
are measured for the sluiceway side only and shown for information.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from common import Params, Result, Row, fmt_int, make_record, module_main, run_child

import sluiceway as sw

BATCH = 1024
ROW_GROUP = 64 * 1024
TARGET = 0.70
SCHEMA = pa.schema([("id", pa.int64()), ("user", pa.string()), ("amount", pa.float64())])
FORMATS = ("parquet", "delta", "iceberg")


def _catalog(work: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{work}/cat.db", "warehouse": f"file://{work}/wh"}


def _batches(records: list[dict[str, Any]]) -> list[Any]:
    return [
        pa.Table.from_pylist(records[i : i + BATCH], schema=SCHEMA)
        for i in range(0, len(records), BATCH)
    ]


def _library(fmt: str, work: Path, records: list[dict[str, Any]]) -> None:
    if fmt == "parquet":
        writer = pq.ParquetWriter(work / "part-0.parquet", SCHEMA, compression="zstd")
        pending: list[Any] = []
        rows = 0
        for table in _batches(records):
            pending.append(table)
            rows += table.num_rows
            if rows >= ROW_GROUP:
                writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                pending, rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
        writer.close()
    elif fmt == "delta":
        import deltalake  # noqa: PLC0415 - the format's library, only for its workload

        deltalake.write_deltalake(str(work / "t"), pa.concat_tables(_batches(records)))
    else:
        from pyiceberg.catalog import load_catalog  # noqa: PLC0415

        cat = load_catalog("default", **_catalog(work))
        cat.create_namespace_if_not_exists("bench")
        table = cat.create_table_if_not_exists("bench.t", schema=SCHEMA)
        table.append(pa.concat_tables(_batches(records)))


def _sink(fmt: str, work: Path) -> sw.sinks.Sink:
    if fmt == "parquet":
        return sw.sinks.Parquet(work, schema=SCHEMA)
    if fmt == "delta":
        return sw.sinks.Delta(work / "t", schema=SCHEMA)
    return sw.sinks.Iceberg("bench.t", catalog=_catalog(work), schema=SCHEMA)


def _count(fmt: str, work: Path) -> int:
    if fmt == "parquet":
        return sum(pq.read_metadata(p).num_rows for p in work.glob("*.parquet"))
    if fmt == "delta":
        import deltalake  # noqa: PLC0415

        return int(deltalake.DeltaTable(str(work / "t")).count())
    from pyiceberg.catalog import load_catalog  # noqa: PLC0415

    table = load_catalog("default", **_catalog(work)).load_table("bench.t")
    return int(table.scan().count())


def measure(params: Params) -> Result:
    """Child entry: rows/s of ``system`` ("sluiceway" or "library") into ``fmt``."""
    fmt, system, n = params["fmt"], params["system"], int(params["records"])
    checkpoints = bool(params.get("checkpoints"))
    records = [make_record(i) for i in range(n)]
    work = Path(tempfile.mkdtemp(prefix="sw-bench-lh-"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if system == "library":
            _library(fmt, work, records)
        else:
            flow = sw.Flow("bench-lh")
            flow.source(sw.sources.Iterable(records)).sink(_sink(fmt, work), name="out")
            ckpt = sw.Checkpoints(work / "ckpt", interval=1.0) if checkpoints else None
            sw.run(flow, handle_signals=False, max_batch_size=BATCH, checkpoints=ckpt)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        got = _count(fmt, work)
        assert got == n, f"{system} {fmt}: {got} rows, expected {n}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rate": n / elapsed, "cpu_rate": n / cpu}


def run(quick: bool) -> tuple[list[Row], Result]:
    """The LH rows (for run.py) and the raw figures."""
    n, repeats = (200_000, 1) if quick else (1_000_000, 5)
    raw: Result = {"records": n, "repeats": repeats, "batch": BATCH}
    rows: list[Row] = []
    for fmt in FORMATS:
        rates = {"library": 0.0, "sluiceway": 0.0}
        cpu = {"library": 0.0, "sluiceway": 0.0}
        for _ in range(repeats):  # alternate: a busy machine hits both
            for system in ("library", "sluiceway"):
                params = {"fmt": fmt, "system": system, "records": n}
                got = run_child("bench_lakehouse", "measure", params)
                rates[system] = max(rates[system], got["rate"])
                cpu[system] = max(cpu[system], got["cpu_rate"])
        ckpt = run_child(
            "bench_lakehouse",
            "measure",
            {"fmt": fmt, "system": "sluiceway", "records": n, "checkpoints": True},
        )["rate"]
        raw[fmt] = {"wall": rates, "cpu": cpu, "sluiceway_checkpoints_1s": ckpt}
        share = rates["sluiceway"] / rates["library"]
        cpu_share = cpu["sluiceway"] / cpu["library"]
        wl = f"LH {fmt}"
        rows.append(
            Row(
                wl,
                f"sluiceway Iterable -> {fmt} sink",
                f"{fmt_int(rates['sluiceway'])} rows/s (CPU: {fmt_int(cpu['sluiceway'])})",
                f"{share:.0%} of library (CPU: {cpu_share:.0%})",
                f">= {TARGET:.0%}",
                "PASS" if share >= TARGET else "FAIL",
            )
        )
        rows.append(
            Row(
                wl,
                f"{fmt} library directly, batches of {BATCH}",
                f"{fmt_int(rates['library'])} rows/s (CPU: {fmt_int(cpu['library'])})",
            )
        )
        rows.append(Row(wl, "sluiceway, checkpoint every 1 s", f"{fmt_int(ckpt)} rows/s"))
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure})
