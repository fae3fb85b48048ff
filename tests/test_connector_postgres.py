"""The PostgreSQL sink against a real server (the shared one, or a private one; see
services_postgres.py): append (COPY and INSERT), upsert, exactly-once with checkpoints
(stop/resume, restore, a SIGKILL crash test), bad records, errors, clean close, and an
outage test that stops and restarts a server of its own mid-stream.

Every test writes its own ``sw_test_<uuid>`` table, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import random
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from services import import_or_missing

psycopg = import_or_missing("psycopg")

from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

import sluiceway as sw  # noqa: E402
from services_postgres import (  # noqa: E402
    PostgresServer,
    drop_table,
    own_postgres,
    pg_dsn,
    pg_table,
)
from sluiceway.connectors.base import PartialWriteError, SinkContext  # noqa: E402
from sluiceway.connectors.postgres import PostgresSink  # noqa: E402
from sluiceway.flowcontrol import TokenBucket  # noqa: E402
from sluiceway.runtime.messages import Batch  # noqa: E402
from sluiceway.time import SystemClock  # noqa: E402

FIXTURES = (own_postgres, pg_dsn, pg_table)  # pytest finds them here

HERE = Path(__file__).resolve().parent
CHILD = HERE / "pg_crash_child.py"
SRC = HERE.parent / "src"
EXAMPLE = HERE.parent / "examples" / "postgres_flow.py"


# -- helpers ---------------------------------------------------------------------------


def execute(dsn: str, query: str, *table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(query).format(*map(sql.Identifier, table)))


def fetch(dsn: str, query: str, *table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows: list[tuple[Any, ...]] = conn.execute(
            sql.SQL(query).format(*map(sql.Identifier, table))
        ).fetchall()
        return rows


def ids(dsn: str, table: str) -> list[int]:
    return [r[0] for r in fetch(dsn, "SELECT id FROM {} ORDER BY id", table)]


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (pytest sees the same fixtures)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def run(flow: sw.Flow, **kwargs: Any) -> sw.RunResult:
    return sw.run(flow, handle_signals=False, **kwargs)


def ctx(name: str = "out", *, checkpointing: bool = False) -> SinkContext:
    return SinkContext("test", name, SystemClock(), checkpointing)


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}", "data": {"i": i, "tags": ["a", "b"]}} for i in range(n)]


# -- append ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["copy", "insert"])
def test_append_writes_every_record_once_in_order(pg_dsn: str, pg_table: str, method: Any) -> None:
    execute(
        pg_dsn,
        "CREATE TABLE {} (pos bigserial PRIMARY KEY, id bigint, name text, data jsonb)",
        pg_table,
    )
    flow = sw.Flow("append")
    flow.source(sw.sources.Iterable(records(3000))).map(lambda r: r).sink(
        PostgresSink(pg_dsn, pg_table, method=method), name="table"
    )
    result = run(flow, max_batch_size=256)
    assert result.metrics.operator("table").records_out == 3000
    rows = fetch(pg_dsn, "SELECT id, name, data FROM {} ORDER BY pos", pg_table)
    assert [r[0] for r in rows] == list(range(3000))  # the order the flow wrote them in
    assert rows[7] == (7, "n7", {"i": 7, "tags": ["a", "b"]})


@sync
async def test_a_write_is_committed_when_it_returns_and_close_releases_the_connection(
    pg_dsn: str, pg_table: str
) -> None:
    execute(pg_dsn, "CREATE TABLE {} (id bigint, name text)", pg_table)
    sink = PostgresSink(pg_dsn, pg_table, columns=["id", "name"])
    app = f"sluiceway test/{pg_table}"
    await sink.open(ctx(pg_table))
    await sink.write(Batch([{"id": 1, "name": "a", "extra": "ignored"}, (2, "b")]))
    # another connection sees it: committed, not pending in an open transaction
    assert ids(pg_dsn, pg_table) == [1, 2]
    active = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(active, [app]).fetchone() == (1,)
        await sink.close()
        await sink.close()  # a second close is a no-op
        for _ in range(50):  # the server notices the goodbye asynchronously
            if conn.execute(active, [app]).fetchone() == (0,):
                break
            conn.rollback()
            await asyncio.sleep(0.02)
        assert conn.execute(active, [app]).fetchone() == (0,)


def test_create_table_infers_the_column_types_from_the_first_record(
    pg_dsn: str, pg_table: str
) -> None:
    flow = sw.Flow("create")
    flow.source(sw.sources.Iterable(records(10))).sink(
        PostgresSink(pg_dsn, pg_table, create_table=True)
    )
    run(flow)
    types = fetch(
        pg_dsn,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
        "ORDER BY ordinal_position".replace("%s", f"'{pg_table}'"),
    )
    assert types == [("id", "bigint"), ("name", "text"), ("data", "jsonb")]
    assert ids(pg_dsn, pg_table) == list(range(10))


# -- upsert ----------------------------------------------------------------------------


def test_upsert_keeps_the_last_value_per_key_and_a_replay_changes_nothing(
    pg_dsn: str, pg_table: str
) -> None:
    execute(pg_dsn, "CREATE TABLE {} (k text PRIMARY KEY, n bigint, seen text)", pg_table)
    rnd = random.Random(3)
    events = [{"k": f"key{rnd.randrange(50)}", "n": i, "seen": "x"} for i in range(2000)]
    want = {e["k"]: e["n"] for e in events}  # the last value of each key

    def once() -> dict[str, int]:
        flow = sw.Flow("upsert")
        flow.source(sw.sources.Iterable(events)).sink(
            PostgresSink(pg_dsn, pg_table, mode="upsert", key=["k"])
        )
        run(flow, max_batch_size=100)  # a key repeats inside one batch, and across them
        return dict(fetch(pg_dsn, "SELECT k, n FROM {}", pg_table))

    assert once() == want
    assert once() == want  # a replay (e.g. after a crash) overwrites the same rows


@sync
async def test_upsert_without_a_unique_index_on_the_key_is_refused_at_open(
    pg_dsn: str, pg_table: str
) -> None:
    execute(pg_dsn, "CREATE TABLE {} (k text, n bigint)", pg_table)
    sink = PostgresSink(pg_dsn, pg_table, columns=["k", "n"], mode="upsert", key=["k"])
    with pytest.raises(LookupError, match=r"unique index on exactly \['k'\].*CREATE UNIQUE"):
        await sink.open(ctx())
    await sink.close()


# -- bad records and errors ------------------------------------------------------------


def test_a_refused_record_is_dead_lettered_and_the_rest_of_its_batch_written(
    pg_dsn: str, pg_table: str
) -> None:
    execute(pg_dsn, "CREATE TABLE {} (id bigint PRIMARY KEY, v bigint CHECK (v >= 0))", pg_table)
    values = [{"id": i, "v": -1 if i in (5, 12) else i} for i in range(20)]
    values[15] = {"id": 15}  # no "v": cannot become a row
    dead: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("bad")
    flow.source(sw.sources.Iterable(values)).sink(
        PostgresSink(pg_dsn, pg_table), on_error=sw.DeadLetter(dead)
    )
    run(flow, max_batch_size=20)
    assert ids(pg_dsn, pg_table) == [i for i in range(20) if i not in (5, 12, 15)]
    assert [d.record for d in dead.items] == [values[5], values[12], values[15]]
    assert "CheckViolation" in dead.items[0].error_type or "check" in dead.items[0].error_message
    assert "has no field 'v'" in dead.items[2].error_message


@sync
async def test_partial_write_error_counts_the_committed_records(pg_dsn: str, pg_table: str) -> None:
    execute(pg_dsn, "CREATE TABLE {} (id bigint PRIMARY KEY)", pg_table)
    sink = PostgresSink(pg_dsn, pg_table, columns=["id"])
    await sink.open(ctx())
    try:
        with pytest.raises(PartialWriteError) as info:
            await sink.write(Batch([{"id": 1}, {"id": 2}, {"id": 1}, {"id": 3}]))
        assert info.value.written == 2
        assert isinstance(info.value.cause, psycopg.errors.UniqueViolation)
        assert ids(pg_dsn, pg_table) == [1, 2]
    finally:
        await sink.close()


@sync
async def test_a_missing_table_or_column_is_named_at_open(pg_dsn: str, pg_table: str) -> None:
    sink = PostgresSink(pg_dsn, pg_table, columns=["id"])
    with pytest.raises(LookupError, match=f"{pg_table}.*does not exist.*create_table=True"):
        await sink.open(ctx())
    await sink.close()
    execute(pg_dsn, "CREATE TABLE {} (id bigint)", pg_table)
    sink = PostgresSink(pg_dsn, pg_table, columns=["id", "nope"])
    with pytest.raises(LookupError, match=r"no column\(s\) \['nope'\]"):
        await sink.open(ctx())
    await sink.close()
    sink = PostgresSink(pg_dsn, pg_table, columns=["id"], mode="exactly_once")
    with pytest.raises(LookupError, match=r"ALTER TABLE .* ADD COLUMN sluiceway_sink"):
        await sink.open(ctx(checkpointing=True))
    await sink.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "merge"}, "mode must be"),
        ({"method": "bulk"}, "method must be"),
        ({"mode": "upsert"}, "needs key="),
        ({"mode": "upsert", "key": ["id"], "method": "copy"}, "method='insert'"),
        ({"key": ["id"]}, "key= is for mode='upsert'"),
        ({"columns": ["id"], "mode": "upsert", "key": ["k"]}, "must be among the columns"),
        ({"columns": ["sluiceway_epoch"]}, "reserved"),
        ({"reconnect_timeout": -1}, "reconnect_timeout"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostgresSink("postgresql://127.0.0.1/test", "t", **kwargs)
    with pytest.raises(ValueError, match=r"schema\.name"):
        PostgresSink("postgresql://127.0.0.1/test", "a.b.c")


def test_the_sink_is_registered_lazily() -> None:
    assert sw.sinks.Postgres is PostgresSink
    assert "Postgres" in dir(sw.sinks)


# -- exactly once ----------------------------------------------------------------------


@sync
async def test_restore_deletes_the_rows_written_after_the_checkpoint(
    pg_dsn: str, pg_table: str
) -> None:
    opts: dict[str, Any] = {"columns": ["id"], "mode": "exactly_once", "create_table": True}
    first = PostgresSink(pg_dsn, pg_table, **opts)
    await first.open(ctx(checkpointing=True))
    await first.pre_commit(1)
    await first.write(Batch([{"id": 1}, {"id": 2}]))
    kept = await first.pre_commit(2)  # stored and committed
    await first.commit(2, kept)
    await first.write(Batch([{"id": 3}]))
    await first.pre_commit(3)  # pre-committed, but the checkpoint was never stored
    await first.write(Batch([{"id": 4}]))
    await first.close()  # its last checkpoint is not known to be stored: rows stay
    assert ids(pg_dsn, pg_table) == [1, 2, 3, 4]

    second = PostgresSink(pg_dsn, pg_table, **opts)
    second.restore(kept)
    await second.open(ctx(checkpointing=True))
    assert ids(pg_dsn, pg_table) == [1, 2]  # 3 and 4 come again with the replay
    await second.write(Batch([{"id": 3}, {"id": 4}]))
    await second.commit(3, await second.pre_commit(3))
    await second.write(Batch([{"id": 5}]))
    await second.close()  # its last checkpoint is committed: what came after goes
    assert ids(pg_dsn, pg_table) == [1, 2, 3, 4]
    await second.open(ctx(checkpointing=True))  # the same sink in a later run: no restore
    await second.close()
    assert ids(pg_dsn, pg_table) == [1, 2, 3, 4]  # the old restore is not applied again

    # a fresh start (checkpoints reset) keeps what is there and tags above it
    third = PostgresSink(pg_dsn, pg_table, **opts)
    await third.open(ctx(checkpointing=True))
    state = await third.pre_commit(1)
    await third.close()
    epochs = fetch(pg_dsn, "SELECT max(sluiceway_epoch) FROM {}", pg_table)[0][0]
    assert state["epoch"] > epochs
    assert ids(pg_dsn, pg_table) == [1, 2, 3, 4]


def test_a_stopped_flow_resumes_from_its_checkpoint_with_nothing_lost_or_doubled(
    pg_dsn: str, pg_table: str, tmp_path: Path
) -> None:
    n = 3000
    checkpoints = sw.Checkpoints(tmp_path / "ckpt", interval=0.05)

    def build() -> sw.Flow:
        flow = sw.Flow("resume")
        (
            flow.source(sw.sources.Iterable(range(n)))
            .rate_limit(TokenBucket(rate=6000, burst=100))
            .map(lambda i: {"id": i})
            .sink(
                PostgresSink(pg_dsn, pg_table, mode="exactly_once", create_table=True),
                name="pg",
            )
        )
        return flow

    async def stop_midway() -> None:
        handle = sw.start(build(), checkpoints=checkpoints)
        # Not a fixed 0.2 s: under load the sink had not even opened (and created its
        # table) by then, and the stop found nothing written.
        deadline = time.monotonic() + 20
        while handle.metrics().operator("pg").records_in == 0:
            assert not handle.done(), await handle.wait()
            assert time.monotonic() < deadline, "the sink wrote nothing in 20 s"
            await asyncio.sleep(0.01)
        await handle.stop()

    asyncio.run(stop_midway())
    written = ids(pg_dsn, pg_table)
    assert 0 < len(written) < n, "the stop did not land mid-stream"
    assert written == list(range(len(written)))  # exactly the checkpointed prefix
    run(build(), checkpoints=checkpoints)
    assert ids(pg_dsn, pg_table) == list(range(n))
    progress = fetch(
        pg_dsn, "SELECT epoch, committed_epoch FROM {}", f"{pg_table}_sluiceway_epochs"
    )
    [(epoch, committed)] = progress
    assert committed is not None
    assert committed >= epoch


def _start_child(dsn: str, table: str, work: Path, n: int, rate: int, mode: str) -> Any:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(CHILD), dsn, table, str(work), str(n), str(rate), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _wait_ready(p: Any, timeout: float = 20.0) -> None:
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    line = p.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        p.kill()
        _, err = p.communicate()
        raise AssertionError(f"the crash child did not start: {line!r}\n{err.decode()}")


def crash_and_finish(
    dsn: str, table: str, work: Path, *, mode: str, kills: int, seed: int
) -> tuple[int, int]:
    """SIGKILL the child ``kills`` times at random instants, then let a run finish;
    returns (records, kills)."""
    n, rate = 40_000, 20_000  # a whole run is ~2 s: every kill lands mid-stream
    rnd = random.Random(seed)
    done = 0
    while done < kills:
        p = _start_child(dsn, table, work, n, rate, mode)
        _wait_ready(p)
        time.sleep(rnd.uniform(0.1, 0.5))
        if p.poll() is not None:
            err = p.communicate()[1].decode()
            raise AssertionError(
                f"run {done + 1} ended (exit {p.returncode}) before its kill\n{err}"
            )
        p.send_signal(signal.SIGKILL)
        p.communicate()
        done += 1
    p = _start_child(dsn, table, work, n, rate, mode)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    return n, done


@pytest.mark.timeout(60)
def test_killed_at_random_instants_the_table_holds_every_record_exactly_once(
    pg_dsn: str, pg_table: str, tmp_path: Path
) -> None:
    n, kills = crash_and_finish(pg_dsn, pg_table, tmp_path, mode="exactly_once", kills=10, seed=7)
    assert kills >= 10
    counts = Counter(ids(pg_dsn, pg_table))
    lost = set(range(n)) - set(counts)
    doubled = {i: c for i, c in counts.items() if c > 1}
    assert not lost, f"{len(lost)} records lost, e.g. {sorted(lost)[:5]}"
    assert not doubled, f"{len(doubled)} records written twice or more"
    assert fetch(pg_dsn, "SELECT count(*) FROM {} WHERE v <> 2 * id", pg_table) == [(0,)]


@pytest.mark.timeout(60)
def test_the_same_crashes_in_append_mode_write_duplicates(
    pg_dsn: str, pg_table: str, tmp_path: Path
) -> None:
    n, _ = crash_and_finish(pg_dsn, pg_table, tmp_path, mode="append", kills=3, seed=8)
    counts = Counter(ids(pg_dsn, pg_table))
    assert set(counts) == set(range(n)), "append is at-least-once: nothing may be lost"
    assert any(c > 1 for c in counts.values()), "crashes in append mode showed no duplicates"


# -- outage ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "stop"), [("exactly_once", "fast"), ("append", "immediate")])
def test_the_sink_reconnects_after_a_server_restart_and_loses_nothing(
    own_postgres: PostgresServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: Any,
    stop: str,
) -> None:
    dsn, table, n = own_postgres.dsn, "outage", 6000
    flow = sw.Flow("outage")
    (
        flow.source(sw.sources.Iterable(range(n)))
        .rate_limit(TokenBucket(rate=4000, burst=100))
        .map(lambda i: {"id": i})
        .sink(PostgresSink(dsn, table, mode=mode, create_table=True, reconnect_timeout=30))
    )

    async def main() -> None:
        handle = sw.start(flow, checkpoints=sw.Checkpoints(tmp_path / "ckpt", interval=0.1))
        before = 0
        deadline = time.monotonic() + 20
        while before < 500:  # mid-stream (a loaded machine may take a while to get there)
            assert time.monotonic() < deadline, "the flow wrote nothing"
            await asyncio.sleep(0.05)
            with contextlib.suppress(psycopg.errors.UndefinedTable):  # not created yet
                before = len(await asyncio.to_thread(ids, dsn, table))
        await asyncio.to_thread(own_postgres.stop, stop)
        await asyncio.sleep(0.7)
        await asyncio.to_thread(own_postgres.start)
        await handle.wait()
        assert 0 < before < n, "the outage did not happen mid-stream"

    with caplog.at_level(logging.INFO, logger="sluiceway"):
        asyncio.run(main())
    counts = Counter(ids(dsn, table))
    assert set(counts) == set(range(n)), "a record acknowledged by the server was lost"
    if mode == "exactly_once":
        assert max(counts.values()) == 1, "exactly_once wrote a record twice"
    warnings = [r for r in caplog.records if "lost the connection" in r.getMessage()]
    assert warnings
    assert warnings[0].levelno == logging.WARNING
    assert len(warnings) == len([r for r in caplog.records if "reconnected to" in r.getMessage()])


@sync
async def test_an_unreachable_server_fails_after_reconnect_timeout_naming_it(
    own_postgres: PostgresServer,
) -> None:
    sink = PostgresSink(
        own_postgres.dsn, "t", columns=["id"], create_table=True, reconnect_timeout=0.5
    )
    await sink.open(ctx())
    await sink.write(Batch([{"id": 1}]))
    await asyncio.to_thread(own_postgres.stop, "fast")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{own_postgres.port}/postgres"):
        await sink.write(Batch([{"id": 2}]))
    assert 0.4 < time.monotonic() - started < 5
    await sink.close()


@sync
async def test_a_write_and_a_commit_reconnecting_at_once_share_one_connection(
    pg_dsn: str, pg_table: str
) -> None:
    """The checkpoint coordinator's commit() runs while the stage writes the next batch.
    When the connection is lost, both used to reconnect at once: each opened a
    connection, one was dropped unclosed (a ResourceWarning when collected, under
    load), and two transactions shared the survivor.  They take turns now."""
    sink = PostgresSink(pg_dsn, pg_table, columns=["id"], mode="exactly_once", create_table=True)
    await sink.open(ctx("once", checkpointing=True))
    try:
        await sink.write(Batch([{"id": 1}]))
        state = await sink.pre_commit(1)  # checkpoint 1 holds id 1
        assert sink._conn is not None
        pid = sink._conn.info.backend_pid
        await asyncio.to_thread(execute, pg_dsn, f"SELECT pg_terminate_backend({pid})")
        await asyncio.gather(sink.write(Batch([{"id": 2}])), sink.commit(1, state))
        app = "sluiceway test/once"
        opened = await asyncio.to_thread(
            fetch, pg_dsn, f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'"
        )
        assert len(opened) == 1, f"the sink holds {len(opened)} connections"
    finally:
        await sink.close()
    # checkpoint 1 was committed; id 2 came after it, so close takes it back
    assert ids(pg_dsn, pg_table) == [1]


class CommitCutter:
    """A TCP proxy to a real server that, when armed, forwards the next COMMIT, drops the
    server's answer and cuts the connection: the client cannot know whether its
    transaction committed (it did).  Later connections pass through untouched."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.upstream = host, port
        self.armed = False
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CommitCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sr, sw_ = await asyncio.open_connection(self.host, self.upstream)
        hold = False

        async def to_server() -> None:
            nonlocal hold
            while data := await cr.read(65536):
                if self.armed and b"COMMIT\x00" in data:
                    self.armed, hold = False, True  # the answer will not get through
                    sw_.write(data)
                    await sw_.drain()
                    await asyncio.sleep(0.3)  # the server commits
                    self.cuts += 1
                    return
                sw_.write(data)
                await sw_.drain()

        async def to_client() -> None:
            while data := await sr.read(65536):
                if not hold:
                    cw.write(data)
                    await cw.drain()

        try:
            pump = asyncio.ensure_future(to_client())
            await to_server()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        finally:
            for w in (cw, sw_):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self._tasks.discard(task)


