"""Watermark strategies for :meth:`~sluiceway.Stream.with_timestamps`.

>>> BoundedOutOfOrderness(5.0).bound
5.0
>>> Monotonic().bound
0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sluiceway.time.durations import non_negative_seconds

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
        return non_negative_seconds(self.max_out_of_orderness, "max_out_of_orderness")


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
