"""Adaptive concurrency: a limit on calls in flight, driven by measured latency and errors.

An AIMD controller in the spirit of Netflix's concurrency-limits: it learns the service's
latency when it is not loaded (the lowest latency seen), raises the limit by one per
round of calls while latency holds, and cuts it by a factor when the round's latency
rises past ``tolerance`` times that baseline, or when a call fails or times out.  A
round is ``limit`` completed calls.  The limit rises only when it was actually reached
during the round: an idle flow does not inflate it.

The baseline never drifts up under load (that would let the limit creep past the
service's capacity); it is re-learned only when the service is slower even at the lowest
limit: ``baseline_rounds`` overloaded rounds in a row at ``min`` take the latest round's
lowest latency as the new baseline.

Pure logic: :meth:`Adaptive.on_complete` takes the latency measured by the caller.

>>> a = Adaptive(min=1, max=100, initial=10)
>>> for _ in range(10):
...     a.on_complete(0.010, ok=True, in_flight=10)
>>> a.limit                                   # a round at the baseline, saturated: +1
11
>>> for _ in range(11):
...     a.on_complete(0.030, ok=True, in_flight=11)
>>> a.limit                                   # latency tripled: cut by the backoff
8
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Adaptive"]


@dataclass
class Adaptive:
    """Concurrency that adapts: pass ``concurrency=sw.Adaptive()`` to ``map_async``.

    Args:
        min, max: bounds of the limit.
        initial: the starting limit (default: ``min`` * 4, within the bounds).
        tolerance: a round whose mean latency exceeds ``tolerance`` x the baseline counts
            as overload.
        backoff: the factor the limit is multiplied by on overload or failure.
        baseline_rounds: overloaded rounds in a row at the ``min`` limit after which the
            baseline is re-learned (a service that became slower for good).
    """

    min: int = 1
    max: int = 256
    initial: int | None = None
    tolerance: float = 1.5
    backoff: float = 0.8
    baseline_rounds: int = 20
    limit: int = field(init=False)
    _round_n: int = field(init=False, default=0, repr=False)
    _round_sum: float = field(init=False, default=0.0, repr=False)
    _round_min: float = field(init=False, default=math.inf, repr=False)
    _round_failed: bool = field(init=False, default=False, repr=False)
    _round_saturated: bool = field(init=False, default=False, repr=False)
    _base: float = field(init=False, default=math.inf, repr=False)
    _slow_rounds: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Adaptive({name}=...) must be an int >= 1, got {v!r}")
        if self.max < self.min:
            raise ValueError(f"Adaptive: max ({self.max}) < min ({self.min})")
        if not 1.0 < self.tolerance < math.inf:
            raise ValueError(
                f"Adaptive(tolerance=...) must be a finite number > 1.0, got {self.tolerance!r}"
            )
        if not 0.0 < self.backoff < 1.0:
            raise ValueError(f"Adaptive(backoff=...) must be in (0, 1), got {self.backoff!r}")
        rounds = self.baseline_rounds
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ValueError(f"Adaptive(baseline_rounds=...) must be an int >= 1, got {rounds!r}")
        start = self.initial if self.initial is not None else self.min * 4
        self.limit = max(self.min, min(self.max, start))

    @property
    def baseline(self) -> float:
        """The latency of the unloaded service, as learned so far (inf before any round)."""
        return self._base

    def on_complete(self, latency: float, *, ok: bool, in_flight: int) -> None:
        """A call completed after ``latency`` seconds; ``in_flight`` calls were running
        when it started (``in_flight >= limit`` means the limit held the caller back)."""
        self._round_n += 1
        self._round_sum += latency
        self._round_min = min(self._round_min, latency)
        self._round_failed |= not ok
        self._round_saturated |= in_flight >= self.limit
        if self._round_n >= self.limit:
            self._end_round()

    def _end_round(self) -> None:
        mean = self._round_sum / self._round_n
        self._base = min(self._base, self._round_min)
        overloaded = mean > self.tolerance * self._base
        if self._round_failed or overloaded:
            self.limit = max(self.min, min(self.limit - 1, math.floor(self.limit * self.backoff)))
        elif self._round_saturated:
            self.limit = min(self.max, self.limit + 1)
        if overloaded and self.limit == self.min:
            self._slow_rounds += 1
            if self._slow_rounds >= self.baseline_rounds:  # slower even unloaded: re-learn
                self._base = self._round_min
                self._slow_rounds = 0
        else:
            self._slow_rounds = 0
        self._round_n = 0
        self._round_sum = 0.0
        self._round_min = math.inf
        self._round_failed = False
        self._round_saturated = False
