"""Delta Lake sink (``sw.sinks.Delta``): delta-rs transactions, one per checkpoint, applied once.

Records become Arrow tables (:mod:`.arrow`), are buffered, and are *staged* as Parquet
files in the table's directory (written with pyarrow, fsynced), which no reader sees:
a Delta reader reads only the files the transaction log lists.  A Delta transaction then
adds them to the log (append), or merges them into the table by key (upsert)::

    write       rows -> buffer
    stage       buffer -> part-<sink>-<uuid>.parquet  (in the table dir, not in the log)
    pre_commit  stage the rest; the checkpoint lists the staged files of epoch E
    commit      one Delta transaction: add (or merge) those files, with the action
                txn(appId = app_id, version = E) and commitInfo sluiceway.checkpoint = id

**Exactly once.**  ``E`` counts the sink's checkpoints (it goes on across restarts).  A
transaction is applied only if the table's ``txn`` version for ``app_id`` is below ``E``
(Delta keeps the latest ``txn`` of each application in the table's state), so the
commit that a restart repeats -- its checkpoint was stored, then the process died
before or after the transaction -- is applied once.  A restart deletes the staged files
of this sink that no transaction references (rows after the checkpoint: the replay
writes them again).

**Without checkpoints** (at-least-once) the buffer is committed, without ``txn``, when it
holds ``flush_rows`` rows or is ``flush_interval`` seconds old at a write, and at close.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sluiceway.connectors.base import PartialWriteError, Sink, SinkContext
from sluiceway.connectors.lakehouse.arrow import RecordsToArrow, import_extra
from sluiceway.connectors.lakehouse.parquet import _fsync, _remove, hive_dir, split_partitions
from sluiceway.errors import CheckpointError, short_repr
from sluiceway.runtime.messages import Batch

__all__ = ["Delta", "DeltaSink", "compact"]

DeltaMode = Literal["append", "upsert"]
STAGING = "_sluiceway_staging"


def _delta() -> Any:
    return import_extra("deltalake", "delta", "sinks.Delta")


def _partition_values(names: Sequence[str], key: Sequence[Any]) -> dict[str, str | None]:
    """A Delta add action's ``partitionValues``: strings, None for null."""
    return {
        c: None if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        for c, v in zip(names, key, strict=True)
    }


