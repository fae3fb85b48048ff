"""Argument checks and labels shared by the builders of every operator family.

Each check raises at the user's line with the bad value quoted and the fix named; each
label turns a function or a connector into the default part of an operator's name.
"""

from __future__ import annotations

import inspect
import math
import re
import sys

from sluiceway.errors import FlowDefinitionError
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.policies import DeadLetter, ErrorPolicy, Retry
from sluiceway.time.durations import seconds_of

#: The package whose frames :func:`user_location` skips: the builder, all its modules.
_BUILDER = __name__.rsplit(".", 1)[0]


def user_location() -> str:
    """``file:line`` of the first frame outside the builder (where the user called us)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_BUILDER + "."):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:  # pragma: no cover - always a caller
        return "<unknown>"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


def fn_label(fn: object) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    name = "lambda" if name == "<lambda>" else name
    return re.sub(r"\W+", "_", name).strip("_") or "fn"


def class_label(obj: object) -> str:
    """``JsonLinesSource`` -> ``JsonLines``: the class name without a Source/Sink suffix."""
    name = type(obj).__name__
    return re.sub(r"(Source|Sink)$", "", name) or name


def check_callable(fn: object, method: str) -> None:
    if not callable(fn):
        raise TypeError(f"{method}() expects a callable, got {type(fn).__name__} {fn!r}")


def check_breaker(breaker: object, when_open: str, policy: ErrorPolicy, method: str) -> None:
    if breaker is not None and not isinstance(breaker, CircuitBreaker):
        raise TypeError(f"{method}(breaker=...) expects sw.CircuitBreaker, got {breaker!r}")
    if when_open not in ("wait", "dead_letter"):
        raise ValueError(
            f"{method}(when_open=...) must be 'wait' or 'dead_letter', got {when_open!r}"
        )
    final = policy.then if isinstance(policy, Retry) else policy
    if breaker is not None and when_open == "dead_letter" and not isinstance(final, DeadLetter):
        raise FlowDefinitionError(
            f"{method}(when_open='dead_letter') needs on_error=sw.DeadLetter(sink) "
            "(or a Retry that ends in one): the records must go somewhere"
        )


def check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    """Refuse ``value`` unless it is one of ``choices``; ``what`` names the argument, as
    in ``"window_join(how=...)"``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{what} must be {allowed}, got {value!r}")


def is_async_callable(fn: object) -> bool:
    """``async def`` functions and objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an async callable object
    )


def positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value!r}")
    return value


def ticks_of(value: object, what: str, *, signed: bool = False) -> int:
    """A duration (seconds or timedelta) in integer microseconds; negative only if
    ``signed``."""
    s = seconds_of(value, what)
    if not math.isfinite(s) or (s < 0 and not signed):
        rule = "finite" if signed else "finite and >= 0 seconds"
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return round(s * 1_000_000)
