"""The bytes of a checkpoint's incremental state: change sets as segments, and their fold.

Every byte the runtime stores goes through :func:`encode_value` / :func:`decode_value`
(and, for the per-partition change sets of incremental steps, :func:`encode_changes` /
:func:`decode_changes` on top of them); compaction re-encodes through
:func:`fold_segments`, in the flow's checkpoint thread or in the compactor's process
(:mod:`sluiceway.runtime.compactor`).  A codec that signs or encrypts parts plugs in
here, once.
"""

from __future__ import annotations

import pickle
from collections.abc import Hashable, Sequence
from itertools import islice
from typing import Any, Final

from sluiceway.core.delta import Changes, Incremental, Partition, fold_incremental

__all__ = [
    "decode_changes",
    "decode_value",
    "encode_changes",
    "encode_value",
    "fold_segments",
    "partition_key",
    "partition_of",
    "unchain",
]

_CHANGES: Final = "sluiceway-changes-1"
_CHUNK: Final = 20_000
"""Keys pickled per call when serialising a change set in the worker thread: the event
loop's thread can take the GIL back between two calls (a pickle call holds it)."""


def encode_value(value: Any) -> bytes:
    """The stored bytes of one state value (a whole part, a chunk of a change set)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def decode_value(data: bytes) -> Any:
    """The inverse of :func:`encode_value` (only ever given the store's own bytes)."""
    return pickle.loads(data)


def encode_changes(changes: Changes) -> bytes:
    """One partition's :class:`Changes` as a segment: the upserts in dicts of ``_CHUNK``
    keys, so that serialising millions of keys in a worker thread leaves the event loop
    the GIL between chunks (dicts pickle faster and smaller than lists of pairs)."""
    items = iter(changes.upserts.items())
    chunks: list[bytes] = []
    while chunk := dict(islice(items, _CHUNK)):
        chunks.append(encode_value(chunk))
    return encode_value((_CHANGES, changes.whole, chunks, changes.deletes, changes.extra))


def decode_changes(data: bytes) -> Changes:
    """The inverse of :func:`encode_changes`."""
    _, whole, chunks, deletes, extra = _segment(data)
    upserts: dict[Hashable, Any] = {}
    for chunk in chunks:
        upserts.update(decode_value(chunk))
    return Changes(whole, upserts, deletes, extra)


def fold_segments(blobs: Sequence[bytes]) -> bytes:
    """Compaction's fold: a stored chain (a base, then deltas) -> the stored base of the
    same state.  Runs in the store's thread on what is stored, never on live state.

    The same result as :func:`~sluiceway.core.delta.fold` over the chain, without
    building the whole state: the deltas are folded into one net change, each chunk of
    the base loses the keys that change wrote or deleted (a chunk nothing touched keeps
    its bytes as they are), and the net upserts follow as new chunks."""
    tag, whole, chunks, deletes, extra = _segment(blobs[0])
    if not whole or deletes:
        raise ValueError("a stored chain must start with a whole base")
    upserts: dict[Hashable, Any] = {}
    deleted: set[Hashable] = set()
    for blob in blobs[1:]:
        later = decode_changes(blob)
        if later.whole:
            raise ValueError("a stored chain holds a whole state after its base")
        for key in later.deletes:
            upserts.pop(key, None)
        deleted |= later.deletes
        deleted.difference_update(later.upserts.keys())
        upserts.update(later.upserts)
        extra = later.extra
    touched = deleted | upserts.keys()
    kept: list[bytes] = []
    small: dict[Hashable, Any] = {}
    for blob in chunks:
        if not touched:
            kept.append(blob)
            continue
        chunk = decode_value(blob)
        stale = chunk.keys() & touched
        if not stale:
            kept.append(blob)
            continue
        for key in stale:
            del chunk[key]
        small.update(chunk)  # shrunken chunks are merged, so chunks stay about _CHUNK keys
        if len(small) >= _CHUNK:
            kept.append(encode_value(small))
            small = {}
    small.update(upserts)
    rest = encode_changes(Changes(True, small))
    return encode_value((tag, True, kept + _segment(rest)[2], frozenset(), extra))


def _segment(data: bytes) -> tuple[str, bool, list[bytes], frozenset[Hashable], Any]:
    """A segment's header and its chunks, still encoded."""
    found = decode_value(data)
    if not (isinstance(found, tuple) and len(found) == 5 and found[0] == _CHANGES):
        raise ValueError(f"not a change set of format {_CHANGES!r}")
    return found


def unchain(chains: dict[str, tuple[bytes, ...]]) -> Incremental:
    """A stored incremental part -> the whole :class:`Incremental` a step restores."""
    base = {partition_of(key): decode_changes(chain[0]) for key, chain in chains.items()}
    later = [
        Incremental({partition_of(key): decode_changes(chain[i])})
        for key, chain in chains.items()
        for i in range(1, len(chain))
    ]
    return fold_incremental(Incremental(base), *later)


def partition_key(partition: Partition) -> str:
    """How the store names a partition: ``"-"`` for None (an unpartitioned flow)."""
    return "-" if partition is None else str(partition)


def partition_of(key: str) -> Partition:
    """The inverse of :func:`partition_key`."""
    return None if key == "-" else int(key)
