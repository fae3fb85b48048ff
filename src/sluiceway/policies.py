"""Error policies: what an operator does when user code (or a sink, or input) fails.

* :class:`Fail` (the default) stops the flow with an
  :class:`~sluiceway.errors.OperatorError` naming the operator, the record and the cause.
* :class:`Retry` calls again after a :class:`Backoff` (exponential by default, or
  ``kind="linear"``) with jitter on the injected clock, then falls back to ``then``
  (``Fail()`` by default, or a :class:`DeadLetter`).
* :class:`DeadLetter` writes a :class:`DeadLetterRecord` (the record, the exception, the
  operator, the attempt count, the time) to a sink of your choice and goes on.

A record is never silently lost: it is either in the output, in a dead-letter sink, or
the flow stops with an error that names it.

>>> Backoff(initial=0.1, multiplier=2.0, max_delay=1.0, jitter=0.0).delay(4)
0.8
>>> [Backoff(kind="linear", initial=0.5, step=0.25, max_delay=1.0, jitter=0.0).delay(n)
...  for n in (1, 2, 3, 4)]
[0.5, 0.75, 1.0, 1.0]
>>> Retry(attempts=0)
Traceback (most recent call last):
  ...
ValueError: Retry attempts must be >= 1 (the total number of tries), got 0
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sluiceway.core.contract import Sink

__all__ = ["Backoff", "DeadLetter", "DeadLetterRecord", "ErrorPolicy", "Fail", "Retry"]


@dataclass(frozen=True, slots=True)
class Fail:
    """Stop the flow with an error naming the operator, the record and the cause."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: exponential (the default) or linear, capped, with jitter.

    * ``kind="exponential"``: retry ``n`` waits ``initial * multiplier**(n-1)``.
    * ``kind="linear"``: retry ``n`` waits ``initial + step * (n-1)`` (``step`` defaults
      to ``initial``: 0.1, 0.2, 0.3, ...).

    Either way the delay is capped at ``max_delay`` and then scaled by jitter.

    Args:
        kind: ``"exponential"`` or ``"linear"``.
        initial: the delay before the first retry, in seconds.
        multiplier: growth factor per retry (>= 1); exponential only.
        max_delay: cap on any single delay, in seconds.
        jitter: a fraction in [0, 1]; each delay is scaled by a random factor in
            ``[1 - jitter, 1 + jitter]`` (then capped) so that many retrying workers
            do not hammer a service in lock-step.
        step: what each retry adds to the delay (>= 0); linear only.

    Raises:
        ValueError: a negative delay or step, a multiplier below 1, a cap below
            ``initial``, jitter outside [0, 1], an unknown ``kind``, or ``step`` given
            to an exponential backoff.

    >>> Backoff(kind="linear", initial=1.0, jitter=0.0).delay(3)
    3.0
    """

    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2
    kind: Literal["exponential", "linear"] = "exponential"
    step: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("exponential", "linear"):
            raise ValueError(f"Backoff kind must be 'exponential' or 'linear', got {self.kind!r}")
        for name in ("initial", "multiplier", "max_delay", "jitter", "step"):
            value = getattr(self, name)
            if name == "step" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Backoff {name} must be a number, got {value!r}")
            if not math.isfinite(value):  # NaN passes every comparison below
                raise ValueError(f"Backoff {name} must be a finite number, got {value!r}")
        if self.initial < 0:
            raise ValueError(f"Backoff initial delay must be >= 0, got {self.initial!r}")
        if self.multiplier < 1:
            raise ValueError(f"Backoff multiplier must be >= 1, got {self.multiplier!r}")
        if self.max_delay < self.initial:
            raise ValueError(
                f"Backoff max_delay ({self.max_delay!r}) must be >= initial ({self.initial!r})"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff jitter must be in [0, 1], got {self.jitter!r}")
        if self.step is not None:
            if self.kind != "linear":
                raise ValueError(
                    f"Backoff step={self.step!r} applies only to kind='linear'; "
                    "an exponential backoff grows by multiplier="
                )
            if self.step < 0:
                raise ValueError(f"Backoff step must be >= 0, got {self.step!r}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The delay before retry number ``retry`` (1 for the first retry)."""
        n = max(0, retry - 1)
        if self.kind == "linear":
            step = self.initial if self.step is None else self.step
            try:
                added = step * n if step else 0.0
            except OverflowError:  # a retry count too large for a float: long past the cap
                added = math.inf
            base = min(self.max_delay, self.initial + added)
        else:
            try:
                growth = self.multiplier**n
            except OverflowError:  # retry 1,100 of a doubling backoff: long past the cap
                growth = math.inf
            if growth == math.inf:
                base = self.max_delay if self.initial > 0 else 0.0
            else:
                base = min(self.max_delay, self.initial * growth)
        if self.jitter and rng is not None:
            base *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return min(self.max_delay, max(0.0, base))


