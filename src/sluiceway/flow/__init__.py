"""The logical dataflow and its fluent builder (``sw.Flow``, ``Stream``, ``KeyedStream``).

The classes users meet live in :mod:`sluiceway.flow.stream`; the graph they record in
:mod:`sluiceway.flow.graph`; the argument checks and node building of each operator family
in ``stateless``, ``control``, ``windows``, ``keyed``, ``joins`` and ``io`` (see the
table in :mod:`sluiceway.flow.stream`).  Import the public names from here or from
``sluiceway``.
"""

from sluiceway.flow.graph import Node
from sluiceway.flow.stream import (
    Flow,
    JoinedStream,
    KeyedStream,
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
