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
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Session", "Sessions", "Sliding", "Tumbling", "seconds", "ticks"]

TICKS_PER_SECOND = 1_000_000


def ticks(t: float) -> int:
    """Seconds to integer microseconds (rounded to the nearest)."""
    return round(t * TICKS_PER_SECOND)


def seconds(t: int) -> float:
    """Integer microseconds to seconds."""
    return t / TICKS_PER_SECOND


def _duration(value: object, what: str) -> int:
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        s = float(value)
    else:
        raise TypeError(f"{what} must be seconds (float) or a timedelta, got {value!r}")
    if not math.isfinite(s) or ticks(s) < 1:
        raise ValueError(
            f"{what} must be a finite duration of at least 1 microsecond, got {value!r}"
        )
    return ticks(s)


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
        if not isinstance(self.offset, int | float | timedelta) or isinstance(self.offset, bool):
            raise TypeError(f"Tumbling offset must be seconds or a timedelta, got {self.offset!r}")

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
        if self.slide_ticks > self.size_ticks:
            raise ValueError(
                f"Sliding slide ({self.slide!r}) must be <= size ({self.size!r}): an event "
                "between two windows would belong to none; use Tumbling for slide == size"
            )
        if not isinstance(self.offset, int | float | timedelta) or isinstance(self.offset, bool):
            raise TypeError(f"Sliding offset must be seconds or a timedelta, got {self.offset!r}")

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


class Sessions:
    """The sessions of one key: disjoint ``[start, end)`` intervals in ticks, merged on add.

    >>> s = Sessions(gap=10)
    >>> s.add(0), s.add(25)
    (((0, 10), []), ((25, 35), []))
    >>> s.add(12)                 # [12, 22) bridges nothing: 22 <= 25 and 12 >= 10
    ((12, 22), [])
    >>> s.add(18)                 # [18, 28) overlaps [12, 22) and [25, 35): all merge
    ((12, 35), [(12, 22), (25, 35)])
    >>> s.intervals()
    [(0, 10), (12, 35)]
    """

    __slots__ = ("_ends", "_gap", "_starts")

    def __init__(self, gap: int) -> None:
        if gap < 1:
            raise ValueError(f"session gap must be >= 1 tick, got {gap!r}")
        self._gap = gap
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, t: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """Add a record at ``t``; returns its session and the sessions merged into it.

        The merged sessions (their accumulators must be merged into the returned one)
        are removed; a record inside an existing session returns that session and ``[]``.
        """
        start, end = t, t + self._gap
        starts, ends = self._starts, self._ends
        # Sessions are disjoint and sorted, so their ends are sorted too. Overlapping
        # ones satisfy s < end and e > start: a contiguous run [lo, hi).
        lo = bisect_right(ends, start)
        hi = bisect_left(starts, end)
        if lo < hi and starts[lo] <= start and end <= ends[lo] and hi - lo == 1:
            return (starts[lo], ends[lo]), []  # fully inside one session
        merged = [(starts[i], ends[i]) for i in range(lo, hi)]
        if merged:
            start = min(start, merged[0][0])
            end = max(end, merged[-1][1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]
        return (start, end), merged

    def overlaps(self, t: int) -> bool:
        """Whether a record at ``t`` would join (or bridge) an existing session."""
        i = bisect_right(self._ends, t)
        return i < len(self._starts) and self._starts[i] < t + self._gap

    def intervals(self) -> list[tuple[int, int]]:
        """Every session, in order."""
        return list(zip(self._starts, self._ends, strict=True))

    def remove(self, start: int) -> None:
        """Forget the session starting at ``start`` (it has fired for good)."""
        i = bisect_left(self._starts, start)
        if i == len(self._starts) or self._starts[i] != start:
            raise KeyError(f"no session starts at {start}")
        del self._starts[i]
        del self._ends[i]
