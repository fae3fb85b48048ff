"""The Parquet sink: schema, partitions, rolling, atomic publication, exactly-once restore."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ds = pytest.importorskip("pyarrow.dataset")
duckdb = pytest.importorskip("duckdb")

import sluiceway as sw  # noqa: E402
from sluiceway.connectors.base import SinkContext  # noqa: E402
from sluiceway.connectors.lakehouse.arrow import RecordsToArrow  # noqa: E402
from sluiceway.connectors.lakehouse.parquet import ParquetSink, compact  # noqa: E402
from sluiceway.runtime.messages import Batch  # noqa: E402
from sluiceway.time import SystemClock, VirtualClock  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def visible(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def hidden(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if p.is_file())


def read_ids(root: Path) -> list[int]:
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    return sorted(table.column("id").to_pylist())


def test_writes_every_record_once_readable_by_pyarrow_and_duckdb(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = [{"id": i, "k": f"k{i % 3}", "v": i * 0.5} for i in range(1000)]
    flow = sw.Flow("pq")
    flow.source(sw.sources.Iterable(rows)).sink(
        sw.sinks.Parquet(out, partition_by=["k"], row_group_rows=100)
    )
    sw.testing.run_flow(flow, max_batch_size=64)
    assert read_ids(out) == list(range(1000))
    assert sorted(p.parent.name for p in visible(out)) == ["k=k0", "k=k1", "k=k2"]
    assert hidden(out) == []
    got = duckdb.sql(
        f"SELECT k, count(*), sum(id) FROM read_parquet('{out}/**/*.parquet', "
        "hive_partitioning=true) GROUP BY k ORDER BY k"
    ).fetchall()
    want = [
        (
            f"k{j}",
            sum(1 for r in rows if r["k"] == f"k{j}"),
            sum(r["id"] for r in rows if r["k"] == f"k{j}"),
        )
        for j in range(3)
    ]
    assert got == want


def test_files_roll_by_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = [{"id": i, "pad": f"{i:0200d}"} for i in range(5000)]
    flow = sw.Flow("pq")
    flow.source(sw.sources.Iterable(rows)).sink(
        sw.sinks.Parquet(out, row_group_rows=500, max_file_bytes=20_000, compression="none")
    )
    sw.testing.run_flow(flow, max_batch_size=500)
    assert len(visible(out)) >= 5
    assert read_ids(out) == list(range(5000))


def test_files_roll_by_age_on_the_flow_clock(tmp_path: Path) -> None:
    async def go() -> list[Path]:
        clock = VirtualClock()
        sink = ParquetSink(tmp_path, max_file_age=10.0)
        await sink.open(SinkContext("f", "s", clock, checkpointing=False))
        await sink.write(Batch([{"id": 1}]))
        clock.advance(5.0)
        await sink.write(Batch([{"id": 2}]))
        before = visible(tmp_path)
        clock.advance(5.0)
        await sink.write(Batch([{"id": 3}]))  # the file is 10 s old: rolled
        after = visible(tmp_path)
        await sink.close()
        assert before == []
        assert len(after) == 1
        return visible(tmp_path)

    assert len(asyncio.run(go())) == 1
    assert read_ids(tmp_path) == [1, 2, 3]


def test_a_record_that_does_not_fit_the_schema_is_a_dead_letter(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    records: list[Any] = [{"id": 1}, {"id": "two"}, {"id": 3, "extra": 1}, "four", {"id": 5}]
    flow = sw.Flow("pq")
    flow.source(sw.sources.Iterable(records)).sink(
        sw.sinks.Parquet(out, schema=pa.schema([("id", pa.int64())])),
        name="out",
        on_error=sw.DeadLetter(dlq),
    )
    sw.testing.run_flow(flow)
    assert read_ids(out) == [1, 5]
    assert [d.record for d in dlq.items] == [{"id": "two"}, {"id": 3, "extra": 1}, "four"]
    assert "field 'id': 'two' is not int64" in dlq.items[0].error_message
    assert "field 'extra' is not in the schema" in dlq.items[1].error_message


def test_a_bad_record_stops_the_flow_by_default_naming_it(tmp_path: Path) -> None:
    flow = sw.Flow("pq")
    flow.source(sw.sources.Iterable([{"id": 1}, {"id": "x"}])).sink(sw.sinks.Parquet(tmp_path))
    with pytest.raises(sw.OperatorError, match=r"record \{'id': 'x'\} does not fit the schema"):
        sw.testing.run_flow(flow)


def test_with_checkpoints_files_appear_only_at_commit(tmp_path: Path) -> None:
    async def go() -> None:
        ctx = SinkContext("f", "s", VirtualClock(), checkpointing=True)
        sink = ParquetSink(tmp_path)
        await sink.open(ctx)
        await sink.write(Batch([{"id": 1}, {"id": 2}]))
        state = await sink.pre_commit(1)
        assert visible(tmp_path) == []  # finished and fsynced, still hidden
        assert len(hidden(tmp_path)) == 1
        await sink.commit(1, state)
        assert read_ids(tmp_path) == [1, 2]
        await sink.write(Batch([{"id": 3}]))
        await sink.close()  # a failed run: rows after the checkpoint are dropped
        assert hidden(tmp_path) == []
        assert read_ids(tmp_path) == [1, 2]

    asyncio.run(go())


def test_restore_publishes_what_the_checkpoint_listed_and_drops_the_rest(tmp_path: Path) -> None:
    async def crashed_run() -> Any:
        sink = ParquetSink(tmp_path)
        await sink.open(SinkContext("f", "s", VirtualClock(), checkpointing=True))
        await sink.write(Batch([{"id": 1}]))
        state = await sink.pre_commit(1)  # stored, but the crash came before commit()
        await sink.write(Batch([{"id": 2}]))
        await sink.pre_commit(2)  # never stored
        await sink.write(Batch([{"id": 3}]))
        return state  # no close: the process died

    async def restart(state: Any) -> None:
        sink = ParquetSink(tmp_path)
        sink.restore(state)
        await sink.open(SinkContext("f", "s", VirtualClock(), checkpointing=True))
        await sink.close()

    state = asyncio.run(crashed_run())
    assert visible(tmp_path) == []
    asyncio.run(restart(state))
    assert read_ids(tmp_path) == [1]
    assert hidden(tmp_path) == []
    asyncio.run(restart(state))  # restoring twice changes nothing
    assert read_ids(tmp_path) == [1]


def test_restore_of_a_lost_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    sink.restore({"pending": [[".part-x.parquet.inprogress", "part-x.parquet"]]})
    ctx = SinkContext("f", "s", VirtualClock(), checkpointing=True)
    with pytest.raises(sw.CheckpointError, match=r"neither it nor 'part-x\.parquet' exists"):
        asyncio.run(sink.open(ctx))


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        ParquetSink(tmp_path, compression="zip")
    with pytest.raises(ValueError, match="max_file_bytes must be an int >= 1, got 0"):
        ParquetSink(tmp_path, max_file_bytes=0)
    with pytest.raises(
        ValueError,
        match=r"max_file_age must be a finite number > 0 seconds or None \(no age limit\), got -1",
    ):
        ParquetSink(tmp_path, max_file_age=-1)
    with pytest.raises(ValueError, match=r"partition_by \['day'\] are not fields"):
        ParquetSink(tmp_path, schema=[("id", pa.int64())], partition_by=["day"])


def test_registered_lazily_and_import_sluiceway_does_not_import_pyarrow() -> None:
    assert sw.sinks.Parquet is ParquetSink
    code = "import sys, sluiceway; sys.exit('pyarrow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_compact_merges_small_files_per_partition(tmp_path: Path) -> None:
    rows = [{"id": i, "k": i % 2} for i in range(400)]
    flow = sw.Flow("pq")
    flow.source(sw.sources.Iterable(rows)).sink(
        sw.sinks.Parquet(tmp_path, partition_by=["k"], row_group_rows=20, max_file_bytes=1)
    )
    sw.testing.run_flow(flow, max_batch_size=20)
    assert len(visible(tmp_path)) == 20
    assert compact(tmp_path) == 20
    assert len(visible(tmp_path)) == 2
    assert read_ids(tmp_path) == list(range(400))
    assert not list(tmp_path.rglob("_sluiceway_compaction.json"))


def test_compact_finishes_a_run_that_died_after_publishing(tmp_path: Path) -> None:
    folder = tmp_path / "k=1"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": [i]}), folder / f"part-{i}.parquet")
    merged = pa.table({"id": [0, 1, 2]})
    pq.write_table(merged, folder / "part-compacted-x.parquet")  # renamed, then died
    (folder / "_sluiceway_compaction.json").write_text(
        '{"tmp": ".part-compacted-x.parquet.inprogress", "final": "part-compacted-x.parquet", '
        '"old": ["part-0.parquet", "part-1.parquet", "part-2.parquet"]}'
    )
    compact(tmp_path)
    assert read_ids(tmp_path) == [0, 1, 2]
    assert [p.name for p in visible(tmp_path)] == ["part-compacted-x.parquet"]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"idd": 2, "v": "b"}, "field 'idd' is not in the schema"),  # as many fields, one misnamed
        ("ab", "a record must be a dict, got str"),  # from_pylist would make it all nulls
        ({"id": 2}, "field 'v' is not nullable"),
        ({"id": 2, "v": "b", "w": 0}, "field 'w' is not in the schema"),
    ],
)
def test_every_misfit_is_found_in_a_batch_of_fitting_records(bad: Any, why: str) -> None:
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("v", pa.string(), nullable=False)])
    conv = RecordsToArrow(schema, None, "t")
    good = [{"id": i, "v": str(i)} for i in range(5)]
    table, err = conv.convert([*good, bad, *good])
    assert table.num_rows == 5
    assert err is not None
    assert why in str(err)
    table, err = conv.convert([{"id": None, "v": "x"}, *good])  # nullable: None is fine
    assert (table.num_rows, err) == (6, None)


@pytest.mark.slow
def test_files_roll_by_age_on_the_real_clock(tmp_path: Path) -> None:
    async def go() -> list[Path]:
        clock = SystemClock()
        sink = ParquetSink(tmp_path, max_file_age=0.2)
        await sink.open(SinkContext("f", "s", clock, checkpointing=False))
        await sink.write(Batch([{"id": 1}]))
        await clock.sleep(0.3)
        await sink.write(Batch([{"id": 2}]))  # the file is 0.3 s old: rolled
        rolled = visible(tmp_path)
        await sink.close()
        return rolled

    assert len(asyncio.run(asyncio.wait_for(go(), timeout=10))) == 1
    assert read_ids(tmp_path) == [1, 2]
