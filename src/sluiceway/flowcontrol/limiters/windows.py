"""Local rate limiters: pure decisions on a given ``now``, with clock-bound wrappers.

Five algorithms share one interface, :class:`Limiter`:

* ``TokenBucket(rate, burst)``: an average rate with bursts; at most
  ``burst + rate * t`` units in any ``t`` seconds.
* ``LeakyBucket(rate, capacity)``: shaping; a steady outflow of ``rate`` units per
  second, no bursts, at most ``capacity`` units in the bucket.
* ``FixedWindow(limit, window)``: at most ``limit`` units per aligned window
  ``[k * window, (k + 1) * window)``; cheap, but up to ``2 * limit`` across a boundary.
* ``SlidingWindowLog(limit, window)``: at most ``limit`` units in *every* interval of
  ``window`` seconds; exact, one float per unit.
* ``SlidingWindowCounter(limit, window)``: the weighted two-window approximation of a
  sliding window; constant memory, approximate.

**The logic is pure.**  Every decision takes ``now`` -- seconds on a monotonic clock --
and no limiter ever reads a clock to decide:

* ``delay(n, now)``: seconds until ``n`` units could be taken (``0.0``: now).  No effect.
* ``reserve(n, now)``: take ``n`` units at the earliest instant ``>= now`` at which they
  fit *behind every earlier reservation*, record that, and return how long the caller
  must wait before going on (``0.0``: go now).  Reservations are served first come,
  first served: a small request never overtakes a large one that is waiting.
* ``try_take(n, now)``: take ``n`` units only if that needs no wait; True if taken.
* ``try_reserve(n, now)``: reserve only if the limiter accepts the request now: the
  :class:`LeakyBucket` accepts while its queue has room (and returns the wait in the
  queue), the other limiters keep no queue and accept only what needs no wait (``0.0``);
  ``None`` when refused, with nothing recorded.

>>> bucket = TokenBucket(rate=2, burst=3)       # starts full: 3 tokens, +1 every 0.5 s
>>> [bucket.try_take(1, now=0.0) for _ in range(4)]
[True, True, True, False]
>>> bucket.delay(1, now=0.0)
0.5
>>> bucket.reserve(2, now=0.0)                  # 2 tokens are there at t = 1.0
1.0
>>> bucket.delay(1, now=0.0)                    # queued behind that reservation
1.5

Instants closer than :data:`TOLERANCE` (one nanosecond) count as equal, so that decimal
instants behave as written: with ``rate=10``, requests at ``0.1``, ``0.2``, ``0.3`` are
each on time, although ``0.1 + 0.1 + 0.1 != 0.3`` in binary floating point.  ``now``
should not go backwards from call to call; if it does, the limiters still keep their
bounds, but may admit later than necessary.

**The wrappers** use the clock given at construction (``clock=``, by default the
:class:`~sluiceway.time.SystemClock`); a flow re-binds a limiter to its own clock with
:meth:`Limiter.bind`.  ``try_acquire(n)`` is ``try_take(n, clock.monotonic())``;
``await acquire(n)`` reserves and sleeps on the clock; ``async with limiter:`` acquires
one unit.  :class:`KeyedLimiter` keeps one limiter per key and forgets the keys whose
limiter is back to its initial state, so memory stays bounded.

Limiters are not thread-safe: use each from one event loop (or one thread).

Errors: ``ValueError`` for a bad value (a rate <= 0, a burst < 1, an ``n`` the limiter
can never take at once), ``TypeError`` for a value of the wrong type; messages quote the
value and name the limiter.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable
from datetime import timedelta
from itertools import repeat
from types import TracebackType
from typing import Generic, Self, TypeVar

from sluiceway.time.clock import Clock, SystemClock
from sluiceway.time.durations import positive_seconds

__all__ = [
    "TOLERANCE",
    "FixedWindow",
    "KeyedLimiter",
    "LeakyBucket",
    "Limiter",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
]

TOLERANCE = 1e-9
"""Seconds: instants closer than this count as equal (absorbs floating-point rounding)."""

_EPS = TOLERANCE
_NEVER = -math.inf
_SYSTEM_CLOCK = SystemClock()  # the default of every limiter (stateless, so shared)


def _rate(value: object, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{who} rate must be a number of units per second, got {value!r}")
    rate = float(value)
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(
            f"{who} rate must be a finite number > 0 (units per second), got {value!r}"
        )
    return rate


def _units(value: object, who: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who} {what} must be an int >= 1 (units), got {value!r}")
    if value < 1:
        raise ValueError(f"{who} {what} must be an int >= 1 (units), got {value!r}")
    return value


class Limiter(ABC):
    """A rate limiter: pure decisions on ``now``, plus wrappers bound to a clock.

    Subclasses implement the pure methods (:meth:`delay`, :meth:`reserve`,
    :meth:`try_take`, :meth:`idle`); the wrappers (:meth:`try_acquire`, :meth:`acquire`,
    ``async with``) read the bound clock and call them.

    Args:
        clock: the clock the wrappers read and sleep on; ``None`` for the system clock.
    """

    __slots__ = ("_clock", "_monotonic")

    _clock: Clock
    _monotonic: Callable[[], float]

    def __init__(self, clock: Clock | None = None) -> None:
        self.bind(_SYSTEM_CLOCK if clock is None else clock)

    # -- the clock ---------------------------------------------------------------------

    def bind(self, clock: Clock) -> Self:
        """Use ``clock`` for the wrappers from now on; returns the limiter itself.

        The pure methods are not affected (they take ``now``), nor is the recorded
        state, so re-bind only between clocks that agree on ``monotonic()``, or before
        first use (as a flow does when it starts).
        """
        if not isinstance(clock, Clock):
            raise TypeError(f"{type(self).__name__}.bind() needs a sluiceway Clock, got {clock!r}")
        self._clock = clock
        self._monotonic = clock.monotonic
        return self

    @property
    def clock(self) -> Clock:
        """The clock the wrappers use."""
        return self._clock

    # -- the pure interface ------------------------------------------------------------

    @property
    @abstractmethod
    def max_units(self) -> int:
        """The most units one call may ask for (the burst, capacity or limit)."""

    @abstractmethod
    def delay(self, n: int, now: float) -> float:
        """Seconds from ``now`` until ``n`` units could be taken; ``0.0`` if at once.

        Accounts for earlier reservations.  Changes nothing (:meth:`reserve` with the
        same arguments would return the same wait).

        Raises:
            ValueError: ``n < 1`` or ``n > max_units``.
        """

    @abstractmethod
    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` units at the earliest instant ``>= now`` at which they fit.

        The instant comes after every earlier reservation's.  Returns the seconds the
        caller must wait before going on (``0.0``: go now).  The units stay taken even if
        the caller then gives up, so a cancelled wait never lets anyone exceed the limit.

        Raises:
            ValueError: ``n < 1`` or ``n > max_units``.
        """

    @abstractmethod
    def try_take(self, n: int, now: float) -> bool:
        """Take ``n`` units if that needs no wait (``delay(n, now) == 0``); True if taken.

        Raises:
            ValueError: ``n < 1`` or ``n > max_units``.
        """

    def try_reserve(self, n: int, now: float) -> float | None:
        """Reserve ``n`` units if the limiter accepts them now; the wait, or None.

        Only a :class:`LeakyBucket` queues: it accepts while its queue has room and
        returns the wait in the queue.  The other limiters accept only what needs no wait
        (and return ``0.0``).  ``None`` means refused; nothing is recorded then.

        Raises:
            ValueError: ``n < 1`` or ``n > max_units``.
        """
        return 0.0 if self.try_take(n, now) else None

    @abstractmethod
    def idle(self, now: float) -> bool:
        """True when the limiter is back to its initial state at ``now``.

        From then on it behaves exactly like a new one, so it may be dropped and
        rebuilt (which :class:`KeyedLimiter` does).
        """

    # -- the wrappers ------------------------------------------------------------------

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` units now if they are there, without waiting; True if taken."""
        return self.try_take(n, self._monotonic())

    async def acquire(self, n: int = 1) -> None:
        """Wait on the clock until ``n`` units are taken.

        Returns without suspending when they can be taken at once.  If the wait is
        cancelled the units stay taken (see :meth:`reserve`).
        """
        wait = self.reserve(n, self._monotonic())
        if wait > 0.0:
            await self._clock.sleep(wait)

    async def __aenter__(self) -> None:
        await self.acquire(1)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # -- helpers -----------------------------------------------------------------------

    def _check_n(self, n: object) -> int:
        """``n`` as an int in ``1 .. max_units``, or the error that explains why not.

        The methods call this only when the fast check (an exact int in range) fails.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{self!r}: n must be an int >= 1 (units), got {n!r}")
        if n < 1:
            raise ValueError(f"{self!r}: n must be >= 1 unit, got {n}")
        if n > self.max_units:
            raise ValueError(
                f"{self!r} can never take n={n} units at once (at most {self.max_units}); "
                f"split the request into parts of at most {self.max_units} units"
            )
        return int(n)


class TokenBucket(Limiter):
    """A bucket of ``burst`` tokens, refilled at ``rate`` tokens per second.

    Taking ``n`` units takes ``n`` tokens.  The bucket **starts full**, never holds more
    than ``burst`` tokens, and so admits at most ``burst + rate * t`` units in any
    interval of ``t`` seconds: bursts of up to ``burst``, then ``rate`` on average.

    A reservation may take tokens that have not been refilled yet; later requests queue
    behind it.  Internally the state is a single instant (when the bucket is empty, as
    in the generic cell rate algorithm), so each decision is a few float operations.

    ``rate=1, burst=2``, one unit per request (``x`` admitted, ``-`` refused by
    ``try_take``)::

        time        0   0   0   0.5  1   1.5  2   2   2   2
        request     x   x   -   -    x   -    x   -   -   -

    Args:
        rate: tokens added per second (a finite float > 0).
        burst: the bucket size, the most units taken at once (an int >= 1).
        clock: for the wrappers; ``None`` for the system clock.

    >>> b = TokenBucket(rate=1, burst=2)
    >>> [b.try_take(1, t) for t in (0, 0, 0, 0.5, 1, 1.5)]
    [True, True, False, False, True, False]
    >>> b.tokens(2.0)
    1.0
    >>> TokenBucket(rate=0, burst=5)
    Traceback (most recent call last):
        ...
    ValueError: TokenBucket rate must be a finite number > 0 (units per second), got 0
    """

    __slots__ = ("_burst", "_empty_at", "_fill", "_rate")

    def __init__(self, rate: float, burst: int, *, clock: Clock | None = None) -> None:
        self._rate = _rate(rate, "TokenBucket")
        self._burst = _units(burst, "TokenBucket", "burst")
        self._fill = self._burst / self._rate  # seconds to fill from empty
        self._empty_at = _NEVER  # the bucket holds rate * (t - _empty_at) tokens, capped
        super().__init__(clock)

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """The bucket size."""
        return self._burst

    @property
    def max_units(self) -> int:
        return self._burst

    def tokens(self, now: float) -> float:
        """The tokens in the bucket at ``now``; negative while reservations are pending."""
        return min(float(self._burst), (now - self._empty_at) * self._rate)

    def delay(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._burst:
            n = self._check_n(n)
        wait = self._empty_at + n / self._rate - now
        return wait if wait > _EPS else 0.0

    def reserve(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._burst:
            n = self._check_n(n)
        empty_at = self._empty_at
        at = empty_at + n / self._rate  # when the n tokens are there
        if at > now + _EPS:
            self._empty_at = at  # the bucket is empty right after this reservation
            return at - now
        full_since = now - self._fill
        self._empty_at = (empty_at if empty_at > full_since else full_since) + n / self._rate
        return 0.0

    def try_take(self, n: int, now: float) -> bool:
        if type(n) is not int or not 1 <= n <= self._burst:
            n = self._check_n(n)
        empty_at = self._empty_at
        if empty_at + n / self._rate > now + _EPS:
            return False
        full_since = now - self._fill
        self._empty_at = (empty_at if empty_at > full_since else full_since) + n / self._rate
        return True

    def try_acquire(self, n: int = 1) -> bool:
        # try_take, inlined: this is the hot path of a limiter checked per request.
        now = self._monotonic()
        if type(n) is not int or not 1 <= n <= self._burst:
            n = self._check_n(n)
        empty_at = self._empty_at
        if empty_at + n / self._rate > now + _EPS:
            return False
        full_since = now - self._fill
        self._empty_at = (empty_at if empty_at > full_since else full_since) + n / self._rate
        return True

    def idle(self, now: float) -> bool:
        return self._empty_at + self._fill <= now + _EPS

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate!r}, burst={self._burst!r})"


class LeakyBucket(Limiter):
    """A queue that drains at a steady ``rate`` units per second: shaping, no bursts.

    A request of ``n`` units joins the back of the queue and goes on when the units
    ahead of it have drained; its own units then take ``n / rate`` seconds to drain.  So
    admitted requests are spaced by at least ``n / rate`` seconds (``n`` of the earlier
    one), whatever the pattern of arrivals; an idle bucket admits at once.

    ``capacity`` bounds the queue: the units in the bucket -- those still draining and
    those waiting -- never exceed it, so an accepted request waits at most
    ``(capacity - n) / rate`` seconds.  :meth:`try_reserve` refuses a request that does
    not fit (like nginx's ``limit_req`` with ``burst``).  :meth:`reserve` (and so
    :meth:`acquire`) instead waits for room and then for its turn, which ends at the
    same instant as queueing at once: for them the capacity only caps ``n``.
    :meth:`try_take` admits only when the queue is empty.

    ``rate=2`` (one unit every 0.5 s), one unit per request, all arriving at 0::

        arrival     0    0    0    0
        goes on     0    0.5  1.0  1.5     (reserve; try_reserve with capacity=3
                                            refuses the fourth: 3 units are queued)

    Args:
        rate: units drained per second (a finite float > 0).
        capacity: the most units in the bucket (an int >= 1); ``1`` means no queue.
        clock: for the wrappers; ``None`` for the system clock.

    >>> q = LeakyBucket(rate=2, capacity=3)
    >>> [q.try_reserve(1, now=0.0) for _ in range(4)]
    [0.0, 0.5, 1.0, None]
    >>> q.backlog(0.25)
    2.5
    """

    __slots__ = ("_capacity", "_free_at", "_rate")

    def __init__(self, rate: float, capacity: int, *, clock: Clock | None = None) -> None:
        self._rate = _rate(rate, "LeakyBucket")
        self._capacity = _units(capacity, "LeakyBucket", "capacity")
        self._free_at = _NEVER  # when the queue is empty (the outflow is free)
        super().__init__(clock)

    @property
    def rate(self) -> float:
        """Units drained per second."""
        return self._rate

    @property
    def capacity(self) -> int:
        """The most units in the bucket."""
        return self._capacity

    @property
    def max_units(self) -> int:
        return self._capacity

    def backlog(self, now: float) -> float:
        """The units in the bucket at ``now`` (still draining or waiting)."""
        return max(0.0, (self._free_at - now) * self._rate)

    def delay(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._capacity:
            n = self._check_n(n)
        wait = self._free_at - now
        return wait if wait > _EPS else 0.0

    def reserve(self, n: int, now: float) -> float:
        if type(n) is not int or not 1 <= n <= self._capacity:
            n = self._check_n(n)
        free_at = self._free_at
        if free_at > now + _EPS:
            self._free_at = free_at + n / self._rate
            return free_at - now
        self._free_at = (free_at if free_at > now else now) + n / self._rate
        return 0.0

    def try_take(self, n: int, now: float) -> bool:
        if type(n) is not int or not 1 <= n <= self._capacity:
            n = self._check_n(n)
        free_at = self._free_at
        if free_at > now + _EPS:
            return False
        self._free_at = (free_at if free_at > now else now) + n / self._rate
        return True

    def try_reserve(self, n: int, now: float) -> float | None:
        if type(n) is not int or not 1 <= n <= self._capacity:
            n = self._check_n(n)
        # fits when backlog + n <= capacity, i.e. the wait is at most (capacity - n) / rate
        if self._free_at - now > (self._capacity - n) / self._rate + _EPS:
            return None
        return self.reserve(n, now)

    def idle(self, now: float) -> bool:
        return self._free_at <= now + _EPS

    def __repr__(self) -> str:
        return f"LeakyBucket(rate={self._rate!r}, capacity={self._capacity!r})"


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


K = TypeVar("K", bound=Hashable)


class KeyedLimiter(Generic[K]):
    """One limiter per key, e.g. per user: each key has its own limit.

    Limiters are built on first use by ``factory`` (a function returning a *new*
    limiter) and forgotten once idle (back to their initial state, e.g. a full token
    bucket), which changes nothing: a new one behaves the same.  Idle keys are swept
    whenever the number of keys held doubles, so memory stays proportional to the keys
    active recently, at an amortized constant cost per call.

    The methods are those of :class:`Limiter` with a ``key`` first.

    Args:
        factory: builds the limiter of a new key, e.g. ``lambda: TokenBucket(10, 5)``.
            Called once at construction, to check it.
        clock: for the wrappers; ``None`` for the system clock.

    >>> per_user = KeyedLimiter(lambda: TokenBucket(rate=1, burst=1))
    >>> per_user.try_take("ann", 1, now=0.0), per_user.try_take("ann", 1, now=0.0)
    (True, False)
    >>> per_user.try_take("bob", 1, now=0.0)
    True
    >>> per_user.delay("ann", 1, now=0.25)
    0.75
    """

    __slots__ = ("_clock", "_factory", "_fresh", "_limiters", "_monotonic", "_sweep_at")

    _MIN_SWEEP = 64

    def __init__(self, factory: Callable[[], Limiter], *, clock: Clock | None = None) -> None:
        if not callable(factory):
            raise TypeError(
                "KeyedLimiter needs a function that builds a limiter, e.g. "
                f"lambda: TokenBucket(rate=10, burst=5), got {factory!r}"
            )
        self._factory = factory
        self._fresh = self._build()  # a limiter never used: answers delay() for new keys
        self._limiters: dict[K, Limiter] = {}
        self._sweep_at = self._MIN_SWEEP
        self._clock: Clock
        self._monotonic: Callable[[], float]
        self.bind(_SYSTEM_CLOCK if clock is None else clock)

    def _build(self) -> Limiter:
        limiter = self._factory()
        if not isinstance(limiter, Limiter):
            raise TypeError(
                f"KeyedLimiter factory must return a Limiter (e.g. a TokenBucket), got {limiter!r}"
            )
        if limiter is getattr(self, "_fresh", None):
            raise ValueError(
                "KeyedLimiter factory returned the same limiter twice; it must build a new "
                "one per key, e.g. lambda: TokenBucket(rate=10, burst=5)"
            )
        return limiter

    def bind(self, clock: Clock) -> Self:
        """Use ``clock`` for the wrappers; returns the keyed limiter itself."""
        if not isinstance(clock, Clock):
            raise TypeError(f"KeyedLimiter.bind() needs a sluiceway Clock, got {clock!r}")
        self._clock = clock
        self._monotonic = clock.monotonic
        return self

    @property
    def clock(self) -> Clock:
        """The clock the wrappers use."""
        return self._clock

    @property
    def max_units(self) -> int:
        """The most units one call may ask for."""
        return self._fresh.max_units

    @property
    def keys_held(self) -> int:
        """The number of keys currently held (idle ones may linger until a sweep)."""
        return len(self._limiters)

    def _get(self, key: K, now: float) -> Limiter:
        limiter = self._limiters.get(key)
        if limiter is None:
            if len(self._limiters) >= self._sweep_at:
                self._sweep(now)
            limiter = self._limiters[key] = self._build()
        return limiter

    def _sweep(self, now: float) -> None:
        held = self._limiters
        for key in [k for k, lim in held.items() if lim.idle(now)]:
            del held[key]
        self._sweep_at = max(self._MIN_SWEEP, 2 * len(held))

    def delay(self, key: K, n: int, now: float) -> float:
        """:meth:`Limiter.delay` for ``key``."""
        limiter = self._limiters.get(key)
        return (self._fresh if limiter is None else limiter).delay(n, now)

    def reserve(self, key: K, n: int, now: float) -> float:
        """:meth:`Limiter.reserve` for ``key``."""
        n = self._fresh._check_n(n)  # before remembering the key
        return self._get(key, now).reserve(n, now)

    def try_take(self, key: K, n: int, now: float) -> bool:
        """:meth:`Limiter.try_take` for ``key``."""
        n = self._fresh._check_n(n)
        return self._get(key, now).try_take(n, now)

    def try_reserve(self, key: K, n: int, now: float) -> float | None:
        """:meth:`Limiter.try_reserve` for ``key``."""
        n = self._fresh._check_n(n)
        return self._get(key, now).try_reserve(n, now)

    def try_acquire(self, key: K, n: int = 1) -> bool:
        """:meth:`Limiter.try_acquire` for ``key``."""
        return self.try_take(key, n, self._monotonic())

    async def acquire(self, key: K, n: int = 1) -> None:
        """:meth:`Limiter.acquire` for ``key``."""
        wait = self.reserve(key, n, self._monotonic())
        if wait > 0.0:
            await self._clock.sleep(wait)

    def __repr__(self) -> str:
        return f"KeyedLimiter({self._fresh!r}, keys={len(self._limiters)})"
