"""PostgreSQL sink: batched COPY or multi-row INSERT, upsert by key, exactly-once epochs.

``sw.sinks.Postgres(dsn, table, ...)`` writes every micro-batch in **one transaction**:
when :meth:`PostgresSink.write` returns, the batch is committed (durable), and a failed
write leaves nothing behind.  Three modes::

    mode            statement per batch                      guarantee
    append          COPY (or INSERT) + COMMIT                at-least-once
    upsert          INSERT ... ON CONFLICT (key) DO UPDATE   exactly-once final state
                    + COMMIT                                 (deterministic rows per key)
    exactly_once    COPY rows tagged (sink, epoch)           exactly-once with checkpoints
                    + UPDATE progress row + COMMIT

**exactly_once** tags each row with two hidden columns, ``sluiceway_sink`` (the sink's id
in the progress table ``<table>_sluiceway_epochs``) and ``sluiceway_epoch``: the records
between two checkpoint barriers form one epoch.  At a barrier :meth:`~PostgresSink.
pre_commit` returns the current epoch ``E`` (every row written so far is committed
already) and the sink moves on to ``E + 1``.  A restart from a checkpoint that recorded
``E`` first deletes this sink's rows with an epoch above ``E`` -- the rows of checkpoints
that were pre-committed but never stored, and anything written after -- in one
transaction, then the replay writes them again::

    epochs     1 1 1 | 2 2 2 | 3 3 ✗crash      checkpoint of epoch 2 stored, of 3 not
    restore(E=2):  DELETE ... WHERE sluiceway_sink = s AND sluiceway_epoch > 2
    replay         the source goes back to checkpoint 2's position: epoch 3 again

Each write transaction also sets the progress row's ``(epoch, seq)``, so when a
connection drops while ``COMMIT`` is in flight the sink learns after reconnecting whether
the batch got in, instead of writing it twice.  Rows are visible before their checkpoint
completes (a reader sees them *read-uncommitted* with respect to the flow); a reader that
must only see rows a crash can no longer take back selects ``sluiceway_epoch <=
committed_epoch`` of the sink's progress row (set at every completed checkpoint).

Why not ``PREPARE TRANSACTION`` (hold each epoch open, commit it prepared after the
checkpoint is stored)?  It needs ``max_prepared_transactions > 0``, which PostgreSQL
ships at 0, and a prepared transaction left behind by a crash holds its locks until
someone resolves it.  The epoch column needs no server setting and no cleanup.

On connection loss (server restart, network) every operation is retried on a new
connection with exponential backoff on the flow's clock, logging one WARNING per outage
and one INFO on recovery, for up to ``reconnect_timeout`` seconds; then it raises
:class:`ConnectionError` naming the server.  The exception tree::

    ValueError             a bad argument (at construction)
    LookupError            at open: the table or a needed column/index is missing
    ConnectionError        the server stayed unreachable for reconnect_timeout
    PartialWriteError      record ``written`` of a batch is bad (cannot be converted, or
                           PostgreSQL refused it: a data or constraint error); the records
                           before it are committed
    psycopg.Error          anything else the server refused (the whole batch rolled back)
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import errno
import logging
import math
import operator
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import JsonbDumper

from sluiceway.connectors.security import (
    Secret,
    SecretLike,
    Tls,
    TlsLike,
    secret,
    tls_failure,
    tls_option,
)
from sluiceway.core.contract import (
    OPEN_TIMEOUT,
    PartialWriteError,
    Sink,
    SinkContext,
    check_open_timeout,
    open_limit,
    redact,
)
from sluiceway.core.messages import Batch
from sluiceway.errors import CheckpointError, short_repr

__all__ = ["Method", "Mode", "Postgres", "PostgresSink"]

log = logging.getLogger("sluiceway")

Mode = Literal["append", "upsert", "exactly_once"]
"""How :class:`PostgresSink` writes: see the module docs for the guarantee of each."""

Method = Literal["copy", "insert"]
"""``copy``: ``COPY ... FROM STDIN`` (fastest, append and exactly_once); ``insert``: one
multi-row ``INSERT`` per batch (the only method for upsert)."""

T = TypeVar("T")
Row = tuple[Any, ...]

SINK_COLUMN = "sluiceway_sink"
EPOCH_COLUMN = "sluiceway_epoch"
PROGRESS_SUFFIX = "_sluiceway_epochs"
_MAX_PARAMS = 65_535  # PostgreSQL's limit of parameters in one statement
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0

_SQL_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is an int
    (int, "bigint"),
    (float, "double precision"),
    (decimal.Decimal, "numeric"),
    (str, "text"),
    (bytes, "bytea"),
    (datetime.datetime, "timestamptz"),
    (datetime.date, "date"),
    (uuid.UUID, "uuid"),
    (dict, "jsonb"),
)


def _sql_type(value: Any) -> str:
    for py, name in _SQL_TYPES:
        if isinstance(value, py):
            return name
    return "text"


def _split_table(table: str) -> sql.Identifier:
    parts = table.split(".")
    if not table or len(parts) > 2 or not all(parts):
        raise ValueError(f"sinks.Postgres table must be 'name' or 'schema.name', got {table!r}")
    return sql.Identifier(*parts)


def _is_disconnect(exc: BaseException) -> bool:
    """True for a lost or refused connection (retry), False for an error of the request."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    if state is None and _REFUSED_LOGIN.search(str(exc)):
        return False  # the server answered: no such role or database, a bad password
    if state is None and tls_failure(exc):
        return False  # an untrusted certificate, a server without TLS: retrying cannot help
    # No SQLSTATE: the client lost the socket or could not connect.  08: connection
    # exception; 57P0x: admin/crash shutdown, cannot connect now (server starting).
    return state is None or state.startswith(("08", "57P"))


