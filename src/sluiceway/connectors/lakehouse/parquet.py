"""Parquet files sink (``sw.sinks.Parquet``): pyarrow, Hive-style partitions, atomic files.

Records become Arrow tables (:mod:`.arrow`) and are written with ``pyarrow.parquet``
into files under ``path``, one open file per partition (``path/country=FR/day=3/``).  A
file is written under a hidden temporary name (``.part-<...>.parquet.inprogress``) and
appears under its final name (``part-<...>.parquet``) only by an atomic rename once it is
complete, so readers (pyarrow, DuckDB, polars, Spark: they skip names starting with ``.``)
never see a partial file::

    write     rows -> row groups -> .part-a-1.parquet.inprogress   (hidden)
    roll      (size, age, or a checkpoint barrier) footer written, fsync
    publish   rename -> part-a-1.parquet                          (visible, atomic)

**With checkpoints** (exactly-once) a file is published only when the checkpoint that
covers it is stored: :meth:`ParquetSink.pre_commit` rolls every open file and returns
the list of finished but unpublished files; :meth:`ParquetSink.commit` renames them.  A
restart from a checkpoint first publishes what that checkpoint listed (a crash between
storing it and renaming lost nothing), then deletes every other temporary file of this
sink (rows after the checkpoint, which the replay writes again).

**Without checkpoints** (at-least-once) a file is published when it rolls (it reaches
``max_file_bytes``, or is older than ``max_file_age`` at a write) and at ``close``; a
crash loses the unpublished files' rows unless the source replays them.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sluiceway.connectors.lakehouse.arrow import RecordsToArrow, import_extra
from sluiceway.core.contract import PartialWriteError, Sink, SinkContext
from sluiceway.core.messages import Batch
from sluiceway.errors import CheckpointError, short_repr

__all__ = ["Parquet", "ParquetSink", "compact", "hive_dir", "split_partitions"]

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_TMP_SUFFIX = ".inprogress"
_COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


def hive_dir(names: Sequence[str], values: Sequence[Any]) -> str:
    """The relative directory of a partition, ``name=value/...`` (values URL-quoted).

    >>> hive_dir(["country", "day"], ["F/R", None])
    'country=F%2FR/day=__HIVE_DEFAULT_PARTITION__'
    """
    return "/".join(
        f"{n}={HIVE_NULL if v is None else quote(str(v), safe='')}"
        for n, v in zip(names, values, strict=True)
    )


def split_partitions(
    table: Any, by: Sequence[str], *, keep: bool = False
) -> list[tuple[tuple[Any, ...], Any]]:
    """``table``'s rows grouped by the values of the columns ``by``: (values, rows without
    those columns unless ``keep``), in order of first appearance."""
    if not by:
        return [((), table)]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in by), strict=True)):
        groups.setdefault(key, []).append(i)
    rest = table if keep else table.drop_columns(list(by))
    if len(groups) == 1:
        return [(next(iter(groups)), rest)]
    return [(key, rest.take(idx)) for key, idx in groups.items()]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


@dataclass(slots=True)
class _OpenFile:
    writer: Any
    tmp: str  # relative to the root
    final: str
    opened_at: float
    buffered: list[Any] = field(default_factory=list)
    rows: int = 0


class ParquetSink(Sink):
    """Writes records into Parquet files under a directory (``sw.sinks.Parquet``).

    Args:
        path: the dataset's root directory (created if missing).
        schema: a ``pyarrow.Schema`` (or a list of ``(name, type)``); default: inferred
            from the first batch.  A record that does not fit it goes to the sink's
            ``on_error=`` policy.
        partition_by: fields whose values name the Hive-style directories; they are not
            stored in the files (readers take them from the path).
        compression: ``"zstd"`` (default), ``"snappy"``, ``"gzip"``, ``"brotli"``,
            ``"lz4"`` or ``"none"``.
        max_file_bytes: roll a file once it is this big.
        max_file_age: seconds; roll a file older than this at the next write (checkpoints
            also roll every file).  None: only by size, at checkpoints and at close.
        row_group_rows: rows buffered per file before they are written as a row group.
        transform: turns a record into a dict before conversion.

    Raises:
        ValueError: a bad argument.
    """

    exactly_once = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        schema: Any = None,
        partition_by: Sequence[str] = (),
        compression: str = "zstd",
        max_file_bytes: int = 128 * 1024 * 1024,
        max_file_age: float | None = 300.0,
        row_group_rows: int = 64 * 1024,
        transform: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> None:
        self._root = os.fspath(path)
        what = self.describe()
        if compression not in _COMPRESSIONS:
            raise ValueError(
                f"{what} compression must be one of {_COMPRESSIONS}, got {compression!r}"
            )
        for name, value in (("max_file_bytes", max_file_bytes), ("row_group_rows", row_group_rows)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} {name} must be an int >= 1, got {value!r}")
        if max_file_age is not None and not (
            isinstance(max_file_age, int | float) and 0 < max_file_age < math.inf
        ):
            raise ValueError(
                f"{what} max_file_age must be a finite number > 0 seconds or None (no age "
                f"limit), got {max_file_age!r}"
            )
        if isinstance(partition_by, str):
            partition_by = [partition_by]
        self._pq = import_extra("pyarrow.parquet", "parquet", what)
        self._conv = RecordsToArrow(schema, transform, what)
        self._partition_by = list(partition_by)
        if self._conv.schema is not None:
            missing = [c for c in self._partition_by if c not in self._conv.schema.names]
            if missing:
                raise ValueError(f"{what} partition_by {missing} are not fields of the schema")
        self._compression = compression
        self._max_bytes = max_file_bytes
        self._max_age = None if max_file_age is None else float(max_file_age)
        self._row_group = row_group_rows
        self._ctx: SinkContext | None = None
        self._files: dict[tuple[Any, ...], _OpenFile] = {}
        self._closed: list[tuple[str, str]] = []  # finished, not yet in a checkpoint
        self._pending: list[tuple[str, str]] = []  # in a checkpoint, not yet published
        self._restore_to: list[tuple[str, str]] | None = None
        self._prefix = ""
        self._seq = 0

    # -- lifecycle ---------------------------------------------------------------------

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint that listed ``{"pending": [[tmp, final], ...]}``."""
        pending = state.get("pending") if isinstance(state, dict) else None
        if not isinstance(pending, list):
            raise CheckpointError(
                f"{self.describe()}: checkpoint state must be {{'pending': [...]}}, got "
                f"{short_repr(state)}"
            )
        self._restore_to = [(str(t), str(f)) for t, f in pending]

    async def open(self, ctx: SinkContext) -> None:
        """Create the root; publish what the restored checkpoint listed; delete this
        sink's other temporary files (rows after the checkpoint, or of a failed run)."""
        self._ctx = ctx
        tag = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{ctx.flow}-{ctx.name}")
        self._prefix = f".part-{tag}-"
        self._run = uuid.uuid4().hex[:12]
        os.makedirs(self._root, exist_ok=True)
        for tmp, final in self._restore_to or ():
            self._publish(tmp, final, restoring=True)
        self._restore_to = None
        for folder, _, names in os.walk(self._root):
            for name in names:
                if name.startswith(self._prefix) and name.endswith(_TMP_SUFFIX):
                    os.remove(os.path.join(folder, name))

    async def close(self) -> None:
        """Without checkpoints: publish every open file.  With checkpoints: drop the
        files no checkpoint lists (a restart writes their rows again)."""
        ctx, files = self._ctx, list(self._files.values())
        self._files.clear()
        if ctx is None:
            return
        for f in files:
            if ctx.checkpointing:
                f.writer.close()
                self._closed.append((f.tmp, f.final))
            else:
                self._finish(f)
        for tmp, _ in self._closed:
            _remove(os.path.join(self._root, tmp))
        self._closed.clear()

    # -- writing -----------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Convert ``batch`` and add its rows to the open files (rolling full ones).

        Raises:
            PartialWriteError: record ``written`` does not fit the schema; the records
                before it are written.
        """
        table, bad = self._conv.convert(batch.values)
        if table.num_rows:
            self._add(table)
        if self._max_age is not None and self._ctx is not None:
            now = self._ctx.clock.monotonic()
            for key, f in list(self._files.items()):
                if now - f.opened_at >= self._max_age:
                    del self._files[key]
                    self._finish(f)
        if bad is not None:
            raise PartialWriteError(table.num_rows, bad) from bad

    def _add(self, table: Any) -> None:
        if self._partition_by and not self._files and self._seq == 0:
            missing = [c for c in self._partition_by if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"{self.describe()} partition_by {missing} are not fields of the records "
                    f"(schema: {table.schema.names})"
                )
        for key, part in split_partitions(table, self._partition_by):
            f = self._files.get(key)
            if f is None:
                f = self._files[key] = self._new_file(key, part.schema)
            f.buffered.append(part)
            f.rows += part.num_rows
            if f.rows >= self._row_group:
                self._flush(f)
                if os.path.getsize(os.path.join(self._root, f.tmp)) >= self._max_bytes:
                    del self._files[key]
                    self._finish(f)

    def _new_file(self, key: tuple[Any, ...], schema: Any) -> _OpenFile:
        assert self._ctx is not None
        folder = hive_dir(self._partition_by, key) if key else ""
        os.makedirs(os.path.join(self._root, folder), exist_ok=True)
        self._seq += 1
        name = f"part-{self._prefix[6:]}{self._run}-{self._seq:06d}.parquet"
        final = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{name}{_TMP_SUFFIX}")
        compression = None if self._compression == "none" else self._compression
        writer = self._pq.ParquetWriter(
            os.path.join(self._root, tmp), schema, compression=compression
        )
        return _OpenFile(writer, tmp, final, self._ctx.clock.monotonic())

    def _flush(self, f: _OpenFile) -> None:
        if f.buffered:
            pa = self._conv.pa
            table = f.buffered[0] if len(f.buffered) == 1 else pa.concat_tables(f.buffered)
            f.writer.write_table(table, row_group_size=max(self._row_group, table.num_rows))
            f.buffered.clear()
            f.rows = 0

    def _finish(self, f: _OpenFile) -> None:
        """Write the footer and fsync; publish now, or at the next checkpoint's commit."""
        self._flush(f)
        f.writer.close()
        _fsync(os.path.join(self._root, f.tmp))
        assert self._ctx is not None
        if self._ctx.checkpointing:
            self._closed.append((f.tmp, f.final))
        else:
            self._publish(f.tmp, f.final)

    def _publish(self, tmp: str, final: str, *, restoring: bool = False) -> None:
        src, dst = os.path.join(self._root, tmp), os.path.join(self._root, final)
        if os.path.exists(src):
            os.replace(src, dst)
            _fsync(os.path.dirname(dst) or ".")
        elif not os.path.exists(dst) and restoring:
            raise CheckpointError(
                f"{self.describe()}: the checkpoint lists {tmp!r}, but neither it nor "
                f"{final!r} exists; was the directory changed by hand?"
            )

    # -- checkpoints -------------------------------------------------------------------

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """Roll every open file (footer, fsync); the checkpoint lists every finished file
        not yet published."""
        for f in list(self._files.values()):
            self._finish(f)
        self._files.clear()
        self._pending.extend(self._closed)
        self._closed.clear()
        return {"pending": [list(p) for p in self._pending]}

    async def commit(self, checkpoint_id: int, state: Any) -> None:
        """The checkpoint is stored: publish (rename) the files it lists."""
        listed = [(str(t), str(f)) for t, f in state["pending"]]
        for tmp, final in listed:
            self._publish(tmp, final)
        done = set(listed)
        self._pending = [p for p in self._pending if p not in done]

    def describe(self) -> str:
        """``Parquet(<path>)``."""
        return f"Parquet({self._root})"


