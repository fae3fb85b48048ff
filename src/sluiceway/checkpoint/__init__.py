"""Checkpoints: the store of complete checkpoints (a SQLite file) and its command line.

The runtime pickles each operator's state into an :class:`OperatorState`, saves them as
one checkpoint with :meth:`CheckpointStore.save`, and on a restart restores
:meth:`CheckpointStore.latest`.  See ``docs/checkpoints.md``.
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
