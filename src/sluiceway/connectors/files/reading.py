r"""Reading and following files: what the file sources share, and the JSON Lines source.

The sources read the file in binary chunks and track the byte offset of the next line
they have not handed out, so :meth:`~JsonLinesSource.position` is exact and
``resume_from=position`` restarts right there::

    events.jsonl   {"id": 1}\n   \n   {"id": 2}\n   {"id":
    offset         0             10   11            21      (no newline yet)
    next_batch(9)  [{"id": 1}, {"id": 2}]  -> position {"offset": 21, "line": 3}
    follow=True:   the partial line waits for its newline, polling on the flow's clock

A malformed line is *bad input* naming ``path:line``.  Under the default ``Fail()``
policy the flow stops, and the source's position points *at* the bad line (the good
records before it are delivered first), so a fixed file can be resumed from there.
Under ``flow.source(src, on_error=sw.DeadLetter(sink))`` the line becomes a
:class:`~sluiceway.policies.DeadLetterRecord` and reading goes on.

A source never holds good records while it reports a bad line: it returns them first
and reports the bad line on the next call.  So a stop (which may cancel the source
while it waits) can never lose a record; a dead letter whose write was cancelled half
way is reported again on resume (at least once).

Files are read and written with plain blocking calls, in chunks of 64 KiB: local files
answer in microseconds, and asyncio offers no non-blocking file I/O.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import IO, Any, Final, TypeGuard

from sluiceway.connectors.files.lines import CHUNK as _CHUNK
from sluiceway.connectors.files.lines import LineBuffer, LineTooLongError
from sluiceway.core.contract import Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.errors import BadInputError, short_repr
from sluiceway.time.clock import yield_now

__all__ = ["DEFAULT_MAX_LINE_BYTES", "JsonLinesSource"]

log = logging.getLogger("sluiceway")


# -- helpers shared by the sources ---------------------------------------------------


def _check_encoding(encoding: str, what: str) -> str:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"{what}: unknown encoding {encoding!r}; try 'utf-8'") from None
    if "\n".encode(encoding) != b"\n":
        raise ValueError(
            f"{what} splits lines on the byte b'\\n', so the encoding must be ASCII-compatible "
            f"(e.g. 'utf-8', 'latin-1'), got {encoding!r}"
        )
    return encoding


@dataclasses.dataclass(frozen=True, slots=True)
class _Start:
    """Where a file source starts: a :meth:`position` checked."""

    offset: int = 0
    line: int = 0
    unterminated: bool = False
    """The offset is the end of a last line that was read without its newline."""


def _check_resume(resume_from: Mapping[str, int] | None, what: str) -> _Start:
    if resume_from is None:
        return _Start()
    if isinstance(resume_from, Mapping):
        offset, line = resume_from.get("offset"), resume_from.get("line", 0)
        loose = resume_from.get("unterminated", False)
        if _is_count(offset) and _is_count(line) and isinstance(loose, bool):
            return _Start(offset, line, loose)
    raise ValueError(
        f"{what} resume_from must be a dict returned by position(), like "
        f"{{'offset': 1024, 'line': 10}}, got {short_repr(resume_from)}"
    )


def _position(lines: LineBuffer, loose_start: int) -> dict[str, int]:
    """A source's position; ``loose_start``: the offset it started at if that was after
    a last line without its newline (else 0)."""
    if lines.unterminated or lines.offset == loose_start != 0:
        return {"offset": lines.offset, "line": lines.line, "unterminated": True}
    return {"offset": lines.offset, "line": lines.line}


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open_at(path: str, start: _Start, what: str) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading at ``start``; returns the file and where to read from.

    A position is the start of a line -- or the end of a last line that was read at the
    end of the file without its newline.  In that case reading goes on at the end, or
    just after that line's newline if it was added since.
    """
    offset = start.offset
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the source's close()
    try:
        if offset:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                raise ValueError(
                    f"{what}: cannot resume {path} at byte {offset}: the file has only {size} "
                    "bytes (it was truncated or replaced since the position was taken)"
                )
            f.seek(offset - 1)
            before, after = f.read(1), f.read(1)
            if before != b"\n" and after:  # at the end of the file is fine: nothing to read
                if after == b"\n" and start.unterminated:
                    offset += 1  # the last line, read without its newline, got it since
                else:
                    raise ValueError(
                        f"{what}: cannot resume {path} at byte {offset}: that is not the "
                        "start of a line (the file changed since the position was taken)"
                    )
            f.seek(offset)
    except BaseException:
        f.close()
        raise
    return f, offset


