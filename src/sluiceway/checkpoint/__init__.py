"""Checkpoints: the store of complete checkpoints (a SQLite file) and its command line.

The runtime encodes and signs each operator's state into an :class:`OperatorState`
(:mod:`sluiceway.checkpoint.codec`, with a key from :mod:`sluiceway.checkpoint.keys`),
saves them as one checkpoint with :meth:`CheckpointStore.save`, and on a restart
verifies every part of :meth:`CheckpointStore.latest` before it decodes any.  See
``docs/checkpoints.md``.
"""

from sluiceway.checkpoint.store import (
    FORMAT_VERSION,
    ChainInfo,
    Checkpoint,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStore,
    OperatorState,
    PartInfo,
    Segment,
)

__all__ = [
    "FORMAT_VERSION",
    "ChainInfo",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "OperatorState",
    "PartInfo",
    "Segment",
]