# A failed connect has no SQLSTATE; a refused login says so in the server's message.
_REFUSED_LOGIN = re.compile(
    r"FATAL:\s+(?:password authentication failed|role \S+ does not exist|"
    r"database \S+ does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects connection)"
)


def _security(
    tls: TlsLike, password: SecretLike | None, passfile: object, what: str
) -> tuple[Tls | None, Secret | None, str | None]:
    """The checked ``tls=``, ``password=`` and ``passfile=`` of the sink."""
    found = tls_option(tls, what)
    if found is not None:
        found.no_server_name(what)
    if passfile is not None and not (isinstance(passfile, str | os.PathLike) and passfile):
        raise TypeError(f"{what} passfile must be a file path or None, got {passfile!r}")
    path = None if passfile is None else os.fspath(passfile)
    return found, secret(password, f"{what} password"), path


def _is_row_error(exc: BaseException) -> bool:
    """A data (22) or integrity (23) error: one record's fault, not the batch's."""
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)


def _check_mode(mode: Mode, method: Method | None, key: Sequence[str] | None) -> Method:
    """The method to use (its default for ``mode``); raises ValueError on a bad combination."""
    what = "sinks.Postgres"
    if mode not in ("append", "upsert", "exactly_once"):
        raise ValueError(f"{what} mode must be 'append', 'upsert' or 'exactly_once', got {mode!r}")
    if method is None:
        method = "insert" if mode == "upsert" else "copy"
    if method not in ("copy", "insert"):
        raise ValueError(f"{what} method must be 'copy' or 'insert', got {method!r}")
    if mode == "upsert":
        if method != "insert":
            raise ValueError(
                f"{what} upsert writes with INSERT ... ON CONFLICT: use "
                "method='insert' (the default for upsert)"
            )
        if not key:
            raise ValueError(
                f"{what} mode='upsert' needs key=[...]: the columns of "
                "the table's primary key or unique index"
            )
    elif key:
        raise ValueError(f"{what} key= is for mode='upsert', not {mode!r}")
    return method


