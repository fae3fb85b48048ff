"""Window assigners: which windows an event-time instant belongs to.

Windows are half-open, ``[start, end)``: a record at exactly ``end`` belongs to the next
window.  Window arithmetic is done in integer **microseconds** ("ticks"), so that window
bounds are exact: with floats, ``0.3 - 0.3 % 0.1`` is ``0.2``, which would put an event at
``0.3`` into the window ``[0.2, 0.3)``.  Timestamps are rounded to the nearest microsecond.

>>> Tumbling(0.1).windows(0.3)
[(0.3, 0.4)]
>>> Sliding(30, 10).windows(25.0)
[(20.0, 50.0), (10.0, 40.0), (0.0, 30.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from sluiceway.time.durations import seconds_of
from sluiceway.time.ticks import seconds, ticks

__all__ = ["Session", "Sliding", "Tumbling", "seconds", "ticks"]


def _duration(value: object, what: str) -> int:
    s = seconds_of(value, what)
    if not math.isfinite(s) or ticks(s) < 1:
        raise ValueError(
            f"{what} must be a finite duration of at least 1 microsecond, got {value!r}"
        )
    return ticks(s)


def _check_offset(value: object, what: str) -> None:
    if not isinstance(value, int | float | timedelta) or isinstance(value, bool):
        raise TypeError(f"{what} offset must be seconds or a timedelta, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} offset must be a finite number of seconds, got {value!r}")


MAX_WINDOWS_PER_RECORD = 10_000
"""A sliding window's ``size / slide`` at most: each record is added to that many windows
(``Sliding(10, 1e-6)`` would make ten million per record)."""


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed, non-overlapping windows ``[offset + k*size, offset + (k+1)*size)``.

    Args:
        size: the window length (seconds or ``timedelta``).
        offset: shifts the window grid (e.g. ``3600`` with ``size=86400`` for days
            starting at 01:00 UTC); any value, taken modulo ``size``.
    """

    size: float | timedelta
    offset: float | timedelta = 0.0

    @property
    def size_ticks(self) -> int:
        return _duration(self.size, "Tumbling size")

    @property
    def offset_ticks(self) -> int:
        off = self.offset.total_seconds() if isinstance(self.offset, timedelta) else self.offset
        return ticks(off) % self.size_ticks

    def __post_init__(self) -> None:
        _ = self.size_ticks
        _check_offset(self.offset, "Tumbling")

    def start_of(self, t: int) -> int:
        """The start (ticks) of the window holding instant ``t`` (ticks)."""
        size = self.size_ticks
        return t - (t - self.offset_ticks) % size

    def windows(self, ts: float) -> list[tuple[float, float]]:
        """The windows (in seconds) that hold an event at ``ts`` seconds: exactly one."""
        start = self.start_of(ticks(ts))
        return [(seconds(start), seconds(start + self.size_ticks))]


@dataclass(frozen=True, slots=True)
class Sliding:
    """Overlapping windows of ``size``, one starting every ``slide``.

    An event belongs to ``ceil(size / slide)`` windows (fewer at the grid's edges when
    ``size`` is not a multiple of ``slide``).  ``slide`` may not exceed ``size``: an event
    falling between two windows would belong to none, and sluiceway never drops records
    silently.
    """

    size: float | timedelta
    slide: float | timedelta
    offset: float | timedelta = 0.0

    @property
    def size_ticks(self) -> int:
        return _duration(self.size, "Sliding size")

    @property
    def slide_ticks(self) -> int:
        return _duration(self.slide, "Sliding slide")

    @property
    def offset_ticks(self) -> int:
        off = self.offset.total_seconds() if isinstance(self.offset, timedelta) else self.offset
        return ticks(off) % self.slide_ticks

    def __post_init__(self) -> None:
        size, slide = self.size_ticks, self.slide_ticks
        if slide > size:
            raise ValueError(
                f"Sliding slide ({self.slide!r}) must be <= size ({self.size!r}): an event "
                "between two windows would belong to none; use Tumbling for slide == size"
            )
        per_record = -(-size // slide)
        if per_record > MAX_WINDOWS_PER_RECORD:
            least = seconds(-(-size // MAX_WINDOWS_PER_RECORD))
            raise ValueError(
                f"Sliding({self.size!r}, {self.slide!r}) puts every record into "
                f"{per_record:,} windows (size / slide); at most {MAX_WINDOWS_PER_RECORD:,} "
                f"are allowed: use a slide of at least {least:g} s"
            )
        _check_offset(self.offset, "Sliding")

    def starts_of(self, t: int) -> list[int]:
        """The starts (ticks) of every window holding instant ``t``, latest first."""
        slide, size = self.slide_ticks, self.size_ticks
        last = t - (t - self.offset_ticks) % slide
        out = []
        start = last
        while start > t - size:
            out.append(start)
            start -= slide
        return out

    def windows(self, ts: float) -> list[tuple[float, float]]:
        """The windows (in seconds) that hold an event at ``ts`` seconds, latest first."""
        size = self.size_ticks
        return [(seconds(s), seconds(s + size)) for s in self.starts_of(ticks(ts))]


@dataclass(frozen=True, slots=True)
class Session:
    """Per-key windows that close after ``gap`` of inactivity.

    A record at ``t`` opens the window ``[t, t + gap)``; windows of the same key that
    overlap merge, so a session is ``[first, last + gap)``.  Two records exactly ``gap``
    apart are in different sessions (the windows are half-open and only touch).  A late
    record that falls between two sessions within ``gap`` of both bridges them into one.
    """

    gap: float | timedelta

    @property
    def gap_ticks(self) -> int:
        return _duration(self.gap, "Session gap")

    def __post_init__(self) -> None:
        _ = self.gap_ticks