class DeltaSink(Sink):
    """Writes records into a Delta Lake table (``sw.sinks.Delta``).

    Args:
        table_uri: the table's directory (created with the records' schema if missing).
        schema: a ``pyarrow.Schema``; default: the existing table's, or inferred from
            the first batch.  A record that does not fit goes to ``on_error=``.
        mode: ``"append"`` or ``"upsert"`` (a Delta MERGE by ``key``: the last record of
            a key in a checkpoint replaces the row, or is inserted).
        key: the fields identifying a row (upsert only).
        partition_by: partition columns (when the sink creates the table).
        app_id: the Delta ``txn`` application id; default ``sluiceway/<flow>/<sink>``.
            Two sinks writing one table need different ids (the default does that).
        flush_rows: stage the buffer into files when it holds this many rows; without
            checkpoints, also commit.
        flush_interval: seconds; without checkpoints, commit a buffer this old at the
            next write.
        transform: turns a record into a dict before conversion.
    """

    exactly_once = True

    def __init__(
        self,
        table_uri: str | os.PathLike[str],
        *,
        schema: Any = None,
        mode: DeltaMode = "append",
        key: Sequence[str] | None = None,
        partition_by: Sequence[str] = (),
        app_id: str | None = None,
        flush_rows: int = 1_000_000,
        flush_interval: float = 60.0,
        transform: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> None:
        self._uri = os.fspath(table_uri)
        what = self.describe()
        if mode not in ("append", "upsert"):
            raise ValueError(f"{what} mode must be 'append' or 'upsert', got {mode!r}")
        if mode == "upsert" and not key:
            raise ValueError(f"{what} mode='upsert' needs key=[...]: the fields of a row's id")
        if mode == "append" and key:
            raise ValueError(f"{what} key= is for mode='upsert'")
        if not isinstance(flush_rows, int) or isinstance(flush_rows, bool) or flush_rows < 1:
            raise ValueError(f"{what} flush_rows must be an int >= 1, got {flush_rows!r}")
        if not (isinstance(flush_interval, int | float) and flush_interval > 0):
            raise ValueError(f"{what} flush_interval must be > 0 seconds, got {flush_interval!r}")
        self._dl = _delta()
        self._pq = import_extra("pyarrow.parquet", "delta", what)
        self._conv = RecordsToArrow(schema, transform, what)
        self._mode: DeltaMode = mode
        self._key = list(key or ())
        self._partition_by = [partition_by] if isinstance(partition_by, str) else list(partition_by)
        self._app_id = app_id
        self._flush_rows = flush_rows
        self._flush_interval = float(flush_interval)
        self._ctx: SinkContext | None = None
        self._buffer: list[Any] = []
        self._rows = 0
        self._since = 0.0
        self._staged: list[dict[str, Any]] = []  # files of the current epoch
        self._pending: list[dict[str, Any]] = []  # epochs in a checkpoint, not committed
        self._epoch = 1
        self._restore_to: dict[str, Any] | None = None
        self._tag = ""
        self._created = False

    # -- lifecycle ---------------------------------------------------------------------

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint: commit the epochs it lists (once), drop the rest."""
        if not (isinstance(state, dict) and isinstance(state.get("next_epoch"), int)):
            raise CheckpointError(
                f"{self.describe()}: checkpoint state must be {{'next_epoch': int, "
                f"'pending': [...]}}, got {short_repr(state)}"
            )
        self._restore_to = state

    async def open(self, ctx: SinkContext) -> None:
        """Load the table (its schema when none is given); after a restore, apply the
        checkpoint's epochs; delete this sink's staged files no transaction references."""
        self._ctx = ctx
        self._app_id = self._app_id or f"sluiceway/{ctx.flow}/{ctx.name}"
        self._tag = re.sub(r"[^A-Za-z0-9_-]+", "_", self._app_id.removeprefix("sluiceway/"))
        os.makedirs(self._uri, exist_ok=True)
        table = self._table()
        if table is not None and self._conv.schema is None:
            self._conv.set_schema(self._conv.pa.schema(table.schema().to_arrow()))
        if self._restore_to is not None:
            state, self._restore_to = self._restore_to, None
            self._epoch = int(state["next_epoch"])
            for item in state.get("pending", ()):
                self._apply(item, item.get("checkpoint"))
        elif table is not None:
            self._epoch = (table.transaction_version(self._app_id) or 0) + 1
        self._drop_orphans()
        self._since = ctx.clock.monotonic()

    async def close(self) -> None:
        """Without checkpoints: commit the buffer.  With: drop what no checkpoint lists."""
        ctx = self._ctx
        if ctx is None:
            return
        if not ctx.checkpointing:
            self._stage()
            self._commit_now()
            return
        self._buffer.clear()
        for f in self._staged:
            _remove(os.path.join(self._uri, f["path"]))
        self._staged.clear()

    # -- writing -----------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Convert ``batch`` into the buffer; stage (and without checkpoints commit) it
        when full or old.

        Raises:
            PartialWriteError: record ``written`` does not fit the schema.
        """
        table, bad = self._conv.convert(batch.values)
        if table.num_rows:
            if not self._buffer:
                assert self._ctx is not None
                self._since = self._ctx.clock.monotonic()
            self._buffer.append(table)
            self._rows += table.num_rows
        ctx = self._ctx
        assert ctx is not None
        full = self._rows >= self._flush_rows
        if full or (
            not ctx.checkpointing
            and self._buffer
            and ctx.clock.monotonic() - self._since >= self._flush_interval
        ):
            self._stage()
            if not ctx.checkpointing:
                self._commit_now()
        if bad is not None:
            raise PartialWriteError(table.num_rows, bad) from bad

    def _stage(self) -> None:
        """Write the buffer as Parquet files no reader sees yet (fsynced)."""
        if not self._buffer:
            return
        if self._created is False:  # before any file: a restart finds the table
            self._table(create_with=self._conv.schema)
            self._created = True
        pa = self._conv.pa
        table = self._buffer[0] if len(self._buffer) == 1 else pa.concat_tables(self._buffer)
        self._buffer.clear()
        self._rows = 0
        name = f"part-{self._tag}-{uuid.uuid4().hex}.parquet"
        if self._mode == "upsert":  # whole rows: the MERGE reads them as its source
            parts = [((), table, os.path.join(STAGING, self._tag))]
        else:
            parts = [
                (key, part, hive_dir(self._partition_by, key) if key else "")
                for key, part in split_partitions(table, self._partition_by)
            ]
        key: tuple[Any, ...]
        for key, part, folder in parts:
            os.makedirs(os.path.join(self._uri, folder), exist_ok=True)
            path = os.path.join(folder, name)
            full = os.path.join(self._uri, path)
            self._pq.write_table(part, full, compression="zstd")
            _fsync(full)
            values = _partition_values(self._partition_by, key)
            self._staged.append(
                {
                    "path": path,
                    "size": os.path.getsize(full),
                    "partition": values,
                    "rows": part.num_rows,
                }
            )

    def _commit_now(self) -> None:
        if self._staged:
            self._apply({"epoch": None, "files": self._staged, "checkpoint": None}, None)
            self._staged = []

    # -- Delta transactions ------------------------------------------------------------

    def _table(self, create_with: Any = None) -> Any:
        dl = self._dl
        if dl.DeltaTable.is_deltatable(self._uri):
            return dl.DeltaTable(self._uri)
        if create_with is None:
            return None
        return dl.DeltaTable.create(
            self._uri, create_with, mode="ignore", partition_by=self._partition_by or None
        )

    def _apply(self, item: Mapping[str, Any], checkpoint_id: int | None) -> None:
        """One Delta transaction for an epoch's files, unless the table has it already."""
        files, epoch = item["files"], item["epoch"]
        if not files:
            return
        dl = self._dl
        table = self._table(create_with=self._conv.schema)
        assert self._app_id is not None
        if epoch is not None and (table.transaction_version(self._app_id) or 0) >= epoch:
            return  # applied before the crash
        meta = {"sluiceway.sink": self._app_id}
        if checkpoint_id is not None:
            meta["sluiceway.checkpoint"] = str(checkpoint_id)
        props = dl.CommitProperties(
            custom_metadata=meta,
            app_transactions=None if epoch is None else [dl.Transaction(self._app_id, epoch)],
        )
        if self._mode == "upsert":
            self._merge(table, files, props)
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

    def _merge(self, table: Any, files: list[dict[str, Any]], props: Any) -> None:
        pa = self._conv.pa
        paths = [os.path.join(self._uri, f["path"]) for f in files]
        source = pa.concat_tables([self._pq.read_table(p) for p in paths])
        keys = list(zip(*(source.column(k).to_pylist() for k in self._key), strict=True))
        last = list({k: i for i, k in enumerate(keys)}.values())  # the last row per key
        source = source.take(sorted(last))
        predicate = " AND ".join(f"t.`{k}` = s.`{k}`" for k in self._key)
        (
            table.merge(
                source, predicate, source_alias="s", target_alias="t", commit_properties=props
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
        for p in paths:
            _remove(p)

    def _drop_orphans(self) -> None:
        """Delete this sink's staged files that the table does not reference."""
        table = self._table()
        pa = self._conv.pa
        used: set[str] = set()
        if table is not None:
            used = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
        prefix = f"part-{self._tag}-"
        for folder, dirs, names in os.walk(self._uri):
            dirs[:] = [d for d in dirs if d != "_delta_log"]
            for name in names:
                if name.startswith(prefix):
                    path = os.path.join(folder, name)
                    if os.path.relpath(path, self._uri) not in used:
                        os.remove(path)

    # -- checkpoints -------------------------------------------------------------------

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """Stage the buffer; the checkpoint lists the staged files of every epoch not
        yet committed."""
        self._stage()
        if self._staged:
            self._pending.append(
                {"epoch": self._epoch, "files": self._staged, "checkpoint": checkpoint_id}
            )
            self._staged = []
            self._epoch += 1
        return {"next_epoch": self._epoch, "pending": list(self._pending)}

    async def commit(self, checkpoint_id: int, state: Any) -> None:
        """The checkpoint is stored: one Delta transaction per epoch it lists (once)."""
        done = set()
        for item in state["pending"]:
            self._apply(item, checkpoint_id if item["checkpoint"] is None else item["checkpoint"])
            done.add(item["epoch"])
        self._pending = [p for p in self._pending if p["epoch"] not in done]

    def describe(self) -> str:
        """``Delta(<table_uri>)``."""
        return f"Delta({self._uri})"


def compact(table_uri: str | os.PathLike[str], *, vacuum_hours: int | None = 168) -> Any:
    """Rewrite a Delta table's small files into large ones (``OPTIMIZE``), then delete
    files no version younger than ``vacuum_hours`` references (None: keep them).

    Safe while the sink writes: both are Delta transactions, readers see one version or
    the other.  Returns delta-rs's optimize metrics."""
    dl = _delta()
    table = dl.DeltaTable(os.fspath(table_uri))
    metrics = table.optimize.compact()
    if vacuum_hours is not None:
        table.vacuum(retention_hours=vacuum_hours, dry_run=False, enforce_retention_duration=False)
    return metrics


Delta = DeltaSink
"""The name ``sw.sinks.Delta`` resolves to."""
