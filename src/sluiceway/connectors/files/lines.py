"""Line buffering for the file sources: :class:`LineBuffer` splits bytes read in chunks
into lines, tracking the byte offset and number of the next line, with a limit on the
length of a line (:class:`LineTooLongError`)."""

from __future__ import annotations

__all__ = ["CHUNK", "LineBuffer", "LineTooLongError"]

CHUNK = 64 * 1024
"""Bytes read from a file in one call."""


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