def compact(path: str | os.PathLike[str], *, target_file_bytes: int = 128 * 1024 * 1024) -> int:
    """Merge the small published files of each partition directory under ``path`` into
    one file per directory (files of ``target_file_bytes`` or more are left alone).

    Per directory: write the merged file hidden, fsync; write a journal
    ``_sluiceway_compaction.json`` naming it and the files it replaces; publish it
    (rename); delete the old files; delete the journal.  A run that died half-way is
    finished by the next call (from the journal), so rows end up once.  While it runs,
    a reader listing the directory between the rename and the deletes sees those rows
    twice: compact when nothing reads.  A sink may keep writing (only files present
    when the directory is visited are merged).  Returns the number of files replaced.
    """
    pq = import_extra("pyarrow.parquet", "parquet", "compact")
    replaced = 0
    for folder, dirs, _ in os.walk(os.fspath(path)):
        dirs.sort()
        journal = os.path.join(folder, "_sluiceway_compaction.json")
        if os.path.exists(journal):
            _finish_compaction(folder, journal)
        small = sorted(
            n
            for n in os.listdir(folder)
            if n.endswith(".parquet")
            and not n.startswith((".", "_"))
            and os.path.getsize(os.path.join(folder, n)) < target_file_bytes
        )
        if len(small) < 2:
            continue
        name = f"part-compacted-{uuid.uuid4().hex}.parquet"
        tmp = os.path.join(folder, f".{name}{_TMP_SUFFIX}")
        data = pq.ParquetDataset([os.path.join(folder, n) for n in small]).read()
        pq.write_table(data, tmp, compression="zstd")
        _fsync(tmp)
        with open(journal, "w", encoding="utf-8") as f:
            json.dump({"tmp": os.path.basename(tmp), "final": name, "old": small}, f)
            f.flush()
            os.fsync(f.fileno())
        _finish_compaction(folder, journal)
        replaced += len(small)
    return replaced


def _finish_compaction(folder: str, journal: str) -> None:
    with open(journal, encoding="utf-8") as f:
        plan = json.load(f)
    tmp, final = os.path.join(folder, plan["tmp"]), os.path.join(folder, plan["final"])
    if os.path.exists(tmp):
        os.replace(tmp, final)
    if os.path.exists(final):
        for old in plan["old"]:
            _remove(os.path.join(folder, old))
    _fsync(folder)
    os.remove(journal)


Parquet = ParquetSink
"""The name ``sw.sinks.Parquet`` resolves to."""
