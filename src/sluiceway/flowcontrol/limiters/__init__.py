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

from sluiceway.flowcontrol.limiters.base import TOLERANCE, Limiter
from sluiceway.flowcontrol.limiters.buckets import LeakyBucket, TokenBucket
from sluiceway.flowcontrol.limiters.keyed import KeyedLimiter
from sluiceway.flowcontrol.limiters.windows import (
    FixedWindow,
    SlidingWindowCounter,
    SlidingWindowLog,
)

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
