"""PostgreSQL for tests: the machine's shared server, or a private one (see services.py).

* ``pg_dsn`` (session): the shared server at ``postgresql://127.0.0.1:5432/test`` (user
  ``root``, else ``postgres``, trust auth) if it answers; otherwise a private server
  (``initdb`` + ``pg_ctl`` in a temporary directory, on a free port) for the session.
* ``pg_table``: a fresh table name ``sw_test_<uuid>`` for one test; the table and its
  ``_sluiceway_epochs`` progress table are dropped afterwards.  Nothing else on the shared
  server is touched: never reconfigure, stop or drop anything you did not create.
* ``pg_store_url``: a checkpoint store URL ``<dsn>?schema=sw_test_<uuid>`` for one test;
  the schema and those inside it (``sw_test_<uuid>/tasks/p0``...) are dropped afterwards.
* ``own_postgres``: a :class:`PostgresServer` of the test's own, which it may stop and
  restart (outage tests).

``initdb``/``pg_ctl`` refuse to run as root; as root they are run as the ``postgres``
user (``runuser``), in a directory that user may write.  Missing binaries or psycopg skip
the test naming what is missing, or fail it under ``SLUICEWAY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import free_port, service_missing

__all__ = [
    "PostgresServer",
    "drop_schemas",
    "drop_table",
    "own_postgres",
    "pg_dsn",
    "pg_store_url",
    "pg_table",
    "postgres_answers",
]

SHARED_DSNS = (
    "postgresql://root@127.0.0.1:5432/test",
    "postgresql://postgres@127.0.0.1:5432/test",
)
BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/bin")


def postgres_answers(dsn: str, timeout: int = 2) -> bool:
    """True if a PostgreSQL accepts a connection at ``dsn``."""
    import psycopg  # noqa: PLC0415 - only tests that use PostgreSQL need the package

    try:
        with psycopg.connect(dsn, connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _binary(name: str) -> str | None:
    for d in BIN_DIRS:
        path = Path(d) / name
        if path.exists():
            return str(path)
    return shutil.which(name)


class PostgresServer:
    """A PostgreSQL server of our own on 127.0.0.1, in a temporary directory.

    The port and data directory are kept across :meth:`stop` / :meth:`start`, so clients
    reconnect to the same DSN and find the data committed before the stop::

        with PostgresServer.start_new() as server:
            ...  # server.dsn; server.stop("immediate"); server.start()
    """

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="sluiceway-pg-"))
        self.data = self._dir / "data"
        self._user: str | None = None
        if os.geteuid() == 0:  # initdb and pg_ctl refuse to run as root
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N"])
        self.running = False

    @classmethod
    def start_new(cls) -> PostgresServer:
        """Init and start one on a free port; skip/fail without the binaries."""
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            service_missing(
                "no initdb/pg_ctl binaries to start a private PostgreSQL (looked in "
                + ", ".join(BIN_DIRS)
                + " and PATH)"
            )
        server = cls(initdb, pg_ctl)
        try:
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def _run(self, cmd: list[str], timeout: float = 60) -> None:
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start (or restart) the server on its port and data directory; returns when
        it accepts connections."""
        opts = f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        log = self._dir / "server.log"
        self._run([self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(log), "-w", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clients disconnected, clean shutdown) or
        ``immediate`` (like a crash: recovery from the WAL at the next start)."""
        if self.running:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"])
            self.running = False

    def close(self) -> None:
        """Stop the server and remove its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def drop_table(dsn: str, table: str) -> None:
    """Drop ``table`` and its progress table, if they exist."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in (table, f"{table}_sluiceway_epochs"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL DSN to share (use ``pg_table`` for a table of your own)."""
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError as exc:
        service_missing(f"the Python package 'psycopg' is not installed ({exc})")
    for dsn in SHARED_DSNS:
        if postgres_answers(dsn):
            yield dsn
            return
    with PostgresServer.start_new() as server:
        yield server.dsn


@pytest.fixture
def pg_table(pg_dsn: str) -> Iterator[str]:
    """A fresh table name for this test; the table (and its progress table) is dropped
    afterwards."""
    table = f"sw_test_{uuid.uuid4().hex[:16]}"
    yield table
    drop_table(pg_dsn, table)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL this test may stop and restart."""
    with PostgresServer.start_new() as server:
        yield server


def drop_schemas(dsn: str, schema: str) -> None:
    """Drop ``schema`` and the schemas named ``<schema>/...`` (a checkpoint store in
    PostgreSQL and the stores inside it, e.g. its tasks'), if they exist."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        like = schema.replace("_", "\\_") + "/%"
        names = [
            str(r[0])
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s",
                (schema, like),
            )
        ]
        for name in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_store_url(pg_dsn: str) -> Iterator[str]:
    """A checkpoint store URL for this test: a fresh schema ``sw_test_<uuid>`` of the
    test database; it and the stores inside it are dropped afterwards."""
    schema = f"sw_test_{uuid.uuid4().hex[:16]}"
    yield f"{pg_dsn}?schema={schema}"
    drop_schemas(pg_dsn, schema)
