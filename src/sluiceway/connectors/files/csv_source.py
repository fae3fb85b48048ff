"""The CSV file source: rows as dicts (a header, or given field names), read and followed
like the JSON Lines source (:mod:`.reading`), a bad row being bad input naming
``path:line``."""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from sluiceway.connectors.files.lines import LineBuffer, LineTooLongError
from sluiceway.connectors.files.reading import (
    _READ_BUDGET,
    DEFAULT_MAX_LINE_BYTES,
    _byte_before,
    _check_encoding,
    _check_max_line,
    _check_resume,
    _fill,
    _not_open,
    _open_at,
    _position,
    _pull_line,
    _report,
    _Start,
    _strip_eol,
    _too_long,
    _unread,
)
from sluiceway.core.contract import Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.errors import short_repr
from sluiceway.time.clock import yield_now

__all__ = ["Csv"]


class _TextLines(Iterator[str]):
    """Feeds decoded lines to ``csv.reader``, noting a line that failed to decode."""

    def __init__(self, f: IO[bytes], lines: LineBuffer, encoding: str) -> None:
        self.f = f
        self.lines = lines
        self.encoding = encoding
        self.decode_error: UnicodeDecodeError | None = None

    def __next__(self) -> str:
        raw = _pull_line(self.lines, self.f, follow=False)
        if raw is None:
            raise StopIteration
        assert isinstance(raw, bytes)  # no budget: never _BUSY
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError as exc:
            if self.decode_error is None:
                self.decode_error = exc
            return raw.decode(self.encoding, "backslashreplace")


