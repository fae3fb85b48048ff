"""Moved: the bounded channel lives in :mod:`sluiceway.core.channel` (issue 21).

Operators, the runtime and the metrics all use it, so it sits in the core layer; this
module stays as a re-export for code written against the old path.
"""

from __future__ import annotations

from sluiceway.core.channel import (
    ChannelReader,
    ChannelStatistics,
    ChannelWriter,
    Overflow,
    TaggedControl,
    open_channel,
)

__all__ = [
    "ChannelReader",
    "ChannelStatistics",
    "ChannelWriter",
    "Overflow",
    "TaggedControl",
    "open_channel",
]
