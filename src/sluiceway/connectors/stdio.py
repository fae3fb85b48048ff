r"""Standard input as a source: :class:`Stdin` (``sw.sources.Stdin``).

Lines flow as soon as they arrive, without blocking the event loop and without a
thread: a pipe, socket or terminal is read through ``loop.connect_read_pipe``; a regular
file (``sluiceway run flow.py < events.jsonl``) or ``/dev/null`` is read as a file::

    printf 'a\nb\n' | python flow.py       -> "a", "b"   (each as soon as its line is in)
    python flow.py < events.txt            -> read in 64 KiB chunks, like sources.JsonLines

The event loop reads a pipe through its own file descriptor (a duplicate of stdin's),
so closing the source never closes ``sys.stdin``; the descriptor's blocking mode, which
the loop changes, is restored at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import Callable
from typing import IO, Any

from sluiceway.connectors.files import (
    _READ_BUDGET,
    DEFAULT_MAX_LINE_BYTES,
    LineBuffer,
    LineTooLongError,
    _check_encoding,
    _check_max_line,
    _decode,
    _report,
    _too_long,
)
from sluiceway.core.contract import Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.time.clock import yield_now

__all__ = ["Stdin"]

_CHUNK = 64 * 1024


class _PipeProtocol(asyncio.StreamReaderProtocol):
    """A stream reader protocol that also says when the pipe is closed."""

    def __init__(self, reader: asyncio.StreamReader, lost: asyncio.Future[None]) -> None:
        super().__init__(reader)
        self._lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._lost.done():
            self._lost.set_result(None)


def _fileno(stream: IO[bytes]) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation (BytesIO) is both
        return None


def _is_pollable(fd: int) -> bool:
    """True for what the event loop can watch: pipes, sockets, terminals."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