class _Busy:
    """What :func:`_pull_line` returns when it read its budget without finding a line."""


_BUSY: Final = _Busy()
_READ_BUDGET: Final = 16 * _CHUNK
"""Bytes a source reads in one go before it lets the event loop run other tasks."""

DEFAULT_MAX_LINE_BYTES: Final = 10 * 1024 * 1024
"""The longest line the file sources accept by default: 10 MiB without its newline (as
Filebeat's ``max_bytes``).  Longer lines are bad input; see ``max_line_bytes``."""


def _pull_line(
    lines: LineBuffer, f: IO[bytes], *, follow: bool, budget: int | None = None
) -> bytes | _Busy | None:
    """The next complete line, reading more of ``f`` as needed; None when there is none.

    With ``follow`` the end of the file is not the end of the input: a partial last line
    stays in the buffer until its newline arrives.  With a ``budget``, returns
    :data:`_BUSY` after reading that many bytes without completing a line, so that the
    caller can let other tasks run before it asks again.

    Raises:
        LineTooLongError: the next line is longer than ``lines.max_line``.
    """
    read = 0
    while True:
        line = lines.next_line()
        if line is not None or lines.eof:
            return line
        if budget is not None and read >= budget:
            return _BUSY
        data = f.read(_CHUNK)
        if data:
            read += len(data)
            lines.feed(data)
        elif follow:
            return None
        else:
            lines.feed_eof()


def _fill(lines: LineBuffer, f: IO[bytes], budget: int) -> bool:
    """Read until a line is ready in ``lines`` (or the file ends); False if the budget
    ran out first."""
    read = 0
    while not lines.has_line():
        if read >= budget:
            return False
        data = f.read(_CHUNK)
        if data:
            read += len(data)
            lines.feed(data)
        else:
            lines.feed_eof()
    return True


def _check_max_line(value: object, what: str) -> int | None:
    if value is None:
        return None
    if not _is_count(value) or value < 1:
        raise ValueError(
            f"{what} max_line_bytes must be a whole number of bytes >= 1 (or None for no "
            f"limit), got {value!r}"
        )
    return value


def _too_long(exc: LineTooLongError, encoding: str) -> tuple[str, str]:
    """The dead-letter text (the line's head) and the reason for an over-long line."""
    shown = exc.head.decode(encoding, "backslashreplace")
    more = "" if exc.complete else " so far"
    return shown + "...", (
        f"line too long: {exc.length:,} bytes{more}, the limit is {exc.limit:,} "
        f"(max_line_bytes); the line is skipped up to its newline (only its first "
        f"{len(exc.head):,} bytes are kept here); raise max_line_bytes if such lines "
        "are expected"
    )


def _strip_eol(text: str) -> str:
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    return text


