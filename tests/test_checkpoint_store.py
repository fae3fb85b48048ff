"""The checkpoint store: atomic saves, pruning, verification, fallback and bad files.

The tests of the store's contract run on both backends (``location``: a directory, or a
PostgreSQL URL with a schema of the test's own); those about the SQLite file itself (WAL,
migrations, bad files) on SQLite only."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services_postgres import pg_dsn, pg_store_url  # noqa: F401 - fixtures
from sluiceway.checkpoint import (
    FORMAT_VERSION,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStore,
    OperatorState,
)
from sluiceway.checkpoint import postgres as pg_module
from sluiceway.checkpoint import store as store_module
from sluiceway.errors import CheckpointCorruptError, CheckpointError

FLOW = "orders"


def states(n: int) -> dict[str, OperatorState]:
    """Three operators whose state depends on ``n``."""
    parts = [
        OperatorState("source", "source", f"offset={n * 100}".encode()),
        OperatorState("totals", "window", bytes([n % 256]) * (n * 10)),
        OperatorState("sink", "sink", b""),
    ]
    return {p.name: p for p in parts}


def save(store: CheckpointStore, n: int, *, flow: str = FLOW, final: bool = False) -> None:
    store.save(flow, n, states(n), created=1_700_000_000.0 + n, duration=0.25, final=final)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a directory, or a PostgreSQL URL (a schema of its own)."""
    if request.param == "sqlite":
        return str(tmp_path / "cp")
    return str(request.getfixturevalue("pg_store_url"))


@pytest.fixture
def store(location: str) -> Iterator[CheckpointStore]:
    with CheckpointStore(location) as s:
        yield s


_RAW: list[Any] = []


@pytest.fixture(autouse=True)
def _close_raw_connections() -> Iterator[None]:
    yield
    while _RAW:
        _RAW.pop().close()


def raw(store: CheckpointStore) -> Any:
    """A second, plain connection to the store (``?`` placeholders, autocommit), to damage
    it as a crash or a disk would (closed after the test)."""
    conn: Any
    if store_module.is_url(store.where):
        import psycopg  # noqa: PLC0415

        conninfo, schema, _ = pg_module.split_url(store.where)
        pg = psycopg.connect(conninfo, autocommit=True)
        pg.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(schema)))
        conn = pg_module._PgConnection(pg)
    else:
        conn = sqlite3.connect(store.path, isolation_level=None)
    _RAW.append(conn)
    return conn


# -- saving and reading back ----------------------------------------------------------


def test_round_trip(location: str) -> None:
    with CheckpointStore(location) as store:
        info = store.save(FLOW, 7, states(7), created=1234.5, duration=0.75, final=True)
    assert info == CheckpointInfo(
        id=7,
        flow=FLOW,
        created=1234.5,
        duration=0.75,
        size=sum(len(s.data) for s in states(7).values()),
        operators=3,
        final=True,
        format_version=FORMAT_VERSION,
    )
    with CheckpointStore(location) as reopened:  # a new process would do this
        latest = reopened.latest(FLOW)
        assert latest is not None
        assert latest.info == info
        assert latest.states == states(7)
        assert reopened.load(7) == latest
        assert reopened.list() == [(info, None)]
        assert reopened.next_id() == 8


def test_latest_is_per_flow(store: CheckpointStore) -> None:
    save(store, 1, flow="a")
    save(store, 2, flow="b")
    a, b = store.latest("a"), store.latest("b")
    assert a is not None
    assert b is not None
    assert (a.info.id, b.info.id) == (1, 2)
    assert store.latest("c") is None


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "nowhere"
    with CheckpointStore(directory) as store:
        assert store.path == directory / "checkpoints.db"
        assert store.latest(FLOW) is None
        assert store.list() == []
        assert store.next_id() == 1
        assert store.reset() == 0
        with pytest.raises(KeyError, match="no checkpoint 3"):
            store.load(3)
    assert not directory.exists()


