"""Event-time windows: assigners (tumbling, sliding, session) and their arithmetic.

Work in progress for the windows feature: the assigners and session merging are
complete and tested; the ``window()`` operator that uses them is not built yet, so
nothing here is exported from ``sluiceway`` itself.
"""

from sluiceway.windows.assigners import Session, Sessions, Sliding, Tumbling, seconds, ticks

__all__ = ["Session", "Sessions", "Sliding", "Tumbling", "seconds", "ticks"]
