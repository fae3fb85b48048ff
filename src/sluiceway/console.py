"""The live terminal view of a running flow, as a :data:`~sluiceway.Monitor`.

>>> import asyncio, io, itertools, sluiceway as sw
>>> out = io.StringIO()
>>> flow = sw.Flow("ticks")
>>> flow.source(sw.sources.Generator(itertools.count, rate=100), name="src").sink(
...     sw.sinks.Collect(), name="out")
>>> view = LiveView(out, interval=1.0, live=False)
>>> async def monitor(handle: sw.FlowHandle) -> None:
...     async with asyncio.TaskGroup() as tg:
...         tg.create_task(view(handle))
...         await handle.clock.sleep(2.5)
...         handle.request_stop()
>>> _ = sw.run(flow, clock=sw.VirtualClock(), monitor=monitor)
>>> print(out.getvalue(), end="")
t=1.0s  in 99.0/s  out 99.0/s  errors 0  dropped 0
t=2.0s  in 100/s  out 100/s  errors 0  dropped 0

Everything here reads the public snapshots of a running flow (``handle.metrics()``, see
:class:`~sluiceway.FlowSnapshot`) and sleeps on the flow's clock, so a view runs on a
:class:`~sluiceway.VirtualClock` in tests exactly as on the system clock.  Rendering is
pure: :func:`render` (the table) and :func:`render_line` (one plain line) take snapshots and
return text.  :class:`LiveView` only decides when to render and where to write.

A live table is redrawn in place with ANSI escape codes (cursor up, clear to the end of the
screen); the plain mode writes one line per interval, for logs and pipes.  Only the
standard library is used.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import TextIO

from sluiceway.metrics import FlowSnapshot, Rates
from sluiceway.runtime.handle import FlowHandle

__all__ = [
    "Frames",
    "LiveView",
    "cut",
    "format_count",
    "format_rate",
    "render",
    "render_line",
    "say",
    "strip_ansi",
    "table",
]

_BOLD = "\x1b[1m"
_DIM = "\x1b[2m"
_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"
_RESET = "\x1b[0m"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"
_CLEAR_BELOW = "\x1b[J"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

_BAR_WIDTH = 10
_NAME_LIMIT = 28
_HIGH_BACKPRESSURE = 0.5


def format_count(n: int) -> str:
    """A count with thousands separators.

    >>> format_count(1234567)
    '1,234,567'
    """
    return f"{n:,}"


def format_rate(rate: float | None) -> str:
    """A per-second rate: whole numbers from 100 up, one decimal below, ``-`` if unknown.

    >>> format_rate(2000.4), format_rate(12.345), format_rate(None)
    ('2,000', '12.3', '-')
    """
    if rate is None:
        return "-"
    if abs(rate) >= 100:
        return f"{rate:,.0f}"
    return f"{rate:.1f}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _bar(fill: int, capacity: int) -> str:
    """``[###.......]``: how full a channel is.

    >>> _bar(512, 1024)
    '[#####.....]'
    """
    share = 0.0 if capacity <= 0 else min(1.0, fill / capacity)
    n = round(share * _BAR_WIDTH)
    if fill and not n:
        n = 1  # a channel that holds anything shows it
    return "[" + "#" * n + "." * (_BAR_WIDTH - n) + "]"


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape codes.

    >>> strip_ansi("\\x1b[1mbold\\x1b[0m")
    'bold'
    """
    return _ANSI.sub("", text)


def _seconds(value: float) -> str:
    """A latency for the table: ``850us``, ``12ms``, ``1.5s``; ``-`` when unknown."""
    if math.isnan(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1.0:
        return f"{value * 1e3:.0f}ms"
    return f"{value:.1f}s"


def cut(line: str, width: int) -> str:
    """``line``, cut to ``width`` columns (ending in ``~`` when cut).

    >>> cut("abcdef", 4)
    'abc~'
    """
    return line if len(line) <= width else line[: max(0, width - 1)] + "~"


def table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns sized to their content; the first ``left`` columns align left.

    >>> table(["name", "n"], [["a", "1"], ["bbb", "22"]], left=1)
    ['name   n', 'a      1', 'bbb   22']
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


def render(
    snapshot: FlowSnapshot,
    previous: FlowSnapshot | None,
    width: int,
    *,
    started: float | None = None,
    color: bool = False,
) -> str:
    """The table of a flow's operators and channels, as text of at most ``width`` columns.

    Args:
        snapshot: the counters now.
        previous: an earlier snapshot, for rates (None: rates show ``-``).
        width: the widest a line may be (longer lines are cut, ending in ``~``).
        started: the clock time the flow started, to show its age (None: not shown).
        color: add ANSI styles (bold headings; red errors; yellow high backpressure).

    Returns:
        Lines joined by newlines, without a trailing newline.
    """
    rates = snapshot.rates_since(previous) if previous is not None else Rates({}, {}, {})
    title = f"sluiceway  flow {snapshot.flow!r}"
    if started is not None:
        title += f"  t={snapshot.time - started:.1f}s"
    if previous is not None and snapshot.time > previous.time:
        title += f"  (rates over the last {snapshot.time - previous.time:.1f}s)"

    op_rows: list[list[str]] = []
    bad_ops: set[int] = set()
    # Event-time flows get two more columns: late records, and watermark lag.
    event_time = any(op.watermark != -math.inf or op.late for op in snapshot.operators)
    for i, op in enumerate(snapshot.operators):
        if op.errors or op.dead_letters or op.dropped:
            bad_ops.add(i)
        row = [
            cut(op.name, _NAME_LIMIT),
            op.kind,
            str(op.stage),
            format_count(op.records_in),
            format_count(op.records_out),
            format_rate(rates.records_in.get(op.name)),
            format_rate(rates.records_out.get(op.name)),
            format_count(op.errors),
            format_count(op.retries),
            format_count(op.dead_letters),
        ]
        row.append(_seconds(op.latency_p99))
        if event_time:
            lag = snapshot.watermark_lag(op.name)
            row += [format_count(op.late), "-" if lag is None else f"{lag:.1f}s"]
        op_rows.append(row)
    header = ["operator", "kind", "stage", "in", "out", "in/s", "out/s", "errors", "retries"]
    header += ["dead", "p99", "late", "wm lag"] if event_time else ["dead", "p99"]
    ops = table(header, op_rows, left=2)

    ch_rows: list[list[str]] = []
    hot: set[int] = set()
    for i, ch in enumerate(snapshot.channels):
        bp = rates.backpressure.get(ch.name)
        if (bp is not None and bp >= _HIGH_BACKPRESSURE) or ch.records_dropped:
            hot.add(i)
        ch_rows.append(
            [
                cut(ch.name, _NAME_LIMIT),
                f"{format_count(ch.fill)}/{format_count(ch.capacity)}",
                _bar(ch.fill, ch.capacity),
                format_count(ch.max_fill),
                _percent(bp),
                format_count(ch.records_dropped),
                ch.overflow.value,
            ]
        )
    chans = (
        table(
            ["channel", "fill/capacity", "", "max fill", "backpressure", "dropped", "overflow"],
            ch_rows,
            left=3,
        )
        if ch_rows
        else ["(no channels: every operator runs in one stage)"]
    )

    def style(line: str, code: str) -> str:
        return f"{code}{line}{_RESET}" if color else line

    lines = [style(cut(title, width), _BOLD), ""]
    lines.append(style(cut(ops[0], width), _BOLD))
    for i, line in enumerate(ops[1:]):
        lines.append(style(cut(line, width), _RED) if i in bad_ops else cut(line, width))
    lines.append("")
    lines.append(style(cut(chans[0], width), _BOLD) if ch_rows else cut(chans[0], width))
    for i, line in enumerate(chans[1:]):
        lines.append(style(cut(line, width), _YELLOW) if i in hot else cut(line, width))
    return "\n".join(lines)


def render_line(
    snapshot: FlowSnapshot, previous: FlowSnapshot | None, *, started: float | None = None
) -> str:
    """One plain line: source and sink rates, errors, drops, the worst backpressure.

    ``in`` is what the sources produced per second, ``out`` what the sinks received.
    """
    rates = snapshot.rates_since(previous) if previous is not None else Rates({}, {}, {})
    known = previous is not None and snapshot.time > previous.time
    sources = [o.name for o in snapshot.operators if o.kind == "source"]
    sinks = [o.name for o in snapshot.operators if o.kind == "sink"]
    rate_in = sum(rates.records_out.get(n, 0.0) for n in sources) if known else None
    rate_out = sum(rates.records_in.get(n, 0.0) for n in sinks) if known else None
    errors = sum(o.errors for o in snapshot.operators)
    dropped = sum(c.records_dropped for c in snapshot.channels)
    parts = []
    if started is not None:
        parts.append(f"t={snapshot.time - started:.1f}s")
    parts += [
        f"in {format_rate(rate_in)}/s",
        f"out {format_rate(rate_out)}/s",
        f"errors {format_count(errors)}",
        f"dropped {format_count(dropped)}",
    ]
    if rates.backpressure:
        worst = max(rates.backpressure, key=lambda name: rates.backpressure[name])
        bp = rates.backpressure[worst]
        parts.append(f"backpressure {_percent(bp)}" + (f" ({worst})" if bp > 0 else ""))
    elif snapshot.channels:
        parts.append("backpressure -")
    return "  ".join(parts)


class Frames:
    """A frame of text redrawn in place on a terminal (ANSI: cursor up, clear below), with
    lines that scroll above it (:meth:`above`).

    Args:
        stream: where to write.
        width: the widest a line may be (default: the terminal's width, re-read at every
            frame, one column short of the edge so no terminal wraps a full line).
    """

    def __init__(self, stream: TextIO, width: int | None = None) -> None:
        self.stream = stream
        self.width = width
        self._drawn = 0  # lines of the frame on screen
        self._last: list[str] = []

    def columns(self) -> int:
        """The widest a line of the next frame may be."""
        return (self.width or shutil.get_terminal_size((100, 24)).columns) - 1

    def begin(self) -> None:
        """Hide the cursor while frames are drawn."""
        self.write(_HIDE_CURSOR)

    def end(self) -> None:
        """Give the cursor back (the last frame stays on screen)."""
        self.write(_SHOW_CURSOR)

    def show(self, text: str) -> None:
        """Replace the frame on screen with ``text`` (lines cut by the caller)."""
        lines = text.split("\n")
        rows = shutil.get_terminal_size((100, 24)).lines
        if self.width is None and len(lines) > rows - 1:
            # Cursor-up cannot reach above the screen's top: keep the frame on screen.
            keep = max(1, rows - 2)
            lines = [*lines[:keep], f"... {len(lines) - keep} more lines (enlarge the terminal)"]
        self.write(self._up() + _CLEAR_BELOW + "\n".join(lines) + "\n")
        self._drawn = len(lines)
        self._last = lines

    def above(self, line: str) -> None:
        """Write ``line`` where the frame is and redraw the frame under it: the line
        stays on screen above the frames that follow."""
        self.write(self._up() + _CLEAR_BELOW + line + "\n")
        self._drawn = 0
        if self._last:
            self.show("\n".join(self._last))

    def _up(self) -> str:
        return f"\x1b[{self._drawn}F" if self._drawn else ""

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class LiveView:
    """A monitor that shows a running flow's metrics every ``interval`` seconds.

    Pass it as ``sw.run(flow, monitor=LiveView(sys.stdout))``.

    Args:
        stream: where to write (a terminal for the live table; anything for plain lines).
        interval: seconds of the flow's clock between refreshes.
        live: True redraws a table in place with ANSI codes; False writes one plain line
            per interval (see :func:`render_line`).
        width: the widest a table line may be (default: the terminal's width, re-read at
            every refresh).
        color: ANSI colors in the live table (default: when ``stream`` is a terminal and
            ``NO_COLOR`` is not set).
        footer: called at every refresh; its text goes under the table (live) or after
            `` | `` on the line (plain), e.g. the latest result of the flow.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 1.0,
        live: bool = True,
        width: int | None = None,
        color: bool | None = None,
        footer: Callable[[], str | None] | None = None,
    ) -> None:
        if not 0 < interval < math.inf:
            raise ValueError(
                f"LiveView interval must be a finite number > 0 seconds, got {interval!r}"
            )
        if width is not None and width < 20:
            raise ValueError(f"LiveView width must be >= 20 columns, got {width!r}")
        self.stream = stream
        self.interval = float(interval)
        self.live = live
        self.width = width
        if color is None:
            color = live and _isatty(stream) and "NO_COLOR" not in os.environ
        self.color = color
        self.footer = footer
        self._frames = Frames(stream, width)
        self._handle: FlowHandle | None = None

    async def __call__(self, handle: FlowHandle) -> None:
        clock = handle.clock
        self._handle = handle
        previous = first = handle.metrics()
        started = previous.time
        next_tick = started + self.interval
        try:
            if self.live:
                self._frames.begin()
                self._draw(previous, None, started)
            while True:
                await clock.sleep_until(next_tick)
                now = handle.metrics()
                if self.live:
                    self._draw(now, previous, started)
                else:
                    self._write(self._line(now, previous, started) + "\n")
                previous = now
                next_tick += self.interval
                if next_tick <= clock.monotonic():  # fell behind: skip, do not burst
                    next_tick = clock.monotonic() + self.interval
        finally:
            if self.live:
                # The flow has ended (or the view is being cancelled): leave the final
                # counts on screen, with rates averaged over the whole run (the last
                # tick may be a moment ago: rates over that would mean nothing), and
                # give the cursor back.
                self._draw(handle.metrics(), first, started)
                self._frames.end()

    def _footer(self) -> str | None:
        return None if self.footer is None else self.footer()

    def _line(self, now: FlowSnapshot, previous: FlowSnapshot, started: float) -> str:
        line = render_line(now, previous, started=started)
        extra = self._footer()
        return line if not extra else f"{line} | {' '.join(extra.split())}"

    def _draw(self, now: FlowSnapshot, previous: FlowSnapshot | None, started: float) -> None:
        width = self._frames.columns()
        text = render(now, previous, width, started=started, color=self.color)
        handle = self._handle
        if handle is not None and handle.stopping and not handle.done():
            # Shown here, inside the frame, so the in-place redraw stays aligned.
            text = "stopping: draining in-flight records (Ctrl-C again to force)\n" + text
        extra = self._footer()
        if extra:
            text += "\n\n" + "\n".join(cut(line, width) for line in extra.splitlines())
        self._frames.show(text)

    def _write(self, text: str) -> None:
        self._frames.write(text)


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def say(line: str) -> None:
    """``line`` on stderr, in one write (the lines of several workers share a terminal:
    a line must not be cut by another's).

    When nothing reads stderr any more (a pipe whose reader ended: the supervisor or the
    terminal is gone), the line is lost and stderr goes to /dev/null from then on: a
    process that cannot be heard must still do what it was told -- a worker whose
    SIGTERM handler said "stopping" must stop, not fail with BrokenPipeError -- and exit
    without Python's own failing flush of stderr at exit."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stderr.fileno())
        finally:
            os.close(devnull)
