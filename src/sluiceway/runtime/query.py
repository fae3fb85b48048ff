"""Moved: the queryable-state answers live in :mod:`sluiceway.core.query` (issue 21).

Operators build them and the runtime hands them out, so they sit in the core layer; this
module stays as a re-export for code written against the old path.
"""

from __future__ import annotations

from sluiceway.core.query import KeyState, OpenWindow, StateAnswer, worker_id

__all__ = ["KeyState", "OpenWindow", "StateAnswer", "worker_id"]
