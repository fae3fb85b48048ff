"""The lakehouse crash tests: SIGKILL a flow writing each format with checkpoints every
second at 20 random instants, restart it each time, then read the table back with the
format's library and with DuckDB: every record exactly once, no partial file visible,
the table's metadata valid.  The same harness with an at-least-once Parquet sink must
find duplicates: the test can fail.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_checkpoint_crash import go, make_input, reap, wait_ready

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ds = pytest.importorskip("pyarrow.dataset")
duckdb = pytest.importorskip("duckdb")

from lakehouse_crash_child import iceberg_catalog  # noqa: E402
from lakehouse_readers import delta_live_files, delta_log, duckdb_delta_rows  # noqa: E402
from sluiceway.connectors.lakehouse.iceberg import load_catalog  # noqa: E402

CHILD = Path(__file__).with_name("lakehouse_crash_child.py")
SRC = Path(__file__).resolve().parents[1] / "src"
RECORDS = 80_000
RATE = 5_000  # records/s while being killed: 16 s of input, more than the KILLS short runs use
KILLS = 12  # a dozen per format: ~1.2 s each, and the CI run is near its 20 minutes


def start_child(
    fmt: str, work: Path, inp: Path, rate: float, naive: bool
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, str(CHILD), fmt, str(inp), str(work), str(rate)]
    return subprocess.Popen(
        [*args, *(["--naive"] if naive else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def crash_and_finish(
    tmp_path: Path,
    fmt: str,
    *,
    kills: int,
    seed: int,
    naive: bool = False,
    after_kill: Callable[[Path], None] | None = None,
) -> tuple[int, Path]:
    """Kill the flow ``kills`` times at random instants, then let a last run finish."""
    inp = tmp_path / "input.jsonl"
    make_input(inp, RECORDS, seed)
    work = tmp_path / "work"
    work.mkdir()
    rnd = random.Random(seed)
    # Each run is started while the one before it runs (it waits for go()): a kill's
    # instant counts from its run's go, as it counted from its start.
    children = [start_child(fmt, work, inp, RATE if kills else 1e9, naive)]
    try:
        for done in range(kills):
            p = children[0]
            wait_ready(p)
            go(p)
            rate = RATE if done + 1 < kills else 1e9  # the next run: the last one finishes
            children.insert(0, start_child(fmt, work, inp, rate, naive))
            time.sleep(rnd.uniform(0.3, 1.6))
            if p.poll() is not None:
                err = p.communicate()[1].decode()
                raise AssertionError(
                    f"run {done + 1} ended (exit {p.returncode}) before its kill\n{err}"
                )
            p.send_signal(signal.SIGKILL)
            p.communicate()
            if after_kill is not None:
                after_kill(work)
        p = children[0]
        _, err = p.communicate(b"go\n", timeout=120)
        assert p.returncode == 0, err.decode()
    finally:
        reap(children)
    return kills, work


def assert_exactly_once(ids: list[int], reader: str) -> None:
    counts = Counter(ids)
    lost = RECORDS - len(counts)
    doubled = sum(n - 1 for n in counts.values() if n > 1)
    assert (lost, doubled) == (0, 0), f"{reader}: {lost} records lost, {doubled} duplicated"
    assert sorted(counts) == list(range(RECORDS)), f"{reader}: ids that were never written"


# -- Parquet ---------------------------------------------------------------------------


def parquet_files_are_whole(work: Path) -> None:
    """After a kill: every file a reader can see is a complete Parquet file."""
    for path in (work / "table").rglob("*.parquet"):
        if not path.name.startswith("."):
            pq.read_metadata(path)  # raises on a torn or partial file


@pytest.mark.timeout(150)
def test_parquet_killed_at_random_instants_every_record_exactly_once(tmp_path: Path) -> None:
    kills, work = crash_and_finish(
        tmp_path, "parquet", kills=KILLS, seed=21, after_kill=parquet_files_are_whole
    )
    assert kills == KILLS
    table = work / "table"
    assert not [p for p in table.rglob("*") if p.is_file() and p.name.startswith(".")]
    parquet_files_are_whole(work)
    got = ds.dataset(table, format="parquet", partitioning="hive").to_table()
    assert_exactly_once(got.column("id").to_pylist(), "pyarrow")
    assert got.num_rows == RECORDS
    rows = duckdb.sql(
        f"SELECT id, p, k FROM read_parquet('{table}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert_exactly_once([r[0] for r in rows], "duckdb")
    assert all(int(p) == k % 4 for _, p, k in rows), "a row in the wrong partition"


@pytest.mark.timeout(60)
def test_the_same_crashes_with_an_at_least_once_parquet_sink_duplicate_rows(
    tmp_path: Path,
) -> None:
    _, work = crash_and_finish(tmp_path, "parquet", kills=3, seed=22, naive=True)
    got = ds.dataset(work / "table", format="parquet", partitioning="hive").to_table()
    ids = got.column("id").to_pylist()
    assert len(ids) > len(set(ids)), (
        "a sink that never takes back what it wrote showed no duplicates"
    )


# -- Delta Lake ------------------------------------------------------------------------


def delta_table_is_valid(work: Path) -> None:
    """After a kill: the log is well formed and every file it lists is whole."""
    table = work / "table"
    if (table / "_delta_log").exists():
        delta_log(table)
        for path in delta_live_files(table):
            pq.read_metadata(path)


@pytest.mark.timeout(150)
def test_delta_killed_at_random_instants_every_record_exactly_once(tmp_path: Path) -> None:
    deltalake = pytest.importorskip("deltalake")
    kills, work = crash_and_finish(
        tmp_path, "delta", kills=KILLS, seed=31, after_kill=delta_table_is_valid
    )
    assert kills == KILLS
    table = work / "table"
    delta_table_is_valid(work)
    dt = deltalake.DeltaTable(str(table))
    assert_exactly_once(dt.to_pyarrow_table().column("id").to_pylist(), "deltalake")
    rows = duckdb_delta_rows(table, "id, p, k")
    assert_exactly_once([r[0] for r in rows], "duckdb")
    assert all(int(p) == k % 4 for _, p, k in rows), "a row in the wrong partition"
    live = {Path(p).name for p in delta_live_files(table)}
    on_disk = {p.name for p in table.rglob("*.parquet")}
    assert on_disk == live, f"{len(on_disk - live)} staged files left behind"
    assert dt.transaction_version("sluiceway/lakehouse_crash/table_out")


# -- Iceberg ---------------------------------------------------------------------------


def iceberg_table(work: Path) -> object:
    cat = load_catalog(iceberg_catalog(work))
    return cat.load_table("crash.events") if cat.table_exists("crash.events") else None


def iceberg_table_is_valid(work: Path) -> None:
    """After a kill: the metadata loads, the snapshots form one chain whose epochs grow,
    and every data file the current snapshot lists is whole."""
    if not (work / "catalog.db").exists():
        return
    t: Any = iceberg_table(work)
    if t is None or t.current_snapshot() is None:
        return
    chain = []
    s = t.current_snapshot()
    while s is not None:
        chain.append(s)
        s = t.snapshot_by_id(s.parent_snapshot_id) if s.parent_snapshot_id else None
    epochs = [int(s.summary["sluiceway.epoch"]) for s in reversed(chain)]
    assert epochs == sorted(set(epochs)), f"snapshot epochs not increasing: {epochs}"
    for f in t.inspect.files().column("file_path").to_pylist():
        pq.read_metadata(f.removeprefix("file://"))


@pytest.mark.timeout(150)
def test_iceberg_killed_at_random_instants_every_record_exactly_once(tmp_path: Path) -> None:
    pytest.importorskip("pyiceberg")
    kills, work = crash_and_finish(
        tmp_path, "iceberg", kills=KILLS, seed=41, after_kill=iceberg_table_is_valid
    )
    assert kills == KILLS
    iceberg_table_is_valid(work)
    t: Any = iceberg_table(work)
    assert_exactly_once(t.scan().to_arrow().column("id").to_pylist(), "pyiceberg")
    files = [f.removeprefix("file://") for f in t.inspect.files().column("file_path").to_pylist()]
    listed = ", ".join(f"'{f}'" for f in files)
    rows = duckdb.sql(f"SELECT id, p, k FROM read_parquet([{listed}])").fetchall()
    assert_exactly_once([r[0] for r in rows], "duckdb")
    assert all(p == k % 4 for _, p, k in rows), "a row in the wrong partition"
    on_disk = {p.name for p in (work / "warehouse").rglob("*.parquet")}
    assert on_disk == {Path(f).name for f in files}, "staged files left behind"
