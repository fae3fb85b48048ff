"""Event time in integer microseconds ("ticks") since the epoch: the unit inside the engine.

Window bounds and watermarks are exact in integers; users see seconds.  The connectors
(a broker's own timestamps), the keyed-state timers and the operators all convert here.

>>> ticks(1.5), seconds(1_500_000)
(1500000, 1.5)
"""

from __future__ import annotations

import math
from datetime import datetime

from sluiceway.errors import short_repr

__all__ = ["MAX_SECONDS", "MIN_SECONDS", "TICKS_PER_SECOND", "seconds", "ticks", "to_ticks"]

TICKS_PER_SECOND = 1_000_000


def ticks(t: float) -> int:
    """Seconds to integer microseconds (rounded to the nearest)."""
    return round(t * TICKS_PER_SECOND)


def seconds(t: int) -> float:
    """Integer microseconds to seconds."""
    return t / TICKS_PER_SECOND


# Event times must be plausible epoch *seconds*: within what a datetime can show (years
# 1 to 9999).  Beyond is nearly always milliseconds (or micro-, nanoseconds) given as
# seconds -- windows in the year 55,840 -- or an overflow waiting to happen (1e303).
MIN_SECONDS = _MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_SECONDS = _MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_MIN_TICKS = _MIN_SECONDS * 1_000_000
_MAX_TICKS = _MAX_SECONDS * 1_000_000


def _implausible(t: float) -> ValueError:
    """The error for a finite ``t`` outside the range of epoch seconds, with the fix."""
    hint = "; event times are epoch seconds (or aware datetimes)"
    for factor, unit in ((1_000, "milliseconds"), (1_000_000, "microseconds"), (10**9, "ns")):
        if _MIN_SECONDS * factor <= t <= _MAX_SECONDS * factor:
            name = "nanoseconds" if unit == "ns" else unit
            hint = f"; it looks like epoch {name}: divide by {factor:_} to get seconds"
            break
    return ValueError(
        f"timestamp {short_repr(t, 60)} is outside the years 1-9999 as epoch seconds{hint}"
    )


def to_ticks(t: object) -> int:
    """An event time (epoch seconds or aware datetime) as integer microseconds.

    >>> to_ticks(1.5)
    1500000
    >>> try:
    ...     to_ticks(1_733_000_000_000)
    ... except ValueError as exc:
    ...     print(str(exc).split("; ")[1])
    it looks like epoch milliseconds: divide by 1_000 to get seconds

    Raises:
        TypeError / ValueError: naming what was wrong with ``t``.
    """
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(
                f"timestamp {t!r} is a naive datetime; give it a timezone "
                "(e.g. datetime(..., tzinfo=timezone.utc)) or use epoch seconds"
            )
        return ticks(t.timestamp())
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise TypeError(
            f"timestamp must be epoch seconds (int or float) or an aware datetime, "
            f"got {type(t).__name__} {t!r}"
        )
    if isinstance(t, float) and not math.isfinite(t):  # (isfinite overflows on huge ints)
        raise ValueError(f"timestamp must be a finite number of seconds, got {t!r}")
    if not _MIN_SECONDS <= t <= _MAX_SECONDS:  # exact for ints of any size too
        raise _implausible(t)
    return ticks(t)
