"""Delta Lake sink (``sw.sinks.Delta``): one delta-rs transaction per checkpoint, applied once.

The two-phase commit is :mod:`.staged`'s: rows are staged as Parquet files in the
table's directory (no Delta reader sees a file the log does not list), then each
checkpoint's files are committed in **one Delta transaction** carrying the action
``txn(appId = app_id, version = E)`` -- ``E`` the sink's epoch, one per checkpoint with
rows -- and ``sluiceway.checkpoint = <id>`` in its ``commitInfo``.  Delta keeps the
latest ``txn`` version of every application in the table's state (checkpoints and
``OPTIMIZE`` included), so the transaction a restart repeats is skipped when the table's
version for ``app_id`` is already ``E``::

    append   add actions for the staged files (partition values from the Hive dirs)
    upsert   MERGE the staged rows (the last per key) on key: update matched, insert new

Small files: :func:`compact` (``OPTIMIZE`` then ``VACUUM``), safe while the sink writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sluiceway.connectors.lakehouse.arrow import import_extra
from sluiceway.connectors.lakehouse.staged import StagedTableSink, TableMode

__all__ = ["Delta", "DeltaSink", "compact"]


def _delta() -> Any:
    return import_extra("deltalake", "delta", "sinks.Delta")


class DeltaSink(StagedTableSink):
    """Writes records into a Delta Lake table (``sw.sinks.Delta``).

    Args:
        table_uri: the table's local directory (created with the records' schema if
            missing).
        schema: a ``pyarrow.Schema``; default: the existing table's, or inferred from
            the first batch.  A record that does not fit goes to ``on_error=``.
        mode: ``"append"`` or ``"upsert"`` (a Delta MERGE by ``key``: the last record of
            a key in a checkpoint updates its row, or is inserted).
        key: the fields identifying a row (upsert only).
        partition_by: partition columns (when the sink creates the table).
        app_id: the Delta ``txn`` application id; default ``sluiceway/<flow>/<sink>``.
        flush_rows: stage the buffer into files when it holds this many rows; without
            checkpoints, also commit.
        flush_interval: seconds; without checkpoints, commit a buffer this old at the
            next write.
        transform: turns a record into a dict before conversion.

    Raises:
        ValueError: a bad argument.
    """

    _extra = "delta"
    _compression = "snappy"  # delta-rs writes snappy by default
    _writes_unmarked = True  # write_deltalake: delta-rs's own (Rust) writer

    def __init__(
        self,
        table_uri: str | os.PathLike[str],
        *,
        schema: Any = None,
        mode: TableMode = "append",
        key: Sequence[str] | None = None,
        partition_by: Sequence[str] = (),
        app_id: str | None = None,
        flush_rows: int = 1_000_000,
        flush_interval: float = 60.0,
        transform: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> None:
        self._uri = os.fspath(table_uri)
        self._dl = _delta()
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

    def _table(self) -> Any:
        dl = self._dl
        return dl.DeltaTable(self._uri) if dl.DeltaTable.is_deltatable(self._uri) else None

    def _load(self) -> tuple[Any, int] | None:
        table = self._table()
        if table is None:
            return None
        schema = self._conv.pa.schema(table.schema().to_arrow())
        return schema, table.transaction_version(self._app_id) or 0

    def _create(self, schema: Any) -> None:
        os.makedirs(self._uri, exist_ok=True)
        self._dl.DeltaTable.create(
            self._uri, schema, mode="ignore", partition_by=self._partition_by or None
        )

    def _data_root(self) -> str:
        return self._uri

    def _referenced(self) -> set[str]:
        table = self._table()
        if table is None:
            return set()
        paths = self._conv.pa.table(table.get_add_actions(flatten=True)).column("path")
        return set(paths.to_pylist())

    def _mark(self) -> int:
        table = self._table()
        return 0 if table is None else table.transaction_version(self._app_id) or 0

    def _merge(self, table: Any, source: Any, props: Any) -> None:
        predicate = " AND ".join(f"t.`{k}` = s.`{k}`" for k in self._key)
        (
            table.merge(
                source, predicate, source_alias="s", target_alias="t", commit_properties=props
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    def _commit(self, files: list[dict[str, Any]], epoch: int | None, meta: dict[str, str]) -> None:
        dl = self._dl
        table = self._table()
        props = dl.CommitProperties(
            custom_metadata=meta,
            app_transactions=None if epoch is None else [dl.Transaction(self._app_id, epoch)],
        )
        if self._mode == "upsert":
            self._merge(table, self._merge_source(files), props)
            return
        now = int(self._ctx.clock.time() * 1000) if self._ctx else 0
        actions = [
            dl.transaction.AddAction(
                f["path"],
                f["size"],
                f["partition"],
                now,
                True,
                json.dumps({"numRecords": f["rows"]}),
            )
            for f in files
        ]
        table.create_write_transaction(
            actions,
            mode="append",
            schema=table.schema(),
            partition_by=self._partition_by or None,
            commit_properties=props,
        )

    def _write_unmarked(self, table: Any, meta: dict[str, str]) -> None:
        """Without checkpoints: delta-rs writes and commits the rows in one call."""
        dl = self._dl
        props = dl.CommitProperties(custom_metadata=meta)
        if self._mode == "upsert":
            self._merge(self._table(), self._last_per_key(table), props)
            return
        dl.write_deltalake(
            self._uri,
            table,
            mode="append",
            partition_by=self._partition_by or None,
            commit_properties=props,
        )

    def describe(self) -> str:
        """``Delta(<table_uri>)``."""
        return f"Delta({self._uri})"


def compact(table_uri: str | os.PathLike[str], *, vacuum_hours: int | None = 168) -> Any:
    """Rewrite a Delta table's small files into large ones (``OPTIMIZE``), then delete
    the files no version younger than ``vacuum_hours`` references (None: keep them).

    Safe while the sink writes: both are Delta transactions, readers see one version or
    the other, and the sink's ``txn`` versions survive.  Returns delta-rs's metrics."""
    table = _delta().DeltaTable(os.fspath(table_uri))
    metrics = table.optimize.compact()
    if vacuum_hours is not None:
        table.vacuum(retention_hours=vacuum_hours, dry_run=False, enforce_retention_duration=False)
    return metrics


Delta = DeltaSink
"""The name ``sw.sinks.Delta`` resolves to."""
