"""Joins of two keyed streams: window, interval, as-of and temporal joins.

See docs/joins.md.  ``orders.window_join(payments, sw.windows.Tumbling(60))``.
"""

from sluiceway.joins.base import LateJoinRecord

__all__ = ["LateJoinRecord"]
