"""Local rate limiters (the code lives in :mod:`sluiceway.flowcontrol.limiters.windows`)."""

from sluiceway.flowcontrol.limiters.windows import (
    TOLERANCE,
    FixedWindow,
    KeyedLimiter,
    LeakyBucket,
    Limiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
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
