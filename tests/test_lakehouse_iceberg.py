"""The Iceberg sink: one snapshot per checkpoint, marked, applied once (SQL catalog on
SQLite, no cloud)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow")
pytest.importorskip("pyiceberg")
duckdb = pytest.importorskip("duckdb")

import sluiceway as sw  # noqa: E402
from sluiceway.connectors.base import SinkContext  # noqa: E402
from sluiceway.connectors.lakehouse.iceberg import IcebergSink, compact, load_catalog  # noqa: E402
from sluiceway.runtime.messages import Batch  # noqa: E402
from sluiceway.time import VirtualClock  # noqa: E402

CTX = SinkContext("flow", "out", VirtualClock(), checkpointing=True)
APP = "sluiceway/flow/out"


def catalog(tmp: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp}/cat.db", "warehouse": f"file://{tmp}/wh"}


def table(tmp: Path, name: str = "ns.events") -> Any:
    return load_catalog(catalog(tmp)).load_table(name)


def ids(tmp: Path) -> list[int]:
    return sorted(table(tmp).scan().to_arrow().column("id").to_pylist())


def duckdb_ids(tmp: Path) -> list[int]:
    """The data files the current snapshot lists, read by DuckDB."""
    files = table(tmp).inspect.files().column("file_path").to_pylist()
    listed = ", ".join(f"'{f.removeprefix('file://')}'" for f in files)
    return sorted(r[0] for r in duckdb.sql(f"SELECT id FROM read_parquet([{listed}])").fetchall())


def test_appends_every_record_once_readable_by_pyiceberg_and_duckdb(tmp_path: Path) -> None:
    rows = [{"id": i, "p": i % 3} for i in range(300)]
    flow = sw.Flow("ice")
    flow.source(sw.sources.Iterable(rows)).sink(
        sw.sinks.Iceberg("ns.events", catalog=catalog(tmp_path), partition_by=["p"])
    )
    sw.testing.run_flow(flow, max_batch_size=50)
    assert ids(tmp_path) == list(range(300))
    assert duckdb_ids(tmp_path) == list(range(300))
    assert [f.name for f in table(tmp_path).spec().fields] == ["p"]


def test_each_checkpoint_is_one_snapshot_recording_its_checkpoint(tmp_path: Path) -> None:
    async def go() -> None:
        sink = IcebergSink("ns.events", catalog=catalog(tmp_path))
        await sink.open(CTX)
        for cid in (1, 2, 3):
            await sink.write(Batch([{"id": cid * 10}, {"id": cid * 10 + 1}]))
            await sink.commit(cid, await sink.pre_commit(cid))
        await sink.commit(4, await sink.pre_commit(4))  # nothing written: no snapshot
        await sink.close()

    asyncio.run(go())
    t = table(tmp_path)
    assert ids(tmp_path) == [10, 11, 20, 21, 30, 31]
    summaries = [s.summary for s in t.snapshots()]
    assert [s.get("sluiceway.checkpoint") for s in summaries] == ["1", "2", "3"]
    assert [s.get("sluiceway.epoch") for s in summaries] == ["1", "2", "3"]
    assert t.properties["sluiceway.epoch." + APP] == "3"


@pytest.mark.parametrize("committed_before_crash", [True, False])
def test_a_retried_commit_is_applied_once(tmp_path: Path, committed_before_crash: bool) -> None:
    async def first_run() -> Any:
        sink = IcebergSink("ns.events", catalog=catalog(tmp_path))
        await sink.open(CTX)
        await sink.write(Batch([{"id": 1}, {"id": 2}]))
        state = await sink.pre_commit(1)
        if committed_before_crash:
            await sink.commit(1, state)
        await sink.write(Batch([{"id": 3}]))
        await sink.pre_commit(2)  # staged, never in a stored checkpoint
        return state  # died here

    async def restart(state: Any) -> None:
        sink = IcebergSink("ns.events", catalog=catalog(tmp_path))
        sink.restore(state)
        await sink.open(CTX)
        await sink.close()

    state = asyncio.run(first_run())
    asyncio.run(restart(state))
    asyncio.run(restart(state))
    assert ids(tmp_path) == [1, 2]
    assert len(table(tmp_path).snapshots()) == 1
    data = {p.name for p in (tmp_path / "wh").rglob("*.parquet")}
    live = {Path(f).name for f in table(tmp_path).inspect.files().column("file_path").to_pylist()}
    assert data == live, "an orphan staged file was left behind"


def test_upsert_by_key(tmp_path: Path) -> None:
    async def go() -> None:
        sink = IcebergSink("ns.kv", catalog=catalog(tmp_path), mode="upsert", key=["id"])
        await sink.open(CTX)
        await sink.write(Batch([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 1, "v": "c"}]))
        await sink.commit(1, await sink.pre_commit(1))
        await sink.write(Batch([{"id": 2, "v": "d"}, {"id": 3, "v": "e"}]))
        state = await sink.pre_commit(2)
        await sink.commit(2, state)
        await sink.commit(2, state)  # repeated: applied once
        await sink.close()

    asyncio.run(go())
    got = table(tmp_path, "ns.kv").scan().to_arrow().to_pylist()
    assert sorted((r["id"], r["v"]) for r in got) == [(1, "c"), (2, "d"), (3, "e")]


def test_a_record_that_does_not_fit_goes_to_on_error(tmp_path: Path) -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("ice")
    flow.source(sw.sources.Iterable([{"id": 1}, {"id": "x"}, {"id": 2}])).sink(
        sw.sinks.Iceberg("ns.events", catalog=catalog(tmp_path)), on_error=sw.DeadLetter(dlq)
    )
    sw.testing.run_flow(flow)
    assert ids(tmp_path) == [1, 2]
    assert [d.record for d in dlq.items] == [{"id": "x"}]


def test_compact_rewrites_small_files_keeping_the_mark(tmp_path: Path) -> None:
    async def go() -> None:
        sink = IcebergSink("ns.events", catalog=catalog(tmp_path))
        await sink.open(CTX)
        for cid in range(1, 5):
            await sink.write(Batch([{"id": cid}]))
            await sink.commit(cid, await sink.pre_commit(cid))
        await sink.close()

    asyncio.run(go())
    assert compact("ns.events", catalog=catalog(tmp_path)) == 4
    assert len(table(tmp_path).inspect.files()) == 1
    assert ids(tmp_path) == [1, 2, 3, 4]
    assert table(tmp_path).properties["sluiceway.epoch." + APP] == "4"


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"table must be 'namespace\.name', got 'events'"):
        IcebergSink("events", catalog=catalog(tmp_path))
    with pytest.raises(ValueError, match=r"mode='upsert' needs key=\[...\]"):
        IcebergSink("ns.t", catalog=catalog(tmp_path), mode="upsert")
    assert sw.sinks.Iceberg is IcebergSink
