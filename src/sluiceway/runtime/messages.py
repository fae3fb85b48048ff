"""Moved: the in-band messages live in :mod:`sluiceway.core.messages` (issue 21).

This module stays as a re-export so that code written against the old path keeps
working; new code imports from ``sluiceway.core`` (or ``sw.Batch``).
"""

from __future__ import annotations

from sluiceway.core.messages import Barrier, Batch, Control, Watermark

__all__ = ["Barrier", "Batch", "Control", "Watermark"]
