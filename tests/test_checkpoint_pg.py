"""The checkpoint store in PostgreSQL (``sluiceway.checkpoint.postgres``) beyond the
contract tests that run on both backends (tests/test_checkpoint_store.py): namespacing,
a zombie's save racing the live one, a SIGKILL in the middle of a save, the layout of
workers' stores, the command line and the compactor's child."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import services_postgres
from sluiceway.checkpoint import CheckpointStore, OperatorState
from sluiceway.checkpoint.postgres import has_store, split_url, stores_under, sub_url
from sluiceway.checkpoint.store import CheckpointConflictError
from sluiceway.errors import CheckpointError, FlowDefinitionError
from sluiceway.scaleout.checks import check_layout

pg_dsn = services_postgres.pg_dsn
pg_store_url = services_postgres.pg_store_url

FLOW = "orders"


def state(text: str) -> dict[str, OperatorState]:
    return {"a": OperatorState("a", "map", text.encode())}


@pytest.fixture
def url(pg_store_url: str) -> str:
    return pg_store_url


def schemas(dsn: str, schema: str) -> list[str]:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s"
            " ORDER BY nspname",
            (schema, schema.replace("_", "\\_") + "/%"),
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_reading_a_missing_store_creates_no_schema(url: str, pg_dsn: str) -> None:
    _, schema, _ = split_url(url)
    with CheckpointStore(url) as store:
        assert store.latest(FLOW) is None
        assert (store.list(), store.next_id(), store.reset()) == ([], 1, 0)
        with pytest.raises(KeyError, match="no checkpoint 3"):
            store.load(3)
    assert schemas(pg_dsn, schema) == []
    with CheckpointStore(url) as store:
        store.save(FLOW, 1, state("one"), created=1.0, duration=0.0)
    assert schemas(pg_dsn, schema) == [schema]


def test_the_url_names_the_schema_and_the_password_is_never_shown() -> None:
    conninfo, schema, where = split_url(
        "postgresql://u:s3cret@db:5433/apps?schema=spend&sslmode=require"
    )
    assert schema == "spend"
    assert "schema" not in conninfo  # libpq refuses parameters it does not know
    assert "s3cret" in conninfo
    assert "s3cret" not in where
    assert where == "postgresql://u@db:5433/apps?sslmode=require&schema=spend"
    assert split_url("postgresql://db/apps")[1] == "sluiceway"
    inner = sub_url("postgresql://u:s3cret@db/apps?schema=spend", "tasks", "p3")
    assert split_url(inner)[1] == "spend/tasks/p3"
    assert repr(CheckpointStore(inner)) == (
        "CheckpointStore('postgresql://u@db/apps?schema=spend/tasks/p3', keep=3)"
    )
    with pytest.raises(ValueError, match=r"schema of checkpoint store .* got '\.\./x'"):
        split_url("postgresql://db/apps?schema=../x")
    with pytest.raises(ValueError, match="1 to 63"):
        split_url("postgresql://db/apps?schema=" + "s" * 64)


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"pip install 'sluiceway\[postgres\]'"):
        CheckpointStore("postgresql://db/apps")


def test_a_zombie_saving_while_the_live_worker_saves_is_refused(url: str) -> None:
    """The live worker saves checkpoint 6 while a zombie (another machine, the same
    schema) saves 5, the id it thinks comes next: the zombie waits for the store's lock
    and then finds 6 -- it must not write 5 beside it nor set the flow's last id back."""
    with CheckpointStore(url) as live, CheckpointStore(url) as zombie:
        for n in (1, 2, 3, 4):
            live.save(FLOW, n, state(f"live {n}"), created=n, duration=0.0)
        inside, release = threading.Event(), threading.Event()
        prune = live._prune

        def slow_prune(conn: object, flow: str) -> None:
            inside.set()  # checkpoint 6 is written, not committed; the lock is held
            assert release.wait(30)
            prune(conn, flow)  # type: ignore[arg-type]

        live._prune = slow_prune  # type: ignore[method-assign]
        saving = threading.Thread(
            target=live.save, args=(FLOW, 6, state("live 6")), kwargs={"created": 6, "duration": 0}
        )
        saving.start()
        assert inside.wait(30)
        errors: list[BaseException] = []

        def zombie_save() -> None:
            try:
                zombie.save(FLOW, 5, state("zombie 5"), created=5, duration=0.0)
            except BaseException as exc:
                errors.append(exc)

        racing = threading.Thread(target=zombie_save)
        racing.start()
        racing.join(0.5)  # it waits for the lock (were it not held, it would be done)
        release.set()
        saving.join(30)
        racing.join(30)
        [error] = errors
        assert isinstance(error, CheckpointConflictError)
        assert "got 5, but 6 was already saved" in str(error)
        latest = live.latest(FLOW)
        assert latest is not None
        assert latest.states == state("live 6")
        assert [i.id for i, _ in live.list()] == [6, 4, 3]
        assert zombie.next_id(FLOW) == 7


CRASHING_SAVER = textwrap.dedent(
    """
    import os, signal, sys

    from sluiceway.checkpoint import CheckpointStore, OperatorState
    from sluiceway.checkpoint import postgres

    store = CheckpointStore(sys.argv[1])
    store.save("crashy", 1, {"a": OperatorState("a", "map", b"first")}, created=1.0,
               duration=0.0)
    real = postgres._PgConnection.executemany

    def executemany(self, sql, rows):
        if sql.startswith("INSERT INTO parts"):
            rows = list(rows)
            real(self, sql, rows[:8])  # half the parts are in the open transaction
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, sql, rows)

    postgres._PgConnection.executemany = executemany
    print("saving the big one", flush=True)
    big = {f"op{i}": OperatorState(f"op{i}", "map", os.urandom(1_000_000)) for i in range(16)}
    store.save("crashy", 2, big, created=2.0, duration=0.0)
    print("the big save committed", flush=True)
    """
)


