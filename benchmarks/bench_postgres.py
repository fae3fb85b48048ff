"""PG: records/s into PostgreSQL through the sluiceway sink vs raw psycopg, same run.

    python benchmarks/bench_postgres.py           # full (~40 s), prints the table
    python benchmarks/bench_postgres.py --quick   # ~15 s smoke run
    python benchmarks/bench_postgres.py --dsn postgresql://127.0.0.1:5432/test

Two workloads, each measured for both systems in fresh child processes, alternating
(best of ``repeats`` each), every run on a fresh table:

* ``append``: a flow ``Iterable -> map -> PostgresSink(mode="append")`` (COPY, one
  transaction per micro-batch of 1024) vs a psycopg 3 async loop that maps the same
  records and COPYs them 1024 rows at a time, committing each batch.
* ``upsert``: the same flow into ``PostgresSink(mode="upsert", key=["id"])`` (one
  multi-row ``INSERT ... ON CONFLICT (id) DO UPDATE`` per batch) vs psycopg sending the same
  statement per 1024 rows.  Keys repeat every 50,000 records, so later batches update.

Every commit is durable (the server's default ``synchronous_commit``): both sides pay the
same WAL flush per batch.  Tables are ``sw_bench_<uuid>``, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
from common import (
    Params,
    Result,
    Row,
    fmt_int,
    make_record,
    module_main,
    run_child,
)
from psycopg import sql

import sluiceway as sw
from sluiceway.connectors.postgres import PostgresSink

DEFAULT_DSN = "postgresql://127.0.0.1:5432/test"
BATCH = 1024
KEYS = 50_000
TARGET = 0.70


def transform(r: dict[str, Any]) -> dict[str, Any]:
    """The map step both sides run: a key, the user, a derived amount."""
    return {"id": r["id"] % KEYS, "user": r["user"], "amount": r["amount"] * 1.1}


def _reset(dsn: str, table: str, *, create: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        if create:
            conn.execute(
                sql.SQL('CREATE TABLE {} (id bigint, "user" text, amount double precision)').format(
                    name
                )
            )


async def _raw(dsn: str, table: str, records: list[dict[str, Any]], mode: str) -> None:
    cols = ["id", "user", "amount"]
    names = sql.SQL(", ").join(map(sql.Identifier, cols))
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), names)
    one = sql.SQL("(%s, %s, %s)")
    upserts: dict[int, sql.Composed] = {}

    def upsert(n: int) -> sql.Composed:
        if n not in upserts:
            upserts[n] = sql.SQL(
                'INSERT INTO {} ({}) VALUES {} ON CONFLICT (id) DO UPDATE SET "user" = '
                'EXCLUDED."user", amount = EXCLUDED.amount'
            ).format(sql.Identifier(table), names, sql.SQL(", ").join([one] * n))
        return upserts[n]

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for start in range(0, len(records), BATCH):
            rows = [transform(r) for r in records[start : start + BATCH]]
            async with conn.cursor() as cur:
                if mode == "append":
                    async with cur.copy(copy) as cp:
                        for r in rows:
                            await cp.write_row((r["id"], r["user"], r["amount"]))
                else:
                    params = [v for r in rows for v in (r["id"], r["user"], r["amount"])]
                    await cur.execute(upsert(len(rows)), params)
            await conn.commit()


def measure(params: Params) -> Result:
    """Child entry: records/s of ``system`` ("sluiceway" or "raw") doing ``mode``."""
    dsn, n, mode = params["dsn"], int(params["records"]), params["mode"]
    system, repeats = params["system"], int(params["repeats"])
    table = f"sw_bench_{uuid.uuid4().hex[:12]}"
    records = [make_record(i) for i in range(n)]
    rates = []
    try:
        for _ in range(repeats):
            _reset(dsn, table, create=True)
            if mode == "upsert":
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(table))
                    )
            t0 = time.perf_counter()
            if system == "raw":
                asyncio.run(_raw(dsn, table, records, mode))
            else:
                flow = sw.Flow("bench-pg")
                sink = (
                    PostgresSink(dsn, table, mode="upsert", key=["id"])
                    if mode == "upsert"
                    else PostgresSink(dsn, table)
                )
                flow.source(sw.sources.Iterable(records)).map(transform).sink(sink)
                sw.run(flow, handle_signals=False, max_batch_size=BATCH)
            rates.append(n / (time.perf_counter() - t0))
            with psycopg.connect(dsn) as conn:
                count = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                ).fetchone()
            want = n if mode == "append" else min(n, KEYS)
            assert count == (want,), f"{system} {mode}: {count} rows, expected {want}"
    finally:
        _reset(dsn, table, create=False)
    return {"best": max(rates), "runs": rates}


def run(quick: bool, dsn: str = DEFAULT_DSN) -> tuple[list[Row], Result]:
    """The PG rows (for run.py) and the raw figures."""
    n, repeats = (100_000, 2) if quick else (300_000, 3)
    raw: Result = {"records": n, "repeats": repeats, "batch": BATCH}
    rows: list[Row] = []
    wl = "PG postgres sink"
    for mode, how in (("append", "COPY"), ("upsert", "INSERT ON CONFLICT")):
        rates: dict[str, float] = {"raw": 0.0, "sluiceway": 0.0}
        for _ in range(repeats):  # alternate the systems: a busy shared server hits both
            for system in ("raw", "sluiceway"):
                params = {"dsn": dsn, "records": n, "mode": mode, "system": system}
                best = run_child("bench_postgres", "measure", {**params, "repeats": 1})["best"]
                rates[system] = max(rates[system], best)
        raw[mode] = rates
        share = rates["sluiceway"] / rates["raw"]
        rows.append(
            Row(
                wl,
                f"sluiceway map -> Postgres {mode} ({how})",
                f"{fmt_int(rates['sluiceway'])} rec/s",
                f"{share:.0%} of raw",
                f">= {TARGET:.0%}",
                "PASS" if share >= TARGET else "FAIL",
            )
        )
        rows.append(Row(wl, f"raw psycopg {how} per {BATCH}", f"{fmt_int(rates['raw'])} rec/s"))
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure}, ("--dsn", DEFAULT_DSN, "the PostgreSQL"))