@sync
async def test_a_connection_cut_during_commit_is_resolved_without_writing_twice(
    pg_dsn: str, pg_table: str
) -> None:
    info = conninfo_to_dict(pg_dsn)
    other = f"{pg_table}_append"
    async with CommitCutter(str(info["host"]), int(str(info["port"]))) as cutter:
        dsn = make_conninfo(pg_dsn, port=str(cutter.port))
        try:
            modes: list[tuple[Any, str]] = [("exactly_once", pg_table), ("append", other)]
            for mode, table in modes:
                sink = PostgresSink(dsn, table, columns=["id"], mode=mode, create_table=True)
                await sink.open(ctx(mode, checkpointing=True))
                await sink.pre_commit(1)
                await sink.write(Batch([{"id": 1}]))
                cutter.armed = True
                await sink.write(Batch([{"id": 2}, {"id": 3}]))  # committed, answer lost
                assert cutter.cuts == (1 if mode == "exactly_once" else 2)
                await sink.close()
            # exactly_once learnt from its progress row that the batch had landed
            assert ids(pg_dsn, pg_table) == [1, 2, 3]
            # append cannot know: it writes the batch again (at-least-once)
            assert ids(pg_dsn, other) == [1, 2, 2, 3, 3]
        finally:
            drop_table(pg_dsn, other)


