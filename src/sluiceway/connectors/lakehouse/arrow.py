"""Records to Arrow tables, shared by the Parquet, Delta Lake and Iceberg sinks.

A record is a dict (or whatever ``transform`` turns it into: a dict).  The schema is the
one given, or inferred from the first batch (from its first record's fields and the
values of the batch).  A record *fits* the schema when it is a dict, has no field the
schema lacks, leaves out only nullable fields, and every value converts to its field's
type.  :meth:`RecordsToArrow.convert` returns the Arrow table of the records before the
first that does not fit, and why that one does not: the sink writes the table and raises
:class:`~sluiceway.core.contract.PartialWriteError`, so the sink's ``on_error=`` policy
handles exactly that record (stop naming it, retry, or dead-letter it).

>>> conv = RecordsToArrow(None, None, "sinks.Parquet(out)")
>>> table, bad = conv.convert([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": "x"}])
>>> table.num_rows, conv.schema.names
(2, ['id', 'name'])
>>> print(str(bad).split(": ", 1)[1].split(" (")[0])
record {'id': 'x'} does not fit the schema
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from sluiceway.errors import short_repr

__all__ = ["RecordsToArrow", "import_extra"]


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the {module.split('.', maxsplit=1)[0]!r} library: "
            f"pip install 'sluiceway[{extra}]'"
        ) from exc


def _pa() -> Any:
    return import_extra("pyarrow", "parquet", "the lakehouse connectors")


def as_schema(schema: Any, what: str) -> Any:
    """``schema`` as a ``pyarrow.Schema`` (it may be one, or a list of (name, type))."""
    pa = _pa()
    if schema is None or isinstance(schema, pa.Schema):
        return schema
    try:
        return pa.schema(schema)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise ValueError(
            f"{what} schema must be a pyarrow.Schema or a list of (name, type) pairs, got "
            f"{short_repr(schema)} ({exc})"
        ) from exc


class RecordsToArrow:
    """Converts micro-batches of records into Arrow tables of one fixed schema.

    Args:
        schema: a ``pyarrow.Schema`` (or list of (name, type)); None: infer it from the
            first batch.
        transform: turns a record into a dict before conversion; None: records are dicts.
        what: the sink's description, for error messages.
    """

    def __init__(
        self, schema: Any, transform: Callable[[Any], Mapping[str, Any]] | None, what: str
    ) -> None:
        self.pa = _pa()
        self.schema: Any = as_schema(schema, what)
        self._transform = transform
        self._what = what
        self._names: frozenset[str] = (
            frozenset(self.schema.names) if schema is not None else (frozenset())
        )
        self._required: frozenset[str] = (
            frozenset(f.name for f in self.schema if not f.nullable)
            if schema is not None
            else frozenset()
        )

    def set_schema(self, schema: Any) -> None:
        self.schema = schema
        self._names = frozenset(schema.names)
        self._required = frozenset(f.name for f in schema if not f.nullable)

    def convert(self, values: Sequence[Any]) -> tuple[Any, Exception | None]:
        """The table of the records before the first that does not fit, and why it does
        not (None: every record fits)."""
        pa = self.pa
        if self._transform is not None:
            rows: list[Any] = []
            for value in values:
                try:
                    rows.append(self._transform(value))
                except Exception as exc:  # noqa: BLE001 - pinned to this record
                    return self._convert(rows)[0], self._bad(value, f"transform raised {exc!r}")
            values = rows
        if self.schema is None:
            first = values[0] if values else None
            if not isinstance(first, Mapping) or not first:
                return pa.table({}), self._bad(first, "the first record must be a non-empty dict")
            try:
                self.set_schema(pa.Table.from_pylist(list(values)).schema)
            except (pa.ArrowException, TypeError, ValueError):
                self.set_schema(pa.Table.from_pylist([first]).schema)
        return self._convert(values)

    def _convert(self, values: Sequence[Any]) -> tuple[Any, Exception | None]:
        table = self._fast(values)
        if table is not None:
            return table, None
        pa = self.pa
        for i, value in enumerate(values):
            problem = self._misfit(value)
            if problem is None:
                problem = self._unconvertible(value)
            if problem is not None:
                good = pa.Table.from_pylist(list(values[:i]), schema=self.schema)
                return good, self._bad(value, problem)
        return pa.Table.from_pylist(list(values), schema=self.schema), None

    def _fast(self, values: Sequence[Any]) -> Any:
        """The table when every record fits, found without a Python step per record in
        the common case; None when some record may not fit.

        ``from_pylist`` ignores extra fields and makes a missing one null.  So when the
        records hold as many fields in all as the schema has per record, and no column
        came out null, no record can lack a field, hence none has an extra one either."""
        pa, names = self.pa, self._names
        try:
            table = pa.Table.from_pylist(values, schema=self.schema)
            total = sum(map(len, values))
        except (
            pa.ArrowException,
            TypeError,
            ValueError,
            OverflowError,
            LookupError,
            AttributeError,
        ):
            return None  # some record does not convert: find it
        if total == len(values) * len(names) and not any(c.null_count for c in table.columns):
            return table
        if all(type(v) is dict and v.keys() == names for v in values):
            return table  # nulls, but set explicitly: check each record's fields
        return None

    def _misfit(self, value: Any) -> str | None:
        if not isinstance(value, Mapping):
            return f"a record must be a dict, got {type(value).__name__}; pass transform=..."
        extra = [k for k in value if k not in self._names]
        if extra:
            return f"field {extra[0]!r} is not in the schema; add it to schema= or drop it"
        missing = [k for k in self._required if value.get(k) is None]
        if missing:
            return f"field {missing[0]!r} is not nullable but missing or None"
        return None

    def _unconvertible(self, value: Mapping[str, Any]) -> str | None:
        pa = self.pa
        for f in self.schema:
            try:
                pa.array([value.get(f.name)], type=f.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                return f"field {f.name!r}: {short_repr(value.get(f.name))} is not {f.type} ({exc})"
        return None

    def _bad(self, value: Any, problem: str) -> ValueError:
        fields = ", ".join(f"{f.name}: {f.type}" for f in self.schema) if self.schema else ""
        return ValueError(
            f"{self._what}: record {short_repr(value)} does not fit the schema ({fields}): "
            f"{problem}"
        )
