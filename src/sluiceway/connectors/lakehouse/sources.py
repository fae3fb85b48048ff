"""Bounded sources over lakehouse tables: a Parquet dataset, a Delta table, an Iceberg table.

Each reads the table *as it was* when the flow first opened it -- a Delta version, an
Iceberg snapshot, the Parquet files then present -- in a fixed order, and hands out its
rows as dicts (partition columns included), then ends.  Use one to backfill before
switching a flow to a live broker.

The position (stored in every checkpoint) is the pinned version or snapshot and the
number of rows handed out::

    {"pin": 7, "rows": 120000}     resume: read version 7 again, skip 120000 rows

Parquet and Delta skip whole files by their row counts (from the footers); Iceberg
re-reads the skipped rows without handing them out.  A Parquet dataset is not
versioned: its pin is the number of files, and a resume fails if the files changed.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

from sluiceway.connectors.lakehouse.arrow import import_extra
from sluiceway.connectors.lakehouse.iceberg import load_catalog
from sluiceway.core.contract import Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.errors import CheckpointError, short_repr

__all__ = ["DeltaSource", "IcebergSource", "ParquetSource"]

_READ_ROWS = 64 * 1024


class _TableSource(Source):
    """Rows of a pinned table state, in a fixed order, resumable by row count."""

    _extra = "parquet"

    def __init__(self, batch_rows: int) -> None:
        if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
            raise ValueError(
                f"{self.describe()} batch_rows must be an int >= 1, got {batch_rows!r}"
            )
        self._batch_rows = batch_rows
        self._pin: Any = None
        self._rows = 0
        self._total: int | None = None
        self._resume: dict[str, Any] | None = None
        self._batches: Iterator[Any] | None = None
        self._pending: list[Any] = []

    @abstractmethod
    def _pin_now(self) -> Any:
        """The table's current version (or snapshot, or file count)."""

    @abstractmethod
    def _read(self, pin: Any, skip: int) -> Iterator[Any]:
        """Record batches of the table at ``pin``, after the first ``skip`` rows."""

    def restore(self, position: Any) -> None:
        """Resume from ``{"pin": ..., "rows": n}``: the same table state, after n rows."""
        if not (isinstance(position, dict) and isinstance(position.get("rows"), int)):
            raise CheckpointError(
                f"{self.describe()}: position must be {{'pin': ..., 'rows': int}}, got "
                f"{short_repr(position)}"
            )
        self._resume = position

    async def open(self, ctx: SourceContext) -> None:
        """Pin the table state (or take the restored one) and start reading."""
        skip = 0
        if self._resume is not None:
            self._pin, skip = self._resume.get("pin"), int(self._resume["rows"])
        else:
            self._pin = self._pin_now()
        self._rows = skip
        self._batches = self._read(self._pin, skip)

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` rows as dicts, or None once every row was handed out."""
        if self._batches is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        while not self._pending:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._pending = batch.to_pylist()
        values, self._pending = self._pending[:max_records], self._pending[max_records:]
        self._rows += len(values)
        return Batch(values)

    def position(self) -> dict[str, Any]:
        """``{"pin": <version>, "rows": <rows handed out>}``."""
        return {"pin": self._pin, "rows": self._rows}

    def backlog(self) -> int | None:
        """Rows not yet handed out (when the table's row count is known)."""
        return None if self._total is None else max(0, self._total - self._rows)

    def _fragments(self, dataset: Any, skip: int) -> Iterator[Any]:
        """The batches of a pyarrow dataset's files in path order, after ``skip`` rows
        (whole files skipped by their row counts)."""
        pads = import_extra("pyarrow.dataset", self._extra, self.describe())
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
        counts = [f.count_rows() for f in fragments]
        self._total = sum(counts)
        if skip > self._total:
            raise CheckpointError(
                f"{self.describe()}: the checkpoint read {skip} rows, but the table has "
                f"{self._total}; did it change?"
            )
        for fragment, count in zip(fragments, counts, strict=True):
            if skip >= count:
                skip -= count
                continue
            scanner = pads.Scanner.from_fragment(
                fragment, schema=dataset.schema, batch_size=self._batch_rows
            )
            for batch in scanner.to_batches():
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                yield batch.slice(skip)
                skip = 0


class ParquetSource(_TableSource):
    """Reads a (Hive-partitioned) Parquet dataset once (``sw.sources.Parquet``).

    Args:
        path: the dataset's root directory (or one file).
        batch_rows: rows read at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, batch_rows: int = _READ_ROWS) -> None:
        self._path = os.fspath(path)
        self._ds = import_extra("pyarrow.dataset", "parquet", self.describe())
        super().__init__(batch_rows)

    def _dataset(self) -> Any:
        return self._ds.dataset(self._path, format="parquet", partitioning="hive")

    def _pin_now(self) -> Any:
        return len(self._dataset().files)

    def _read(self, pin: Any, skip: int) -> Iterator[Any]:
        dataset = self._dataset()
        if pin is not None and len(dataset.files) != pin:
            raise CheckpointError(
                f"{self.describe()}: the checkpoint read a dataset of {pin} files, it now "
                f"has {len(dataset.files)}; a Parquet dataset must not change while it is "
                "read (a Delta or Iceberg table can: their sources pin a version)"
            )
        return self._fragments(dataset, skip)

    def describe(self) -> str:
        """``Parquet(<path>)``."""
        return f"Parquet({self._path})"


class DeltaSource(_TableSource):
    """Reads one version of a Delta table (``sw.sources.Delta``).

    Args:
        table_uri: the table.
        version: the version to read; default: the latest when the flow first opens it.
        batch_rows: rows read at a time.
    """

    _extra = "delta"

    def __init__(
        self,
        table_uri: str | os.PathLike[str],
        *,
        version: int | None = None,
        batch_rows: int = _READ_ROWS,
    ) -> None:
        self._uri = os.fspath(table_uri)
        self._dl = import_extra("deltalake", "delta", self.describe())
        self._version = version
        super().__init__(batch_rows)

    def _pin_now(self) -> Any:
        if self._version is not None:
            return self._version
        return self._dl.DeltaTable(self._uri).version()

    def _read(self, pin: Any, skip: int) -> Iterator[Any]:
        table = self._dl.DeltaTable(self._uri, version=pin)
        return self._fragments(table.to_pyarrow_dataset(), skip)

    def describe(self) -> str:
        """``Delta(<table_uri>)``."""
        return f"Delta({self._uri})"


class IcebergSource(_TableSource):
    """Reads one snapshot of an Iceberg table (``sw.sources.Iceberg``).

    Args:
        table: ``namespace.name``.
        catalog: a pyiceberg ``Catalog`` or its properties.
        catalog_name: the name given to ``load_catalog``.
        snapshot_id: the snapshot to read; default: the current one when the flow first
            opens it.
        batch_rows: rows read at a time (pyiceberg's own batches are cut to this).
    """

    _extra = "iceberg"

    def __init__(
        self,
        table: str,
        *,
        catalog: Any,
        catalog_name: str = "default",
        snapshot_id: int | None = None,
        batch_rows: int = _READ_ROWS,
    ) -> None:
        self._name = table
        import_extra("pyiceberg", "iceberg", self.describe())
        self._catalog = load_catalog(catalog, catalog_name)
        self._snapshot = snapshot_id
        super().__init__(batch_rows)

    def _pin_now(self) -> Any:
        if self._snapshot is not None:
            return self._snapshot
        current = self._catalog.load_table(self._name).current_snapshot()
        return None if current is None else current.snapshot_id

    def _read(self, pin: Any, skip: int) -> Iterator[Any]:
        if pin is None:  # an empty table: no snapshot yet
            return
        scan = self._catalog.load_table(self._name).scan(snapshot_id=pin)
        for batch in scan.to_arrow_batch_reader():
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            rest, skip = batch.slice(skip), 0
            for start in range(0, rest.num_rows, self._batch_rows):
                yield rest.slice(start, self._batch_rows)

    def describe(self) -> str:
        """``Iceberg(<namespace.name>)``."""
        return f"Iceberg({self._name})"