# -- the example -----------------------------------------------------------------------


def test_the_example_flow_runs(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    table = f"sw_test_{uuid.uuid4().hex[:16]}"
    monkeypatch.setenv("SLUICEWAY_PG_DSN", pg_dsn)
    monkeypatch.setenv("SLUICEWAY_PG_TABLE", table)
    spec = importlib.util.spec_from_file_location("postgres_flow", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)

    async def main() -> None:
        handle = sw.start(module.flow)
        await asyncio.sleep(1.6)  # the demo windows one second of clicks at a time
        await handle.stop()

    try:
        spec.loader.exec_module(module)
        asyncio.run(main())
        rows = fetch(pg_dsn, "SELECT events, top_pages FROM {}", table)
        assert rows
        assert all(events > 0 and isinstance(top, dict) for events, top in rows)
    finally:
        drop_table(pg_dsn, table)


def test_credentials_in_the_dsn_are_never_shown(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from services import assert_secret_hidden, free_port  # noqa: PLC0415

    caplog.set_level(logging.DEBUG)
    secret = "s3cret-pw"
    port = free_port()
    for dsn in (
        f"postgresql://ann:{secret}@127.0.0.1:{port}/db",
        f"host=127.0.0.1 port={port} user=ann password={secret} dbname=db",
    ):
        flow = sw.Flow("pg-secret")
        sink = PostgresSink(dsn, "t", reconnect_timeout=0.3)
        flow.source(sw.sources.Iterable([{"id": 1}])).sink(sink)
        with pytest.raises(sw.SluicewayError, match=f"127.0.0.1:{port}/db") as info:
            sw.run(flow, handle_signals=False)
        assert_secret_hidden(secret, info.value, caplog.text)
    for bad in (
        f"postgresql://ann:{secret}@127.0.0.1:{port}/db?bogus=1",
        f"host=127.0.0.1 password={secret} port",
    ):
        with pytest.raises(ValueError, match="is not a libpq connection string") as refused:
            PostgresSink(bad, "t")
        assert "***" in str(refused.value)
        assert_secret_hidden(secret, refused.value, caplog.text)


def test_a_missing_table_stops_the_flow_at_its_start_naming_it(pg_dsn: str, pg_table: str) -> None:
    """Without ``columns=`` (taken from the first record) the table is still checked at
    open: not reported as a failure of the whole first batch."""
    flow = sw.Flow("pg-missing")
    flow.source(sw.sources.Iterable([{"id": i} for i in range(3)])).sink(
        PostgresSink(pg_dsn, pg_table), name="orders"
    )
    with pytest.raises(sw.ConnectorOpenError) as info:
        sw.run(flow, handle_signals=False)
    message = str(info.value)
    assert message.startswith("sink 'orders' (")
    assert f"table {pg_table!r} does not exist" in message
    assert "create it, or pass create_table=True" in message
    assert "failed on record" not in message