def test_a_save_killed_mid_transaction_leaves_the_previous_checkpoint(
    tmp_path: Path, url: str
) -> None:
    script = tmp_path / "saver.py"
    script.write_text(CRASHING_SAVER)
    done = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "saving the big one\n"
    with CheckpointStore(url) as store:
        latest = store.latest("crashy")
        assert latest is not None
        assert latest.info.id == 1
        assert latest.states == {"a": OperatorState("a", "map", b"first")}
        assert [(info.id, problem) for info, problem in store.list()] == [(1, None)]
        assert store.next_id() == 2
        store.save(
            "crashy", 2, {"a": OperatorState("a", "map", b"second")}, created=3.0, duration=0.0
        )
        assert [(info.id, problem) for info, problem in store.list()] == [(2, None), (1, None)]


def test_workers_and_one_process_keep_their_layouts_apart(url: str) -> None:
    """As for a directory: one process keeps its store in the URL's schema, workers in
    ``<schema>/tasks/p<N>``, and each mode refuses the other's."""
    from sluiceway.scaleout.tasks import task_dir  # noqa: PLC0415 - needs confluent-kafka

    check_layout(url, tasks=True)
    check_layout(url, tasks=False)
    p2 = task_dir(url, 2)
    assert split_url(p2)[1] == split_url(url)[1] + "/tasks/p2"
    with CheckpointStore(p2) as store:
        store.save(FLOW, 1, state("p2"), created=1.0, duration=0.0)
    assert stores_under(url, "tasks") == [split_url(p2)[1]]
    assert not has_store(url)
    check_layout(url, tasks=True)
    with pytest.raises(FlowDefinitionError, match="per-partition checkpoints of workers"):
        check_layout(url, tasks=False)
    with CheckpointStore(url) as store:
        store.save(FLOW, 1, state("one process"), created=1.0, duration=0.0)
    with pytest.raises(FlowDefinitionError, match="run as one process"):
        check_layout(url, tasks=True)


def test_the_checkpoints_command_takes_the_url(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluiceway.cli import main  # noqa: PLC0415

    assert main(["checkpoints", "list", url]) == 2
    assert "holds none" in capsys.readouterr().err
    with CheckpointStore(url) as store:
        store.save(FLOW, 1, state("one"), created=1.0, duration=0.0)
    assert main(["checkpoints", "reset", url, "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"schema={split_url(url)[1]}" in out
    assert "deleted 1 checkpoint" in out


def test_the_compactor_child_gets_the_url_without_its_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluiceway.checkpoint.keys import KeyRing  # noqa: PLC0415
    from sluiceway.runtime import compactor  # noqa: PLC0415

    with CheckpointStore(url) as store:
        store.save(FLOW, 1, state("one"), created=1.0, duration=0.0)
    started: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.Popen

    def popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        started.append((args, dict(kwargs["env"])))  # type: ignore[call-overload]
        return real(args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(compactor.subprocess, "Popen", popen)
    secret = url.replace("://", "://postgres:not-needed@", 1).replace("postgres@", "", 1)
    ring = KeyRing.parse("k" * 32, source="test")
    n = compactor.compact_in_child(secret, FLOW, ring, ratio=0.5, after=10, larger_than=-1)
    assert n == 0  # nothing to fold: the child opened the store and found so
    [(args, env)] = started
    assert "not-needed" not in " ".join(args)
    assert env["PGPASSWORD"] == "not-needed"


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() == before


def _terminate(dsn: str, store: CheckpointStore) -> None:
    """End the store's server session, as a server restart or a failover would."""
    import psycopg  # noqa: PLC0415

    conn = store._conn
    assert conn is not None
    pid = conn.conn.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_a_connection_the_server_ended_is_replaced(url: str, pg_dsn: str) -> None:
    """Between two calls (at the BEGIN of the next transaction: nothing done yet) the
    store reconnects and the call goes on; a flow's next checkpoint does not fail."""
    with CheckpointStore(url) as store:
        store.save(FLOW, 1, state("one"), created=1.0, duration=0.0)
        _terminate(pg_dsn, store)
        store.save(FLOW, 2, state("two"), created=2.0, duration=0.0)
        _terminate(pg_dsn, store)
        latest = store.latest(FLOW)
        assert latest is not None
        assert latest.states == state("two")


def test_an_unreachable_store_is_a_clear_error_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluiceway.cli import main  # noqa: PLC0415

    job = tmp_path / "job.py"
    job.write_text(
        "import sluiceway as sw\n"
        "def flow():\n"
        "    f = sw.Flow('j')\n"
        "    f.source(sw.sources.Iterable([1, 2])).sink(sw.sinks.Collect())\n"
        "    return f\n"
    )
    url = "postgresql://sw:s3cret@127.0.0.1:1/apps?schema=spend"
    assert main(["run", f"{job}:flow", "--checkpoint-dir", url]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to the checkpoint store postgresql://sw@127.0.0.1:1/apps" in err
    assert "s3cret" not in err
