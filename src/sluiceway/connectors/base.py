"""Moved: the Source/Sink contract lives in :mod:`sluiceway.core.contract` (issue 21).

This module stays as a re-export so that custom sources and sinks written against the old
path keep working; new code imports from ``sluiceway.core``.
"""

from __future__ import annotations

from sluiceway.core.contract import (
    OPEN_TIMEOUT,
    PartialWriteError,
    Sink,
    SinkContext,
    Source,
    SourceContext,
    check_open_timeout,
    open_limit,
    redact,
)

__all__ = [
    "OPEN_TIMEOUT",
    "PartialWriteError",
    "Sink",
    "SinkContext",
    "Source",
    "SourceContext",
    "check_open_timeout",
    "open_limit",
    "redact",
]
