"""A circuit breaker: stop calling a failing service for a while, then probe it.

States: **closed** (calls go through; ``failure_threshold`` failures in a row open it),
**open** (no calls for ``reset_timeout`` seconds), **half-open** (up to ``half_open_max``
trial calls; one success closes it, one failure opens it again).  Pure logic on ``now``
(seconds of a monotonic clock) -- the operator passes its flow's clock.

>>> b = CircuitBreaker(failure_threshold=2, reset_timeout=10.0)
>>> b.on_failure(now=0.0); b.on_failure(now=1.0); b.state
'open'
>>> b.wait(now=5.0)            # seconds until a trial call is allowed
6.0
>>> b.try_start(now=11.0), b.state
(True, 'half_open')
>>> b.on_success(now=11.5); b.state
'closed'
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sluiceway.time import Clock
from sluiceway.time.durations import positive_seconds

__all__ = ["CircuitBreaker", "CircuitOpenError", "watch_breaker"]

log = logging.getLogger("sluiceway")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitOpenError(Exception):
    """A call was not made because the circuit breaker is open."""


class CircuitBreaker:
    """Args:
    failure_threshold: consecutive failures that open the circuit.
    reset_timeout: seconds (or timedelta) the circuit stays open before a trial.
    half_open_max: trial calls allowed at once while half-open.
    name: for log lines and errors.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        half_open_max: int = 1,
        *,
        name: str = "circuit",
    ) -> None:
        for what, v in (("failure_threshold", failure_threshold), ("half_open_max", half_open_max)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CircuitBreaker({what}=...) must be an int >= 1, got {v!r}")
        self.failure_threshold = failure_threshold
        self.reset_timeout = positive_seconds(reset_timeout, "CircuitBreaker reset_timeout")
        self.half_open_max = half_open_max
        self.name = name
        self.state = CLOSED
        self.failures = 0  # in a row
        self.opened_at = 0.0
        self.trials = 0  # in flight while half-open
        self.transitions = 0  # state changes so far (a metric)
        self._listeners: list[Callable[[str, str], None]] = []

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(old, new)`` on every state change (operators keep metrics)."""
        self._listeners.append(listener)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, {self.state})"

    def _set(self, state: str, why: str) -> None:
        old, self.state = self.state, state
        self.transitions += 1
        log.warning("circuit breaker %r: %s -> %s (%s)", self.name, old, state, why)
        for listener in self._listeners:
            listener(old, state)

    def wait(self, now: float) -> float:
        """Seconds until a call may start (0.0: now)."""
        if self.state == OPEN:
            return max(0.0, self.opened_at + self.reset_timeout - now)
        if self.state == HALF_OPEN and self.trials >= self.half_open_max:
            return self.reset_timeout  # until a trial reports back; re-checked then
        return 0.0

    def try_start(self, now: float) -> bool:
        """Whether a call may start now; if so, it counts as started."""
        if self.state == OPEN:
            if now < self.opened_at + self.reset_timeout:
                return False
            self._set(HALF_OPEN, f"{self.reset_timeout:g}s passed: trying again")
            self.trials = 0
        if self.state == HALF_OPEN:
            if self.trials >= self.half_open_max:
                return False
            self.trials += 1
        return True

    async def enter(self, clock: Clock, when_open: str) -> None:
        """Start a call through the breaker: wait while it is open (``"wait"``), or
        raise :class:`CircuitOpenError` (``"dead_letter"``: the caller's error policy
        sends the record on)."""
        while not self.try_start(clock.monotonic()):
            if when_open == "dead_letter":
                raise CircuitOpenError(f"circuit breaker {self.name!r} is open")
            await clock.sleep(max(self.wait(clock.monotonic()), 0.001))

    def on_success(self, now: float) -> None:
        """A call that started completed successfully."""
        self.failures = 0
        if self.state == HALF_OPEN:
            self.trials = max(0, self.trials - 1)
            self._set(CLOSED, "a trial call succeeded")

    def on_failure(self, now: float) -> None:
        """A call that started failed (an error or a timeout)."""
        self.failures += 1
        if self.state == HALF_OPEN:
            self.trials = max(0, self.trials - 1)
            self.opened_at = now
            self._set(OPEN, "a trial call failed")
        elif self.state == CLOSED and self.failures >= self.failure_threshold:
            self.opened_at = now
            self._set(OPEN, f"{self.failures} failures in a row")


def watch_breaker(breaker: CircuitBreaker, metrics: Any) -> None:
    """Keep an operator's ``circuit_state`` / ``circuit_opens`` metrics up to date."""
    metrics.circuit_state = breaker.state

    def changed(old: str, new: str) -> None:
        metrics.circuit_state = new
        if new == OPEN:
            metrics.circuit_opens += 1

    breaker.subscribe(changed)
