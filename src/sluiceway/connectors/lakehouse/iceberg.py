"""Apache Iceberg sink (``sw.sinks.Iceberg``): one pyiceberg snapshot per checkpoint, once.

The two-phase commit is :mod:`.staged`'s: rows are staged as Parquet files under the
table's ``data/`` directory (no Iceberg reader sees a file no manifest lists), then each
checkpoint's files are committed as **one Iceberg commit** whose snapshot summary
carries ``sluiceway.sink``, ``sluiceway.epoch`` and ``sluiceway.checkpoint``::

    append   add_files: the staged files become one APPEND snapshot
    upsert   upsert of the staged rows (the last per key) on key: pyiceberg writes the
             overwrite and the append in one transaction

The same commit sets the table property ``sluiceway.epoch.<app_id>`` to the epoch (one
atomic catalog update), so the mark survives snapshot expiry and compaction; a commit
that a restart repeats is skipped when the property is already at that epoch.

The catalog is any pyiceberg catalog; tests and laptops use the SQL catalog on SQLite
(``{"type": "sql", "uri": "sqlite:///cat.db", "warehouse": "file:///wh"}``), servers
PostgreSQL (``"uri": "postgresql+psycopg2://..."``).  Staged files are written to the
local filesystem: the warehouse must be a local path (``file://``).

Small files: :func:`compact` rewrites the table's data into large files in one
overwrite snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from sluiceway.connectors.lakehouse.arrow import import_extra
from sluiceway.connectors.lakehouse.staged import StagedTableSink, TableMode

__all__ = ["Iceberg", "IcebergSink", "compact", "load_catalog"]

MARK = "sluiceway.epoch."


def load_catalog(catalog: Any, name: str = "default") -> Any:
    """A pyiceberg catalog: ``catalog`` itself, or one loaded from its properties."""
    if isinstance(catalog, Mapping):
        module = import_extra("pyiceberg.catalog", "iceberg", "sinks.Iceberg")
        return module.load_catalog(name, **{str(k): str(v) for k, v in catalog.items()})
    return catalog


def _local(location: str) -> str:
    url = urlparse(location)
    if url.scheme not in ("", "file"):
        raise ValueError(
            f"sinks.Iceberg stages files on the local filesystem, but the table lives at "
            f"{location!r}; use a file:// warehouse"
        )
    return unquote(url.path) if url.scheme else location


class IcebergSink(StagedTableSink):
    """Writes records into an Apache Iceberg table (``sw.sinks.Iceberg``).

    Args:
        table: the table's identifier, ``namespace.name`` (created, with its namespace,
            from the records' schema if missing).
        catalog: a pyiceberg ``Catalog``, or its properties (for ``load_catalog``).
        catalog_name: the name given to ``load_catalog``.
        schema: a ``pyarrow.Schema``; default: the existing table's, or inferred from
            the first batch.  A record that does not fit goes to ``on_error=``.
        mode: ``"append"`` or ``"upsert"`` (by ``key``).
        key: the fields identifying a row (upsert only).
        partition_by: identity partition columns (when the sink creates the table).
        app_id: names this sink's mark; default ``sluiceway/<flow>/<sink>``.
        flush_rows: stage the buffer into files when it holds this many rows; without
            checkpoints, also commit.
        flush_interval: seconds; without checkpoints, commit a buffer this old at the
            next write.
        transform: turns a record into a dict before conversion.

    Raises:
        ValueError: a bad argument.
    """

    _extra = "iceberg"
    _keep_partition_columns = True  # add_files reads identity partition values from data

    def __init__(
        self,
        table: str,
        *,
        catalog: Any,
        catalog_name: str = "default",
        schema: Any = None,
        mode: TableMode = "append",
        key: Sequence[str] | None = None,
        partition_by: Sequence[str] = (),
        app_id: str | None = None,
        flush_rows: int = 1_000_000,
        flush_interval: float = 60.0,
        transform: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(table, str) or "." not in table.strip("."):
            raise ValueError(f"sinks.Iceberg table must be 'namespace.name', got {table!r}")
        self._name = table
        import_extra("pyiceberg", "iceberg", "sinks.Iceberg")
        self._catalog_spec = catalog
        self._catalog_name = catalog_name
        self._catalog: Any = None
        self._location = ""
        super().__init__(
            schema=schema,
            mode=mode,
            key=key,
            partition_by=partition_by,
            app_id=app_id,
            flush_rows=flush_rows,
            flush_interval=flush_interval,
            transform=transform,
        )

    def _cat(self) -> Any:
        if self._catalog is None:
            self._catalog = load_catalog(self._catalog_spec, self._catalog_name)
        return self._catalog

    def _table(self) -> Any:
        cat = self._cat()
        if not cat.table_exists(self._name):
            return None
        table = cat.load_table(self._name)
        self._location = _local(table.location())
        return table

    def _load(self) -> tuple[Any, int] | None:
        table = self._table()
        if table is None:
            return None
        return table.schema().as_arrow(), int(table.properties.get(MARK + self._app_id, 0))

    def _create(self, schema: Any) -> None:
        cat = self._cat()
        cat.create_namespace_if_not_exists(self._name.rsplit(".", 1)[0])
        table = cat.create_table_if_not_exists(self._name, schema=schema)
        if self._partition_by and table.spec().is_unpartitioned():
            with table.update_spec() as spec:
                for column in self._partition_by:
                    spec.add_identity(column)
        self._location = _local(table.location())

    def _data_root(self) -> str:
        if not self._location:
            self._table()
        return os.path.join(self._location, "data") if self._location else ""

    def _referenced(self) -> set[str]:
        table = self._table()
        if table is None or table.current_snapshot() is None:
            return set()
        root = self._data_root()
        files = table.inspect.files().column("file_path").to_pylist()
        return {os.path.relpath(_local(f), root) for f in files}

    def _mark(self) -> int:
        table = self._table()
        return 0 if table is None else int(table.properties.get(MARK + self._app_id, 0))

    def _commit(self, files: list[dict[str, Any]], epoch: int | None, meta: dict[str, str]) -> None:
        table = self._table()
        root = self._data_root()
        with table.transaction() as tx:
            if self._mode == "upsert":
                tx.upsert(self._merge_source(files), join_cols=self._key, snapshot_properties=meta)
            else:
                paths = [f"file://{os.path.join(root, f['path'])}" for f in files]
                tx.add_files(paths, snapshot_properties=meta)
            if epoch is not None:
                tx.set_properties({MARK + self._app_id: str(epoch)})

    def describe(self) -> str:
        """``Iceberg(<namespace.name>)``."""
        return f"Iceberg({self._name})"


def compact(table: str, *, catalog: Any, catalog_name: str = "default") -> int:
    """Rewrite an Iceberg table's data into as few files as pyiceberg writes for it, in
    one overwrite snapshot (readers see the old or the new snapshot, never both).

    Do not run it while a sink appends to the same table: pyiceberg's overwrite is
    validated against concurrent commits only by the catalog's optimistic commit, and
    a conflicting append makes one of the two fail.  Old files stay until the snapshots
    referencing them are expired.  Returns the number of data files before."""
    t = load_catalog(catalog, catalog_name).load_table(table)
    before = len(t.inspect.files())
    data = t.scan().to_arrow()
    t.overwrite(data, snapshot_properties={"sluiceway.compaction": "true"})
    return before


Iceberg = IcebergSink
"""The name ``sw.sinks.Iceberg`` resolves to."""