def test_the_first_save_creates_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    with CheckpointStore(directory) as store:
        save(store, 1)
    assert (directory / "checkpoints.db").is_file()


def test_the_file_is_durable_and_in_wal_mode(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        save(store, 1)
        assert raw(store).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn = store._conn  # the store's own connection: synchronous is per connection
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_an_empty_file_reads_as_no_store_and_is_initialized_by_a_save(tmp_path: Path) -> None:
    (tmp_path / "checkpoints.db").write_bytes(b"")  # a creation that was interrupted
    with CheckpointStore(tmp_path) as store:
        assert store.latest(FLOW) is None
        save(store, 1)
        latest = store.latest(FLOW)
    assert latest is not None
    assert latest.info.id == 1


def test_load_of_an_absent_id_lists_what_is_there(store: CheckpointStore) -> None:
    save(store, 1)
    save(store, 2)
    with pytest.raises(CheckpointNotFoundError) as info:
        store.load(5)
    assert str(info.value) == f"no checkpoint 5 in {store.where} (checkpoints there: 1, 2)"
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, CheckpointError)


def test_parts_show_what_is_stored(store: CheckpointStore) -> None:
    save(store, 2)
    parts = store.parts(2)
    assert [(p.name, p.kind, p.size) for p in parts] == [
        ("sink", "sink", 0),
        ("source", "source", len(b"offset=200")),
        ("totals", "window", 20),
    ]
    assert parts[0].sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(CheckpointNotFoundError):
        store.parts(3)


# -- pruning and ids ------------------------------------------------------------------


def test_keeps_the_newest_n(location: str) -> None:
    with CheckpointStore(location, keep=2) as store:
        for n in range(1, 6):
            save(store, n)
        assert [info.id for info, _ in store.list()] == [5, 4]
        with pytest.raises(CheckpointNotFoundError):
            store.load(3)
        orphans = raw(store).execute(
            "SELECT count(*) FROM parts WHERE checkpoint_id NOT IN (SELECT id FROM checkpoints)"
        )
        assert orphans.fetchone()[0] == 0


def test_keep_and_ids_count_per_flow(location: str) -> None:
    """Flows sharing a store: one flow's saves never prune another's checkpoints, and
    each counts its own ids."""
    with CheckpointStore(location, keep=3) as store:
        for n in (1, 2, 3, 4):
            save(store, n, flow="orders")
        for n in (1, 2, 3, 4, 5, 6):
            save(store, n, flow="audit")
        latest = store.latest("orders")
        assert latest is not None
        assert latest.info.id == 4  # all of them were pruned by audit's saves before
        assert [(i.flow, i.id) for i, _ in store.list()] == [
            ("audit", 6),
            ("audit", 5),
            ("audit", 4),
            ("orders", 4),
            ("orders", 3),
            ("orders", 2),
        ]
        assert [i.id for i, _ in store.list("orders")] == [4, 3, 2]
        assert store.flows() == ["audit", "orders"]
        assert (store.next_id("orders"), store.next_id("audit"), store.next_id("new")) == (5, 7, 1)
        assert store.next_id() == 7
        with pytest.raises(ValueError, match=r"flows 'audit', 'orders' each have a checkpoint 4"):
            store.load(4)
        assert store.load(3).states == states(3)  # only orders has a 3
        assert store.load(4, "orders").info.flow == "orders"
        assert [p.name for p in store.parts(5, "audit")] == ["sink", "source", "totals"]
        with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint 9 of flow 'orders'"):
            store.load(9, "orders")
        with pytest.raises(
            ValueError, match=r"got 4, but 4 was already saved for flow 'orders'.*another run"
        ):
            save(store, 4, flow="orders")
        assert store.reset("audit") == 3
        assert store.flows() == ["orders"]
        assert store.next_id("audit") == 7  # ids are never reused


