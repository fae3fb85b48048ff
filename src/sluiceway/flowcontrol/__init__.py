"""Flow control: adaptive concurrency and circuit breaking for ``map_async``; rate limiters.

See docs/flow-control.md.
"""

from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker, CircuitOpenError
from sluiceway.flowcontrol.limiters import (
    FixedWindow,
    KeyedLimiter,
    LeakyBucket,
    Limiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)

__all__ = [
    "Adaptive",
    "CircuitBreaker",
    "CircuitOpenError",
    "FixedWindow",
    "KeyedLimiter",
    "LeakyBucket",
    "Limiter",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
]
