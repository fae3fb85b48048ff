"""Flow control: adaptive concurrency and circuit breaking for ``map_async``; rate limiters;
load rules (:class:`LoadPolicy`).

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
from sluiceway.flowcontrol.load import (
    LimitRate,
    LoadPolicy,
    LoadRule,
    RejectAdmission,
    ShrinkFetch,
    WantMoreInstances,
)

__all__ = [
    "Adaptive",
    "CircuitBreaker",
    "CircuitOpenError",
    "FixedWindow",
    "KeyedLimiter",
    "LeakyBucket",
    "LimitRate",
    "Limiter",
    "LoadPolicy",
    "LoadRule",
    "RejectAdmission",
    "ShrinkFetch",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
    "WantMoreInstances",
]