class Csv(Source):
    r"""Records from a CSV file, as dicts keyed by the header row (``sw.sources.Csv``).

    Blank lines are skipped; quoted fields may span lines (the row is then named by its
    first line).  A row with the wrong number of fields, or whose conversion fails, is
    bad input naming ``path:line``.

    Args:
        path: the file to read.
        delimiter: the one-character field separator.
        fieldnames: the field names; then the first row is data, not a header.
        convert: per-field conversions of the text value, e.g. ``{"amount": float}``.
        encoding: the text encoding of the file (ASCII-compatible).
        resume_from: a :meth:`position` taken earlier: start reading there.
        max_line_bytes: the longest line accepted, in bytes without its newline
            (default :data:`DEFAULT_MAX_LINE_BYTES`, 10 MiB; None: no limit).  A longer
            line is bad input naming ``path:line``, like a malformed row.

    Raises:
        ValueError: a bad argument; at ``open``, a missing or malformed header (duplicate
            names, undecodable), a ``convert`` key that names no field, or a
            ``resume_from`` that does not fit the file.
        TypeError: a ``convert`` value is not callable.
        OSError: at ``open``, the file cannot be opened.

    >>> import os, tempfile, sluiceway as sw
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "sales.csv")
    ...     with open(path, "w") as f:
    ...         _ = f.write("item,amount\npen,1.5\nink,2\n")
    ...     sw.testing.run_collect(lambda s: s, sw.sources.Csv(path, convert={"amount": float}))
    [{'item': 'pen', 'amount': 1.5}, {'item': 'ink', 'amount': 2.0}]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        delimiter: str = ",",
        fieldnames: Sequence[str] | None = None,
        convert: Mapping[str, Callable[[str], Any]] | None = None,
        encoding: str = "utf-8",
        resume_from: Mapping[str, int] | None = None,
        max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        what = "sources.Csv"
        if not (isinstance(delimiter, str) and len(delimiter) == 1 and delimiter not in "\r\n"):
            raise ValueError(
                f"{what} delimiter must be one character (not a newline), got {delimiter!r}"
            )
        if fieldnames is not None:
            if isinstance(fieldnames, str) or not all(isinstance(n, str) for n in fieldnames):
                raise ValueError(
                    f"{what} fieldnames must be a list of strings, got {short_repr(fieldnames)}"
                )
            fieldnames = _check_names(list(fieldnames), f"{what} fieldnames")
        for name, fn in (convert or {}).items():
            if not callable(fn):
                raise TypeError(
                    f"{what} convert[{name!r}] must be a callable taking the field's text "
                    f"(e.g. float), got {short_repr(fn)}"
                )
        self._path = os.fspath(path)
        self._delimiter = delimiter
        self._fieldnames = fieldnames
        self._convert = dict(convert or {})
        self._encoding = _check_encoding(encoding, what)
        self._max_line = _check_max_line(max_line_bytes, what)
        self._resume_from = _check_resume(resume_from, what)
        self._restored: _Start | None = None
        self._names: list[str] | None = None
        self._lines = LineBuffer(
            self._resume_from.offset, self._resume_from.line, max_line=self._max_line
        )
        self._file: IO[bytes] | None = None
        self._text: _TextLines | None = None
        self._reader: Iterator[list[str]] = iter(())
        self._ctx: SourceContext | None = None
        self._loose_start = 0

    async def open(self, ctx: SourceContext) -> None:
        """Open the file and read its header (at the start, also when resuming).

        Raises:
            OSError: the file cannot be opened.
            ValueError: the header is malformed, ``convert`` names a field the file does
                not have, or ``resume_from`` does not fit the file.
        """
        what = "sources.Csv"
        start = self._restored or self._resume_from
        self._restored = None
        f, offset = _open_at(self._path, start, what)
        line = start.line
        try:
            lines = LineBuffer(offset, line, max_line=self._max_line)
            if self._fieldnames is not None:
                self._names = list(self._fieldnames)
            else:
                if offset:
                    f.seek(0)
                    lines = LineBuffer(max_line=self._max_line)
                self._names = self._read_header(f, lines)
                if offset:
                    if self._names is not None and offset < lines.offset:
                        raise ValueError(
                            f"{what}: cannot resume {self._path} at byte {offset}: that is "
                            "inside the header row"
                        )
                    f.seek(offset)
                    lines = LineBuffer(offset, line, max_line=self._max_line)
            unknown = sorted(set(self._convert) - set(self._names or ()))
            if unknown and self._names is not None:
                raise ValueError(
                    f"{what}: convert names {unknown} but the fields of {self._path} are "
                    f"{self._names}; fix the names in convert="
                )
        except BaseException:
            f.close()
            raise
        self._file, self._lines, self._ctx = f, lines, ctx
        self._loose_start = offset if offset and _byte_before(f, offset) else 0
        self._text = _TextLines(f, lines, self._encoding)
        self._reader = self._new_reader()

    def _new_reader(self) -> Iterator[list[str]]:
        assert self._text is not None
        return csv.reader(self._text, delimiter=self._delimiter)

    def _read_header(self, f: IO[bytes], lines: LineBuffer) -> list[str] | None:
        text = _TextLines(f, lines, self._encoding)
        reader = csv.reader(text, delimiter=self._delimiter)
        where = f"sources.Csv: {self._path}:{lines.line + 1}"
        try:
            row: list[str] = []
            while not row:
                row = next(reader)
        except StopIteration:
            return None  # an empty file: no header, no records
        except csv.Error as exc:
            raise ValueError(
                f"{where}: cannot read the header row: {exc}; fix it or pass fieldnames=[...]"
            ) from None
        except LineTooLongError as exc:
            raise ValueError(
                f"{where}: cannot read the header row: its {exc}; fix it or raise max_line_bytes"
            ) from None
        if text.decode_error is not None:
            raise ValueError(
                f"{where}: the header row is not valid {self._encoding} "
                f"({text.decode_error.reason}); pass encoding=... or fieldnames=[...]"
            )
        lines.commit()
        if row[0].startswith("\ufeff"):
            row[0] = row[0][1:]  # a byte-order mark, as spreadsheet programs write
        return _check_names(row, f"{where}: the header row")

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` rows as dicts; None at the end of the file.

        Raises:
            OperatorError: (from the runtime, under the ``Fail`` policy) a row is
                malformed; :meth:`position` then points at its first line.
        """
        ctx, lines, text, names = self._ctx, self._lines, self._text, self._names
        if ctx is None or text is None:
            raise _not_open(self.describe())
        if names is None:
            return None
        f = self._file
        assert f is not None
        records: list[dict[str, Any]] = []
        while len(records) < max_records:
            if not _fill(lines, f, _READ_BUDGET):  # a long line: let other tasks run
                if records:
                    break
                await yield_now()
                continue
            text.decode_error = None
            problem: str
            try:
                row = next(self._reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self._reader = self._new_reader()
                problem = f"malformed CSV: {exc}"
            except LineTooLongError as exc:
                self._reader = self._new_reader()
                if records:
                    lines.rollback()
                    break
                await self._skip_long_row(ctx, lines, exc)
                continue
            else:
                if not row:  # a blank line
                    lines.commit()
                    continue
                if text.decode_error is not None:
                    problem = (
                        f"cannot decode as {self._encoding} ({text.decode_error.reason}); "
                        "pass encoding=... if the file uses another encoding"
                    )
                else:
                    record, problem = self._make(names, row)
                    if record is not None:
                        records.append(record)
                        lines.commit()
                        continue
            if records:  # hand out the good ones first; report this row next time
                lines.rollback()
                self._reader = self._new_reader()
                break
            raw = _strip_eol(lines.pending().decode(self._encoding, "backslashreplace"))
            await _report(ctx, f"{self._path}:{lines.line + 1}", raw, problem)
            lines.commit()
        return Batch(records) if records else None

    async def _skip_long_row(
        self, ctx: SourceContext, lines: LineBuffer, exc: LineTooLongError
    ) -> None:
        shown, problem = _too_long(exc, self._encoding)
        await _report(ctx, f"{self._path}:{lines.line + 1}", shown, problem)
        lines.commit()  # the row's lines before the long one go with it
        lines.skip_line()

    def _make(self, names: list[str], row: list[str]) -> tuple[dict[str, Any] | None, str]:
        if len(row) != len(names):
            return None, (f"expected {len(names)} fields ({', '.join(names)}), got {len(row)}")
        record: dict[str, Any] = dict(zip(names, row, strict=True))
        for name, fn in self._convert.items():
            try:
                record[name] = fn(record[name])
            except Exception as exc:  # noqa: BLE001 - any conversion failure is bad input
                fn_name = getattr(fn, "__name__", short_repr(fn))
                return None, (
                    f"field {name!r}: {fn_name}({record[name]!r}) failed: "
                    f"{type(exc).__name__}: {exc}"
                )
        return record, ""

    def position(self) -> dict[str, int]:
        """``{"offset": byte offset, "line": lines before it}`` of the next row to read.

        Pass it back as ``resume_from=`` to continue from there (the header is read again
        from the start of the file).
        """
        return _position(self._lines, self._loose_start)

    def restore(self, position: Any) -> None:
        """Resume at a :meth:`position` (like ``resume_from=``) at the next :meth:`open`
        (for that run only)."""
        self._restored = _check_resume(position, "sources.Csv")

    def backlog(self) -> int | None:
        """Bytes of the file not read yet (None when it is not open)."""
        return _unread(self._file, self._lines.offset)

    async def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        """``Csv(<path>)``."""
        return f"Csv({self._path})"


def _check_names(names: list[str], what: str) -> list[str]:
    dups = sorted(n for n, count in Counter(names).items() if count > 1)
    if dups:
        raise ValueError(f"{what} repeats field names {dups}: {names}; every name must be unique")
    if not names:
        raise ValueError(f"{what} names no fields")
    return names
