"""A latency histogram cheap enough for the hot path: log buckets, one call per batch.

Buckets are quarter-octaves of microseconds (each bucket's upper bound is 2^(1/4) ~ 1.19
times the previous one), so a percentile read from them is within 19 % of the true
value.  ``observe(seconds, n)`` records ``n`` records that each took ``seconds`` -- a
stage times a whole batch once.

>>> h = LatencyHistogram()
>>> h.observe(0.001, 99); h.observe(0.1, 1)
>>> round(h.percentile(50), 4), round(h.percentile(99), 4), round(h.percentile(100), 3)
(0.001, 0.001, 0.11)
>>> h.count
100
"""

from __future__ import annotations

import math

__all__ = ["LatencyHistogram"]

_PER_OCTAVE = 4
_BUCKETS = 40 * _PER_OCTAVE  # 1 us .. 2^40 us (12 days)


class LatencyHistogram:
    """Counts of records per latency bucket."""

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts = [0] * (_BUCKETS + 1)
        self.count = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` records, each ``seconds`` long."""
        us = seconds * 1e6
        i = 0 if us <= 1.0 else min(_BUCKETS, math.ceil(math.log2(us) * _PER_OCTAVE))
        self.counts[i] += n
        self.count += n

    def percentile(self, q: float) -> float:
        """The latency (seconds) at or below which ``q`` % of records fall (an upper
        bound: the bucket's); NaN when empty."""
        if not self.count:
            return math.nan
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return 2 ** (i / _PER_OCTAVE) / 1e6
        return math.inf  # pragma: no cover - rank <= count
