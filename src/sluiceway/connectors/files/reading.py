r"""File connectors: JSON Lines and CSV sources, a JSON Lines sink.

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
import csv
import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, Final, Literal, TypeGuard

from sluiceway.core.contract import PartialWriteError, Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.errors import BadInputError, CheckpointError, short_repr
from sluiceway.time.clock import yield_now

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "Csv",
    "JsonLinesSink",
    "JsonLinesSource",
    "LineBuffer",
    "LineTooLongError",
    "WriteMode",
]

log = logging.getLogger("sluiceway")

_CHUNK = 64 * 1024

WriteMode = Literal["append", "overwrite"]
"""How :class:`JsonLinesSink` opens an existing file: add to its end, or start empty."""


class LineTooLongError(Exception):
    """A line is longer than the source's ``max_line_bytes`` (raised by :class:`LineBuffer`).

    Attributes:
        length: how many bytes of the line were seen (at least; more may follow).
        limit: the limit it broke.
        head: the line's first bytes, for the message and the dead letter.
        complete: True when the line's end was seen.
    """

    def __init__(self, length: int, limit: int, head: bytes, *, complete: bool) -> None:
        self.length, self.limit, self.head, self.complete = length, limit, head, complete
        more = "" if complete else "+"
        super().__init__(f"line of {length:,}{more} bytes is longer than {limit:,} bytes")


_HEAD = 1024  # bytes of an over-long line kept for its message and dead letter


class LineBuffer:
    r"""Splits a byte stream into lines and tracks the position of the lines taken.

    Reading is tentative: :meth:`next_line` moves a cursor; :meth:`commit` marks every
    line up to the cursor as consumed (that is what :attr:`offset` and :attr:`line`
    report); :meth:`rollback` moves the cursor back, so a source can put back a line it
    has read but decided not to hand out yet.

    The work is linear in the bytes fed, however long a line is: bytes are appended to
    one ``bytearray`` (consumed bytes are dropped only once they are at least half of it),
    and the search for a newline resumes where the previous one stopped.  With
    ``max_line``, a line longer than that raises :class:`LineTooLongError` as soon as
    that many bytes of it are buffered, so memory stays bounded; :meth:`skip_line` then
    drops it, discarding the rest of it as it is fed.

    Args:
        offset: the byte offset in the stream of the first byte fed.
        line: how many lines came before that offset.
        max_line: the longest line allowed, in bytes without its newline (None: no limit).

    >>> buf = LineBuffer()
    >>> buf.feed(b"a\nbc")
    >>> buf.next_line(), buf.next_line()
    (b'a\n', None)
    >>> buf.commit()
    >>> buf.offset, buf.line
    (2, 1)
    >>> buf.feed_eof()
    >>> buf.next_line()
    b'bc'
    """

    __slots__ = (
        "_base",
        "_buf",
        "_cur",
        "_cur_line",
        "_done",
        "_done_line",
        "_scan",
        "_skip_from",
        "eof",
        "max_line",
    )

    def __init__(self, offset: int = 0, line: int = 0, *, max_line: int | None = None) -> None:
        self._buf = bytearray()
        self._base = offset  # stream offset of _buf[0]
        self._done = 0  # index in _buf of the committed position
        self._done_line = line
        self._cur = 0  # index in _buf of the cursor
        self._cur_line = line
        self._scan = 0  # _buf[_cur:_scan] holds no newline: the next search starts here
        self._skip_from: int | None = None  # stream offset of a line being skipped
        self.eof = False
        """True once :meth:`feed_eof` was called: no more bytes will come."""
        self.max_line = max_line
        """The longest line allowed, in bytes without its newline (None: no limit)."""

    @property
    def offset(self) -> int:
        """The stream offset of the first line not yet committed."""
        if self._skip_from is not None:
            return self._skip_from  # a line being skipped is not consumed until its end
        return self._base + self._done

    @property
    def line(self) -> int:
        """How many lines were committed (so the next one is ``line + 1``)."""
        return self._done_line

    @property
    def unterminated(self) -> bool:
        """True when the last line committed ended at EOF without a newline."""
        done = self._done
        return self.eof and 0 < done == len(self._buf) and self._buf[done - 1] != 0x0A

    def feed(self, data: bytes) -> None:
        """Append bytes read from the stream (dropping what is committed already)."""
        if self._skip_from is not None:
            end = data.find(b"\n")
            if end < 0:
                self._base += len(data)
                return
            self._base += end + 1
            data = data[end + 1 :]
            self._end_skip()
        buf, done = self._buf, self._done
        if done and 2 * done >= len(buf):  # amortized: each byte is moved at most once
            del buf[:done]
            self._base += done
            self._cur -= done
            self._scan -= done
            self._done = 0
        buf += data

    def feed_eof(self) -> None:
        """Mark the end of the stream: a last line without a newline becomes complete."""
        self.eof = True
        if self._skip_from is not None:
            self._end_skip()

    def _end_skip(self) -> None:
        self._skip_from = None
        self._cur_line += 1
        self._done_line = self._cur_line

    def next_line(self) -> bytes | None:
        """The next complete line including its ``\n`` (at EOF: the rest), or None.

        Raises:
            LineTooLongError: the line at the cursor is longer than :attr:`max_line`
                (the cursor stays before it: :meth:`skip_line` drops it).
        """
        if self._skip_from is not None:
            return None
        buf, cur, limit = self._buf, self._cur, self.max_line
        newline = buf.find(b"\n", max(cur, self._scan))
        if newline < 0:
            self._scan = size = len(buf)
            if limit is not None and size - cur > limit:
                raise LineTooLongError(
                    size - cur, limit, bytes(buf[cur : cur + _HEAD]), complete=self.eof
                )
            if not self.eof or cur == size:
                return None
            end = size
        else:
            if limit is not None and newline - cur > limit:
                raise LineTooLongError(
                    newline - cur, limit, bytes(buf[cur : cur + _HEAD]), complete=True
                )
            end = newline + 1
        self._cur = self._scan = end
        self._cur_line += 1
        return bytes(buf[cur:end])

    def has_line(self) -> bool:
        """True when :meth:`next_line` can answer without more bytes: a complete line is
        buffered, the stream ended, or the line at the cursor is already too long."""
        if self.eof:
            return True
        if self._skip_from is not None:
            return False
        buf, cur = self._buf, self._cur
        if buf.find(b"\n", max(cur, self._scan)) >= 0:
            return True
        self._scan = len(buf)
        return self.max_line is not None and len(buf) - cur > self.max_line

    def skip_line(self) -> None:
        """Drop the line at the cursor (one :meth:`next_line` refused) and commit.

        Its bytes are discarded, also those fed later until its newline; until then
        :attr:`offset` stays at its start (a position taken meanwhile resumes there).
        """
        buf, cur = self._buf, self._cur
        newline = buf.find(b"\n", cur)
        if newline >= 0 or self.eof:
            self._cur = self._scan = newline + 1 if newline >= 0 else len(buf)
            self._cur_line += 1
            self.commit()
            return
        self._skip_from = self._base + cur
        self._base += len(buf)
        buf.clear()
        self._cur = self._done = self._scan = 0
        self._done_line = self._cur_line

    def tail(self, n: int) -> bytes:
        """Up to ``n`` bytes just before the committed position that are still buffered."""
        done = self._done
        return bytes(self._buf[max(0, done - n) : done])

    def partial(self) -> bytes:
        """The buffered bytes after the cursor: the start of a line without its newline."""
        return bytes(self._buf[self._cur :])

    def pending(self) -> bytes:
        """The bytes read past the committed position (the lines not yet committed)."""
        return bytes(self._buf[self._done : self._cur])

    def commit(self) -> None:
        """Consume every line read so far."""
        self._done, self._done_line = self._cur, self._cur_line

    def rollback(self) -> None:
        """Put back every line read since the last :meth:`commit`."""
        self._cur, self._cur_line = self._done, self._done_line
        self._scan = self._cur


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


# -- CSV -----------------------------------------------------------------------------


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


# -- the JSON Lines sink -------------------------------------------------------------


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: ``to_dict()``, then dataclass fields, then ``str``."""
    if isinstance(value, type):
        return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _open_for_writing(path: str, mode: WriteMode, encoding: str) -> IO[bytes]:
    """Open ``path``; when appending after a torn last line, end that line first."""
    if mode == "overwrite":
        return open(path, "wb")
    f = open(path, "a+b")  # noqa: SIM115 - the sink closes it in close()
    try:
        if os.fstat(f.fileno()).st_size:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write("\n".encode(encoding))
                f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _open_truncated(path: str, length: int) -> IO[bytes]:
    """Open ``path`` for appending after cutting it back to ``length`` bytes."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - the sink closes it in close()
    except FileNotFoundError:
        raise CheckpointError(
            f"sinks.JsonLines({path}): the checkpoint recorded {length} bytes written, "
            "but the file is gone"
        ) from None
    size = os.fstat(f.fileno()).st_size
    if size < length:
        f.close()
        raise CheckpointError(
            f"sinks.JsonLines({path}): the checkpoint recorded {length} bytes written, "
            f"but the file has only {size}; was it truncated or replaced?"
        )
    f.truncate(length)
    f.seek(length)
    return f


class JsonLinesSink(Sink):
    r"""Writes one JSON line per record (``sw.sinks.JsonLines``).

    Each micro-batch is written and flushed at once.  Objects with a ``to_dict()``
    method (such as :class:`~sluiceway.policies.DeadLetterRecord`) and other dataclasses
    are written as JSON objects, any other value JSON cannot represent as ``str(value)``.
    Only whole lines ever reach the file: a record that cannot be serialized at all (a
    dict with tuple keys, a cycle) raises
    :class:`~sluiceway.core.contract.PartialWriteError` after the records before it
    were written, so the sink's error policy handles exactly that record.

    With checkpoints on, the sink is **exactly-once**: at each barrier it flushes and
    fsyncs the file and stores its length in the checkpoint; a restart from that
    checkpoint first truncates the file to that length (what came after is written
    again by the replay).  A reader following the file while the flow runs, or reading
    it after a run that failed, may see lines past the last checkpoint that the next run
    takes back; once a run has ended or stopped, the file holds exactly the records of
    its final checkpoint.

    Args:
        path: the file to write.
        mode: ``"append"`` (default) adds to an existing file; ``"overwrite"`` empties
            it at ``open`` of a fresh run only.  A run that resumes from a checkpoint
            never erases what earlier runs wrote: a flow's sink is cut back to the
            checkpoint's length, and a dead-letter sink (not part of the checkpoint)
            appends.  When appending to a file whose last line lacks its newline (a torn
            write), a newline is added first so records never merge.
        encoding: the text encoding of the file.

    Raises:
        ValueError: an unknown ``mode`` or encoding.

    >>> import os, tempfile, sluiceway as sw
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "out.jsonl")
    ...     flow = sw.Flow("write")
    ...     flow.source(sw.sources.Iterable([{"id": 1}, "two"])).sink(sw.sinks.JsonLines(path))
    ...     _ = sw.testing.run_flow(flow)
    ...     with open(path) as f:
    ...         print(f.read(), end="")
    {"id": 1}
    "two"
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: WriteMode = "append",
        encoding: str = "utf-8",
    ) -> None:
        if mode not in ("append", "overwrite"):
            raise ValueError(f"sinks.JsonLines mode must be 'append' or 'overwrite', got {mode!r}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(
                f"sinks.JsonLines: unknown encoding {encoding!r}; try 'utf-8'"
            ) from None
        self._path = os.fspath(path)
        self._mode: WriteMode = mode
        self._encoding = encoding
        self._file: IO[bytes] | None = None
        self._restore_to: int | None = None

    exactly_once = True

    async def open(self, ctx: SinkContext) -> None:
        """Open (or create) the file for writing; when restarting from a checkpoint, cut
        it back to the length that checkpoint recorded.

        Raises:
            OSError: the file cannot be opened.
            CheckpointError: the file is shorter than the checkpoint recorded.
        """
        restore_to, self._restore_to = self._restore_to, None  # for this run only
        if restore_to is not None:
            self._file = _open_truncated(self._path, restore_to)
        elif ctx.restored:  # a dead-letter sink of a resumed flow: keep what it holds
            self._file = _open_for_writing(self._path, "append", self._encoding)
        else:
            self._file = _open_for_writing(self._path, self._mode, self._encoding)

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint that recorded ``{"length": n}``: cut back to ``n``."""
        if not (isinstance(state, dict) and isinstance(state.get("length"), int)):
            raise CheckpointError(
                f"{self.describe()}: checkpoint state must be {{'length': bytes}}, got "
                f"{short_repr(state)}"
            )
        self._restore_to = state["length"]

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """Flush and fsync; the checkpoint records the file's length."""
        f = self._file
        if f is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        f.flush()
        os.fsync(f.fileno())
        return {"length": f.tell()}

    async def write(self, batch: Batch) -> None:
        """Write every record of ``batch`` as a line, then flush.

        Raises:
            PartialWriteError: record ``written`` could not be serialized; the records
                before it are in the file, it and the ones after it are not.
            OSError: the file could not be written.
        """
        f = self._file
        if f is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        encoding = self._encoding
        chunks: list[bytes] = []
        for i, value in enumerate(batch.values):
            try:
                line = json.dumps(value, default=_to_json, ensure_ascii=False)
                chunks.append(f"{line}\n".encode(encoding))
            except Exception as exc:  # pinned to this record, see PartialWriteError
                self._put(f, chunks)
                raise PartialWriteError(i, exc) from exc
        self._put(f, chunks)

    @staticmethod
    def _put(f: IO[bytes], chunks: list[bytes]) -> None:
        if chunks:
            f.write(b"".join(chunks))
            f.flush()

    async def close(self) -> None:
        """Flush and close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        """``JsonLines(<path>)``."""
        return f"JsonLines({self._path})"
