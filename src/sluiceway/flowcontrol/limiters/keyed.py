"""One limiter per key: :class:`KeyedLimiter` builds them on first use and forgets the
keys whose limiter is back to its initial state, so memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, Self, TypeVar

from sluiceway.flowcontrol.limiters.base import (
    _SYSTEM_CLOCK,
    Limiter,
)
from sluiceway.time.clock import Clock

__all__ = ["KeyedLimiter"]

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

    >>> from sluiceway.flowcontrol.limiters import TokenBucket
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
