"""The seam between the checkpoint store and the database that holds it.

:class:`~sluiceway.checkpoint.store.CheckpointStore` keeps the SQL, checks, digests and
transactions once; a :class:`Backend` supplies the connection, the few differences of SQL
dialect, durability and what an error means: the SQLite file
(``sluiceway.checkpoint.store._SQLite``, the default) or a PostgreSQL schema
(:mod:`sluiceway.checkpoint.postgres`).  Both import this module; neither imports the
other's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sluiceway.errors import CheckpointError

__all__ = ["Backend", "Connection"]


class Connection(Protocol):
    """What the store uses of a DB-API connection in autocommit mode, with ``?``
    placeholders (transactions are the store's explicit statements)."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """Where a :class:`~sluiceway.checkpoint.store.CheckpointStore` keeps its tables: the
    connection, the SQL dialect's few differences, durability and what an error means.
    The store's SQL, checks and transactions are the same on every backend: the SQLite
    file is the default, :class:`sluiceway.checkpoint.postgres.PostgresBackend` the
    shared one."""

    Error: type[Exception]
    DatabaseError: type[Exception]
    kind: str
    """What a store is, for messages: ``"a SQLite database"``."""
    where: str
    """The store, for messages (never with a password)."""
    schema: Sequence[str]
    """The statements that create a new store (idempotent)."""
    begin_read: Sequence[str]
    """The statements that open a read transaction on one consistent snapshot."""
    begin_write: Sequence[str]
    """The statements that open a write transaction, one writer of the store at a time."""
    returning_id: str
    """Appended to an INSERT into segments to get the new row's id back."""

    def connect(self, *, create: bool) -> Connection | None: ...
    def configure(self, conn: Connection) -> None: ...
    def tables(self, conn: Connection) -> set[str]: ...
    def initialized(self) -> None: ...
    def prepare_for_writing(self, conn: Connection) -> None: ...
    def inserted_id(self, cursor: Any) -> int | None: ...
    def broken(self, conn: Connection) -> bool: ...
    def unreadable(self, exc: Exception, where: str) -> CheckpointError: ...
