"""Event-time windows: assigners (tumbling, sliding, session) and the window operator.

See docs/windows.md.  ``stream.window(sw.windows.Tumbling(10)).aggregate(...)``.
"""

from sluiceway.windows.assigners import Session, Sliding, Tumbling, seconds, ticks
from sluiceway.windows.operator import LateRecord, WindowResult

__all__ = [
    "LateRecord",
    "Session",
    "Sliding",
    "Tumbling",
    "WindowResult",
    "seconds",
    "ticks",
]