def _decode(raw: bytes, encoding: str) -> tuple[str, str | None]:
    """``(text without its line end, problem or None)``; bad bytes are shown escaped."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        shown = _strip_eol(raw.decode(encoding, "backslashreplace"))
        return shown, (
            f"cannot decode as {encoding} ({exc.reason} at byte {exc.start} of the line); "
            "pass encoding=... if the file uses another encoding"
        )
    return _strip_eol(text), None


def _hint(ctx: SourceContext) -> str:
    if not ctx.fails_on_bad_input:
        return ""
    return (
        "; fix the input, or set bad records aside with "
        "flow.source(..., on_error=sw.DeadLetter(sink))"
    )


async def _report(ctx: SourceContext, where: str, raw: object, reason: str) -> None:
    await ctx.bad_input(BadInputError(where=where, raw=raw, reason=reason + _hint(ctx)))


def _not_open(what: str) -> RuntimeError:
    return RuntimeError(f"{what} is not open: the runtime calls open() before next_batch()")


# -- JSON Lines ----------------------------------------------------------------------


def _unread(f: IO[bytes] | None, offset: int) -> int | None:
    if f is None or f.closed:
        return None
    return max(0, os.fstat(f.fileno()).st_size - offset)


class JsonLinesSource(Source):
    r"""Records from a JSON Lines file: one JSON value per line (``sw.sources.JsonLines``).

    Blank lines are skipped.  A last line without a newline is read at the end of the
    file -- except with ``follow=True``, where it is incomplete until its newline comes.

    A line longer than ``max_line_bytes`` is bad input naming ``path:line`` (a dead
    letter holding its first KiB, or the flow stops, as ``on_error`` says); it is never
    held in memory whole.  Reading a long line lets other tasks run every 1 MiB.

    With ``follow``, a file that is **truncated** (it becomes shorter than what was read,
    or the bytes before the position change) or **replaced** (rotated: the path names a
    new file, once the old one is read to its end) is read again from its new beginning,
    with a WARNING on the ``sluiceway`` logger.  A line that was still waiting for its
    newline then is bad input ("incomplete"), never joined to the new file's bytes.

    Args:
        path: the file to read.
        follow: keep reading as the file grows (like ``tail -F``) instead of ending at
            its end; the flow then runs until stopped.
        poll_interval: with ``follow``, seconds to wait (on the flow's clock) before
            looking for new lines again.
        encoding: the text encoding of the file (ASCII-compatible).
        resume_from: a :meth:`position` taken earlier: start reading there.
        max_line_bytes: the longest line accepted, in bytes without its newline
            (default :data:`DEFAULT_MAX_LINE_BYTES`, 10 MiB; None: no limit).

    Raises:
        ValueError: a bad argument (non-positive ``poll_interval`` or ``max_line_bytes``,
            unknown or not ASCII-compatible encoding, malformed ``resume_from``); at
            ``open``, a ``resume_from`` that does not fit the file any more.
        OSError: at ``open``, the file cannot be opened (e.g. ``FileNotFoundError``).

    >>> import os, tempfile, sluiceway as sw
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "events.jsonl")
    ...     with open(path, "w") as f:
    ...         _ = f.write('{"id": 1}\n\n{"id": 2}')
    ...     sw.testing.run_collect(lambda s: s, sw.sources.JsonLines(path))
    [{'id': 1}, {'id': 2}]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        follow: bool = False,
        poll_interval: float = 0.25,
        encoding: str = "utf-8",
        resume_from: Mapping[str, int] | None = None,
        max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        what = "sources.JsonLines"
        if not (isinstance(poll_interval, int | float) and 0 < poll_interval < math.inf):
            raise ValueError(
                f"{what} poll_interval must be a finite number > 0 seconds, got {poll_interval!r}"
            )
        self._path = os.fspath(path)
        self._follow = bool(follow)
        self._poll_interval = float(poll_interval)
        self._encoding = _check_encoding(encoding, what)
        self._max_line = _check_max_line(max_line_bytes, what)
        self._resume_from = _check_resume(resume_from, what)
        self._restored: _Start | None = None
        self._lines = LineBuffer(
            self._resume_from.offset, self._resume_from.line, max_line=self._max_line
        )
        self._file: IO[bytes] | None = None
        self._ctx: SourceContext | None = None
        self._loose_start = 0
        self._tail = (0, b"")  # (offset, the bytes read just before it)
        self._at_end = False  # followed and at the end: check for a truncation first

    async def open(self, ctx: SourceContext) -> None:
        """Open the file at the start (or at ``resume_from``, or at the restored position).

        A restored position is used for this run only: a later run without a checkpoint
        starts again where the constructor said.

        Raises:
            OSError: the file cannot be opened.
            ValueError: ``resume_from`` is past the end or not at the start of a line.
        """
        start = self._restored or self._resume_from
        self._restored = None
        self._file, offset = _open_at(self._path, start, "sources.JsonLines")
        self._lines = LineBuffer(offset, start.line, max_line=self._max_line)
        self._ctx = ctx
        # A start after a last line that has no newline (yet): not a sign of a rewrite.
        self._loose_start = offset if offset and _byte_before(self._file, offset) else 0
        self._tail = (0, b"")
        self._at_end = False

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` parsed lines that are in the file now.

        Returns None at the end of the file (never with ``follow=True``).  With
        ``follow``, when nothing is there yet, waits ``poll_interval`` on the flow's clock
        and looks again; cancelling that wait loses nothing.

        Raises:
            OperatorError: (from the runtime, under the ``Fail`` policy) a line is not
                valid JSON, not valid text or too long; :meth:`position` then points at it.
        """
        f, ctx, lines = self._file, self._ctx, self._lines
        if f is None or ctx is None:
            raise _not_open(self.describe())
        records: list[Any] = []
        while len(records) < max_records:
            if self._at_end and not records:  # followed: check the file before reading on
                f, lines = await self._reopened(ctx, f, lines)
            try:
                raw = _pull_line(lines, f, follow=self._follow, budget=_READ_BUDGET)
            except LineTooLongError as exc:
                if records:  # hand out the good ones first; report this line next time
                    lines.rollback()
                    break
                shown, reason = _too_long(exc, self._encoding)
                await _report(ctx, f"{self._path}:{lines.line + 1}", shown, reason)
                lines.skip_line()
                continue
            if isinstance(raw, _Busy):
                if records:
                    break
                await yield_now()  # a long line: let the other tasks run meanwhile
                continue
            if raw is None:
                self._at_end = self._follow
                if records:
                    break
                if lines.eof:
                    return None
                await ctx.clock.sleep(self._poll_interval)
                continue
            text, problem = _decode(raw, self._encoding)
            if problem is None:
                if lines.line == 0 and text.startswith("\ufeff"):
                    text = text[1:]  # a byte-order mark some editors write
                if not text.strip():
                    lines.commit()
                    continue
                try:
                    records.append(json.loads(text))
                except (ValueError, RecursionError) as exc:
                    problem = _json_problem(exc)
                else:
                    lines.commit()
                    continue
            if records:  # hand out the good ones first; report this line next time
                lines.rollback()
                break
            await _report(ctx, f"{self._path}:{lines.line + 1}", text, problem)
            lines.commit()
        return Batch(records)

    async def _reopened(
        self, ctx: SourceContext, f: IO[bytes], lines: LineBuffer
    ) -> tuple[IO[bytes], LineBuffer]:
        """With ``follow``, before reading on after the end of the file: if it was
        truncated or replaced meanwhile, go on at its new content's beginning.  A partial
        line held then is reported as bad input first.  Returns the file and buffer to
        read on with."""
        self._at_end = False
        tail = lines.tail(_TAIL)
        if tail:  # the bytes read last, to notice a file rewritten past the position
            self._tail = (lines.offset, tail)
        seen = self._tail[1] if self._tail[0] == lines.offset else b""
        what = _replaced(self._path, f, lines.offset, seen)
        if what is None:
            return f, lines
        new = _open_new(self._path) if "replaced" in what else None
        if "replaced" in what and new is None:
            return f, lines  # gone again: look next time
        partial = lines.partial()
        if partial:
            shown = partial.decode(self._encoding, "backslashreplace")
            await _report(
                ctx,
                f"{self._path}:{lines.line + 1}",
                shown,
                f"incomplete line: the file {what} before this line got its newline",
            )
        log.warning(
            "sources.JsonLines: %s %s; reading it again from its beginning (%d lines had "
            "been read)",
            self._path,
            what,
            lines.line,
        )
        if new is not None:
            f.close()
            f = self._file = new  # closed in close()
        else:
            f.seek(0)
        self._lines = LineBuffer(max_line=self._max_line)
        self._loose_start = 0
        self._tail = (0, b"")
        return f, self._lines

    def position(self) -> dict[str, int]:
        """``{"offset": byte offset, "line": lines before it}`` of the next line to read.

        Pass it back as ``resume_from=`` to continue from there.  After a last line read
        without its newline it also holds ``"unterminated": True``: a resume then goes on
        after that line (after its newline, if one was written since).
        """
        return _position(self._lines, self._loose_start)

    def restore(self, position: Any) -> None:
        """Resume at a :meth:`position` (like ``resume_from=``) at the next :meth:`open`."""
        self._restored = _check_resume(position, "sources.JsonLines")

    def backlog(self) -> int | None:
        """Bytes of the file not read yet (None when it is not open)."""
        return _unread(self._file, self._lines.offset)

    async def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        """``JsonLines(<path>)``."""
        return f"JsonLines({self._path})"


def _open_new(path: str) -> IO[bytes] | None:
    """The file now at ``path`` (after a rotation), or None if there is none yet."""
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None


def _byte_before(f: IO[bytes], offset: int) -> bool:
    """True when the byte before ``offset`` is not a line end (a position after a last
    line read without its newline)."""
    return os.pread(f.fileno(), 1, offset - 1) != b"\n"


_TAIL: Final = 64
"""Bytes before a followed file's position compared with what was read there."""


def _replaced(path: str, f: IO[bytes], offset: int, seen: bytes) -> str | None:
    """How a followed file changed under the reader, or None: truncated below what was
    read, rewritten before the position (``seen``: the bytes read just before it), or
    replaced by another file at ``path`` (once the old one is read to its end)."""
    fd = f.fileno()
    st = os.fstat(fd)
    read = f.tell()
    if st.st_size < read:
        return f"was truncated (to {st.st_size} bytes; {read} had been read)"
    if seen and os.pread(fd, len(seen), offset - len(seen)) != seen:
        return "was truncated and written again (the bytes before the position changed)"
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return None  # rotated away, the new file not there yet: keep the old one
    if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) and st.st_size == read:
        return "was replaced by a new file (rotated)"
    return None


def _json_problem(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at column {exc.colno}; each line must be one JSON value"
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply to parse"
    return f"invalid JSON: {exc}"
