"""Flow control: adaptive concurrency and circuit breaking for ``map_async``; rate limiters.

See docs/flow-control.md.
"""

from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker, CircuitOpenError

__all__ = ["Adaptive", "CircuitBreaker", "CircuitOpenError"]
