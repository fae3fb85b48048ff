"""Durations as users give them: float seconds or ``timedelta``, checked with clear errors.

>>> positive_seconds(timedelta(minutes=1), "size")
60.0
>>> non_negative_seconds(0, "allowed_lateness")
0.0
"""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["non_negative_seconds", "positive_seconds", "seconds_of"]


def seconds_of(value: object, what: str) -> float:
    """``value`` (seconds or a ``timedelta``) in seconds; TypeError naming ``what``."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{what} must be seconds (float) or a timedelta, got {value!r}")


def positive_seconds(value: object, what: str) -> float:
    """A finite duration > 0."""
    s = seconds_of(value, what)
    if not s > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {value!r}")
    if s == math.inf:
        raise ValueError(f"{what} must be finite, got {value!r}; leave it out for no limit")
    return s


def non_negative_seconds(value: object, what: str) -> float:
    """A finite duration >= 0."""
    s = seconds_of(value, what)
    if not 0 <= s < math.inf:
        raise ValueError(f"{what} must be finite and >= 0 seconds, got {value!r}")
    return s
