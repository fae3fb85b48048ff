"""The bucket limiters: :class:`TokenBucket` (an average rate with bursts) and
:class:`LeakyBucket` (a steady outflow, no bursts, a bounded queue)."""

from __future__ import annotations

from sluiceway.flowcontrol.limiters.base import (
    _EPS,
    _NEVER,
    Limiter,
    _rate,
    _units,
)
from sluiceway.time.clock import Clock

__all__ = ["LeakyBucket", "TokenBucket"]


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
