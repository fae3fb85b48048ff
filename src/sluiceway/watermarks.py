"""Watermark strategies for :meth:`~sluiceway.Stream.with_timestamps`.

>>> BoundedOutOfOrderness(5.0).bound
5.0
>>> Monotonic().bound
0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["BoundedOutOfOrderness", "Monotonic", "WatermarkStrategy"]


@dataclass(frozen=True, slots=True)
class BoundedOutOfOrderness:
    """Watermark = the largest event time seen so far minus ``max_out_of_orderness``.

    A record up to that much behind the newest one is still on time.
    """

    max_out_of_orderness: float | timedelta

    def __post_init__(self) -> None:
        _ = self.bound

    @property
    def bound(self) -> float:
        b = self.max_out_of_orderness
        if isinstance(b, timedelta):
            s = b.total_seconds()
        elif isinstance(b, int | float) and not isinstance(b, bool):
            s = float(b)
        else:
            raise TypeError(f"max_out_of_orderness must be seconds or a timedelta, got {b!r}")
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"max_out_of_orderness must be finite and >= 0 seconds, got {b!r}")
        return s


@dataclass(frozen=True, slots=True)
class Monotonic:
    """Event time only grows: watermark = the largest event time seen so far.

    The same as ``BoundedOutOfOrderness(0)``: a record behind the newest one is late for
    windows that already closed.
    """

    @property
    def bound(self) -> float:
        return 0.0


WatermarkStrategy = BoundedOutOfOrderness | Monotonic