@dataclass(frozen=True, slots=True, eq=False)
class DeadLetter:
    """Write failed records to ``sink`` as :class:`DeadLetterRecord` objects and go on.

    Args:
        sink: any sink, or a file path (``str`` or ``os.PathLike``), which is short for
            ``sw.sinks.JsonLines(path)``: one JSON object per dead letter, appended.
            Each ``DeadLetter(path)`` opens its own sink; to send several operators'
            dead letters to one file, make the policy once and pass it to each.

    Raises:
        TypeError: ``sink`` is neither a sink nor a path.

    >>> DeadLetter("dlq.jsonl").sink.describe()
    'JsonLines(dlq.jsonl)'
    >>> DeadLetter(42)
    Traceback (most recent call last):
      ...
    TypeError: DeadLetter(sink) needs a sink (e.g. sw.sinks.JsonLines(path)) or a file path, got 42
    """

    sink: Sink

    def __post_init__(self) -> None:
        from sluiceway.connectors.files import JsonLinesSink  # noqa: PLC0415
        from sluiceway.core.contract import Sink  # noqa: PLC0415 - policies stay import-light

        sink: object = self.sink
        if isinstance(sink, str | os.PathLike):
            object.__setattr__(self, "sink", JsonLinesSink(sink))
        elif not isinstance(sink, Sink):
            raise TypeError(
                "DeadLetter(sink) needs a sink (e.g. sw.sinks.JsonLines(path)) or a file path, "
                f"got {sink!r}"
            )


@dataclass(frozen=True, slots=True)
class Retry:
    """Try a failing record again, up to ``attempts`` tries in total.

    Args:
        attempts: total tries including the first (so ``Retry(3)`` retries twice).
        backoff: delays between tries, slept on the flow's clock.
        then: what to do once every try has failed: ``Fail()`` or ``DeadLetter(sink)``.
        retry_on: only these exception types are retried; others go to ``then`` at once.
    """

    attempts: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    then: Fail | DeadLetter = field(default_factory=Fail)
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(
                f"Retry attempts must be a whole number of tries, got {self.attempts!r}"
            )
        if self.attempts < 1:
            raise ValueError(
                f"Retry attempts must be >= 1 (the total number of tries), got {self.attempts!r}"
            )
        if not isinstance(self.then, Fail | DeadLetter):
            raise TypeError(
                f"Retry(then=...) must be Fail() or DeadLetter(sink), got {self.then!r}"
            )


ErrorPolicy = Fail | Retry | DeadLetter


def check_policy(policy: object, where: str) -> ErrorPolicy:
    """Validate an ``on_error=`` argument, with a message naming ``where``."""
    if isinstance(policy, Fail | Retry | DeadLetter):
        return policy
    raise TypeError(
        f"{where}: on_error must be sw.Fail(), sw.Retry(...) or sw.DeadLetter(sink), got {policy!r}"
    )


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A record that could not be processed, with why.

    Attributes:
        record: the original record (for bad input: the raw line or row).
        error_type: the exception's class name.
        error_message: ``str()`` of the exception.
        operator: the operator (or source, or sink) that failed.
        flow: the flow's name.
        attempts: how many times it was tried.
        time: wall-clock time of the final failure, from the flow's clock.
    """

    record: Any
    error_type: str
    error_message: str
    operator: str
    flow: str
    attempts: int
    time: float

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, e.g. for a JSON sink."""
        return asdict(self)
