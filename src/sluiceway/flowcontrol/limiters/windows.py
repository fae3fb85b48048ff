"""The window limiters: :class:`FixedWindow` (aligned windows), :class:`SlidingWindowLog`
(exact, one instant per unit) and :class:`SlidingWindowCounter` (the weighted two-window
approximation, constant memory)."""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from itertools import repeat

from sluiceway.flowcontrol.limiters.base import (
    _EPS,
    _NEVER,
    Limiter,
    _units,
)
from sluiceway.time.clock import Clock
from sluiceway.time.durations import positive_seconds

__all__ = ["FixedWindow", "SlidingWindowCounter", "SlidingWindowLog"]


def _window(value: object, who: str) -> float:
    return positive_seconds(value, f"{who} window")


class FixedWindow(Limiter):
    """At most ``limit`` units per window; windows are aligned to multiples of ``window``.

    Window ``k`` is ``[k * window, (k + 1) * window)`` on the clock (from clock ``0``,
    the same grid for every limiter with that ``window``).  The count starts again at
    each boundary, so up to ``2 * limit`` units can pass in a short interval across one:
    use a :class:`SlidingWindowLog` or :class:`SlidingWindowCounter` if that matters.
    A request that does not fit is reserved at the start of the next window with room
    (after the windows already reserved, first come, first served).

    ``limit=2, window=1``::

        time        0.1  0.2  0.3  0.9  1.0  1.0  1.0
        request     x    x    -    -    x    x    -

    Args:
        limit: units per window (an int >= 1).
        window: the window length, seconds (float) or ``timedelta``.
        clock: for the wrappers; ``None`` for the system clock.

    >>> w = FixedWindow(limit=2, window=1)
    >>> [w.try_take(1, t) for t in (0.1, 0.2, 0.3, 0.9, 1.0, 1.0, 1.0)]
    [True, True, False, False, True, True, False]
    >>> w.delay(1, now=1.25)
    0.75
    """

    __slots__ = ("_index", "_limit", "_used", "_window")

    def __init__(
        self, limit: int, window: float | timedelta, *, clock: Clock | None = None
    ) -> None:
        self._limit = _units(limit, "FixedWindow", "limit")
        self._window = _window(window, "FixedWindow")
        self._index = _NEVER  # the latest window with units taken (possibly in the future)
        self._used = 0  # units taken in that window
        super().__init__(clock)

    @property
    def limit(self) -> int:
        """Units per window."""
        return self._limit

    @property
    def window(self) -> float:
        """The window length in seconds."""
        return self._window

    @property
    def max_units(self) -> int:
        return self._limit

    def _slot(self, n: int, now: float) -> tuple[float, int, float]:
        """(window index, units used there after taking n, admitted instant)."""
        k = (now + _EPS) // self._window
        index = self._index
        if k > index:
            return k, n, now  # a new window: it always has room for n <= limit
        used = self._used + n
        if used <= self._limit:
            return index, used, (now if index == k else index * self._window)
        return index + 1, n, (index + 1) * self._window

    def delay(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        at = self._slot(n, now)[2]
        return at - now if at > now else 0.0

    def reserve(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        self._index, self._used, at = self._slot(n, now)
        return at - now if at > now else 0.0

    def try_take(self, n: int, now: float) -> bool:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        k = (now + _EPS) // self._window
        if k > self._index:
            self._index = k
            self._used = n
            return True
        if k == self._index and self._used + n <= self._limit:
            self._used += n
            return True
        return False

    def idle(self, now: float) -> bool:
        return (now + _EPS) // self._window > self._index

    def __repr__(self) -> str:
        return f"FixedWindow(limit={self._limit!r}, window={self._window!r})"


class SlidingWindowLog(Limiter):
    """At most ``limit`` units in every interval of ``window`` seconds (exact).

    The limiter remembers the instant of every unit taken in the last ``window``
    seconds, so a unit taken at ``t`` counts until ``t + window`` (excluded): at
    ``t + window`` it has expired.  Exact at any instant, with no boundary effect; the
    price is memory, one float per unit of the last window (``limit`` at most, plus any
    reserved ahead).  For large limits prefer :class:`SlidingWindowCounter`.

    ``limit=2, window=1``::

        time        0.1  0.2  0.3  1.0  1.1  1.15  1.2
        request     x    x    -    -    x    -     x

    Args:
        limit: the most units in any interval of ``window`` (an int >= 1).
        window: the interval length, seconds (float) or ``timedelta``.
        clock: for the wrappers; ``None`` for the system clock.

    >>> log = SlidingWindowLog(limit=2, window=1)
    >>> [log.try_take(1, t) for t in (0.1, 0.2, 0.3, 1.0, 1.1, 1.15, 1.2)]
    [True, True, False, False, True, False, True]
    >>> round(log.delay(1, now=1.5), 9)         # 1.1 expires at 2.1
    0.6
    """

    __slots__ = ("_limit", "_log", "_window")

    def __init__(
        self, limit: int, window: float | timedelta, *, clock: Clock | None = None
    ) -> None:
        self._limit = _units(limit, "SlidingWindowLog", "limit")
        self._window = _window(window, "SlidingWindowLog")
        self._log: deque[float] = deque()  # instants of the units taken, oldest first
        super().__init__(clock)

    @property
    def limit(self) -> int:
        """The most units in any interval of ``window``."""
        return self._limit

    @property
    def window(self) -> float:
        """The interval length in seconds."""
        return self._window

    @property
    def max_units(self) -> int:
        return self._limit

    def count(self, now: float) -> int:
        """The units that count at ``now``: taken in the last window, or reserved ahead."""
        self._earliest(1, now)  # forgets the expired ones
        return len(self._log)

    def _earliest(self, n: int, now: float) -> float:
        """The earliest admitted instant for n units (forgets expired units first).

        First come, first served: not before the latest unit.  In the interval of
        ``window`` ending at that instant, at most ``limit - n`` units may remain, so
        the ``limit - n + 1``-th newest unit must have expired.
        """
        log = self._log
        horizon = now - self._window + _EPS
        while log and log[0] <= horizon:  # expired for every instant >= now
            log.popleft()
        if not log:
            return now
        at = log[-1] if log[-1] > now else now  # first come, first served
        older = self._limit - n + 1
        if len(log) >= older:
            free = log[-older] + self._window
            at = max(at, free)
        return at

    def delay(self, n: int, now: float) -> float:
        """See :meth:`Limiter.delay`; also forgets expired units (which changes nothing)."""
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        wait = self._earliest(n, now) - now
        return wait if wait > _EPS else 0.0

    def reserve(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        at = self._earliest(n, now)
        self._record(n, at)
        wait = at - now
        return wait if wait > _EPS else 0.0

    def try_take(self, n: int, now: float) -> bool:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        at = self._earliest(n, now)
        if at - now > _EPS:
            return False
        self._record(n, at)
        return True

    def _record(self, n: int, at: float) -> None:
        # ``at`` (not ``now``) even when within the tolerance after ``now``: keeps the log
        # sorted, and a unit remembered a little later only expires a little later.
        if n == 1:
            self._log.append(at)
        else:
            self._log.extend(repeat(at, n))

    def idle(self, now: float) -> bool:
        return not self._log or self._log[-1] <= now - self._window + _EPS

    def __repr__(self) -> str:
        return f"SlidingWindowLog(limit={self._limit!r}, window={self._window!r})"


class SlidingWindowCounter(Limiter):
    """A sliding window **approximated** from two fixed-window counts: constant memory.

    Windows are aligned as for :class:`FixedWindow`.  At an instant a fraction ``f`` into
    window ``k``, the units in the sliding window ending now are *estimated* as::

        used(k - 1) * (1 - f) + used(k)

    as if window ``k - 1``'s units had been spread evenly over it, and a request of ``n``
    is admitted when the estimate plus ``n`` is at most ``limit``.  For evenly spaced
    traffic the estimate is about one unit high (a unit at the very start of window
    ``k - 1`` is counted as spread over it), so at exactly ``limit`` units per window
    about ``limit - 1`` get through.  Guarantees: at most ``limit`` units in every aligned
    window, and fewer than ``2 * limit`` in any interval of ``window`` seconds (when
    window ``k - 1``'s units all came at its end); a sliding window log is exact but
    keeps one float per unit.

    ``limit=4, window=1``: 4 units in window 0, then at ``1.5`` the estimate is
    ``4 * 0.5 + 0 = 2``, so 2 more fit::

        time        0.0  0.0  0.0  0.0  1.5  1.5  1.5  1.75
        request     x    x    x    x    x    x    -    x

    Args:
        limit: the most units (estimated) in any interval of ``window`` (an int >= 1).
        window: the window length, seconds (float) or ``timedelta``.
        clock: for the wrappers; ``None`` for the system clock.

    >>> c = SlidingWindowCounter(limit=4, window=1)
    >>> [c.try_take(1, t) for t in (0, 0, 0, 0, 1.5, 1.5, 1.5, 1.75)]
    [True, True, True, True, True, True, False, True]
    """

    __slots__ = ("_index", "_last", "_limit", "_prev", "_used", "_window")

    def __init__(
        self, limit: int, window: float | timedelta, *, clock: Clock | None = None
    ) -> None:
        self._limit = _units(limit, "SlidingWindowCounter", "limit")
        self._window = _window(window, "SlidingWindowCounter")
        self._index = _NEVER  # the latest window with units taken
        self._prev = 0  # units taken in window _index - 1
        self._used = 0  # units taken in window _index
        self._last = _NEVER  # the latest admitted instant (first come, first served)
        super().__init__(clock)

    @property
    def limit(self) -> int:
        """The most units (estimated) in any interval of ``window``."""
        return self._limit

    @property
    def window(self) -> float:
        """The window length in seconds."""
        return self._window

    @property
    def max_units(self) -> int:
        return self._limit

    def _counts(self, k: float) -> tuple[int, int]:
        """(units in window k - 1, units in window k), for k >= the latest window."""
        if k == self._index:
            return self._prev, self._used
        if k == self._index + 1:
            return self._used, 0
        return 0, 0

    def _slot(self, n: int, now: float) -> tuple[float, int, int, float]:
        """(window index, units there before it, units there after n, admitted instant)."""
        w, limit = self._window, self._limit
        start = now if now > self._last else self._last
        k = (start + _EPS) // w
        prev, used = self._counts(k)
        room = limit - n - used  # in window k: need prev * (1 - f) <= room
        if room >= 0:
            if prev <= room:
                return k, prev, used + n, start
            at = (k + 1.0 - room / prev) * w  # room < prev, so before the window's end
            if room > 0:
                return k, prev, used + n, (at if at > start else start)
        # window k + 1, where used(k) is the previous count and nothing is taken yet
        room = limit - n
        if used <= room:
            return k + 1, used, n, (k + 1) * w
        if room > 0:
            return k + 1, used, n, (k + 2.0 - room / used) * w
        return k + 2, 0, n, (k + 2) * w  # n == limit: needs a window with nothing before

    def delay(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        wait = self._slot(n, now)[3] - now
        return wait if wait > _EPS else 0.0

    def reserve(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        slot = self._slot(n, now)
        return self._commit(slot, now)

    def try_take(self, n: int, now: float) -> bool:
        if type(n) is not int or not 1 <= n <= self._limit:
            n = self._check_n(n)
        slot = self._slot(n, now)
        if slot[3] - now > _EPS:
            return False
        self._commit(slot, now)
        return True

    def _commit(self, slot: tuple[float, int, int, float], now: float) -> float:
        self._index, self._prev, self._used, at = slot
        wait = at - now
        if wait > _EPS:
            self._last = at
            return wait
        self._last = max(self._last, now)
        return 0.0

    def estimate(self, now: float) -> float:
        """The estimated units in the sliding window ending at ``now``.

        (Ending at the latest admitted instant instead, if a reservation made that later
        than ``now``.)
        """
        start = now if now > self._last else self._last
        k = (start + _EPS) // self._window
        prev, used = self._counts(k)
        f = min(1.0, max(0.0, start / self._window - k))
        return prev * (1.0 - f) + used

    def idle(self, now: float) -> bool:
        # two windows on, both counts are 0 (the latest admitted instant is behind too)
        return (now + _EPS) // self._window >= self._index + 2

    def __repr__(self) -> str:
        return f"SlidingWindowCounter(limit={self._limit!r}, window={self._window!r})"