class PostgresSink(Sink):
    """Writes records as rows of a PostgreSQL table (``sw.sinks.Postgres``).

    Args:
        dsn: a libpq connection string or URL, e.g. ``postgresql://user@host:5432/db``.
        table: the table (``name`` or ``schema.name``).
        columns: the columns to write: a list of names, or a mapping ``name -> SQL
            type`` (used by ``create_table``).  Default: the keys of the first record.
        mode: ``"append"`` (at-least-once), ``"upsert"`` (by ``key``) or
            ``"exactly_once"`` (with checkpoints); see the module docs.
        key: the columns of the table's primary key or unique index (upsert only).
        method: ``"copy"`` or ``"insert"``; default ``copy`` except for upsert.
        transform: turns a record into a dict (by column name) or a sequence (in column
            order) before it is written; default: records are dicts or sequences.
        create_table: create the table when missing (column types from ``columns`` or
            inferred from the first record: int -> bigint, float -> double precision,
            str -> text, dict -> jsonb, ...), with the key as primary key and, for
            exactly_once, the hidden columns and their index.
        reconnect_timeout: seconds to keep reconnecting after a connection loss before
            raising :class:`ConnectionError`; None: forever.
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a server that is not
            there at the start is more likely a wrong DSN than an outage.  A refused
            login (no such role or database, a wrong password) fails at once.
        tls: ``sw.Tls(ca=..., cert=..., key=..., key_password=...)`` (or True: the
            system's CAs): TLS with the server's certificate and name checked
            (``sslmode=verify-full``; ``verify=False``: ``require``).  Without it, the
            DSN's own ``sslmode``/``sslrootcert``/... apply.  A failed handshake fails
            at once.
        password: the password (``str`` or ``sw.Secret.env(...)``/``.file(...)``), read
            at every connection, instead of one in the DSN.
        passfile: a libpq password file (``host:port:db:user:password`` lines).

    Dicts are written to ``json``/``jsonb`` columns; lists become PostgreSQL arrays.

    Raises:
        ValueError: a bad argument (unknown mode or method, upsert without key, ...).
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        *,
        columns: Sequence[str] | Mapping[str, str] | None = None,
        mode: Mode = "append",
        key: Sequence[str] | None = None,
        method: Method | None = None,
        transform: Callable[[Any], Mapping[str, Any] | Sequence[Any]] | None = None,
        create_table: bool = False,
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        tls: TlsLike = None,
        password: SecretLike | None = None,
        passfile: str | os.PathLike[str] | None = None,
    ) -> None:
        what = "sinks.Postgres"
        method = _check_mode(mode, method, key)
        if reconnect_timeout is not None and not (
            isinstance(reconnect_timeout, int | float) and 0 <= reconnect_timeout < math.inf
        ):
            raise ValueError(
                f"{what} reconnect_timeout must be a finite number >= 0 seconds or None "
                f"(no limit), got {reconnect_timeout!r}"
            )
        self._types: dict[str, str] = {}
        if isinstance(columns, Mapping):
            self._types = {str(c): str(t) for c, t in columns.items()}
        self._columns: list[str] | None = None if columns is None else [str(c) for c in columns]
        if self._columns is not None:
            if not self._columns:
                raise ValueError(f"{what} columns must name at least one column")
            hidden = {SINK_COLUMN, EPOCH_COLUMN} & set(self._columns)
            if hidden:
                raise ValueError(
                    f"{what} columns {sorted(hidden)} are reserved for mode='exactly_once'"
                )
        self._key = list(key or ())
        if self._columns is not None and not set(self._key) <= set(self._columns):
            raise ValueError(f"{what} key {self._key} must be among the columns {self._columns}")
        self._dsn = dsn
        self._table_name = table
        self._table = _split_table(table)
        parts = table.split(".")
        parts[-1] += PROGRESS_SUFFIX
        self._progress = sql.Identifier(*parts)
        self._mode: Mode = mode
        self._method: Method = method
        self._transform = transform
        self._create = bool(create_table)
        self._timeout = None if reconnect_timeout is None else float(reconnect_timeout)
        self._reconnect_timeout = self._timeout
        self._limit_name = "reconnect_timeout"  # or "open_timeout" while opening
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._tls, self._password, self._passfile = _security(tls, password, passfile, what)
        try:
            info = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ValueError(
                f"{what} dsn {redact(repr(dsn))} is not a libpq connection string or URL "
                f"({redact(exc).strip()}); e.g. 'postgresql://user@host:5432/db'"
            ) from None  # psycopg's own message may quote the password
        self._server = (
            f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/"
            f"{info.get('dbname', info.get('user', ''))}"
        )
        self.exactly_once = mode == "exactly_once"
        self._ctx: SinkContext | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # One transaction at a time on the one connection: the checkpoint coordinator's
        # commit() runs while the sink's stage writes the next batch.
        self._lock = asyncio.Lock()
        self._ready = False  # the table is checked (or created)
        self._insert_sql: dict[int, bytes] = {}  # rendered once: composing costs per row
        self._copy_sql: sql.Composed | None = None
        # exactly_once
        self._sink_key = ""
        self._sink_id = 0
        self._epoch = 0
        self._seq = 0
        self._committed: int | None = None
        self._restore_to: dict[str, Any] | None = None

    # -- connection and retries --------------------------------------------------------

    def _where(self) -> str:
        return f"PostgreSQL at {self._server}"

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        await self._drop()
        ctx = self._ctx
        app = f"sluiceway {ctx.flow}/{ctx.name}" if ctx is not None else "sluiceway"
        conn = await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=False,
            connect_timeout=10,
            application_name=app[:63],
            **self._security_options(),
        )
        conn.adapters.register_dumper(dict, JsonbDumper)
        self._conn = conn
        return conn

    def _security_options(self) -> dict[str, Any]:
        """libpq keywords for ``tls``, ``password`` and ``passfile`` (read now)."""
        what = self.describe()
        out: dict[str, Any] = {}
        tls = self._tls
        if tls is not None:
            ca, cert, key = tls.files(what)
            out["sslmode"] = "verify-full" if tls.verify else "require"
            out["sslrootcert"] = ca or "system"
            if cert is not None:
                out["sslcert"] = cert
                out["sslkey"] = key or cert
            key_password = tls.password(what)
            if key_password is not None:
                out["sslpassword"] = key_password
        if self._password is not None:
            out["password"] = self._password.reveal(f"{what} password")
        if self._passfile is not None:
            if not os.path.isfile(self._passfile):
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"{what}: the passfile {self._passfile!r} does not exist",
                    self._passfile,
                )
            out["passfile"] = self._passfile
        return out

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()

    async def _retrying(
        self, op: Callable[[psycopg.AsyncConnection[Any], bool], Awaitable[T]]
    ) -> T:
        """Run ``op(conn, retry)`` in a transaction; on connection loss reconnect with
        backoff and run it again (``retry`` True), until ``reconnect_timeout``.

        One at a time (``write`` and the coordinator's ``commit`` run concurrently): two
        transactions interleaved on one connection would commit each other's statements,
        and two reconnecting at once would each open a connection and leak one."""
        async with self._lock:
            return await self._retrying_now(op)

    async def _retrying_now(
        self, op: Callable[[psycopg.AsyncConnection[Any], bool], Awaitable[T]]
    ) -> T:
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        clock = ctx.clock
        down_since: float | None = None
        delay = _BACKOFF_FIRST
        retry = False
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connection()
                result = await op(conn, retry)
            except psycopg.Error as exc:
                if not _is_disconnect(exc):
                    if conn is not None and not conn.closed and not conn.broken:
                        await conn.rollback()
                    raise
                await self._drop()
                now = clock.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning(
                        "%s: lost the connection to %s (%s); reconnecting with backoff",
                        self.describe(),
                        self._where(),
                        redact(exc).strip() or type(exc).__name__,
                    )
                waited = now - down_since
                if self._timeout is not None and waited >= self._timeout:
                    raise ConnectionError(
                        f"{self.describe()}: {self._where()} unreachable for {waited:.1f} s "
                        f"({self._limit_name}={self._timeout:g}); last error: "
                        f"{redact(exc).strip() or type(exc).__name__}"
                    ) from exc
                pause = delay if self._timeout is None else min(delay, self._timeout - waited)
                await clock.sleep(max(pause, 0.0))
                delay = min(delay * 2, _BACKOFF_MAX)
                retry = True
                continue
            except BaseException:
                await self._drop()  # cancelled mid-statement: the connection state is unknown
                raise
            if down_since is not None:
                log.info(
                    "%s: reconnected to %s after %.1f s",
                    self.describe(),
                    self._where(),
                    clock.monotonic() - down_since,
                )
            return result

    # -- open: the table, the progress row, restore ------------------------------------

    async def open(self, ctx: SinkContext) -> None:
        """Connect, check the table (or create it), and for exactly_once find this
        sink's progress row; when restarting from a checkpoint, delete the rows written
        after it.

        Raises:
            LookupError: the table (or, for upsert, a unique index on ``key``; for
                exactly_once, the hidden columns) is missing and ``create_table`` is off.
            CheckpointError: restarting from a checkpoint, but the table has no record
                of this sink (it was dropped or replaced since).
            ConnectionError: the server is unreachable for ``reconnect_timeout``.
        """
        self._ctx = ctx
        self._sink_key = f"{ctx.flow}/{ctx.name}"
        self._timeout, self._limit_name = open_limit(self._open_timeout, self._reconnect_timeout)
        try:
            await self._open(ctx)
        finally:
            self._timeout, self._limit_name = self._reconnect_timeout, "reconnect_timeout"

    async def _open(self, ctx: SinkContext) -> None:
        if self._mode == "exactly_once":
            if not ctx.checkpointing:
                log.warning(
                    "%s: mode='exactly_once' without checkpoints writes like 'append' "
                    "(at-least-once); run the flow with checkpoints=sw.Checkpoints(...)",
                    self.describe(),
                )
            await self._retrying(self._open_progress)
        self._restore_to = None  # restored for this run only; a later run starts afresh
        if self._columns is not None and (self._types or not self._create):
            await self._retrying(self._prepare_table)
        else:
            # Columns come from the first record: check now what can be checked (the
            # server answers; the table exists), so that a missing table stops the flow
            # at its start, not as a failure of the whole first batch.
            await self._retrying(self._probe_table)

    async def _probe_table(self, conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
        exists = await self._table_exists(conn)
        await conn.rollback()
        if not exists and not self._create:
            raise LookupError(
                f"{self.describe()}: table {self._table_name!r} does not exist in "
                f"{self._where()}; create it, or pass create_table=True"
            )

    async def _open_progress(self, conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
        p = self._progress
        exists = await (
            await conn.execute("SELECT to_regclass(%s)", [self._progress_name()])
        ).fetchone()
        if exists is None or exists[0] is None:
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (sink text PRIMARY KEY, "
                    "id integer GENERATED BY DEFAULT AS IDENTITY UNIQUE, "
                    "epoch bigint NOT NULL DEFAULT 0, seq bigint NOT NULL DEFAULT 0, "
                    "committed_epoch bigint, checkpoint_id bigint, "
                    "updated_at timestamptz NOT NULL DEFAULT now())"
                ).format(p)
            )
            await conn.commit()
        state = self._restore_to
        if state is not None:
            row = await (
                await conn.execute(
                    sql.SQL("SELECT id, seq FROM {} WHERE sink = %s FOR UPDATE").format(p),
                    [self._sink_key],
                )
            ).fetchone()
            if row is None:
                await conn.rollback()
                raise CheckpointError(
                    f"{self.describe()}: restarting from a checkpoint of epoch "
                    f"{state['epoch']}, but {self._progress_name()} has no row for sink "
                    f"{self._sink_key!r}: the table was dropped or replaced since.  Start "
                    "over with `sluiceway checkpoints reset DIR`"
                )
            self._sink_id, self._seq = row
            epoch = int(state["epoch"])
            if await self._table_exists(conn):
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {} = %s AND {} > %s").format(
                        self._table, sql.Identifier(SINK_COLUMN), sql.Identifier(EPOCH_COLUMN)
                    ),
                    [self._sink_id, epoch],
                )
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET epoch = %s, committed_epoch = %s, updated_at = now() "
                    "WHERE sink = %s"
                ).format(p),
                [epoch, epoch, self._sink_key],
            )
            await conn.commit()
            self._epoch = self._committed = epoch
            self._epoch += 1
            return
        await conn.execute(
            sql.SQL("INSERT INTO {} (sink) VALUES (%s) ON CONFLICT (sink) DO NOTHING").format(p),
            [self._sink_key],
        )
        row = await (
            await conn.execute(
                sql.SQL("SELECT id, epoch, seq FROM {} WHERE sink = %s").format(p),
                [self._sink_key],
            )
        ).fetchone()
        await conn.commit()
        assert row is not None
        self._sink_id, high, self._seq = row
        self._epoch = high + 1  # above every epoch an earlier run left in the table

    def _progress_name(self) -> str:
        parts = self._table_name.split(".")
        parts[-1] += PROGRESS_SUFFIX
        return ".".join(f'"{p}"' for p in parts)

    def _quoted_table(self) -> str:
        return ".".join(f'"{p}"' for p in self._table_name.split("."))

    async def _table_exists(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        row = await (
            await conn.execute("SELECT to_regclass(%s)", [self._quoted_table()])
        ).fetchone()
        return row is not None and row[0] is not None

    async def _prepare_table(self, conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
        """Check the table has what the mode needs; create what is missing when allowed."""
        assert self._columns is not None
        if not await self._table_exists(conn):
            if not self._create:
                await conn.rollback()
                raise LookupError(
                    f"{self.describe()}: table {self._table_name!r} does not exist in "
                    f"{self._where()}; create it, or pass create_table=True"
                )
            await self._create_table(conn)
        have = await self._table_columns(conn)
        missing = [c for c in self._columns if c not in have]
        if missing:
            await conn.rollback()
            raise LookupError(
                f"{self.describe()}: table {self._table_name!r} has no column(s) {missing}; "
                f"it has {sorted(have)}"
            )
        if self._mode == "exactly_once" and not {SINK_COLUMN, EPOCH_COLUMN} <= have:
            if not self._create:
                await conn.rollback()
                raise LookupError(
                    f"{self.describe()}: mode='exactly_once' tags rows with two hidden "
                    f"columns that {self._table_name!r} lacks; add them with: ALTER TABLE "
                    f"{self._table_name} ADD COLUMN {SINK_COLUMN} integer, ADD COLUMN "
                    f"{EPOCH_COLUMN} bigint; CREATE INDEX ON {self._table_name} "
                    f"({SINK_COLUMN}, {EPOCH_COLUMN}); -- or pass create_table=True"
                )
            await self._add_hidden(conn)
        if self._mode == "upsert" and not await self._has_unique(conn):
            await conn.rollback()
            raise LookupError(
                f"{self.describe()}: upsert needs a primary key or unique index on exactly "
                f"{self._key} of {self._table_name!r} (ON CONFLICT needs it); add one, e.g. "
                f"CREATE UNIQUE INDEX ON {self._table_name} ({', '.join(self._key)})"
            )
        await conn.commit()
        self._ready = True

    async def _table_columns(self, conn: psycopg.AsyncConnection[Any]) -> set[str]:
        cur = await conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped",
            [self._quoted_table()],
        )
        return {r[0] for r in await cur.fetchall()}

    async def _has_unique(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            "SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique "
            "AND i.indpred IS NULL AND (SELECT array_agg(a.attname::text ORDER BY "
            "a.attname::text) FROM pg_attribute a WHERE a.attrelid = i.indrelid AND "
            "a.attnum = ANY(i.indkey)) = %s::text[]",
            [self._quoted_table(), sorted(self._key)],
        )
        return await cur.fetchone() is not None

    async def _create_table(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._columns is not None
        defs = [
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(self._types.get(c, "text")))
            for c in self._columns
        ]
        if self._key:
            defs.append(
                sql.SQL("PRIMARY KEY ({})").format(
                    sql.SQL(", ").join(map(sql.Identifier, self._key))
                )
            )
        await conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                self._table, sql.SQL(", ").join(defs)
            )
        )

    async def _add_hidden(self, conn: psycopg.AsyncConnection[Any]) -> None:
        s, e = sql.Identifier(SINK_COLUMN), sql.Identifier(EPOCH_COLUMN)
        await conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} integer, "
                "ADD COLUMN IF NOT EXISTS {} bigint"
            ).format(self._table, s, e)
        )
        await conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}, {})").format(
                sql.Identifier(f"{self._table_name.split('.')[-1]}_sluiceway_idx"),
                self._table,
                s,
                e,
            )
        )

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint: at open, delete this sink's rows of later epochs."""
        if not (isinstance(state, dict) and isinstance(state.get("epoch"), int)):
            raise CheckpointError(
                f"{self.describe()}: checkpoint state must be {{'epoch': int}}, got "
                f"{short_repr(state)}"
            )
        self._restore_to = state

    # -- records to rows ---------------------------------------------------------------

    def _to_rows(self, values: Sequence[Any]) -> tuple[list[Row], Exception | None]:
        """The rows of the records, up to the first that cannot be converted (and why)."""
        columns = self._columns
        if columns is not None and len(columns) > 1 and self._transform is None:
            get = operator.itemgetter(*columns)
            try:  # the common case, dicts with every column, in one pass
                return [get(v) for v in values], None
            except (KeyError, TypeError, IndexError):
                pass  # some record is not a dict of the columns: find it below
        rows: list[Row] = []
        transform = self._transform
        columns = self._columns
        for value in values:
            try:
                rec = transform(value) if transform is not None else value
                if columns is None:
                    columns = self._first_columns(rec)
                if isinstance(rec, Mapping):
                    rows.append(tuple([rec[c] for c in columns]))
                elif isinstance(rec, Sequence) and not isinstance(rec, str | bytes):
                    if len(rec) != len(columns):
                        raise ValueError(
                            f"a row of {len(rec)} values for {len(columns)} columns {columns}"
                        )
                    rows.append(tuple(rec))
                else:
                    raise TypeError(
                        f"a record must be a dict or a sequence of column values, got "
                        f"{type(rec).__name__} {short_repr(rec)}; pass transform=..."
                    )
            except KeyError as exc:
                return rows, KeyError(
                    f"record {short_repr(value)} has no field {exc.args[0]!r} (columns: {columns})"
                )
            except Exception as exc:  # noqa: BLE001 - pinned to this record, see write()
                return rows, exc
        return rows, None

    def _first_columns(self, rec: Any) -> list[str]:
        if not isinstance(rec, Mapping) or not rec:
            raise TypeError(
                f"{self.describe()}: without columns=[...] the first record must be a "
                f"non-empty dict (its keys name the columns), got {short_repr(rec)}"
            )
        columns = [str(c) for c in rec]
        missing = [k for k in self._key if k not in columns]
        if missing:
            raise ValueError(
                f"{self.describe()}: key {missing} is not a field of the first record "
                f"{short_repr(rec)}; pass columns=[...]"
            )
        self._columns = columns
        return columns

    # -- writing -----------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Write every record of ``batch`` in one transaction; committed on return.

        Raises:
            PartialWriteError: record ``written`` cannot be converted to a row, or
                PostgreSQL refused it (data or constraint error); the records before it
                are committed, it and the ones after are not.
            ConnectionError: the server stayed unreachable for ``reconnect_timeout``.
        """
        rows, bad = self._to_rows(batch.values)
        if not self._ready and rows:
            if self._create and self._columns is not None:
                for column, value in zip(self._columns, rows[0], strict=True):
                    if value is not None:
                        self._types.setdefault(column, _sql_type(value))
            await self._retrying(self._prepare_table)
        try:
            if rows:
                await self._write_rows(rows)
        except psycopg.Error as exc:
            if not _is_row_error(exc):
                raise
            at = await self._retrying(lambda conn, _: self._find_bad(conn, rows))
            if at is None:
                raise
            if at:
                await self._write_rows(rows[:at])
            raise PartialWriteError(at, exc) from exc
        if bad is not None:
            raise PartialWriteError(len(rows), bad) from bad

    async def _write_rows(self, rows: list[Row]) -> None:
        if self._mode == "exactly_once":
            self._seq += 1
            seq, epoch, sid = self._seq, self._epoch, self._sink_id
            tagged = [(*r, sid, epoch) for r in rows]

            async def op(conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
                if retry and await self._landed(conn, seq):
                    return
                await self._put(conn, tagged)
                await conn.execute(
                    sql.SQL(
                        "UPDATE {} SET epoch = %s, seq = %s, updated_at = now() WHERE id = %s"
                    ).format(self._progress),
                    [epoch, seq, sid],
                )
                await conn.commit()

            await self._retrying(op)
            return

        async def plain(conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
            await self._put(conn, rows)
            await conn.commit()

        await self._retrying(plain)

    async def _landed(self, conn: psycopg.AsyncConnection[Any], seq: int) -> bool:
        """After a connection loss: did the batch numbered ``seq`` commit after all?"""
        cur = await conn.execute(
            sql.SQL("SELECT seq FROM {} WHERE id = %s").format(self._progress), [self._sink_id]
        )
        row = await cur.fetchone()
        await conn.rollback()
        return row is not None and row[0] >= seq

    def _names(self) -> list[str]:
        assert self._columns is not None
        if self._mode == "exactly_once":
            return [*self._columns, SINK_COLUMN, EPOCH_COLUMN]
        return self._columns

    async def _put(self, conn: psycopg.AsyncConnection[Any], rows: list[Row]) -> None:
        """The statements writing ``rows`` (no commit)."""
        if self._method == "copy":
            if self._copy_sql is None:
                self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    self._table, sql.SQL(", ").join(map(sql.Identifier, self._names()))
                )
            async with conn.cursor() as cur, cur.copy(self._copy_sql) as copy:
                for row in rows:
                    await copy.write_row(row)
            return
        if self._mode == "upsert":
            rows = self._last_per_key(rows)
        width = len(rows[0])
        chunk = max(1, _MAX_PARAMS // width)
        async with conn.cursor() as cur:
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                await cur.execute(self._insert(conn, len(part)), [v for r in part for v in r])

    def _last_per_key(self, rows: list[Row]) -> list[Row]:
        """One row per key, the last one (ON CONFLICT cannot update a row twice)."""
        assert self._columns is not None
        idx = [self._columns.index(k) for k in self._key]
        if len(idx) == 1:
            i = idx[0]
            return list({r[i]: r for r in rows}.values())
        return list({tuple(r[j] for j in idx): r for r in rows}.values())

    def _insert(self, conn: psycopg.AsyncConnection[Any], n: int) -> bytes:
        """The INSERT (upsert: ON CONFLICT) statement for ``n`` rows."""
        cached = self._insert_sql.get(n)
        if cached is not None:
            return cached
        names = self._names()
        one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(names)))
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
            self._table,
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join([one] * n),
        )
        if self._mode == "upsert":
            rest = [c for c in names if c not in self._key]
            target = sql.SQL(", ").join(map(sql.Identifier, self._key))
            if rest:
                sets = sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest
                )
                stmt = sql.SQL("{} ON CONFLICT ({}) DO UPDATE SET {}").format(stmt, target, sets)
            else:
                stmt = sql.SQL("{} ON CONFLICT ({}) DO NOTHING").format(stmt, target)
        query = stmt.as_bytes(conn)
        if len(self._insert_sql) < 8:
            self._insert_sql[n] = query
        return query

    async def _find_bad(self, conn: psycopg.AsyncConnection[Any], rows: list[Row]) -> int | None:
        """The index of the first row PostgreSQL refuses, inserting one by one in a
        transaction that is rolled back (None: every row passes alone)."""
        if self._mode == "exactly_once":
            rows = [(*r, self._sink_id, self._epoch) for r in rows]
        try:
            async with conn.cursor() as cur:
                for i, row in enumerate(rows):
                    try:
                        await cur.execute(self._insert(conn, 1), list(row))
                    except psycopg.Error as exc:
                        if _is_row_error(exc):
                            return i
                        raise
            return None
        finally:
            if not conn.closed and not conn.broken:
                await conn.rollback()

    # -- checkpoints -------------------------------------------------------------------

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """exactly_once: every row written so far is committed; the checkpoint records
        the epoch they carry, and later rows get the next one."""
        if self._mode != "exactly_once":
            return None
        state = {"sink": self._sink_key, "epoch": self._epoch}
        self._epoch += 1
        return state

    async def commit(self, checkpoint_id: int, state: Any) -> None:
        """exactly_once: the checkpoint is stored; record it in the progress row (its
        ``committed_epoch`` tells readers which rows no crash can take back)."""
        if self._mode != "exactly_once" or state is None:
            return
        epoch = int(state["epoch"])

        async def op(conn: psycopg.AsyncConnection[Any], retry: bool) -> None:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET committed_epoch = %s, checkpoint_id = %s, updated_at = now() "
                    "WHERE id = %s"
                ).format(self._progress),
                [epoch, checkpoint_id, self._sink_id],
            )
            await conn.commit()

        await self._retrying(op)
        self._committed = epoch

    async def close(self) -> None:
        """Close the connection (safe to call twice).  exactly_once: when the last
        pre-committed checkpoint was also committed, first delete the rows written
        after it (a restart writes them again), so the table at rest is exact."""
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        try:
            if (
                self._mode == "exactly_once"
                and self._committed is not None
                and self._committed == self._epoch - 1
                and self._conn is not None
                and not self._conn.closed
                and not self._conn.broken
                and self._ready
            ):
                conn = self._conn
                try:
                    await conn.execute(
                        sql.SQL("DELETE FROM {} WHERE {} = %s AND {} > %s").format(
                            self._table, sql.Identifier(SINK_COLUMN), sql.Identifier(EPOCH_COLUMN)
                        ),
                        [self._sink_id, self._committed],
                    )
                    await conn.commit()
                except psycopg.Error as exc:  # the restart's restore deletes them instead
                    log.warning(
                        "%s: could not delete the rows written after the last checkpoint "
                        "(%s); a restart from that checkpoint deletes them",
                        self.describe(),
                        redact(exc),
                    )
        finally:
            await self._drop()

    def describe(self) -> str:
        """``Postgres(<table>)``."""
        return f"Postgres({self._table_name})"


Postgres = PostgresSink
"""The name ``sw.sinks.Postgres`` resolves to."""
