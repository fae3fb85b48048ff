"""Bounded lakehouse sources: every row once, pinned table state, resume by position."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
deltalake = pytest.importorskip("deltalake")
pytest.importorskip("pyiceberg")

import sluiceway as sw  # noqa: E402
from sluiceway.connectors.base import Source, SourceContext  # noqa: E402
from sluiceway.connectors.lakehouse.iceberg import load_catalog  # noqa: E402
from sluiceway.connectors.lakehouse.sources import (  # noqa: E402
    DeltaSource,
    IcebergSource,
    ParquetSource,
)
from sluiceway.time import VirtualClock  # noqa: E402

N = 1000
ROWS = [{"id": i, "p": i % 3} for i in range(N)]


async def _no_bad_input(_: Any) -> None:
    raise AssertionError("no bad input expected")


CTX = SourceContext("f", "src", VirtualClock(), _no_bad_input, True, checkpointing=True)


def write_parquet(tmp: Path) -> Source:
    flow = sw.Flow("w")
    flow.source(sw.sources.Iterable(ROWS)).sink(
        sw.sinks.Parquet(tmp / "pq", partition_by=["p"], max_file_bytes=2_000, row_group_rows=50)
    )
    sw.testing.run_flow(flow, max_batch_size=100)
    return ParquetSource(tmp / "pq", batch_rows=70)


def write_delta(tmp: Path) -> Source:
    for start in range(0, N, 250):
        deltalake.write_deltalake(
            str(tmp / "delta"),
            pa.Table.from_pylist(ROWS[start : start + 250]),
            mode="append",
            partition_by=["p"],
        )
    return DeltaSource(tmp / "delta", batch_rows=70)


def iceberg_catalog(tmp: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp}/cat.db", "warehouse": f"file://{tmp}/wh"}


def write_iceberg(tmp: Path) -> Source:
    cat = load_catalog(iceberg_catalog(tmp))
    cat.create_namespace_if_not_exists("ns")
    data = pa.Table.from_pylist(ROWS)
    table = cat.create_table_if_not_exists("ns.t", schema=data.schema)
    for start in range(0, N, 250):
        table.append(data.slice(start, 250))
    return IcebergSource("ns.t", catalog=iceberg_catalog(tmp), batch_rows=70)


WRITERS: dict[str, Callable[[Path], Source]] = {
    "parquet": write_parquet,
    "delta": write_delta,
    "iceberg": write_iceberg,
}


async def drain(src: Source, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while limit is None or len(out) < limit:
        batch = await src.next_batch(33)
        if batch is None:
            break
        out.extend(batch.values)
    return out


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_reads_every_row_once_with_partition_columns(tmp_path: Path, fmt: str) -> None:
    src = WRITERS[fmt](tmp_path)
    flow = sw.Flow("r")
    out: sw.sinks.Collect[dict[str, Any]] = sw.sinks.Collect()
    flow.source(src).sink(out)
    sw.testing.run_flow(flow)
    assert sorted((r["id"], int(r["p"])) for r in out.items) == [(r["id"], r["p"]) for r in ROWS]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_resumes_from_a_position_after_more_data_was_written(tmp_path: Path, fmt: str) -> None:
    src = WRITERS[fmt](tmp_path)

    async def first() -> tuple[list[dict[str, Any]], Any]:
        await src.open(CTX)
        head = await drain(src, 400)
        position = src.position()
        await src.close()
        return head, position

    head, position = asyncio.run(first())
    if fmt == "parquet":  # not versioned: the same files
        again: Source = ParquetSource(tmp_path / "pq", batch_rows=70)
    else:  # versioned: the table grows meanwhile, the source reads its pinned state
        again = WRITERS[fmt](tmp_path)
    again.restore(position)

    async def rest() -> list[dict[str, Any]]:
        await again.open(CTX)
        return await drain(again)

    tail = asyncio.run(rest())
    assert sorted(r["id"] for r in head + tail) == list(range(N)), "the pinned state, once"


def test_a_changed_parquet_dataset_cannot_be_resumed(tmp_path: Path) -> None:
    src = write_parquet(tmp_path)
    asyncio.run(src.open(CTX))
    position = src.position()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "pq" / "p=0" / "extra.parquet")
    again = ParquetSource(tmp_path / "pq")
    again.restore(position)
    with pytest.raises(sw.CheckpointError, match="must not change while it is read"):
        asyncio.run(again.open(CTX))


def test_registered_lazily() -> None:
    assert sw.sources.Parquet is ParquetSource
    assert sw.sources.Delta is DeltaSource
    assert sw.sources.Iceberg is IcebergSource