SAVER = textwrap.dedent(
    """
    import sys
    from sluiceway.checkpoint import CheckpointStore, OperatorState

    directory, flow = sys.argv[1], sys.argv[2]
    with CheckpointStore(directory, keep=2) as store:
        for n in range(1, 41):
            state = OperatorState("src", "source", f"{flow}={n}".encode())
            store.save(flow, store.next_id(flow), {"src": state}, created=n, duration=0.0)
    """
)


def test_flows_saving_to_one_new_store_at_the_same_time(tmp_path: Path, location: str) -> None:
    """Four processes create and fill one store at once: no 'table meta already exists',
    no clash of ids; each flow keeps its own newest two."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    directory = location
    procs = [
        subprocess.Popen(  # the environment (PYTHONPATH) is this test's
            [sys.executable, str(script), str(directory), f"flow{i}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with CheckpointStore(directory) as store:
        assert [(i.flow, i.id) for i, p in store.list() if p is None] == [
            (f"flow{i}", n) for i in range(4) for n in (40, 39)
        ]
        for i in range(4):
            latest = store.latest(f"flow{i}")
            assert latest is not None
            assert latest.states["src"].data == f"flow{i}=40".encode()


def test_a_version_1_store_is_migrated_and_keeps_its_checkpoints(tmp_path: Path) -> None:
    """A file written by the version 1 layout (ids and keep across flows) is readable:
    migrated once, every checkpoint verifies, no id is given out again."""
    path = tmp_path / CheckpointStore.FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in V1_SCHEMA:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("application", "sluiceway-checkpoints"), ("format_version", "1"), ("last_id", "7")],
    )
    for cid, flow in ((5, "orders"), (6, "audit"), (7, "orders")):
        parts = [(p.name, p.kind, hashlib.sha256(p.data).hexdigest()) for p in states(cid).values()]
        size = sum(len(p.data) for p in states(cid).values())
        digest = store_module._digest(
            cid, flow, final=False, size=size, count=3, format_version=1, parts=parts
        )
        conn.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, 0.1, ?, 3, 0, 1, ?)",
            (cid, flow, 1e9 + cid, size, digest),
        )
        for p in states(cid).values():
            conn.execute(
                "INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?)",
                (cid, p.name, p.kind, len(p.data), hashlib.sha256(p.data).hexdigest(), p.data),
            )
    conn.close()
    with CheckpointStore(tmp_path) as store:
        assert [(i.flow, i.id, i.format_version, p) for i, p in store.list()] == [
            ("audit", 6, 1, None),
            ("orders", 7, 1, None),
            ("orders", 5, 1, None),
        ]
        latest = store.latest("orders")
        assert latest is not None
        assert latest.states == states(7)
        assert (store.next_id("orders"), store.next_id("audit"), store.next_id("new")) == (8, 8, 8)
        save(store, 8)
    meta = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    assert meta["format_version"] == str(FORMAT_VERSION)


V1_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE checkpoints (id INTEGER PRIMARY KEY, flow TEXT NOT NULL, created REAL NOT"
    " NULL, duration REAL NOT NULL, size INTEGER NOT NULL, operators INTEGER NOT NULL, final"
    " INTEGER NOT NULL, format_version INTEGER NOT NULL, digest TEXT NOT NULL)",
    "CREATE INDEX checkpoints_by_flow ON checkpoints (flow, id)",
    "CREATE TABLE parts (checkpoint_id INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT NOT"
    " NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,"
    " PRIMARY KEY (checkpoint_id, name))",
)
"""The layout of format version 1, as sluiceway wrote it before version 2."""


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_keep_must_be_at_least_one(tmp_path: Path, keep: object) -> None:
    with pytest.raises(ValueError, match=f"keep must be a whole number >= 1, got {keep!r}"):
        CheckpointStore(tmp_path, keep=keep)  # type: ignore[arg-type]


def test_ids_must_increase(store: CheckpointStore) -> None:
    save(store, 5)
    for bad in (5, 4):
        with pytest.raises(ValueError, match=rf"must increase: got {bad}, but 5 was already"):
            save(store, bad)
    assert [info.id for info, _ in store.list()] == [5]
    assert store.next_id() == 6


def test_ids_are_never_reused_after_pruning_or_reset(location: str) -> None:
    with CheckpointStore(location, keep=1) as store:
        save(store, 1)
        save(store, 2)
        assert store.reset() == 1
        assert store.list() == []
        assert store.next_id() == 3
        with pytest.raises(ValueError, match="got 2, but 2 was already saved"):
            save(store, 2)
        save(store, 3)
        assert [info.id for info, _ in store.list()] == [3]


def test_reset_deletes_every_checkpoint(store: CheckpointStore) -> None:
    for n in (1, 2, 3):
        save(store, n)
    assert store.reset() == 3
    assert store.latest(FLOW) is None
    assert raw(store).execute("SELECT count(*) FROM parts").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.save("", 1, {}, created=0, duration=0), ValueError, "flow must be"),
        (lambda s: s.save("f", 0, {}, created=0, duration=0), ValueError, "id must be >= 1"),
        (lambda s: s.save("f", 1, {}, created=0, duration=-1), ValueError, "duration"),
        (
            lambda s: s.save("f", 1, {}, created=float("nan"), duration=0),
            ValueError,
            "created must be",
        ),
        (
            lambda s: s.save("f", 1, {"a": OperatorState("b", "map", b"")}, created=0, duration=0),
            ValueError,
            "key 'a' holds the state of operator 'b'",
        ),
        (
            lambda s: s.save(
                "f",
                1,
                {"a": OperatorState("a", "map", "text")},  # type: ignore[arg-type]
                created=0,
                duration=0,
            ),
            TypeError,
            "state data must be bytes, got str",
        ),
        (lambda s: s.save("f", 1, {"a": b""}, created=0, duration=0), TypeError, "OperatorState"),
    ],
)
def test_save_checks_its_arguments(
    store: CheckpointStore,
    call: Callable[[CheckpointStore], object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        call(store)
    assert store.next_id() == 1


def test_a_closed_store_refuses_use(location: str) -> None:
    store = CheckpointStore(location)
    save(store, 1)
    store.close()
    store.close()  # idempotent
    with pytest.raises(CheckpointError, match="is closed"):
        store.latest(FLOW)


# -- threads: one writer thread, reads from the event loop ---------------------------


def test_saves_from_worker_threads_and_reads_from_the_loop(store: CheckpointStore) -> None:
    async def main() -> list[int]:
        seen: list[int] = []
        for n in range(1, 31):
            # asyncio.to_thread may run each save on a different pool thread
            saving = asyncio.ensure_future(asyncio.to_thread(save, store, n))
            latest = store.latest(FLOW)  # from the loop thread, maybe while saving
            if latest is not None:
                assert latest.states == states(latest.info.id)
                seen.append(latest.info.id)
            await saving
        return seen

    seen = asyncio.run(main())
    assert seen == sorted(seen)
    assert store.next_id() == 31


def test_concurrent_readers_and_a_writer_thread(store: CheckpointStore) -> None:
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(1, 41):
                save(store, n)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    while writer.is_alive():
        for info, problem in store.list():
            assert problem is None, (info, problem)
    writer.join()
    assert errors == []
    assert [info.id for info, _ in store.list()] == [40, 39, 38]


# -- torn checkpoints fall back ------------------------------------------------------


def _flip_a_byte(conn: Any) -> None:
    where = "WHERE checkpoint_id = 3 AND name = 'source'"
    [(data,)] = conn.execute(f"SELECT data FROM parts {where}").fetchall()
    assert bytes(data) == b"offset=300"
    conn.execute(f"UPDATE parts SET data = ? {where}", (b"offset=900",))


def _delete_a_part(conn: Any) -> None:
    conn.execute("DELETE FROM parts WHERE checkpoint_id = 3 AND name = 'totals'")


def _alter_the_count(conn: Any) -> None:
    conn.execute("UPDATE checkpoints SET operators = 2 WHERE id = 3")


def _delete_a_part_and_fix_the_count(conn: Any) -> None:
    _delete_a_part(conn)
    conn.execute("UPDATE checkpoints SET operators = 2, size = 10 WHERE id = 3")


def _alter_a_kind(conn: Any) -> None:
    conn.execute("UPDATE parts SET kind = 'map' WHERE checkpoint_id = 3 AND name = 'totals'")


DAMAGES = {
    "altered bytes": (_flip_a_byte, "the state of operator 'source' was altered"),
    "a missing part": (_delete_a_part, "3 operator states recorded but 2 stored"),
    "an altered count": (_alter_the_count, "2 operator states recorded but 3 stored"),
    "a consistent but partial part set": (_delete_a_part_and_fix_the_count, "digest"),
    "an altered kind": (_alter_a_kind, "digest"),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_latest_falls_back_past_a_torn_newest_checkpoint(
    store: CheckpointStore,
    caplog: pytest.LogCaptureFixture,
    damage: tuple[Callable[[Any], None], str],
) -> None:
    damage_it, reason = damage
    for n in (1, 2, 3):
        save(store, n)
    damage_it(raw(store))

    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        latest = store.latest(FLOW)

    assert latest is not None
    assert latest.info.id == 2
    assert latest.states == states(2)
    [record] = caplog.records
    assert record.name == "sluiceway"
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "checkpoint 3 " in message
    assert store.where in message
    assert reason in message
    listed = store.list()
    assert [(info.id, problem is None) for info, problem in listed] == [
        (3, False),
        (2, True),
        (1, True),
    ]
    assert reason in (listed[0][1] or "")
    with pytest.raises(
        CheckpointCorruptError, match=rf"checkpoint 3 of flow 'orders' in .* is torn: .*{reason}"
    ):
        store.load(3)


def test_none_verifies(store: CheckpointStore, caplog: pytest.LogCaptureFixture) -> None:
    save(store, 1)
    save(store, 2)
    conn = raw(store)
    conn.execute("UPDATE parts SET data = ? WHERE name = 'sink'", (b"\x00",))
    with (
        caplog.at_level(logging.WARNING, logger="sluiceway"),
        pytest.raises(CheckpointCorruptError) as info,
    ):
        store.latest(FLOW)
    message = str(info.value)
    assert store.where in message
    assert "checkpoint 2: the state of operator 'sink' was altered" in message
    assert "checkpoint 1: the state of operator 'sink' was altered" in message
    assert len(caplog.records) == 2


# -- files that are not a usable store -----------------------------------------------


def _store_at(tmp_path: Path) -> CheckpointStore:
    with CheckpointStore(tmp_path) as store:
        for n in range(1, 4):
            store.save(
                FLOW,
                n,
                {"big": OperatorState("big", "map", os.urandom(50_000))},
                created=float(n),
                duration=0.0,
            )
    return CheckpointStore(tmp_path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database, just some text\n" * 200)


def _truncated(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)


def _newer_format(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION + 1),)
        )
    conn.close()


def _foreign_database(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()


def _foreign_meta(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 'something-else' WHERE key = 'application'")
    conn.close()


BAD_FILES = {
    "garbage": (
        _garbage,
        "is not a readable sluiceway checkpoint store: SQLite says 'file is not a database'",
    ),
    "truncated": (
        _truncated,
        "is not a readable sluiceway checkpoint store: SQLite says "
        "'database disk image is malformed'",
    ),
    "newer format": (
        _newer_format,
        f"was written in checkpoint format version "
        f"{FORMAT_VERSION + 1}, newer than this sluiceway reads "
        f"\\(version {FORMAT_VERSION}\\)",
    ),
    "another database": (
        _foreign_database,
        "is not a sluiceway checkpoint store: found a SQLite database with tables users",
    ),
    "another application": (_foreign_meta, "application='something-else'"),
}


@pytest.mark.parametrize("spoil", BAD_FILES.values(), ids=BAD_FILES.keys())
@pytest.mark.parametrize(
    "use",
    [
        lambda s: s.latest(FLOW),
        lambda s: s.list(),
        lambda s: s.load(3),
        lambda s: s.next_id(),
        lambda s: s.save(FLOW, 9, {}, created=0.0, duration=0.0),
        lambda s: s.reset(),
    ],
    ids=["latest", "list", "load", "next_id", "save", "reset"],
)
def test_a_bad_file_is_reported_naming_it(
    tmp_path: Path,
    spoil: tuple[Callable[[Path], None], str],
    use: Callable[[CheckpointStore], object],
) -> None:
    spoil_it, message = spoil
    store = _store_at(tmp_path)
    spoil_it(store.path)
    before = store.path.read_bytes()
    with store, pytest.raises(CheckpointCorruptError) as info:
        use(store)
    assert str(info.value).startswith(str(store.path))
    assert info.value.args[0].count(str(store.path)) == 1
    assert re.search(message, str(info.value)), str(info.value)
    assert store.path.read_bytes() == before  # a store never "repairs" a foreign file


def test_a_directory_in_place_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoints.db").mkdir()
    with (
        CheckpointStore(tmp_path) as store,
        pytest.raises(CheckpointCorruptError, match="is a directory"),
    ):
        store.latest(FLOW)


# -- a crash in the middle of a save -------------------------------------------------

CRASHING_SAVER = textwrap.dedent(
    """
    import os, signal, sqlite3, sys

    from sluiceway.checkpoint import CheckpointStore, OperatorState

    directory = sys.argv[1]
    armed = False
    wal = os.path.join(directory, "checkpoints.db-wal")
    threshold = 0

    def crash_once_the_wal_holds_uncommitted_pages():
        if armed and os.path.getsize(wal) > threshold:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_progress_handler(crash_once_the_wal_holds_uncommitted_pages, 50)
        return conn

    sqlite3.connect = connect

    store = CheckpointStore(directory)
    store.save("crashy", 1, {"a": OperatorState("a", "map", b"first")}, created=1.0,
               duration=0.0)
    threshold = os.path.getsize(wal) + 4_000_000
    armed = True
    print("saving the big one", flush=True)
    big = {f"op{i}": OperatorState(f"op{i}", "map", os.urandom(1_000_000)) for i in range(16)}
    store.save("crashy", 2, big, created=2.0, duration=0.0)
    print("the big save committed", flush=True)
    """
)


def test_a_save_killed_mid_transaction_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "saver.py"
    script.write_text(CRASHING_SAVER)
    directory = tmp_path / "cp"
    done = subprocess.run(
        [sys.executable, str(script), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "saving the big one\n"
    wal = directory / "checkpoints.db-wal"
    assert wal.stat().st_size > 4_000_000  # the torn save did reach the disk

    with CheckpointStore(directory) as store:
        latest = store.latest("crashy")
        assert latest is not None
        assert latest.info.id == 1
        assert latest.states == {"a": OperatorState("a", "map", b"first")}
        assert [info.id for info, _ in store.list()] == [1]
        assert store.next_id() == 2
        store.save(
            "crashy", 2, {"a": OperatorState("a", "map", b"second")}, created=3.0, duration=0.0
        )
        assert [(info.id, problem) for info, problem in store.list()] == [(2, None), (1, None)]


# -- the documentation ----------------------------------------------------------------


def test_the_store_example_in_the_docs_runs() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md"
    store_section = page.read_text().split("## The store", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", store_section, flags=re.DOTALL)
    assert "store.latest(" in block
    exec(compile(block, str(page), "exec"), {})
