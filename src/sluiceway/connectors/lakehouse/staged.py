"""The two-phase commit shared by the table sinks (Delta Lake, Iceberg).

Records become Arrow tables (:mod:`.arrow`), are buffered, and are *staged* as Parquet
files (written with pyarrow, fsynced) that no reader sees: a table format's reader reads
only the files its metadata lists.  One table commit (a Delta transaction, an Iceberg
snapshot) then adds them (append) or merges them by key (upsert)::

    write       rows -> buffer
    stage       buffer -> part-<sink>-<uuid>.parquet   (flush_rows, or at a barrier)
    pre_commit  stage the rest: epoch E = these files; the checkpoint lists every epoch
                not yet committed
    commit      one table commit per listed epoch, marked (app_id, E), skipped when the
                table already carries a mark >= E for app_id

``E`` numbers the sink's checkpoints that had rows; it goes on across restarts (the
checkpoint carries the next one; a fresh start continues after the table's mark).  So a
commit that a restart repeats -- its checkpoint was stored, then the process died before
or after the table commit -- is applied once.  A restart also deletes this sink's staged
files that the table does not reference: rows after the checkpoint, which the replay
writes again.

Without checkpoints (at-least-once) the buffer is committed, unmarked, when it holds
``flush_rows`` rows or is ``flush_interval`` seconds old at a write, and at close.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sluiceway.connectors.lakehouse.arrow import RecordsToArrow, import_extra
from sluiceway.connectors.lakehouse.parquet import _fsync, _remove, hive_dir, split_partitions
from sluiceway.core.contract import PartialWriteError, Sink, SinkContext
from sluiceway.core.messages import Batch
from sluiceway.errors import CheckpointError, short_repr

__all__ = ["StagedTableSink", "TableMode"]

TableMode = Literal["append", "upsert"]
"""``append`` adds every record; ``upsert`` merges by key (the last record per key)."""

STAGING = "_sluiceway_staging"


def _partition_values(names: Sequence[str], key: Sequence[Any]) -> dict[str, str | None]:
    """Partition values as strings (None for null, ``true``/``false`` for booleans)."""
    return {
        c: None if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        for c, v in zip(names, key, strict=True)
    }


class StagedTableSink(Sink):
    """Buffering, staging and marked commits for a table format (see the module docs).

    A format implements :meth:`_load`, :meth:`_create`, :meth:`_data_root`,
    :meth:`_referenced` and :meth:`_commit`.
    """

    exactly_once = True
    _extra = ""
    _keep_partition_columns = False  # Delta: no (values in the log); Iceberg: yes
    _compression = "zstd"  # the format library's own default, so files look like its own
    _writes_unmarked = False  # True: the library writes and commits in one call

    def __init__(
        self,
        *,
        schema: Any,
        mode: TableMode,
        key: Sequence[str] | None,
        partition_by: Sequence[str],
        app_id: str | None,
        flush_rows: int,
        flush_interval: float,
        transform: Callable[[Any], Mapping[str, Any]] | None,
    ) -> None:
        what = self.describe()
        if mode not in ("append", "upsert"):
            raise ValueError(f"{what} mode must be 'append' or 'upsert', got {mode!r}")
        if mode == "upsert" and not key:
            raise ValueError(f"{what} mode='upsert' needs key=[...]: the fields of a row's id")
        if mode == "append" and key:
            raise ValueError(f"{what} key= is for mode='upsert'")
        if not isinstance(flush_rows, int) or isinstance(flush_rows, bool) or flush_rows < 1:
            raise ValueError(f"{what} flush_rows must be an int >= 1, got {flush_rows!r}")
        if not (isinstance(flush_interval, int | float) and 0 < flush_interval < math.inf):
            raise ValueError(
                f"{what} flush_interval must be a finite number > 0 seconds, got {flush_interval!r}"
            )
        self._pq = import_extra("pyarrow.parquet", self._extra, what)
        self._conv = RecordsToArrow(schema, transform, what)
        self._mode: TableMode = mode
        self._key = list(key or ())
        self._partition_by = [partition_by] if isinstance(partition_by, str) else list(partition_by)
        self._app_id = app_id or ""
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

    # -- what a format provides ----------------------------------------------------------

    @abstractmethod
    def _load(self) -> tuple[Any, int] | None:
        """The existing table's Arrow schema and this sink's mark (0: none), or None."""

    @abstractmethod
    def _create(self, schema: Any) -> None:
        """Create the table (if missing) with ``schema`` and the partition columns."""

    @abstractmethod
    def _data_root(self) -> str:
        """The local directory under which staged files are written."""

    @abstractmethod
    def _referenced(self) -> set[str]:
        """The data files the table references, relative to :meth:`_data_root`."""

    @abstractmethod
    def _commit(self, files: list[dict[str, Any]], epoch: int | None, meta: dict[str, str]) -> None:
        """One table commit of ``files`` (append, or upsert of their rows), marked
        ``(app_id, epoch)`` unless ``epoch`` is None; ``meta`` goes into its summary."""

    @abstractmethod
    def _mark(self) -> int:
        """The table's current mark for this sink's ``app_id`` (0: none)."""

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
        """Load the table (its schema when none is given); after a restore, commit the
        checkpoint's epochs; delete this sink's staged files the table does not use."""
        self._ctx = ctx
        self._app_id = self._app_id or f"sluiceway/{ctx.flow}/{ctx.name}"
        self._tag = re.sub(r"[^A-Za-z0-9_-]+", "_", self._app_id.removeprefix("sluiceway/"))
        loaded = self._load()
        if loaded is not None:
            self._created = True
            if self._conv.schema is None:
                self._conv.set_schema(loaded[0])
        if self._restore_to is not None:
            state, self._restore_to = self._restore_to, None
            self._epoch = int(state["next_epoch"])
            for item in state.get("pending", ()):
                self._apply(item, item.get("checkpoint"))
        elif loaded is not None:
            self._epoch = loaded[1] + 1
        self._drop_orphans()
        self._since = ctx.clock.monotonic()

    async def close(self) -> None:
        """Without checkpoints: commit the buffer.  With: drop what no checkpoint lists."""
        ctx = self._ctx
        if ctx is None:
            return
        if not ctx.checkpointing:
            self._flush_unmarked()
            return
        self._buffer.clear()
        for f in self._staged:
            _remove(os.path.join(self._data_root(), f["path"]))
        self._staged.clear()

    # -- writing -----------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Convert ``batch`` into the buffer; stage (and without checkpoints commit) it
        when full or old.

        Raises:
            PartialWriteError: record ``written`` does not fit the schema; the records
                before it are buffered.
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        table, bad = self._conv.convert(batch.values)
        if table.num_rows:
            if not self._buffer:
                self._since = ctx.clock.monotonic()
            self._buffer.append(table)
            self._rows += table.num_rows
        if self._rows >= self._flush_rows or (
            not ctx.checkpointing
            and self._buffer
            and ctx.clock.monotonic() - self._since >= self._flush_interval
        ):
            if ctx.checkpointing:
                self._stage()
            else:
                self._flush_unmarked()
        if bad is not None:
            raise PartialWriteError(table.num_rows, bad) from bad

    def _stage(self) -> None:
        """Write the buffer as Parquet files no reader sees yet (fsynced)."""
        if not self._buffer:
            return
        if not self._created:  # before any file: a restart finds the table
            self._create(self._conv.schema)
            self._created = True
        pa = self._conv.pa
        table = self._buffer[0] if len(self._buffer) == 1 else pa.concat_tables(self._buffer)
        self._buffer.clear()
        self._rows = 0
        name = f"part-{self._tag}-{uuid.uuid4().hex}.parquet"
        parts: list[tuple[tuple[Any, ...], Any, str]]
        if self._mode == "upsert":  # whole rows: the merge reads them as its source
            parts = [((), table, os.path.join(STAGING, self._tag))]
        else:
            parts = [
                (key, part, hive_dir(self._partition_by, key) if key else "")
                for key, part in split_partitions(
                    table, self._partition_by, keep=self._keep_partition_columns
                )
            ]
        root = self._data_root()
        for key, part, folder in parts:
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            path = os.path.join(folder, name)
            full = os.path.join(root, path)
            self._pq.write_table(part, full, compression=self._compression)
            _fsync(full)
            self._staged.append(
                {
                    "path": path,
                    "size": os.path.getsize(full),
                    "partition": _partition_values(self._partition_by, key) if key else {},
                    "rows": part.num_rows,
                }
            )

    def _flush_unmarked(self) -> None:
        """Without checkpoints: commit the buffer now, unmarked (at-least-once)."""
        if not self._buffer:
            return
        if not self._writes_unmarked:
            self._stage()
            self._apply({"epoch": None, "files": self._staged, "checkpoint": None}, None)
            self._staged = []
            return
        if not self._created:
            self._create(self._conv.schema)
            self._created = True
        pa = self._conv.pa
        table = self._buffer[0] if len(self._buffer) == 1 else pa.concat_tables(self._buffer)
        self._buffer.clear()
        self._rows = 0
        self._write_unmarked(table, {"sluiceway.sink": self._app_id})

    def _write_unmarked(self, table: Any, meta: dict[str, str]) -> None:
        """With ``_writes_unmarked``: write and commit ``table`` with the format library
        in one call (without checkpoints no staged file has to outlive the process)."""
        raise NotImplementedError

    def _apply(self, item: Mapping[str, Any], checkpoint_id: int | None) -> None:
        """One table commit for an epoch's files, unless the table has it already."""
        files, epoch = item["files"], item["epoch"]
        if not files:
            return
        if epoch is not None and self._mark() >= epoch:
            return  # committed before the crash
        root = self._data_root()
        lost = [f["path"] for f in files if not os.path.exists(os.path.join(root, f["path"]))]
        if lost:
            raise CheckpointError(
                f"{self.describe()}: epoch {epoch} lists staged files that are gone "
                f"({lost[0]!r} under {root!r}, {len(lost)} in all); were they deleted by "
                "hand (a vacuum, an orphan-file cleanup)?  The table does not have them"
            )
        meta = {"sluiceway.sink": self._app_id}
        if epoch is not None:
            meta["sluiceway.epoch"] = str(epoch)
        if checkpoint_id is not None:
            meta["sluiceway.checkpoint"] = str(checkpoint_id)
        self._commit(files, epoch, meta)
        if self._mode == "upsert":
            for f in files:
                _remove(os.path.join(self._data_root(), f["path"]))

    def _merge_source(self, files: list[dict[str, Any]]) -> Any:
        """The rows of staged upsert files, the last one per key."""
        root = self._data_root()
        return self._last_per_key(
            self._conv.pa.concat_tables(
                [self._pq.read_table(os.path.join(root, f["path"])) for f in files]
            )
        )

    def _last_per_key(self, source: Any) -> Any:
        """The rows of ``source`` that are the last of their key."""
        keys = zip(*(source.column(k).to_pylist() for k in self._key), strict=True)
        last = {k: i for i, k in enumerate(keys)}
        return source.take(sorted(last.values()))

    def _drop_orphans(self) -> None:
        """Delete this sink's staged files that the table does not reference."""
        root = self._data_root()
        if not os.path.isdir(root):
            return
        used = self._referenced()
        prefix = f"part-{self._tag}-"
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ("_delta_log", "metadata")]
            for name in names:
                path = os.path.join(folder, name)
                if name.startswith(prefix) and os.path.relpath(path, root) not in used:
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
        """The checkpoint is stored: one table commit per epoch it lists (once)."""
        done = set()
        for item in state["pending"]:
            self._apply(item, checkpoint_id if item["checkpoint"] is None else item["checkpoint"])
            done.add(item["epoch"])
        self._pending = [p for p in self._pending if p["epoch"] not in done]
