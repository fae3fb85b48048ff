"""The interface every local limiter has (:class:`Limiter`: the pure decisions on a given
``now`` and the clock-bound wrappers), and the checks of their arguments."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sluiceway.time.clock import Clock, SystemClock

__all__ = ["TOLERANCE", "Limiter"]

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
