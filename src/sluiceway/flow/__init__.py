"""The logical dataflow and its fluent builder (``sw.Flow``, ``Stream``, ``KeyedStream``).

The classes live in :mod:`sluiceway.flow.stream`; import them from here or from
``sluiceway``.
"""

from sluiceway.flow.stream import (
    Flow,
    JoinedStream,
    KeyedStream,
    Node,
    Stream,
    WindowedStream,
    WindowResultStream,
)

__all__ = [
    "Flow",
    "JoinedStream",
    "KeyedStream",
    "Node",
    "Stream",
    "WindowResultStream",
    "WindowedStream",
]
