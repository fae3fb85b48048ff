"""Time: the injected clock (system or virtual)."""

from sluiceway.time.clock import Clock, SystemClock, TimerHandle, VirtualClock, yield_now

__all__ = ["Clock", "SystemClock", "TimerHandle", "VirtualClock", "yield_now"]