class Stdin(Source):
    r"""Lines of standard input, without their line ends (``sw.sources.Stdin``).

    Every line is a record, blank ones included, passed through ``parse`` if given.  The
    source ends at the end of input.  The position (``{"line": n}``) is informative:
    standard input cannot be read again, so a flow cannot resume from it.  Read standard
    input only through this source: bytes that other code already pulled into the buffer
    of ``sys.stdin`` are not seen by it.

    Args:
        parse: turns a line into a record (e.g. ``json.loads``); if it raises, the line
            is bad input named ``<stdin>:<line>``.
        stream: a binary file object to read instead of ``sys.stdin.buffer`` (for
            tests: a ``BytesIO``, or the read end of ``os.pipe()``); it is not closed.
        encoding: the text encoding of the input (ASCII-compatible).
        max_line_bytes: the longest line accepted, in bytes without its newline
            (default 10 MiB; None: no limit).  A longer line is bad input naming
            ``<stdin>:<line>``, dropped as it is read (never held whole).

    Raises:
        ValueError: an unknown or not ASCII-compatible encoding, or a bad
            ``max_line_bytes``.
        RuntimeError: at ``open``, the process has no standard input.

    >>> import io, json, sluiceway as sw
    >>> src = sw.sources.Stdin(parse=json.loads, stream=io.BytesIO(b'{"a": 1}\n[2]\n'))
    >>> sw.testing.run_collect(lambda s: s, src)
    [{'a': 1}, [2]]
    """

    def __init__(
        self,
        *,
        parse: Callable[[str], Any] | None = None,
        stream: IO[bytes] | None = None,
        encoding: str = "utf-8",
        max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        if parse is not None and not callable(parse):
            raise TypeError(
                f"sources.Stdin parse must be a callable taking a line (e.g. json.loads), "
                f"got {parse!r}"
            )
        self._parse = parse
        self._stream = stream
        self._encoding = _check_encoding(encoding, "sources.Stdin")
        self._lines = LineBuffer(max_line=_check_max_line(max_line_bytes, "sources.Stdin"))
        self._ctx: SourceContext | None = None
        self._file: IO[bytes] | None = None  # read directly (a regular file, a BytesIO)
        self._reader: asyncio.StreamReader | None = None  # read through the event loop
        self._transport: asyncio.ReadTransport | None = None
        self._lost: asyncio.Future[None] | None = None
        self._blocking: tuple[int, bool] | None = None  # (fd, its mode before we opened)

    async def open(self, ctx: SourceContext) -> None:
        """Start reading: through the event loop for a pipe or terminal, else directly.

        Raises:
            RuntimeError: there is no standard input (``sys.stdin`` is None).
        """
        stream = self._stream
        if stream is None:
            if sys.stdin is None:
                raise RuntimeError(
                    "sources.Stdin: this process has no standard input (sys.stdin is None); "
                    "pass stream=... or read a file with sources.JsonLines"
                )
            stream = sys.stdin.buffer
        self._ctx = ctx
        self._lines = LineBuffer(max_line=self._lines.max_line)
        fd = _fileno(stream)
        if fd is None or not _is_pollable(fd):
            self._file = stream
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK)
        lost: asyncio.Future[None] = loop.create_future()
        self._blocking = (fd, os.get_blocking(fd))
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: _PipeProtocol(reader, lost), pipe)
        except BaseException:
            pipe.close()
            self._restore_blocking()
            raise
        self._reader, self._transport, self._lost = reader, transport, lost

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` lines that have arrived; waits only for the first.

        Returns None at the end of input.  Cancelling the wait loses nothing.

        Raises:
            OperatorError: (from the runtime, under the ``Fail`` policy) a line is not
                valid text or ``parse`` failed on it.
        """
        ctx, lines, parse = self._ctx, self._lines, self._parse
        if ctx is None:
            raise RuntimeError("sources.Stdin is not open: the runtime calls open() first")
        records: list[Any] = []
        read = 0
        while len(records) < max_records:
            try:
                raw = lines.next_line()
            except LineTooLongError as exc:
                if records:  # hand out the good ones first; report this line next time
                    lines.rollback()
                    break
                shown, reason = _too_long(exc, self._encoding)
                await _report(ctx, f"<stdin>:{lines.line + 1}", shown, reason)
                lines.skip_line()
                continue
            if raw is None:
                if records:
                    break
                if lines.eof:
                    return None
                if read >= _READ_BUDGET:  # a long line: let the other tasks run meanwhile
                    read = 0
                    await yield_now()
                read += await self._fill()
                continue
            text, problem = _decode(raw, self._encoding)
            if problem is None:
                if parse is None:
                    records.append(text)
                    lines.commit()
                    continue
                try:
                    records.append(parse(text))
                except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
                    name = getattr(parse, "__name__", type(parse).__name__)
                    problem = f"{name}() failed: {type(exc).__name__}: {exc}"
                else:
                    lines.commit()
                    continue
            if records:  # hand out the good ones first; report this line next time
                lines.rollback()
                break
            await _report(ctx, f"<stdin>:{lines.line + 1}", text, problem)
            lines.commit()
        return Batch(records)

    async def _fill(self) -> int:
        """Read more input into the line buffer (waiting for a pipe; cancellation-safe);
        returns how many bytes came."""
        if self._file is not None:
            data = self._file.read(_CHUNK)
        else:
            assert self._reader is not None
            data = await self._reader.read(_CHUNK)
        if data:
            self._lines.feed(data)
        else:
            self._lines.feed_eof()
        return len(data)

    def position(self) -> dict[str, int]:
        """``{"line": n}``: how many lines were handed out (or reported as bad)."""
        return {"line": self._lines.line}

    async def close(self) -> None:
        """Stop reading; the stream itself stays open (safe to call twice)."""
        self._file = None
        transport, lost = self._transport, self._lost
        self._transport = self._lost = self._reader = None
        if transport is not None and lost is not None:
            transport.close()
            await lost  # the loop closes our duplicate descriptor right after this
        self._restore_blocking()

    def _restore_blocking(self) -> None:
        if self._blocking is not None:
            fd, blocking = self._blocking
            self._blocking = None
            # OSError: the descriptor was closed meanwhile, so there is nothing to restore.
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)

    def describe(self) -> str:
        """``Stdin``."""
        return "Stdin"
