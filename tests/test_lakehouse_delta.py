"""The Delta Lake sink: one transaction per checkpoint with a txn action, applied once."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow")
deltalake = pytest.importorskip("deltalake")
pytest.importorskip("duckdb")

import sluiceway as sw  # noqa: E402
from lakehouse_readers import delta_log, duckdb_delta_rows  # noqa: E402
from sluiceway.connectors.base import SinkContext  # noqa: E402
from sluiceway.connectors.lakehouse.delta import DeltaSink, compact  # noqa: E402
from sluiceway.runtime.messages import Batch  # noqa: E402
from sluiceway.time import SystemClock, VirtualClock  # noqa: E402

CTX = SinkContext("flow", "out", VirtualClock(), checkpointing=True)
APP = "sluiceway/flow/out"


def ids(table: Path) -> list[int]:
    return sorted(deltalake.DeltaTable(str(table)).to_pyarrow_table().column("id").to_pylist())


def test_appends_every_record_once_readable_by_deltalake_and_duckdb(tmp_path: Path) -> None:
    rows = [{"id": i, "p": i % 3} for i in range(500)]
    flow = sw.Flow("delta")
    flow.source(sw.sources.Iterable(rows)).sink(sw.sinks.Delta(tmp_path, partition_by=["p"]))
    sw.testing.run_flow(flow, max_batch_size=50)
    assert ids(tmp_path) == list(range(500))
    got = sorted(duckdb_delta_rows(tmp_path, "id, p"))
    assert got == [(i, i % 3) for i in range(500)]


def test_each_checkpoint_is_one_transaction_with_its_txn_version(tmp_path: Path) -> None:
    async def go() -> None:
        sink = DeltaSink(tmp_path)
        await sink.open(CTX)
        for cid in (1, 2, 3):
            await sink.write(Batch([{"id": cid * 10}, {"id": cid * 10 + 1}]))
            await sink.commit(cid, await sink.pre_commit(cid))
        await sink.commit(4, await sink.pre_commit(4))  # nothing written: no transaction
        await sink.close()

    asyncio.run(go())
    table = deltalake.DeltaTable(str(tmp_path))
    assert ids(tmp_path) == [10, 11, 20, 21, 30, 31]
    assert table.transaction_version(APP) == 3
    commits = delta_log(tmp_path)
    txns = [a["txn"]["version"] for c in commits for a in c if "txn" in a]
    assert txns == [1, 2, 3]
    infos = [a["commitInfo"] for c in commits for a in c if "commitInfo" in a]
    assert [i.get("sluiceway.checkpoint") for i in infos if "sluiceway.sink" in i] == [
        "1",
        "2",
        "3",
    ]


@pytest.mark.parametrize("committed_before_crash", [True, False])
def test_a_retried_commit_is_applied_once(tmp_path: Path, committed_before_crash: bool) -> None:
    """The checkpoint was stored; the process died after (or before) its transaction:
    the restart applies the transaction exactly once either way."""

    async def first_run(commit: bool) -> Any:
        sink = DeltaSink(tmp_path)
        await sink.open(CTX)
        await sink.write(Batch([{"id": 1}, {"id": 2}]))
        state = await sink.pre_commit(1)
        if commit:
            await sink.commit(1, state)
        await sink.write(Batch([{"id": 3}]))
        await sink.pre_commit(2)  # staged, never in a stored checkpoint
        return state  # died here

    async def restart(state: Any) -> None:
        sink = DeltaSink(tmp_path)
        sink.restore(state)
        await sink.open(CTX)
        await sink.close()

    state = asyncio.run(first_run(committed_before_crash))
    asyncio.run(restart(state))
    asyncio.run(restart(state))  # a crash during the restart: restored again
    assert ids(tmp_path) == [1, 2]
    assert deltalake.DeltaTable(str(tmp_path)).transaction_version(APP) == 1
    staged = list(tmp_path.rglob("part-*.parquet"))
    live = {Path(p).name for p in deltalake.DeltaTable(str(tmp_path)).file_uris()}
    assert {p.name for p in staged} == live, "an orphan staged file was left behind"


def test_upsert_merges_by_key_the_last_record_per_checkpoint(tmp_path: Path) -> None:
    async def go() -> None:
        sink = DeltaSink(tmp_path, mode="upsert", key=["id"])
        await sink.open(CTX)
        await sink.write(Batch([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 1, "v": "c"}]))
        await sink.commit(1, await sink.pre_commit(1))
        await sink.write(Batch([{"id": 2, "v": "d"}, {"id": 3, "v": "e"}]))
        state = await sink.pre_commit(2)
        await sink.commit(2, state)
        await sink.commit(2, state)  # repeated: applied once
        await sink.close()

    asyncio.run(go())
    got = deltalake.DeltaTable(str(tmp_path)).to_pyarrow_table().to_pylist()
    assert sorted((r["id"], r["v"]) for r in got) == [(1, "c"), (2, "d"), (3, "e")]
    assert not list((tmp_path / "_sluiceway_staging").rglob("*.parquet"))


def test_without_checkpoints_commits_by_size_and_at_close(tmp_path: Path) -> None:
    flow = sw.Flow("delta")
    rows = [{"id": i} for i in range(100)]
    flow.source(sw.sources.Iterable(rows)).sink(sw.sinks.Delta(tmp_path, flush_rows=30))
    sw.testing.run_flow(flow, max_batch_size=10)
    assert ids(tmp_path) == list(range(100))
    commits = delta_log(tmp_path)
    assert len(commits) >= 4  # create + one per 30 rows (+ the rest at close)
    assert not [a for c in commits for a in c if "txn" in a]


def test_a_record_that_does_not_fit_goes_to_on_error(tmp_path: Path) -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("delta")
    flow.source(sw.sources.Iterable([{"id": 1}, {"id": "x"}, {"id": 2}])).sink(
        sw.sinks.Delta(tmp_path, schema=pa.schema([("id", pa.int64())])),
        on_error=sw.DeadLetter(dlq),
    )
    sw.testing.run_flow(flow)
    assert ids(tmp_path) == [1, 2]
    assert [d.record for d in dlq.items] == [{"id": "x"}]


def test_compact_rewrites_small_files(tmp_path: Path) -> None:
    async def go() -> None:
        sink = DeltaSink(tmp_path)
        await sink.open(CTX)
        for cid in range(1, 6):
            await sink.write(Batch([{"id": cid}]))
            await sink.commit(cid, await sink.pre_commit(cid))
        await sink.close()

    asyncio.run(go())
    assert len(deltalake.DeltaTable(str(tmp_path)).file_uris()) == 5
    compact(tmp_path, vacuum_hours=0)
    assert len(deltalake.DeltaTable(str(tmp_path)).file_uris()) == 1
    assert ids(tmp_path) == [1, 2, 3, 4, 5]
    assert deltalake.DeltaTable(str(tmp_path)).transaction_version(APP) == 5


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'append' or 'upsert', got 'merge'"):
        DeltaSink(tmp_path, mode="merge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mode='upsert' needs key=\[...\]"):
        DeltaSink(tmp_path, mode="upsert")
    with pytest.raises(ValueError, match="flush_rows must be an int >= 1, got 0"):
        DeltaSink(tmp_path, flush_rows=0)
    assert sw.sinks.Delta is DeltaSink


def test_the_example_flow_writes_window_results_exactly_once(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "delta_flow.py"
    spec = importlib.util.spec_from_file_location("delta_flow_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table, ckpt = tmp_path / "click_windows", tmp_path / "ckpt"

    async def stop_after(handle: sw.FlowHandle) -> None:
        await handle.clock.sleep(3.0)
        handle.request_stop()

    for _ in range(2):  # a second run goes on from the first one's final checkpoint
        sw.run(
            module.build(str(table)),
            clock=sw.VirtualClock(),
            monitor=stop_after,
            checkpoints=sw.Checkpoints(ckpt, interval=1.0),
        )
    rows = deltalake.DeltaTable(str(table)).to_pyarrow_table().to_pylist()
    starts = [r["start"] for r in rows]
    assert len(starts) >= 4
    assert len(starts) == len(set(starts)), "a window written twice"
    assert all(isinstance(r["top_pages"], list) and r["events"] > 0 for r in rows)


def test_upsert_without_checkpoints_merges_each_flush(tmp_path: Path) -> None:
    rows = [{"id": i % 4, "v": i} for i in range(20)]
    flow = sw.Flow("delta")
    flow.source(sw.sources.Iterable(rows)).sink(
        sw.sinks.Delta(tmp_path, mode="upsert", key=["id"], flush_rows=6)
    )
    sw.testing.run_flow(flow, max_batch_size=3)
    got = deltalake.DeltaTable(str(tmp_path)).to_pyarrow_table().to_pylist()
    assert sorted((r["id"], r["v"]) for r in got) == [(0, 16), (1, 17), (2, 18), (3, 19)]
    assert len(delta_log(tmp_path)) >= 4  # create + a merge per flush


def test_a_checkpoint_whose_staged_files_are_gone_is_a_checkpoint_error(tmp_path: Path) -> None:
    async def crashed() -> Any:
        sink = DeltaSink(tmp_path)
        await sink.open(CTX)
        await sink.write(Batch([{"id": 1}]))
        return await sink.pre_commit(1)  # stored; died before the transaction

    state = asyncio.run(crashed())
    for f in tmp_path.glob("part-*.parquet"):
        f.unlink()  # an over-eager orphan cleanup
    sink = DeltaSink(tmp_path)
    sink.restore(state)
    with pytest.raises(sw.CheckpointError, match="lists staged files that are gone"):
        asyncio.run(sink.open(CTX))


@pytest.mark.slow
def test_flush_interval_on_the_real_clock(tmp_path: Path) -> None:
    async def go() -> int:
        clock = SystemClock()
        sink = DeltaSink(tmp_path, flush_interval=0.2)
        await sink.open(SinkContext("flow", "out", clock, checkpointing=False))
        await sink.write(Batch([{"id": 1}]))
        before = deltalake.DeltaTable.is_deltatable(str(tmp_path))
        await clock.sleep(0.3)
        await sink.write(Batch([{"id": 2}]))  # the buffer is 0.3 s old: committed
        assert not before
        committed = len(ids(tmp_path))
        await sink.close()
        return committed

    assert asyncio.run(asyncio.wait_for(go(), timeout=10)) == 2
    assert ids(tmp_path) == [1, 2]
